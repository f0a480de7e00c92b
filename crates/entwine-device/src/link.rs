//! One shared MQTT connection of a fleet: a bounded outbox in front of rumqttc, on a persistent
//! session, that counts a message as published only once the broker has it.
//!
//! # What rumqttc 0.25 does, and what this module adds
//! - On a connection error, `EventLoop::poll` moves the QoS 1 publishes awaiting their PUBACK
//!   (`MqttState::clean`) *and every request still in the client's channel* into
//!   `EventLoop::pending`; at the next CONNACK it re-sends `pending` first (in-flight ones with
//!   their packet id) when the broker answers `session_present`, and **clears it** otherwise. A
//!   clean session is never present, so with `clean_session(true)` everything in flight or
//!   queued at the drop was lost. We connect with `clean_session(false)` and a stable client id,
//!   so a broker that kept the session gets rumqttc's re-sends; and because a broker that lost
//!   it (a restart without saved state) makes rumqttc drop them, this outbox keeps its own copy
//!   of every message until it is acknowledged and queues again, in order, what rumqttc dropped.
//! - Events rumqttc had buffered when the error struck (`MqttState::events`) would be returned
//!   only after the next CONNACK; they are drained and accounted for at the error instead.
//! - A request with no packet id yet that `pending` holds before an in-flight re-send could take
//!   the packet id of a message still to be re-sent; `pending` is reordered at each error so that
//!   re-sends go first.
//!
//! A message is `published` when the broker acknowledged it (PUBACK, QoS 1) or, at QoS 0, when it
//! was written to the socket. The outbox holds at most [`Delivery::buffer_bytes`] of messages
//! (waiting, or handed to the client and not acknowledged); a message that does not fit is
//! counted as [`Unsent::BufferFull`], so memory stays bounded under any outage and a device's
//! timers never wait. At most [`WINDOW`] messages are handed to the client at a time, so
//! rumqttc's own copies add at most that many messages (each at most 128 KiB, the packet limit)
//! to the buffer's bound.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use entwine_core::retry;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, Request, SubscribeFilter,
};
use tokio_util::sync::CancellationToken;

use crate::fleet::FleetStats;

/// First wait before reconnecting to a broker that went away; it doubles on each failed attempt
/// up to [`RECONNECT_BACKOFF_MAX`], and each wait is drawn uniformly from its upper half
/// (jitter), so a fleet's connections do not reconnect in step: entwine's one retry policy,
/// [`entwine_core::retry::policy`].
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between two reconnection attempts (jitter included: no wait is longer).
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a stopping fleet's connections still try to deliver what they hold; what is left
/// then is counted as [`Unsent::Stopped`].
pub const STOP_GRACE_FOR_QUEUED: Duration = Duration::from_secs(2);
/// Default [`Delivery::buffer_bytes`]: 16 MiB per connection.
pub const DEFAULT_BUFFER_BYTES: usize = 16 * 1024 * 1024;
/// Messages a connection hands to its MQTT client at a time (queued in the client's channel or
/// awaiting their PUBACK); the rest wait in the outbox.
pub const WINDOW: usize = 100;
/// Bytes counted for a message beyond its topic and payload (its bookkeeping).
const MESSAGE_OVERHEAD: usize = 64;

/// How a fleet's connections name their sessions and how much they hold while the broker is
/// away.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// MQTT client id: a single device's connection uses it as it is (default: the device id);
    /// a fleet's connection `i` uses `<client_id>-<i>` (default `<prefix>-fleet-<i>`). Stable, so
    /// the broker keeps one persistent session per connection; two fleets with the same prefix
    /// on one broker must therefore be given different ids.
    pub client_id: Option<String>,
    /// Most bytes of messages (topic, payload and 64 bytes of bookkeeping each) one connection
    /// holds until the broker acknowledges them; a message beyond is counted as
    /// [`Unsent::BufferFull`].
    pub buffer_bytes: usize,
    /// How the connections log in and encrypt (`mqtt.*`).
    pub mqtt: entwine_mqtt::MqttSecurity,
    /// Each device's own credentials (`mqtt.credentials_file`): every device then has a
    /// connection of its own, logged in as its id, so the broker's ACL can hold it to its own
    /// topics. Replaces `mqtt`'s user name and password; its TLS settings stay.
    pub device_credentials: Option<entwine_mqtt::DeviceCredentials>,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            client_id: None,
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            mqtt: entwine_mqtt::MqttSecurity::none(),
            device_credentials: None,
        }
    }
}

/// Why a message due from a device's timers was not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsent {
    /// Its connection's buffer was full (the broker away for long, or too slow).
    BufferFull,
    /// A QoS 0 message whose write to the socket failed when the connection dropped.
    ConnectionLost,
    /// The device's task ran so late that its timer skipped the tick.
    TimerLate,
    /// Still held (not acknowledged) when the fleet stopped, after [`STOP_GRACE_FOR_QUEUED`].
    Stopped,
}

impl Unsent {
    /// Every reason, in the order of [`FleetStats::unsent`].
    pub const ALL: [Self; 4] = [
        Self::BufferFull,
        Self::ConnectionLost,
        Self::TimerLate,
        Self::Stopped,
    ];

    /// The reason's name, in `GET /stats` and the metric's `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BufferFull => "buffer_full",
            Self::ConnectionLost => "connection_lost",
            Self::TimerLate => "timer_late",
            Self::Stopped => "stopped",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

struct Message {
    topic: String,
    payload: Vec<u8>,
    aggregated: bool,
    /// Order of arrival in the outbox, to queue again in order.
    seq: u64,
}

impl Message {
    fn size(&self) -> usize {
        self.topic.len() + self.payload.len() + MESSAGE_OVERHEAD
    }
}

#[derive(Default)]
struct Link {
    connected: bool,
    /// Connected at least once: a CONNACK without a session after that means the broker lost it.
    was_connected: bool,
    /// The fleet is stopping: no new message, disconnect once everything is delivered.
    closing: bool,
    disconnect_sent: bool,
    /// Not yet handed to the client.
    waiting: VecDeque<Message>,
    /// Handed to the client (its channel, or rumqttc's `pending`), no packet id seen yet.
    handed: VecDeque<Message>,
    /// QoS 1, written with this packet id, awaiting the PUBACK.
    written: HashMap<u16, Message>,
    bytes: usize,
    next_seq: u64,
    /// What was last added to the fleet's `queued` and `in_flight` gauges.
    reported: (usize, usize),
}

impl Link {
    fn held(&self) -> usize {
        self.waiting.len() + self.handed.len() + self.written.len()
    }

    fn in_flight(&self) -> usize {
        self.handed.len() + self.written.len()
    }
}

/// The devices' side of a connection: they offer messages, which never waits.
pub(crate) struct Outbox {
    link: Mutex<Link>,
    client: AsyncClient,
    qos: QoS,
    budget: usize,
    stats: Arc<FleetStats>,
}

impl Outbox {
    pub(crate) fn new(
        client: AsyncClient,
        qos: QoS,
        budget: usize,
        stats: Arc<FleetStats>,
    ) -> Self {
        Self {
            link: Mutex::new(Link::default()),
            client,
            qos,
            budget,
            stats,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Link> {
        // A panic while holding the lock leaves consistent enough counters to carry on.
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a message for the broker, or counts it as unsent when the buffer is full or the
    /// connection has stopped. Never waits.
    pub(crate) fn offer(&self, topic: String, payload: Vec<u8>, aggregated: bool) {
        let mut link = self.lock();
        if link.closing {
            drop(link);
            self.stats.count_unsent(Unsent::Stopped, 1);
            return;
        }
        let message = Message {
            topic,
            payload,
            aggregated,
            seq: link.next_seq,
        };
        if link.bytes + message.size() > self.budget {
            drop(link);
            self.stats.count_unsent(Unsent::BufferFull, 1);
            return;
        }
        link.next_seq += 1;
        link.bytes += message.size();
        link.waiting.push_back(message);
        self.pump(&mut link);
        self.report(&mut link);
    }

    /// Hands waiting messages to the client while connected and the window has room. The
    /// client's channel has room for the window and the control requests, so `try_publish`
    /// fails only when the event loop is gone.
    fn pump(&self, link: &mut Link) {
        while link.connected && link.in_flight() < WINDOW {
            let Some(message) = link.waiting.pop_front() else {
                break;
            };
            let handed = self.client.try_publish(
                message.topic.clone(),
                self.qos,
                false,
                message.payload.clone(),
            );
            if handed.is_err() {
                link.waiting.push_front(message);
                break;
            }
            link.handed.push_back(message);
        }
    }

    /// Brings the fleet's `queued` and `in_flight` gauges up to date with this link.
    fn report(&self, link: &mut Link) {
        let now = (link.held(), link.in_flight());
        let (queued, in_flight) = link.reported;
        adjust(&self.stats.queued, queued, now.0);
        adjust(&self.stats.in_flight, in_flight, now.1);
        metrics::gauge!("entwine_device_queued_messages").increment(now.0 as f64 - queued as f64);
        link.reported = now;
    }

    fn published(&self, link: &mut Link, message: Message) {
        link.bytes -= message.size();
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        if message.aggregated {
            self.stats.aggregated.fetch_add(1, Ordering::Relaxed);
        }
        metrics::counter!("entwine_device_published_total").increment(1);
    }

    /// Accounts for one event of the event loop; `true` when it is the DISCONNECT written.
    /// `failed` marks events rumqttc had buffered when the connection failed: a QoS 0 publish
    /// among them was not written.
    fn on_event(&self, link: &mut Link, event: &Event, failed: bool) -> bool {
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                link.connected = true;
                self.stats.connections.fetch_add(1, Ordering::Relaxed);
                if !ack.session_present {
                    if link.was_connected {
                        self.stats.sessions_lost.fetch_add(1, Ordering::Relaxed);
                    }
                    self.queue_again(link);
                }
                link.was_connected = true;
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(message) = link.written.remove(&ack.pkid) {
                    self.published(link, message);
                }
            }
            Event::Incoming(Packet::Publish(publish)) => {
                self.stats.control_messages.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    topic = %publish.topic,
                    payload = %String::from_utf8_lossy(&publish.payload),
                    "control message"
                );
            }
            Event::Outgoing(Outgoing::Publish(0)) => {
                if let Some(message) = link.handed.pop_front() {
                    if failed {
                        link.bytes -= message.size();
                        self.stats.count_unsent(Unsent::ConnectionLost, 1);
                    } else {
                        self.published(link, message);
                    }
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if link.written.contains_key(pkid) {
                    // rumqttc re-sending, on a session the broker kept.
                    self.stats.resent.fetch_add(1, Ordering::Relaxed);
                } else if let Some(message) = link.handed.pop_front() {
                    link.written.insert(*pkid, message);
                }
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                tracing::warn!(
                    pkid,
                    "the broker acknowledged out of order: packet id collision"
                );
            }
            Event::Outgoing(Outgoing::Disconnect) => return true,
            _ => {}
        }
        false
    }

    /// The broker has no session: rumqttc dropped what it would have re-sent, so everything
    /// handed and not acknowledged waits again, in its first order, ahead of the rest.
    fn queue_again(&self, link: &mut Link) {
        let mut again: Vec<Message> = link.written.drain().map(|(_, m)| m).collect();
        again.extend(link.handed.drain(..));
        if again.is_empty() {
            return;
        }
        again.sort_by_key(|m| m.seq);
        tracing::info!(
            messages = again.len(),
            "the broker has no session for this connection: sending again what it did not acknowledge"
        );
        self.stats
            .resent
            .fetch_add(again.len() as u64, Ordering::Relaxed);
        for message in again.into_iter().rev() {
            link.waiting.push_front(message);
        }
    }

    /// Queues a DISCONNECT once a stopping connection holds nothing more.
    fn disconnect_if_done(&self, link: &mut Link) {
        if link.closing && link.connected && !link.disconnect_sent && link.held() == 0 {
            link.disconnect_sent = self.client.try_disconnect().is_ok();
        }
    }

    /// The connection stopped: what it still holds is counted as unsent.
    fn give_up(&self) -> usize {
        let mut link = self.lock();
        link.closing = true;
        let left = link.held();
        link.waiting.clear();
        link.handed.clear();
        link.written.clear();
        link.bytes = 0;
        self.report(&mut link);
        drop(link);
        self.stats.count_unsent(Unsent::Stopped, left as u64);
        left
    }
}

fn adjust(gauge: &std::sync::atomic::AtomicU64, was: usize, now: usize) {
    if now > was {
        gauge.fetch_add((now - was) as u64, Ordering::Relaxed);
    } else {
        gauge.fetch_sub((was - now) as u64, Ordering::Relaxed);
    }
}

/// The MQTT options of a fleet connection: a persistent session under a stable client id.
pub(crate) fn options(
    client_id: String,
    host: &str,
    port: u16,
    security: &entwine_mqtt::Prepared,
) -> MqttOptions {
    let mut mqtt = MqttOptions::new(client_id, host, port);
    security.apply(&mut mqtt);
    mqtt.set_keep_alive(Duration::from_secs(30));
    mqtt.set_clean_session(false);
    mqtt.set_max_packet_size(128 * 1024, 128 * 1024);
    // Packet ids run up to ten windows before they wrap, so an id comes back into use only
    // long after its message was acknowledged: no collision even if a broker acknowledged out
    // of order.
    mqtt.set_inflight((WINDOW * 10) as u16);
    mqtt
}

/// Capacity of the client's channel: the window plus room for SUBSCRIBE and DISCONNECT.
pub(crate) const CHANNEL_CAPACITY: usize = WINDOW + 8;

/// Polls one connection until the fleet stops: subscribes its devices' control topics whenever
/// the broker has no session, accounts for every publish, reconnects with jittered exponential
/// backoff ([`RECONNECT_BACKOFF_MIN`] to [`RECONNECT_BACKOFF_MAX`]), and on stop delivers what it
/// holds (up to [`STOP_GRACE_FOR_QUEUED`]), disconnects and ends its session.
pub(crate) async fn drive(
    outbox: Arc<Outbox>,
    mut eventloop: EventLoop,
    controls: Vec<String>,
    user: Option<String>,
    stop: CancellationToken,
) {
    // `EventLoop::poll` is not cancel-safe while connected (a publish taken from the channel
    // may be half written), so stopping does not interrupt it: the watcher marks the link
    // closing and queues a DISCONNECT once it is empty, which ends the loop when written.
    let watcher = {
        let outbox = outbox.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            let mut link = outbox.lock();
            link.closing = true;
            outbox.disconnect_if_done(&mut link);
        })
    };
    let grace = async {
        stop.cancelled().await;
        tokio::time::sleep(STOP_GRACE_FOR_QUEUED).await;
    };
    tokio::pin!(grace);
    let mut backoff = retry::delays(RECONNECT_BACKOFF_MIN, RECONNECT_BACKOFF_MAX);
    let mut failed_attempts = 0u64;
    let mut disconnected = false;
    loop {
        let connected = outbox.lock().connected;
        let event = tokio::select! {
            biased;
            () = &mut grace => break,
            // Only while not connected, when dropping a poll loses nothing but an attempt.
            () = stop.cancelled(), if !connected => {
                if outbox.lock().held() == 0 {
                    break;
                }
                // Try to deliver what is held until the grace ends; poll again.
                tokio::select! {
                    () = &mut grace => break,
                    event = eventloop.poll() => event,
                }
            }
            event = eventloop.poll() => event,
        };
        match event {
            Ok(event) => {
                let mut link = outbox.lock();
                if outbox.on_event(&mut link, &event, false) {
                    disconnected = true;
                    break;
                }
                if let Event::Incoming(Packet::ConnAck(ack)) = &event {
                    if failed_attempts > 0 {
                        tracing::info!(
                            failed_attempts,
                            session_present = ack.session_present,
                            "broker connection restored"
                        );
                    }
                    failed_attempts = 0;
                    backoff = retry::delays(RECONNECT_BACKOFF_MIN, RECONNECT_BACKOFF_MAX);
                    if !ack.session_present {
                        let filters: Vec<SubscribeFilter> = controls
                            .iter()
                            .map(|t| SubscribeFilter::new(t.clone(), QoS::AtMostOnce))
                            .collect();
                        if let Err(e) = outbox.client.try_subscribe_many(filters) {
                            tracing::warn!(error = %e, "cannot subscribe to control topics");
                        }
                    }
                }
                outbox.pump(&mut link);
                outbox.disconnect_if_done(&mut link);
                outbox.report(&mut link);
            }
            Err(e) => {
                let (was_connected, nothing_held) = {
                    let mut link = outbox.lock();
                    let was_connected = link.connected;
                    // What rumqttc had buffered would otherwise come after the next CONNACK.
                    let buffered: Vec<Event> = eventloop.state.events.drain(..).collect();
                    for event in &buffered {
                        outbox.on_event(&mut link, event, true);
                    }
                    link.connected = false;
                    link.disconnect_sent = false;
                    // Requests handed between rumqttc's own clean-up and this lock join
                    // `pending` too, behind the others, as they are in `handed`.
                    eventloop.clean();
                    resends_first(&mut eventloop.pending);
                    outbox.report(&mut link);
                    (was_connected, link.held() == 0)
                };
                if stop.is_cancelled() && nothing_held {
                    break;
                }
                outbox
                    .stats
                    .connection_errors
                    .fetch_add(1, Ordering::Relaxed);
                // The policy has no last attempt; the fallback is never reached.
                let wait = backoff.next().unwrap_or(RECONNECT_BACKOFF_MAX);
                if let Some(reason) = entwine_mqtt::refusal(&e, user.as_deref()) {
                    // Retried (the broker's password file may be fixed), but said every time.
                    failed_attempts += 1;
                    outbox.stats.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, retry_in = ?wait, "{reason}");
                } else if was_connected {
                    tracing::warn!(error = %e, "broker connection lost; reconnecting");
                } else {
                    failed_attempts += 1;
                    tracing::debug!(error = %e, retry_in = ?wait, "cannot reach the broker");
                }
                tokio::select! {
                    () = &mut grace => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    watcher.abort();
    let left = outbox.give_up();
    if left > 0 {
        tracing::warn!(
            messages = left,
            "the fleet stopped before the broker acknowledged these messages (counted as unsent: stopped)"
        );
    } else if disconnected {
        end_session(eventloop.mqtt_options.clone()).await;
    }
}

/// Moves the publishes rumqttc will re-send with their packet id ahead of the requests that
/// have none yet, so that a new packet id never equals one still to be re-sent.
fn resends_first(pending: &mut VecDeque<Request>) {
    let (resends, rest): (VecDeque<Request>, VecDeque<Request>) = pending
        .drain(..)
        .partition(|r| matches!(r, Request::Publish(p) if p.pkid != 0));
    pending.extend(resends);
    pending.extend(rest);
}

/// Ends a cleanly stopped connection's persistent session (a connection with a clean session
/// under the same client id), so brokers keep no abandoned session. It held nothing more: no
/// message depends on it.
async fn end_session(mut options: MqttOptions) {
    options.set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(options, 4);
    let ended = tokio::time::timeout(Duration::from_secs(1), async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_disconnect();
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    if ended.is_err() {
        tracing::debug!("the broker did not answer: the session stays until it expires");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resends_go_ahead_of_requests_without_a_packet_id() {
        let publish = |pkid: u16| {
            let mut p = rumqttc::Publish::new("t", QoS::AtLeastOnce, vec![pkid as u8]);
            p.pkid = pkid;
            Request::Publish(p)
        };
        let mut pending = VecDeque::from([publish(0), publish(7), publish(0), publish(8)]);
        resends_first(&mut pending);
        let order: Vec<(u16, u8)> = pending
            .iter()
            .map(|r| match r {
                Request::Publish(p) => (p.pkid, p.payload[0]),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(order, [(7, 7), (8, 8), (0, 0), (0, 0)]);
    }
}
