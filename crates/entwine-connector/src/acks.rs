//! Acknowledgement bookkeeping, apart from the MQTT client: which finished messages may be
//! acknowledged now. The caller passes the acknowledging function (the client's `try_ack`), so
//! the rules are tested here without a broker.

use std::collections::VecDeque;

use rumqttc::{Publish, QoS};

use crate::AckOrder;

/// Acknowledgements, by default in the order the messages arrived, as MQTT 3.1.1 §4.6 requires
/// (rumqttd, the embedded broker, drops a client that acknowledges out of order). Lanes finish
/// messages in any order; with [`AckOrder::Arrival`] a finished message is acknowledged once
/// every message that arrived before it is finished too.
pub(crate) struct Acks {
    next: u64,
    /// Messages admitted and not acknowledged yet: number, message, finished.
    pending: VecDeque<(u64, Publish, bool)>,
    order: AckOrder,
}

impl Acks {
    pub(crate) fn new(order: AckOrder) -> Self {
        Self {
            next: 0,
            pending: VecDeque::new(),
            order,
        }
    }

    /// Numbers a message as it arrives; QoS 0 messages need no acknowledgement.
    pub(crate) fn admit(&mut self, publish: &Publish) -> u64 {
        let seq = self.next;
        self.next += 1;
        if publish.qos != QoS::AtMostOnce {
            self.pending.push_back((seq, publish.clone(), false));
        }
        seq
    }

    /// Marks `seq` finished and acknowledges what may be (see [`Acks::flush`]). Numbers from an
    /// earlier connection are ignored: the broker delivers those messages again.
    pub(crate) fn finish(&mut self, seq: u64, ack: impl FnMut(&Publish) -> bool) {
        if let Some(entry) = self.pending.iter_mut().find(|(s, _, _)| *s == seq) {
            entry.2 = true;
        }
        self.flush(ack);
    }

    /// Acknowledges, through `ack`, every finished message the order allows: the finished
    /// prefix in arrival order, every finished one in completion order. `ack` answers whether
    /// the acknowledgement was queued; one that was not (the client's queue is full) is tried
    /// again at the next flush, and in arrival order nothing after it goes first.
    pub(crate) fn flush(&mut self, mut ack: impl FnMut(&Publish) -> bool) {
        match self.order {
            AckOrder::Arrival => {
                while let Some((_, publish, true)) = self.pending.front() {
                    // Never wait here: this runs on the event loop, which empties the queue.
                    if !ack(publish) {
                        return;
                    }
                    self.pending.pop_front();
                }
            }
            AckOrder::Completion => self
                .pending
                .retain(|(_, publish, done)| !(*done && ack(publish))),
        }
    }

    /// The connection dropped: the broker will deliver every unacknowledged message again.
    pub(crate) fn reset(&mut self) {
        self.pending.clear();
    }

    /// Messages admitted and not acknowledged.
    pub(crate) fn outstanding(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(pkid: u16, qos: QoS) -> Publish {
        let mut publish = Publish::new(format!("device/d{pkid}/telemetry/device_state"), qos, "{}");
        publish.pkid = pkid;
        publish
    }

    /// Admits messages with packet ids 1..=n (QoS 1); answers their numbers.
    fn admitted(acks: &mut Acks, n: u16) -> Vec<u64> {
        (1..=n)
            .map(|pkid| acks.admit(&message(pkid, QoS::AtLeastOnce)))
            .collect()
    }

    #[test]
    fn arrival_order_acknowledges_only_the_finished_prefix() {
        let mut acks = Acks::new(AckOrder::Arrival);
        let seqs = admitted(&mut acks, 4);
        let mut sent = Vec::new();
        acks.finish(seqs[2], |p| {
            sent.push(p.pkid);
            true
        });
        acks.finish(seqs[1], |p| {
            sent.push(p.pkid);
            true
        });
        assert!(sent.is_empty(), "nothing before the first is finished");
        acks.finish(seqs[0], |p| {
            sent.push(p.pkid);
            true
        });
        assert_eq!(sent, [1, 2, 3]);
        assert_eq!(acks.outstanding(), 1);
        acks.finish(seqs[3], |p| {
            sent.push(p.pkid);
            true
        });
        assert_eq!(sent, [1, 2, 3, 4]);
        assert_eq!(acks.outstanding(), 0);
    }

    #[test]
    fn completion_order_acknowledges_each_as_it_finishes() {
        let mut acks = Acks::new(AckOrder::Completion);
        let seqs = admitted(&mut acks, 3);
        let mut sent = Vec::new();
        for i in [2, 0, 1] {
            acks.finish(seqs[i], |p| {
                sent.push(p.pkid);
                true
            });
        }
        assert_eq!(sent, [3, 1, 2]);
        assert_eq!(acks.outstanding(), 0);
    }

    #[test]
    fn a_full_client_queue_keeps_the_acknowledgement_for_the_next_flush() {
        let mut acks = Acks::new(AckOrder::Arrival);
        let seqs = admitted(&mut acks, 2);
        acks.finish(seqs[0], |_| false);
        acks.finish(seqs[1], |_| false);
        assert_eq!(acks.outstanding(), 2, "none was queued");
        let mut sent = Vec::new();
        acks.flush(|p| {
            sent.push(p.pkid);
            true
        });
        assert_eq!(sent, [1, 2], "both, still in arrival order");

        // In completion order the one the queue refused waits; the other goes.
        let mut acks = Acks::new(AckOrder::Completion);
        let seqs = admitted(&mut acks, 2);
        acks.finish(seqs[0], |_| false);
        let mut sent = Vec::new();
        acks.finish(seqs[1], |p| {
            sent.push(p.pkid);
            p.pkid != 1
        });
        assert_eq!(sent, [1, 2]);
        assert_eq!(acks.outstanding(), 1);
    }

    #[test]
    fn qos0_needs_no_acknowledgement_and_a_reconnection_forgets_earlier_numbers() {
        let mut acks = Acks::new(AckOrder::Arrival);
        let first = acks.admit(&message(1, QoS::AtMostOnce));
        assert_eq!(acks.outstanding(), 0);
        let seqs = admitted(&mut acks, 2);
        assert_eq!(seqs, [first + 1, first + 2], "numbers go on across QoS");
        acks.reset();
        assert_eq!(acks.outstanding(), 0);
        // A lane finishing a message of the old connection acknowledges nothing: the broker
        // delivers it again under a new number.
        let mut sent = Vec::new();
        acks.finish(seqs[0], |p| {
            sent.push(p.pkid);
            true
        });
        assert!(sent.is_empty());
        let again = acks.admit(&message(1, QoS::AtLeastOnce));
        assert!(again > seqs[1]);
        acks.finish(again, |p| {
            sent.push(p.pkid);
            true
        });
        assert_eq!(sent, [1]);
    }
}
