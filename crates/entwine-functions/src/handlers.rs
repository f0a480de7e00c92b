//! The four functions as plain async handlers: JSON object in, state out. No HTTP here, so the
//! local router, the Fission binaries and the tests all run the same code.

use std::sync::Arc;

use entwine_core::deadletter::DeadLetter;
use entwine_core::odte::OdteConfig;
use entwine_core::state::{DigitalState, PendingDigitalState, PhysicalEvent, PhysicalState};
use entwine_core::InputError;
use entwine_store::{Store, StoreError, StoredDeadLetter, TwinChange, Written};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::publisher::DigitalPublisher;

/// A source of the current time in ms since the Unix epoch. Injected so tests choose the
/// shadow timestamps that the ODTE window depends on.
pub trait Clock: Send + Sync + 'static {
    /// Now, in ms since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
    }
}

/// Why a function refused or failed a call.
#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    /// The input is malformed.
    #[error(transparent)]
    Input(#[from] InputError),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The four twin functions of the seed system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Function {
    /// `POST /physicalevents`: device payload → physical state.
    PhysicalEvent,
    /// `POST /physicalstates`: physical state → pending digital state.
    Shadow,
    /// `POST /pendingdigitalstates`: pending digital state → digital state with its ODTE.
    Twin,
    /// `POST /digitalstates`: digital state → logged, echoed and published.
    DigitalEvent,
    /// `POST /twinevaluations`: re-evaluates every twin at the current time (run by a timer:
    /// a Fission time trigger, or `entwine up`'s), so that a silent device shows.
    TwinEvaluator,
    /// `POST /deadletters`: stores a message the connector refused, with why (beyond the seed:
    /// dead letters are durable and listed by the twins API, not only an MQTT topic).
    DeadLetter,
}

impl Function {
    /// The seed's four, in pipeline order.
    pub const CHAIN: [Function; 4] = [
        Function::PhysicalEvent,
        Function::Shadow,
        Function::Twin,
        Function::DigitalEvent,
    ];

    /// All six: the chain, the twin evaluator and the dead-letter handler.
    pub const ALL: [Function; 6] = [
        Function::PhysicalEvent,
        Function::Shadow,
        Function::Twin,
        Function::DigitalEvent,
        Function::TwinEvaluator,
        Function::DeadLetter,
    ];

    /// The function's name, which is also its binary's and its Fission function's.
    pub fn name(self) -> &'static str {
        match self {
            Self::PhysicalEvent => "physical-event-handler",
            Self::Shadow => "shadow-handler",
            Self::Twin => "twin-handler",
            Self::DigitalEvent => "digital-event-handler",
            Self::TwinEvaluator => "twin-evaluator",
            Self::DeadLetter => "dead-letter-handler",
        }
    }

    /// The seed's route for it.
    pub fn route(self) -> &'static str {
        match self {
            Self::PhysicalEvent => "/physicalevents",
            Self::Shadow => "/physicalstates",
            Self::Twin => "/pendingdigitalstates",
            Self::DigitalEvent => "/digitalstates",
            Self::TwinEvaluator => "/twinevaluations",
            Self::DeadLetter => "/deadletters",
        }
    }

    /// Whether it reads or writes the store: all of them (the digital-event handler checks
    /// that what it announces is what the store holds).
    pub fn needs_store(self) -> bool {
        true
    }

    /// The function named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// Where the digital-event handler announces each digital state, in-process (the local
/// platform's live stream); lagging receivers miss states, they never slow the handler.
pub type DigitalFeed = tokio::sync::broadcast::Sender<DigitalState>;

/// Where lifecycle changes are announced in-process (`entwine up` prints them).
pub type LifecycleFeed = tokio::sync::broadcast::Sender<TwinChange>;

/// The functions that work on the store, with what they share.
#[derive(Clone)]
pub struct TwinFunctions {
    store: Store,
    odte: OdteConfig,
    clock: Arc<dyn Clock>,
    feed: Option<DigitalFeed>,
    lifecycle: Option<LifecycleFeed>,
    publisher: Option<DigitalPublisher>,
}

impl std::fmt::Debug for TwinFunctions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwinFunctions")
            .field("store", &self.store.backend())
            .field("odte", &self.odte)
            .finish_non_exhaustive()
    }
}

impl TwinFunctions {
    /// Functions over `store`, evaluating twins with `odte`, reading time from `clock`.
    pub fn new(store: Store, odte: OdteConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            odte,
            clock,
            feed: None,
            lifecycle: None,
            publisher: None,
        }
    }

    /// The same functions, announcing lifecycle changes to `lifecycle`.
    pub fn with_lifecycle_feed(self, lifecycle: LifecycleFeed) -> Self {
        Self {
            lifecycle: Some(lifecycle),
            ..self
        }
    }

    /// The same functions, publishing digital events with `publisher`.
    pub fn with_publisher(self, publisher: Option<DigitalPublisher>) -> Self {
        Self { publisher, ..self }
    }

    /// The digital-event publisher, if any.
    pub fn publisher(&self) -> Option<&DigitalPublisher> {
        self.publisher.as_ref()
    }

    /// The same functions, with the digital-event handler announcing to `feed`.
    pub fn with_feed(self, feed: DigitalFeed) -> Self {
        Self {
            feed: Some(feed),
            ..self
        }
    }

    /// The feed the digital-event handler announces to, if any.
    pub fn feed(&self) -> Option<&DigitalFeed> {
        self.feed.as_ref()
    }

    /// The store they write to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The clock they read.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// physical-event-handler: stores the device's event as a physical state, stamped now.
    #[tracing::instrument(name = "physical-event-handler", skip_all, fields(device_id))]
    pub async fn physical_event(
        &self,
        input: &Map<String, Value>,
    ) -> Result<PhysicalState, FunctionError> {
        let now = self.clock.now_ms();
        let event = PhysicalEvent::from_json(input, now)?;
        tracing::Span::current().record("device_id", event.device_id.as_str());
        let (state, written) = self.store.record_physical_event(&event, now).await?;
        log_written(written, "physical state", state.id);
        Ok(state)
    }

    /// shadow-handler: makes the twin's pending copy of a physical state, stamped now.
    #[tracing::instrument(name = "shadow-handler", skip_all, fields(device_id))]
    pub async fn shadow(
        &self,
        input: &Map<String, Value>,
    ) -> Result<PendingDigitalState, FunctionError> {
        let now = self.clock.now_ms();
        let physical = PhysicalState::from_json(input, now)?;
        tracing::Span::current().record("device_id", physical.device_id.as_str());
        let (pending, written) = self.store.record_shadow(&physical, now).await?;
        log_written(written, "digital state", pending.id);
        Ok(pending)
    }

    /// twin-handler: computes the ODTE of a pending digital state over its device's window
    /// (answering the seed's digital state), and advances the twin's lifecycle, publishing the
    /// change when there is one and a digital broker is configured.
    #[tracing::instrument(name = "twin-handler", skip_all, fields(device_id))]
    pub async fn twin(&self, input: &Map<String, Value>) -> Result<DigitalState, FunctionError> {
        let pending = PendingDigitalState::from_json(input, self.clock.now_ms())?;
        tracing::Span::current().record("device_id", pending.device_id.as_str());
        let (digital, written, change) = self
            .store
            .evaluate_digital_state(&pending, &self.odte)
            .await?;
        log_written(written, "evaluation of digital state", digital.pending.id);
        if let Some(change) = change {
            self.announce(&change);
        }
        let device = digital.pending.device_id.to_string();
        metrics::gauge!("entwine_twin_odte", "device_id" => device.clone()).set(digital.odte);
        metrics::gauge!("entwine_twin_entangled", "device_id" => device).set(
            if digital.lifecycle == entwine_core::odte::SeedLifecycle::Entangled {
                1.0
            } else {
                0.0
            },
        );
        Ok(digital)
    }

    /// Publishes and announces a lifecycle change.
    fn announce(&self, change: &TwinChange) {
        tracing::info!(
            device_id = %change.device_id,
            from = change.from.map(|l| l.as_str()),
            to = change.to.as_str(),
            odte = change.odte,
            "twin lifecycle changed"
        );
        if let Some(publisher) = &self.publisher {
            publisher.change(change);
        }
        if let Some(feed) = &self.lifecycle {
            let _ = feed.send(change.clone());
        }
    }

    /// digital-event-handler: accepts a digital state only when it is exactly one the store
    /// holds, evaluated (a forged or altered state is refused, naming the field, and never
    /// announced); logs it and echoes it (as the seed does), announces it on the in-process
    /// feed when there is one, and publishes it when a digital broker is configured.
    #[tracing::instrument(name = "digital-event-handler", skip_all, fields(device_id))]
    pub async fn digital_event(
        &self,
        input: &Map<String, Value>,
    ) -> Result<DigitalState, FunctionError> {
        let given = DigitalState::from_json(input, self.clock.now_ms())?;
        tracing::Span::current().record("device_id", given.pending.device_id.as_str());
        let digital = self.store.stored_digital(&given).await?;
        tracing::info!(
            id = digital.pending.id,
            odte = digital.odte,
            availability = digital.availability,
            reliability = digital.reliability,
            timeliness = digital.timeliness,
            lifecycle = digital.lifecycle.as_str(),
            "digital state"
        );
        if let Some(feed) = &self.feed {
            // No receiver is not an error: nobody is watching.
            let _ = feed.send(digital.clone());
        }
        if let Some(publisher) = &self.publisher {
            publisher.state(&digital);
        }
        Ok(digital)
    }

    /// dead-letter-handler: stores a message the connector refused (small by construction:
    /// see [`DeadLetter`]), so that it can be listed and inspected later.
    #[tracing::instrument(name = "dead-letter-handler", skip_all)]
    pub async fn dead_letter(
        &self,
        input: &Map<String, Value>,
    ) -> Result<StoredDeadLetter, FunctionError> {
        let letter = DeadLetter::from_json(input)?;
        let stored = self.store.record_dead_letter(&letter).await?;
        tracing::warn!(
            id = stored.id,
            topic = %stored.topic,
            stage = %stored.stage,
            status = stored.status,
            error = %stored.error,
            payload_bytes = stored.payload_bytes,
            deliveries = stored.deliveries,
            "dead letter stored"
        );
        Ok(stored)
    }

    /// twin-evaluator: re-evaluates every twin at the current time; publishes and answers the
    /// lifecycle changes.
    #[tracing::instrument(name = "twin-evaluator", skip_all)]
    pub async fn evaluate_twins(&self) -> Result<Evaluation, FunctionError> {
        let now = self.clock.now_ms();
        let changes = self.store.reevaluate_twins(now, &self.odte).await?;
        for change in &changes {
            self.announce(change);
            // A twin the evaluator disentangles shows it in /metrics; an unbound one's series
            // are left to expire (`entwine up`'s recorder forgets gauges idle that long).
            if change.to != entwine_core::twin::TwinLifecycle::Unbound {
                let entangled = change.to == entwine_core::twin::TwinLifecycle::Entangled;
                metrics::gauge!("entwine_twin_odte", "device_id" => change.device_id.clone())
                    .set(change.odte);
                metrics::gauge!("entwine_twin_entangled", "device_id" => change.device_id.clone())
                    .set(if entangled { 1.0 } else { 0.0 });
            }
        }
        Ok(Evaluation {
            evaluated_at: now,
            changes,
        })
    }
}

/// What the twin evaluator answers.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// The time every twin was evaluated at (ms).
    pub evaluated_at: i64,
    /// The twins that changed lifecycle.
    pub changes: Vec<TwinChange>,
}

fn log_written(written: Written, what: &str, id: i32) {
    match written {
        Written::Created => tracing::debug!(id, "{what} stored"),
        Written::Existing => tracing::info!(id, "{what} existed already: redelivery answered"),
    }
}
