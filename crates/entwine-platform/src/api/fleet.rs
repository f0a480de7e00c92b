//! The fleet: the twins listed with filters, sorting and pages (`GET /api/twins`), and what the
//! dashboard's fleet page summarizes (`GET /api/fleet`).
//!
//! Both read the twin table once (one row per twin, a few hundred bytes each: 10,000 twins are
//! a few milliseconds) and filter, sort and count in memory, where the model binding of each
//! device is known.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use entwine_core::twin::TwinLifecycle;
use entwine_store::TwinStatus;
use serde::Serialize;

use super::{encode_path_segment, Api, ApiError, Params, DEFAULT_PAGE, MAX_PAGE};

/// What the `model` filter says for the seed's own devices.
pub const SEED_MODEL: &str = "seed";

/// Width of a bucket of [`FleetSummary::odte`].
pub const ODTE_BUCKET_WIDTH: f64 = 0.1;

/// A twin's column the list is sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SortKey {
    DeviceId,
    Odte,
    Lifecycle,
    Since,
    EvaluatedAt,
    LastDigitalTimestamp,
}

impl SortKey {
    const NAMES: [(&'static str, SortKey); 6] = [
        ("device_id", SortKey::DeviceId),
        ("odte", SortKey::Odte),
        ("lifecycle", SortKey::Lifecycle),
        ("since", SortKey::Since),
        ("evaluated_at", SortKey::EvaluatedAt),
        ("last_digital_timestamp", SortKey::LastDigitalTimestamp),
    ];

    fn parse(raw: &str) -> Result<Self, ApiError> {
        Self::NAMES
            .iter()
            .find(|(name, _)| *name == raw)
            .map(|(_, key)| *key)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::NAMES.iter().map(|(n, _)| *n).collect();
                ApiError::BadParameter(
                    "sort".into(),
                    format!("{raw:?} is not one of {}", names.join(", ")),
                )
            })
    }

    /// `a` against `b` by this key, then by device id (byte order) so that pages never overlap.
    fn compare(self, a: &TwinStatus, b: &TwinStatus) -> Ordering {
        let by_key = match self {
            Self::DeviceId => Ordering::Equal,
            Self::Odte => a.odte.total_cmp(&b.odte),
            Self::Lifecycle => a.lifecycle.as_str().cmp(b.lifecycle.as_str()),
            Self::Since => a.since.cmp(&b.since),
            Self::EvaluatedAt => a.evaluated_at.cmp(&b.evaluated_at),
            Self::LastDigitalTimestamp => a.last_digital_timestamp.cmp(&b.last_digital_timestamp),
        };
        by_key.then_with(|| a.device_id.cmp(&b.device_id))
    }
}

/// Which twins a list shows.
struct Filter {
    lifecycle: Option<TwinLifecycle>,
    model: Option<String>,
    /// Lowercased.
    query: Option<String>,
}

impl Filter {
    fn from_params(params: &Params) -> Result<Self, ApiError> {
        let lifecycle = match params.0.get("lifecycle") {
            None => None,
            Some(raw) => Some(TwinLifecycle::parse(raw).ok_or_else(|| {
                ApiError::BadParameter(
                    "lifecycle".into(),
                    format!("{raw:?} is not one of unbound, bound, entangled, disentangled"),
                )
            })?),
        };
        Ok(Self {
            lifecycle,
            model: params.0.get("model").cloned(),
            query: params
                .0
                .get("q")
                .filter(|q| !q.is_empty())
                .map(|q| q.to_lowercase()),
        })
    }

    fn keeps(&self, twin: &TwinStatus) -> bool {
        self.lifecycle.is_none_or(|l| l == twin.lifecycle)
            && self
                .model
                .as_deref()
                .is_none_or(|m| twin.model.as_deref().unwrap_or(SEED_MODEL) == m)
            && self
                .query
                .as_deref()
                .is_none_or(|q| twin.device_id.to_lowercase().contains(q))
    }
}

/// A page of twins.
#[derive(Serialize)]
struct TwinsPage {
    items: Vec<TwinStatus>,
    /// Twins the filters keep, on every page.
    total: usize,
    /// Twins of the filtered, sorted list before this page.
    offset: usize,
    next: Option<String>,
}

impl Api {
    /// Every twin, with its model.
    async fn all_twins(&self) -> Result<Vec<TwinStatus>, ApiError> {
        let mut twins = self.store.twins().await?;
        for twin in &mut twins {
            twin.model = self.model_of(&twin.device_id);
        }
        Ok(twins)
    }
}

/// `GET /api/twins?lifecycle=&model=&q=&sort=&order=&offset=&limit=&after=`.
pub(super) async fn twins(
    State(api): State<Api>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let params = Params::new(
        raw,
        &[
            "after",
            "limit",
            "offset",
            "lifecycle",
            "model",
            "q",
            "sort",
            "order",
        ],
    )?;
    let limit = params
        .integer("limit", 1..=i64::from(MAX_PAGE))?
        .map_or(DEFAULT_PAGE, |l| l as u32) as usize;
    let offset = params.integer("offset", 0..=i64::from(u32::MAX))?;
    let sort = params
        .0
        .get("sort")
        .map(|s| SortKey::parse(s))
        .transpose()?;
    let descending = match params.0.get("order").map(String::as_str) {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => {
            return Err(ApiError::BadParameter(
                "order".into(),
                format!("{other:?} is not asc or desc"),
            ))
        }
    };
    let after = params.0.get("after");
    if after.is_some() && (offset.is_some() || sort.is_some_and(|s| s != SortKey::DeviceId)) {
        return Err(ApiError::BadParameter(
            "after".into(),
            "a device id cursor pages the list by device id: use offset with sort or order".into(),
        ));
    }
    if after.is_some() && descending {
        return Err(ApiError::BadParameter(
            "after".into(),
            "a device id cursor pages the list in ascending order: use offset with order=desc"
                .into(),
        ));
    }
    let filter = Filter::from_params(&params)?;

    let mut twins: Vec<TwinStatus> = api
        .all_twins()
        .await?
        .into_iter()
        .filter(|t| filter.keeps(t))
        .collect();
    let key = sort.unwrap_or(SortKey::DeviceId);
    twins.sort_unstable_by(|a, b| {
        let order = key.compare(a, b);
        if descending {
            order.reverse()
        } else {
            order
        }
    });
    let total = twins.len();
    let start = match (after, offset) {
        (Some(after), _) => twins.partition_point(|t| t.device_id.as_str() <= after.as_str()),
        (None, Some(offset)) => (offset as usize).min(total),
        (None, None) => 0,
    };
    let more = total > start + limit;
    let items: Vec<_> = twins.into_iter().skip(start).take(limit).collect();
    let next = match items.last() {
        Some(last) if more => {
            // The default listing keeps its device id cursor (`entwine status` follows it);
            // a sorted or filtered one pages by offset.
            let mut query: Vec<(String, String)> = Vec::new();
            for name in ["lifecycle", "model", "q", "sort", "order"] {
                if let Some(value) = params.0.get(name) {
                    query.push((name.to_owned(), value.clone()));
                }
            }
            if sort.is_none() && offset.is_none() && !descending {
                query.push(("after".into(), last.device_id.clone()));
            } else {
                query.push(("offset".into(), (start + limit).to_string()));
            }
            query.push(("limit".into(), limit.to_string()));
            let query: Vec<String> = query
                .iter()
                .map(|(k, v)| format!("{k}={}", encode_path_segment(v)))
                .collect();
            Some(format!("/api/twins?{}", query.join("&")))
        }
        _ => None,
    };
    Ok(Json(TwinsPage {
        items,
        total,
        offset: start,
        next,
    })
    .into_response())
}

/// What `GET /api/fleet` answers.
#[derive(Debug, Serialize, PartialEq)]
pub struct FleetSummary {
    /// Twins in all.
    pub twins: usize,
    /// Twins in each lifecycle (all four named, zeros included).
    pub lifecycle: BTreeMap<&'static str, usize>,
    /// The distribution of the twins' latest ODTE.
    pub odte: OdteHistogram,
    /// Twins per model; the seed's devices under [`SEED_MODEL`].
    pub models: BTreeMap<String, usize>,
    /// The dead letters stored.
    pub dead_letters: DeadLetterCounts,
}

/// Twins by their latest ODTE, in buckets of `bucket_width`: bucket `i` holds
/// `[i·w, (i+1)·w)`, the last one also 1.0.
#[derive(Debug, Serialize, PartialEq)]
pub struct OdteHistogram {
    /// The width of a bucket.
    pub bucket_width: f64,
    /// Twins in each bucket.
    pub counts: Vec<usize>,
}

/// The dead letters stored.
#[derive(Debug, Serialize, PartialEq)]
pub struct DeadLetterCounts {
    /// Distinct messages.
    pub messages: i64,
    /// Refusals in all (a message redelivered is refused again).
    pub deliveries: i64,
}

/// The fleet summarized from its twins.
pub fn summarize(twins: &[TwinStatus], dead_letters: DeadLetterCounts) -> FleetSummary {
    let buckets = (1.0 / ODTE_BUCKET_WIDTH).round() as usize;
    let mut counts = vec![0; buckets];
    let mut lifecycle: BTreeMap<&'static str, usize> = [
        TwinLifecycle::Unbound,
        TwinLifecycle::Bound,
        TwinLifecycle::Entangled,
        TwinLifecycle::Disentangled,
    ]
    .into_iter()
    .map(|l| (l.as_str(), 0))
    .collect();
    let mut models = BTreeMap::new();
    for twin in twins {
        *lifecycle.entry(twin.lifecycle.as_str()).or_default() += 1;
        *models
            .entry(twin.model.clone().unwrap_or_else(|| SEED_MODEL.to_owned()))
            .or_default() += 1;
        let odte = f64::from(twin.odte).clamp(0.0, 1.0);
        // Exact decimal edges (0.3 lands in [0.3, 0.4)), whatever f32 made of them.
        let bucket = ((odte * 1e6).round() as usize * buckets / 1_000_000).min(buckets - 1);
        counts[bucket] += 1;
    }
    FleetSummary {
        twins: twins.len(),
        lifecycle,
        odte: OdteHistogram {
            bucket_width: ODTE_BUCKET_WIDTH,
            counts,
        },
        models,
        dead_letters,
    }
}

/// `GET /api/fleet`.
pub(super) async fn fleet(
    State(api): State<Api>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    Params::new(raw, &[])?;
    let twins = api.all_twins().await?;
    let (messages, deliveries) = api.store.dead_letter_count().await?;
    Ok(Json(summarize(
        &twins,
        DeadLetterCounts {
            messages,
            deliveries,
        },
    ))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn twin(id: &str, lifecycle: TwinLifecycle, odte: f32, model: Option<&str>) -> TwinStatus {
        TwinStatus {
            device_id: id.into(),
            lifecycle,
            since: 0,
            odte,
            availability: 1.0,
            reliability: odte,
            timeliness: 1.0,
            evaluated_at: 0,
            last_physical_timestamp: None,
            last_digital_timestamp: None,
            digital_state_id: None,
            model: model.map(str::to_owned),
        }
    }

    #[test]
    fn the_summary_counts_lifecycles_models_and_odte_buckets_with_decimal_edges() {
        use TwinLifecycle::*;
        let twins = [
            twin("a", Entangled, 1.0, None),
            twin("b", Entangled, 0.9, None),
            twin("c", Disentangled, 0.3, Some("meter")),
            twin("d", Disentangled, 0.299_999, Some("meter")),
            twin("e", Unbound, 0.0, None),
            twin("f", Bound, 0.05, Some("plc")),
        ];
        let summary = summarize(
            &twins,
            DeadLetterCounts {
                messages: 2,
                deliveries: 5,
            },
        );
        assert_eq!(summary.twins, 6);
        assert_eq!(
            summary.lifecycle.into_iter().collect::<Vec<_>>(),
            [
                ("bound", 1),
                ("disentangled", 2),
                ("entangled", 2),
                ("unbound", 1)
            ]
        );
        assert_eq!(
            summary.models.into_iter().collect::<Vec<_>>(),
            [("meter".into(), 2), ("plc".into(), 1), ("seed".into(), 3)]
        );
        // 0.0 and 0.05 in [0, 0.1); 0.299999 in [0.2, 0.3); 0.3 in [0.3, 0.4); 0.9 and 1.0 in
        // the last bucket.
        assert_eq!(summary.odte.counts, [2, 0, 1, 1, 0, 0, 0, 0, 0, 2]);
    }

    #[test]
    fn sorting_breaks_ties_by_device_id_so_pages_never_overlap() {
        use TwinLifecycle::*;
        let mut twins = [
            twin("b", Entangled, 0.5, None),
            twin("a", Entangled, 0.5, None),
            twin("c", Entangled, 0.2, None),
        ];
        twins.sort_by(|x, y| SortKey::Odte.compare(x, y));
        let ids: Vec<&str> = twins.iter().map(|t| t.device_id.as_str()).collect();
        assert_eq!(ids, ["c", "a", "b"]);
    }
}
