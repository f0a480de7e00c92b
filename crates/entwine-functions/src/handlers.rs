//! The functions as plain async handlers: JSON object in, state out. No HTTP here, so the
//! local router, the Fission binaries and the tests all run the same code.
//!
//! The four of the chain also take a batch (a slice of JSON values, each what the single call
//! takes): every element parsed by the single call's parser with one reading of the clock,
//! those that parse sent to the store's batch call at once (`entwine_store::batch`), and the
//! results merged back in order, each followed by exactly what the single call does after the
//! store (logs, lifecycle announcements, gauges, the digital feed and publisher), in the
//! batch's order. The single calls are batches of one.

use std::sync::Arc;

use entwine_core::deadletter::DeadLetter;
use entwine_core::model::ModelSet;
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
    models: Arc<ModelSet>,
    clock: Arc<dyn Clock>,
    feed: Option<DigitalFeed>,
    lifecycle: Option<LifecycleFeed>,
    publisher: Option<DigitalPublisher>,
}

impl std::fmt::Debug for TwinFunctions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwinFunctions")
            .field("store", &self.store.backend())
            .field("odte", self.models.seed_profile())
            .field("models", &self.models.models().len())
            .finish_non_exhaustive()
    }
}

impl TwinFunctions {
    /// Functions over `store`, evaluating twins with `odte`, reading time from `clock`; every
    /// device is the seed's until [`TwinFunctions::with_models`].
    pub fn new(store: Store, odte: OdteConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            models: Arc::new(ModelSet::seed_only(odte)),
            clock,
            feed: None,
            lifecycle: None,
            publisher: None,
        }
    }

    /// The same functions with device models: each device's events are read by the model it is
    /// bound to, and its twin evaluated by that model's profile (the seed's device keeps
    /// `models`' seed profile).
    pub fn with_models(self, models: Arc<ModelSet>) -> Self {
        Self { models, ..self }
    }

    /// The device models they read events by.
    pub fn models(&self) -> &Arc<ModelSet> {
        &self.models
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

    /// physical-event-handler: stores the device's event as a physical state, stamped now. A
    /// batch of one ([`TwinFunctions::physical_events`]).
    pub async fn physical_event(
        &self,
        input: &Map<String, Value>,
    ) -> Result<PhysicalState, FunctionError> {
        let now = self.clock.now_ms();
        only(
            self.record_events(
                vec![PhysicalEvent::from_json(input, now, &self.models)],
                now,
            )
            .await?,
        )
    }

    /// physical-event-handler on a batch: each input as [`TwinFunctions::physical_event`] would
    /// take it, all stamped with one reading of the clock and stored in one call
    /// ([`Store::record_physical_events`]); one result per input, in order.
    pub async fn physical_events(
        &self,
        inputs: &[Element<'_>],
    ) -> Result<Each<PhysicalState>, FunctionError> {
        let now = self.clock.now_ms();
        self.record_events(
            parse_each(inputs, |map| {
                PhysicalEvent::from_json(map, now, &self.models)
            }),
            now,
        )
        .await
    }

    #[tracing::instrument(name = "physical-event-handler", skip_all, fields(device_id, batch = parsed.len()))]
    async fn record_events(
        &self,
        parsed: Vec<Result<PhysicalEvent, InputError>>,
        now: i64,
    ) -> Result<Each<PhysicalState>, FunctionError> {
        let (events, slots) = split(parsed);
        if let [event] = events.as_slice() {
            tracing::Span::current().record("device_id", event.device_id.as_str());
        }
        let stored = self.store.record_physical_events(&events, now).await?;
        Ok(merge(slots, stored, |(state, written)| {
            log_written(
                written,
                "physical state",
                state.id,
                state.device_id.as_str(),
            );
            state
        }))
    }

    /// shadow-handler: makes the twin's pending copy of a physical state, stamped now. A batch
    /// of one ([`TwinFunctions::shadows`]).
    pub async fn shadow(
        &self,
        input: &Map<String, Value>,
    ) -> Result<PendingDigitalState, FunctionError> {
        let now = self.clock.now_ms();
        only(
            self.record_shadows(vec![PhysicalState::from_json(input, now)], now)
                .await?,
        )
    }

    /// shadow-handler on a batch, with one reading of the clock, stored in one call
    /// ([`Store::record_shadows`]); one result per input, in order.
    pub async fn shadows(
        &self,
        inputs: &[Element<'_>],
    ) -> Result<Each<PendingDigitalState>, FunctionError> {
        let now = self.clock.now_ms();
        self.record_shadows(
            parse_each(inputs, |map| PhysicalState::from_json(map, now)),
            now,
        )
        .await
    }

    #[tracing::instrument(name = "shadow-handler", skip_all, fields(device_id, batch = parsed.len()))]
    async fn record_shadows(
        &self,
        parsed: Vec<Result<PhysicalState, InputError>>,
        now: i64,
    ) -> Result<Each<PendingDigitalState>, FunctionError> {
        let (states, slots) = split(parsed);
        if let [state] = states.as_slice() {
            tracing::Span::current().record("device_id", state.device_id.as_str());
        }
        let stored = self.store.record_shadows(&states, now).await?;
        Ok(merge(slots, stored, |(pending, written)| {
            log_written(
                written,
                "digital state",
                pending.id,
                pending.device_id.as_str(),
            );
            pending
        }))
    }

    /// twin-handler: computes the ODTE of a pending digital state over its device's window
    /// (answering the seed's digital state), and advances the twin's lifecycle, publishing the
    /// change when there is one and a digital broker is configured. A batch of one
    /// ([`TwinFunctions::twins`]).
    pub async fn twin(&self, input: &Map<String, Value>) -> Result<DigitalState, FunctionError> {
        let now = self.clock.now_ms();
        only(
            self.evaluate(vec![PendingDigitalState::from_json(input, now)])
                .await?,
        )
    }

    /// twin-handler on a batch, with one reading of the clock, evaluated in one call
    /// ([`Store::evaluate_digital_states`]: each state's window holds only the states up to
    /// it); then, in the batch's order, each lifecycle change announced and each twin's gauges
    /// set, as the single call does. One result per input, in order.
    pub async fn twins(&self, inputs: &[Element<'_>]) -> Result<Each<DigitalState>, FunctionError> {
        let now = self.clock.now_ms();
        self.evaluate(parse_each(inputs, |map| {
            PendingDigitalState::from_json(map, now)
        }))
        .await
    }

    #[tracing::instrument(name = "twin-handler", skip_all, fields(device_id, batch = parsed.len()))]
    async fn evaluate(
        &self,
        parsed: Vec<Result<PendingDigitalState, InputError>>,
    ) -> Result<Each<DigitalState>, FunctionError> {
        let (pending, slots) = split(parsed);
        if let [state] = pending.as_slice() {
            tracing::Span::current().record("device_id", state.device_id.as_str());
        }
        let evaluated = self
            .store
            .evaluate_digital_states(&pending, self.models.as_ref())
            .await?;
        Ok(merge(slots, evaluated, |(digital, written, change)| {
            log_written(
                written,
                "evaluation of digital state",
                digital.pending.id,
                digital.pending.device_id.as_str(),
            );
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
            digital
        }))
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
    /// feed when there is one, and publishes it when a digital broker is configured. A batch of
    /// one ([`TwinFunctions::digital_events`]).
    pub async fn digital_event(
        &self,
        input: &Map<String, Value>,
    ) -> Result<DigitalState, FunctionError> {
        let now = self.clock.now_ms();
        only(
            self.announce_digitals(vec![DigitalState::from_json(input, now)])
                .await?,
        )
    }

    /// digital-event-handler on a batch, with one reading of the clock, checked in one call
    /// ([`Store::stored_digitals`]); then, in the batch's order, each accepted state logged,
    /// announced and published, as the single call does. One result per input, in order.
    pub async fn digital_events(
        &self,
        inputs: &[Element<'_>],
    ) -> Result<Each<DigitalState>, FunctionError> {
        let now = self.clock.now_ms();
        self.announce_digitals(parse_each(inputs, |map| DigitalState::from_json(map, now)))
            .await
    }

    #[tracing::instrument(name = "digital-event-handler", skip_all, fields(device_id, batch = parsed.len()))]
    async fn announce_digitals(
        &self,
        parsed: Vec<Result<DigitalState, InputError>>,
    ) -> Result<Each<DigitalState>, FunctionError> {
        let (given, slots) = split(parsed);
        if let [state] = given.as_slice() {
            tracing::Span::current().record("device_id", state.pending.device_id.as_str());
        }
        let stored = self.store.stored_digitals(&given).await?;
        Ok(merge(slots, stored, |digital| {
            tracing::info!(
                device_id = %digital.pending.device_id,
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
            digital
        }))
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
        let changes = self
            .store
            .reevaluate_twins(now, self.models.as_ref())
            .await?;
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

fn log_written(written: Written, what: &str, id: i32, device_id: &str) {
    match written {
        Written::Created => tracing::debug!(id, device_id, "{what} stored"),
        Written::Existing => {
            tracing::info!(id, device_id, "{what} existed already: redelivery answered")
        }
    }
}

/// An element of a batch: its input (checked by the function: a JSON object, then its fields),
/// or its refusal before any function saw it (over HTTP, an element larger than the route
/// takes an object to be: [`crate::http::MAX_BODY_BYTES`]).
pub type Element<'a> = Result<&'a Value, InputError>;

/// One result per input of a batch, in the inputs' order: what the single call answers, or
/// that input's own refusal (bad input, or the store's [`entwine_store::is_element_error`]).
pub type Each<T> = Vec<Result<T, FunctionError>>;

/// Each element of a batch parsed by `parse` (the single handler's parser), or why not.
fn parse_each<T>(
    inputs: &[Element<'_>],
    parse: impl Fn(&Map<String, Value>) -> Result<T, InputError>,
) -> Vec<Result<T, InputError>> {
    inputs
        .iter()
        .map(|input| match input {
            Ok(value) => crate::invoke::object(value).and_then(&parse),
            Err(e) => Err(e.clone()),
        })
        .collect()
}

/// The parsed inputs to send to the store, and for each element of the batch, in order, its
/// own refusal or `None` (its result is the store's next one).
fn split<T>(parsed: Vec<Result<T, InputError>>) -> (Vec<T>, Vec<Option<InputError>>) {
    let mut valid = Vec::with_capacity(parsed.len());
    let slots = parsed
        .into_iter()
        .map(|p| match p {
            Ok(input) => {
                valid.push(input);
                None
            }
            Err(e) => Some(e),
        })
        .collect();
    (valid, slots)
}

/// The batch's results in order: each refused input's error, and the store's results (each
/// passed through `then`, in order) in the places of the inputs sent to it.
fn merge<S, T>(
    slots: Vec<Option<InputError>>,
    stored: entwine_store::Each<S>,
    mut then: impl FnMut(S) -> T,
) -> Each<T> {
    let mut stored = stored.into_iter();
    slots
        .into_iter()
        .map(|slot| match slot {
            Some(e) => Err(FunctionError::Input(e)),
            None => match stored.next() {
                Some(Ok(s)) => Ok(then(s)),
                Some(Err(e)) => Err(FunctionError::Store(e)),
                None => Err(FunctionError::Store(StoreError::Corrupt(
                    "the store answered fewer results than the batch has inputs".into(),
                ))),
            },
        })
        .collect()
}

/// The one result of a batch of one.
fn only<T>(each: Each<T>) -> Result<T, FunctionError> {
    each.into_iter().next().unwrap_or_else(|| {
        Err(FunctionError::Store(StoreError::Corrupt(
            "a batch of one answered nothing".into(),
        )))
    })
}
