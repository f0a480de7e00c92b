//! The dead-letter table: every message the pipeline refused, durable and queryable.

use entwine_core::deadletter::DeadLetter;
use serde::Serialize;

use crate::queries::Sql;
use crate::{Store, StoreError};

/// A stored dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct StoredDeadLetter {
    /// Its row id (the API pages by it).
    pub id: i64,
    /// The MQTT topic it arrived on.
    pub topic: String,
    /// The device the topic names, if any.
    pub device_id: Option<String>,
    /// What refused it.
    pub stage: String,
    /// The HTTP status of the refusal, when a function answered.
    pub status: Option<i32>,
    /// Why.
    pub error: String,
    /// The payload's size in bytes.
    pub payload_bytes: i64,
    /// The payload's SHA-256.
    pub payload_sha256: String,
    /// Its first bytes.
    pub payload_prefix: String,
    /// Whether the payload was longer than its prefix.
    pub truncated: bool,
    /// When it was first refused (ms).
    pub first_at: i64,
    /// When it was last refused (ms).
    pub last_at: i64,
    /// How many times this message (same topic, stage and payload) was refused.
    pub deliveries: i64,
}

static RECORD: Sql = Sql::new(
    "INSERT INTO deadletter (topic, device_id, stage, status, error, payload_bytes, \
                             payload_sha256, payload_prefix, truncated, first_at, last_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) \
     ON CONFLICT (topic, stage, payload_sha256) DO UPDATE SET \
         deliveries = deadletter.deliveries + 1, \
         last_at = CASE WHEN excluded.last_at > deadletter.last_at \
                        THEN excluded.last_at ELSE deadletter.last_at END, \
         status = excluded.status, error = excluded.error \
     RETURNING id, topic, device_id, stage, status, error, payload_bytes, payload_sha256, \
               payload_prefix, truncated, first_at, last_at, deliveries",
);

static NEWEST: Sql = Sql::new(
    "SELECT id, topic, device_id, stage, status, error, payload_bytes, payload_sha256, \
            payload_prefix, truncated, first_at, last_at, deliveries \
     FROM deadletter WHERE id < $1 ORDER BY id DESC LIMIT $2",
);

static COUNT: Sql =
    Sql::new("SELECT COUNT(*), CAST(COALESCE(SUM(deliveries), 0) AS BIGINT) FROM deadletter");

impl Store {
    /// Stores a dead letter; the same message refused again at the same stage adds a delivery
    /// to its row. Answers the row as stored.
    pub async fn record_dead_letter(
        &self,
        letter: &DeadLetter,
    ) -> Result<StoredDeadLetter, StoreError> {
        let payload_bytes = i64::try_from(letter.payload_bytes).unwrap_or(i64::MAX);
        fetch!(
            self,
            RECORD,
            fetch_one,
            StoredDeadLetter,
            &letter.topic,
            letter.device_id.as_deref(),
            &letter.stage,
            letter.status.map(i32::from),
            &letter.error,
            payload_bytes,
            &letter.payload_sha256,
            &letter.payload_prefix,
            letter.truncated,
            letter.at
        )
    }

    /// Dead letters newest first: at most `limit`, with ids below `before` (a page's last id).
    pub async fn dead_letters(
        &self,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<StoredDeadLetter>, StoreError> {
        fetch!(
            self,
            NEWEST,
            fetch_all,
            StoredDeadLetter,
            before.unwrap_or(i64::MAX),
            i64::from(limit)
        )
    }

    /// How many distinct dead letters are stored, and how many refusals they add up to.
    pub async fn dead_letter_count(&self) -> Result<(i64, i64), StoreError> {
        fetch!(self, COUNT, fetch_one, (i64, i64))
    }
}
