//! Dead letters: a message the pipeline visibly refused, with why, small whatever the message.
//!
//! A dead letter never embeds the whole payload (a hostile 60 KiB of control bytes would escape
//! to six times its size and no longer fit the broker's limit, and the connector would try to
//! send it for ever): it carries the payload's size, its SHA-256 and a bounded prefix, enough to
//! find the message in a device's log or a capture and to see what it looked like.

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::input::{Fields, InputError};

/// Bytes of the payload a dead letter keeps, at most (before escaping).
pub const PREFIX_BYTES: usize = 512;
/// Characters of a topic a dead letter keeps, at most.
pub const TOPIC_CHARS: usize = 256;
/// Characters of an error message a dead letter keeps, at most.
pub const ERROR_CHARS: usize = 2048;
/// Characters of a stage name, at most.
pub const STAGE_CHARS: usize = 64;

/// A refused message: where it came from, which stage refused it and why, and a fingerprint of
/// its payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// The MQTT topic it arrived on (cut to [`TOPIC_CHARS`]).
    pub topic: String,
    /// The device the topic names, when it names one.
    pub device_id: Option<String>,
    /// What refused it: `topic`, `payload`, or the route of the function that refused it.
    pub stage: String,
    /// The HTTP status of the refusal, when a function answered.
    pub status: Option<u16>,
    /// Why (cut to [`ERROR_CHARS`]).
    pub error: String,
    /// The payload's size in bytes.
    pub payload_bytes: u64,
    /// The payload's SHA-256, lowercase hex.
    pub payload_sha256: String,
    /// The first [`PREFIX_BYTES`] bytes of the payload, as UTF-8 (invalid sequences replaced).
    pub payload_prefix: String,
    /// Whether the payload was longer than its prefix.
    pub truncated: bool,
    /// When it was refused (ms since the Unix epoch).
    pub at: i64,
}

impl DeadLetter {
    /// The dead letter of `payload`, received on `topic`, refused by `stage` at `at_ms`.
    pub fn of(
        topic: &str,
        device_id: Option<&str>,
        payload: &[u8],
        stage: &str,
        status: Option<u16>,
        error: &str,
        at_ms: i64,
    ) -> Self {
        let prefix = &payload[..payload.len().min(PREFIX_BYTES)];
        Self {
            topic: cut(topic, TOPIC_CHARS),
            device_id: device_id.map(|d| cut(d, TOPIC_CHARS)),
            stage: cut(stage, STAGE_CHARS),
            status,
            error: cut(error, ERROR_CHARS),
            payload_bytes: payload.len() as u64,
            payload_sha256: format!("{:x}", Sha256::digest(payload)),
            payload_prefix: String::from_utf8_lossy(prefix).into_owned(),
            truncated: payload.len() > PREFIX_BYTES,
            at: at_ms,
        }
    }

    /// Parses a dead letter as the connector sends it to the dead-letter handler, checking
    /// every bound (a dead letter is small, or it is refused).
    pub fn from_json(map: &Map<String, Value>) -> Result<Self, InputError> {
        let f = Fields::new(map);
        let bounded = |key: &str, max: usize| -> Result<String, InputError> {
            let s = f.string(key)?;
            if s.chars().count() > max {
                return Err(InputError::new(
                    key,
                    format!("longer than {max} characters"),
                ));
            }
            Ok(s.to_owned())
        };
        let status = match f.optional("status") {
            None => None,
            Some(_) => {
                let n = f.integer("status")?;
                Some(
                    u16::try_from(n)
                        .ok()
                        .filter(|s| (100..=599).contains(s))
                        .ok_or_else(|| {
                            InputError::new("status", format!("{n} is not an HTTP status"))
                        })?,
                )
            }
        };
        let device_id = match f.optional("device_id") {
            None => None,
            Some(_) => Some(bounded("device_id", TOPIC_CHARS)?),
        };
        let payload_bytes = f.integer("payload_bytes")?;
        let payload_bytes = u64::try_from(payload_bytes).map_err(|_| {
            InputError::new("payload_bytes", format!("{payload_bytes} is negative"))
        })?;
        let payload_sha256 = f.string("payload_sha256")?;
        if payload_sha256.len() != 64
            || !payload_sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(InputError::new(
                "payload_sha256",
                "expected 64 lowercase hex digits",
            ));
        }
        let payload_prefix = f.string("payload_prefix")?;
        if payload_prefix.len() > PREFIX_BYTES * 3 {
            return Err(InputError::new(
                "payload_prefix",
                format!("longer than {PREFIX_BYTES} bytes of payload"),
            ));
        }
        let truncated = match f.required("truncated")? {
            Value::Bool(b) => *b,
            other => {
                return Err(InputError::new(
                    "truncated",
                    format!("expected a boolean, got {}", crate::input::kind(other)),
                ))
            }
        };
        let at = f.integer("at")?;
        if at < 0 {
            return Err(InputError::new("at", format!("{at} is negative")));
        }
        Ok(Self {
            topic: bounded("topic", TOPIC_CHARS)?,
            device_id,
            stage: bounded("stage", STAGE_CHARS)?,
            status,
            error: bounded("error", ERROR_CHARS)?,
            payload_bytes,
            payload_sha256: payload_sha256.to_owned(),
            payload_prefix: payload_prefix.to_owned(),
            truncated,
            at,
        })
    }
}

/// `s` cut to at most `max` characters.
fn cut(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_payload_gives_a_small_dead_letter() {
        // 60 KiB of 0x01: escaped whole it would be 368,640 bytes of JSON.
        let payload = vec![1u8; 60 * 1024];
        let letter = DeadLetter::of(
            "device/x/telemetry",
            Some("x"),
            &payload,
            "payload",
            None,
            "payload: not valid JSON",
            7,
        );
        let json = serde_json::to_string(&letter).unwrap();
        // 512 control bytes escape to "\u0001" each: 3,072 characters, plus the rest.
        assert_eq!(letter.payload_prefix.len(), 512);
        assert!(json.len() < 4096, "{}", json.len());
        assert_eq!(letter.payload_bytes, 61_440);
        assert!(letter.truncated);
        // SHA-256 of 61,440 bytes 0x01, as `head -c 61440 /dev/zero | tr '\0' '\1' | sha256sum`.
        assert_eq!(
            letter.payload_sha256,
            "5c20b482f5be4e6b8498ab7d60525fb80940fc3da544845620662f9c47edaac6"
        );
        // What the connector sends is what the handler accepts.
        let back = DeadLetter::from_json(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(back, letter);
    }

    #[test]
    fn bounds_are_checked_naming_the_field() {
        let letter = DeadLetter::of("t", None, b"{}", "payload", Some(400), "e", 1);
        assert_eq!(
            letter.payload_sha256,
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert!(!letter.truncated);
        let mut map = serde_json::to_value(&letter)
            .unwrap()
            .as_object()
            .unwrap()
            .clone();
        map.insert("error".into(), Value::String("x".repeat(ERROR_CHARS + 1)));
        assert_eq!(DeadLetter::from_json(&map).unwrap_err().field, "error");
        map.insert("error".into(), Value::String("e".into()));
        map.insert("status".into(), Value::from(99));
        assert_eq!(DeadLetter::from_json(&map).unwrap_err().field, "status");
        map.insert("status".into(), Value::Null);
        map.insert("payload_sha256".into(), Value::String("ABC".into()));
        assert_eq!(
            DeadLetter::from_json(&map).unwrap_err().field,
            "payload_sha256"
        );
    }
}
