//! The write side over cqrs-es: a command runs on the aggregate's state
//! (from this process's cache when it has it, caught up with newer events)
//! and what it emits is appended once, with the optimistic check on the
//! aggregate's sequence. One command at a time per aggregate in this
//! process ([`super::cache::KeyedLocks`]).

use std::collections::HashMap;

use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{EventStoreAggregateContext, PersistedEventRepository, PersistedEventStore};
use cqrs_es::{Aggregate, AggregateError, EventEnvelope, EventStore};
use postgres_es::PostgresEventRepository;
use sqlite_es::SqliteEventRepository;

use super::sql::serialized_event;
use super::{lean, sqlite, Store, StoreError, SHORT_STREAMS, SNAPSHOT_EVERY};

/// What a command did: the aggregate's state after it, and the events it
/// stored (none for a no-op such as an exact repeat).
#[derive(Debug)]
pub struct Executed<A: Aggregate> {
    pub aggregate: A,
    pub events: Vec<EventEnvelope<A>>,
}

impl Store {
    /// Loads the aggregate, lets it handle the command and appends what it
    /// emitted, once. A concurrent writer to the same aggregate makes this
    /// fail with `AggregateError::AggregateConflict`; see
    /// [`Store::execute_retrying`].
    pub async fn execute<A: Aggregate + Clone + 'static>(
        &self,
        aggregate_id: &str,
        command: A::Command,
        services: &A::Services,
        metadata: HashMap<String, String>,
    ) -> Result<Executed<A>, AggregateError<A::Error>>
    where
        A::Command: Clone,
    {
        let _turn = self.shared().writers.lock(A::TYPE, aggregate_id).await;
        // A remembered state is tried as it is, without asking for newer
        // events first: if another process appended meanwhile, this append
        // takes a sequence that is taken and fails (AggregateConflict: the
        // entry is forgotten and the caller tries again on a fresh load). A
        // command that appends nothing — a repeat, a refusal — has no such
        // check, so that outcome counts only if no newer events exist.
        let cache = &self.shared().cache;
        if let (Some(cached), Some(before)) =
            (cache.get::<A>(aggregate_id), cache.get::<A>(aggregate_id))
        {
            let sequence = before.current_sequence;
            let tried = self
                .execute_loaded(
                    aggregate_id,
                    cached,
                    command.clone(),
                    services,
                    metadata.clone(),
                )
                .await;
            let appended = matches!(&tried, Ok(done) if !done.events.is_empty());
            if appended || matches!(tried, Err(AggregateError::AggregateConflict)) {
                return tried;
            }
            match self.catch_up(aggregate_id, before).await {
                Ok(context) if context.current_sequence == sequence => {
                    if tried.is_err() {
                        cache.put(aggregate_id, context);
                    }
                    return tried;
                }
                Ok(context) => {
                    return self
                        .execute_loaded(aggregate_id, context, command, services, metadata)
                        .await
                }
                Err(e) => {
                    self.shared().cache.forget::<A>(aggregate_id);
                    return Err(e);
                }
            }
        }
        match self.load_context::<A>(aggregate_id).await {
            Ok(context) => {
                self.execute_loaded(aggregate_id, context, command, services, metadata)
                    .await
            }
            Err(e) => {
                self.shared().cache.forget::<A>(aggregate_id);
                Err(e)
            }
        }
    }

    /// [`Store::execute`] for an aggregate id that cannot have been used
    /// yet (a UUID made just now): the command runs on the empty state
    /// without a load. Were the id taken after all, the append would find
    /// its first sequence taken and fail with `AggregateConflict`.
    pub async fn execute_new<A: Aggregate + Clone + 'static>(
        &self,
        aggregate_id: &str,
        command: A::Command,
        services: &A::Services,
        metadata: HashMap<String, String>,
    ) -> Result<Executed<A>, AggregateError<A::Error>> {
        let _turn = self.shared().writers.lock(A::TYPE, aggregate_id).await;
        let empty = EventStoreAggregateContext {
            aggregate_id: aggregate_id.to_string(),
            aggregate: A::default(),
            current_sequence: 0,
            current_snapshot: None,
        };
        self.execute_loaded(aggregate_id, empty, command, services, metadata)
            .await
    }

    /// Runs the command on `context` and appends what it emitted; caches
    /// the state after it, or forgets the entry on failure. The caller holds
    /// the aggregate's turn.
    pub(super) async fn execute_loaded<A: Aggregate + Clone + 'static>(
        &self,
        aggregate_id: &str,
        context: EventStoreAggregateContext<A>,
        command: A::Command,
        services: &A::Services,
        metadata: HashMap<String, String>,
    ) -> Result<Executed<A>, AggregateError<A::Error>> {
        let result = with_event_store!(self, A, snapshots, write, |es| {
            execute_on(&es, context, command, services, metadata).await
        });
        match result {
            Ok((done, after)) => {
                if !done.events.is_empty() {
                    self.appended(A::TYPE);
                }
                self.shared().cache.put(aggregate_id, after);
                Ok(done)
            }
            Err(e) => {
                self.shared().cache.forget::<A>(aggregate_id);
                Err(e)
            }
        }
    }

    /// The aggregate's state from the database. An order's or a
    /// reservation's stream stays a few events long and is never
    /// snapshotted (a snapshot comes every [`SNAPSHOT_EVERY`] events): its
    /// events are read in one statement, without asking for a snapshot
    /// first.
    pub(super) async fn load_context<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<EventStoreAggregateContext<A>, AggregateError<A::Error>> {
        if SHORT_STREAMS.contains(&A::TYPE) {
            with_event_store!(self, A, events, read, |es| es
                .load_aggregate(aggregate_id)
                .await)
        } else {
            with_event_store!(self, A, snapshots, read, |es| es
                .load_aggregate(aggregate_id)
                .await)
        }
    }

    /// A remembered state brought up to date: only the events stored after
    /// it are read.
    pub(super) async fn catch_up<A: Aggregate>(
        &self,
        aggregate_id: &str,
        mut context: EventStoreAggregateContext<A>,
    ) -> Result<EventStoreAggregateContext<A>, AggregateError<A::Error>> {
        let newer = match self {
            Store::Postgres(db) => {
                PostgresEventRepository::new(db.pool.clone())
                    .get_last_events::<A>(aggregate_id, context.current_sequence)
                    .await?
            }
            Store::Sqlite(db) => {
                SqliteEventRepository::new(db.read.clone())
                    .get_last_events::<A>(aggregate_id, context.current_sequence)
                    .await?
            }
        };
        for serialized in newer {
            let envelope = EventEnvelope::<A>::try_from(serialized)?;
            context.current_sequence = envelope.sequence;
            context.aggregate.apply(envelope.payload);
        }
        Ok(context)
    }

    /// [`Store::execute`], reloading and trying again when another writer got
    /// to the aggregate first (at most `attempts` times).
    pub async fn execute_retrying<A: Aggregate + Clone + 'static>(
        &self,
        aggregate_id: &str,
        command: A::Command,
        services: &A::Services,
        metadata: HashMap<String, String>,
        attempts: u32,
    ) -> Result<Executed<A>, AggregateError<A::Error>>
    where
        A::Command: Clone,
    {
        let mut left = attempts.max(1);
        loop {
            left -= 1;
            match self
                .execute(aggregate_id, command.clone(), services, metadata.clone())
                .await
            {
                Err(AggregateError::AggregateConflict) if left > 0 => continue,
                other => return other,
            }
        }
    }

    /// Appends `events` as if the aggregate were at `expected_sequence`: the
    /// raw optimistic append, for writers that already hold the state.
    pub async fn append<A: Aggregate>(
        &self,
        aggregate_id: &str,
        expected_sequence: usize,
        events: Vec<A::Event>,
        metadata: HashMap<String, String>,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        let context = EventStoreAggregateContext {
            aggregate_id: aggregate_id.to_string(),
            aggregate: A::default(),
            current_sequence: expected_sequence,
            current_snapshot: None,
        };
        let stored = with_event_store!(self, A, events, write, |es| es
            .commit(events, context, metadata)
            .await);
        self.shared().cache.forget::<A>(aggregate_id);
        if matches!(&stored, Ok(events) if !events.is_empty()) {
            self.appended(A::TYPE);
        }
        stored
    }

    /// The aggregate's current state and sequence; `None` if it has no
    /// events.
    pub async fn load<A: Aggregate + Clone + 'static>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<(A, usize)>, AggregateError<A::Error>> {
        let cached = self.shared().cache.get::<A>(aggregate_id);
        let had = cached.as_ref().map(|c| c.current_sequence);
        let context = match cached {
            Some(cached) => self.catch_up(aggregate_id, cached).await?,
            None => self.load_context::<A>(aggregate_id).await?,
        };
        self.remember(aggregate_id, &context, had);
        Ok((context.current_sequence > 0).then_some((context.aggregate, context.current_sequence)))
    }

    /// Caches what a read found when it is newer than the entry the read
    /// started from (`had`) and no command of this process is on the
    /// aggregate, so that the next read catches up from here instead of
    /// loading it whole again — on an instance whose commands never touch
    /// it, every read would. An entry changed meanwhile is left alone: a
    /// command put a newer state, or forgot a wrong one.
    fn remember<A: Aggregate + Clone + 'static>(
        &self,
        aggregate_id: &str,
        context: &EventStoreAggregateContext<A>,
        had: Option<usize>,
    ) {
        if context.current_sequence == 0 || had == Some(context.current_sequence) {
            return;
        }
        let shared = self.shared();
        let Some(_turn) = shared.writers.try_lock(A::TYPE, aggregate_id) else {
            return;
        };
        if shared.cache.sequence_of::<A>(aggregate_id) == had {
            shared.cache.put(
                aggregate_id,
                EventStoreAggregateContext {
                    aggregate_id: aggregate_id.to_string(),
                    aggregate: context.aggregate.clone(),
                    current_sequence: context.current_sequence,
                    current_snapshot: context.current_snapshot,
                },
            );
        }
    }

    /// [`Store::load`] of several aggregates of one type, in order: the
    /// ones this process remembers are brought up to date by one read for
    /// all of them (the others load one by one).
    pub async fn load_many<A: Aggregate + Clone + 'static>(
        &self,
        aggregate_ids: &[String],
    ) -> Result<Vec<Option<(A, usize)>>, AggregateError<A::Error>> {
        let cache = &self.shared().cache;
        let mut contexts: Vec<Option<EventStoreAggregateContext<A>>> =
            aggregate_ids.iter().map(|id| cache.get::<A>(id)).collect();
        let had: Vec<Option<usize>> = contexts
            .iter()
            .map(|c| c.as_ref().map(|c| c.current_sequence))
            .collect();
        let remembered: Vec<(&str, usize)> = aggregate_ids
            .iter()
            .zip(&contexts)
            .filter_map(|(id, c)| c.as_ref().map(|c| (id.as_str(), c.current_sequence)))
            .collect();
        if !remembered.is_empty() {
            for serialized in self.newer_events(A::TYPE, &remembered).await? {
                let Some(context) = aggregate_ids
                    .iter()
                    .position(|id| *id == serialized.aggregate_id)
                    .and_then(|i| contexts[i].as_mut())
                else {
                    continue;
                };
                let envelope = EventEnvelope::<A>::try_from(serialized)?;
                context.current_sequence = envelope.sequence;
                context.aggregate.apply(envelope.payload);
            }
        }
        let mut loaded = Vec::with_capacity(aggregate_ids.len());
        for ((id, context), had) in aggregate_ids.iter().zip(contexts).zip(had) {
            loaded.push(match context {
                Some(c) => {
                    self.remember(id, &c, had);
                    (c.current_sequence > 0).then_some((c.aggregate, c.current_sequence))
                }
                None => self.load::<A>(id).await?,
            });
        }
        Ok(loaded)
    }

    /// The events of the given aggregates stored after the given
    /// sequences, oldest first per aggregate: one statement.
    pub(super) async fn newer_events<E: std::error::Error>(
        &self,
        aggregate_type: &str,
        after: &[(&str, usize)],
    ) -> Result<Vec<cqrs_es::persist::SerializedEvent>, AggregateError<E>> {
        // One SELECT per aggregate, each a range of the primary key (an OR
        // of the conditions can make SQLite scan the type's every event).
        let selects: Vec<String> = (0..after.len())
            .map(|i| {
                format!(
                    "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, \
                     payload, metadata FROM events \
                     WHERE aggregate_type = $1 AND aggregate_id = ${} AND sequence > ${}",
                    i * 2 + 2,
                    i * 2 + 3
                )
            })
            .collect();
        let sql = format!(
            "{} ORDER BY aggregate_id, sequence",
            selects.join(" UNION ALL ")
        );
        macro_rules! newer {
            ($pool:expr) => {{
                let mut query = sqlx::query(&sql).bind(aggregate_type);
                for (id, sequence) in after {
                    query = query
                        .bind(*id)
                        .bind(i64::try_from(*sequence).unwrap_or(i64::MAX));
                }
                let rows = query
                    .fetch_all($pool)
                    .await
                    .map_err(|e| AggregateError::DatabaseConnectionError(Box::new(e)))?;
                rows.iter()
                    .map(serialized_event)
                    .collect::<Result<Vec<_>, sqlx::Error>>()
            }};
        }
        let events = match self {
            Store::Postgres(db) => newer!(&*db.statements),
            Store::Sqlite(db) => {
                return sqlite::newer_events(&db.readers, &sql, aggregate_type, after).map_err(
                    |e| match e {
                        StoreError::CorruptRow(_) => {
                            AggregateError::DeserializationError(Box::new(e))
                        }
                        e => AggregateError::DatabaseConnectionError(Box::new(e)),
                    },
                );
            }
        };
        events.map_err(|e| AggregateError::DeserializationError(Box::new(e)))
    }

    /// The aggregate's stored events, oldest first.
    pub async fn load_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        with_event_store!(self, A, events, read, |es| es
            .load_events(aggregate_id)
            .await)
    }

    /// Units `order_id` holds on the product, by the product's stored
    /// events (the Product aggregate keeps only totals): the quantity of its
    /// last `StockHeld` there, unless a `StockReturned` came after it.
    pub async fn held_for_order(
        &self,
        product_id: &str,
        order_id: &str,
    ) -> Result<Option<u32>, StoreError> {
        let quantity: Option<i64> = match self {
            Store::Postgres(db) => {
                db.batched
                    .holds
                    .run((product_id.to_string(), order_id.to_string()))
                    .await?
            }
            Store::Sqlite(db) => {
                sqlite::held_for_order(&db.readers, product_id, order_id)?.flatten()
            }
        };
        quantity
            .map(|q| {
                u32::try_from(q).map_err(|_| {
                    StoreError::CorruptRow(format!(
                        "product {product_id}: order {order_id} holds {q} units"
                    ))
                })
            })
            .transpose()
    }
}

/// Handles `command` on the loaded `context` and commits what it emitted;
/// returns what it did and the aggregate's context after it.
async fn execute_on<A, ES>(
    store: &ES,
    context: EventStoreAggregateContext<A>,
    command: A::Command,
    services: &A::Services,
    metadata: HashMap<String, String>,
) -> Result<(Executed<A>, EventStoreAggregateContext<A>), AggregateError<A::Error>>
where
    A: Aggregate + Clone,
    ES: EventStore<A, AC = EventStoreAggregateContext<A>>,
{
    // The command runs on a copy: the sink applies its events there, and
    // the store gets the context as loaded, so a snapshot taken in this
    // commit applies each event exactly once.
    let mut aggregate = context.aggregate.clone();
    let sink = EventSink::default();
    aggregate
        .handle(command, services, &sink)
        .await
        .map_err(AggregateError::UserError)?;
    let events = sink.collect().await;
    let (id, sequence, snapshot) = (
        context.aggregate_id.clone(),
        context.current_sequence,
        context.current_snapshot,
    );
    let events = if events.is_empty() {
        Vec::new()
    } else {
        store.commit(events, context, metadata).await?
    };
    let after = EventStoreAggregateContext {
        aggregate_id: id,
        aggregate: aggregate.clone(),
        current_sequence: sequence + events.len(),
        current_snapshot: snapshot_after(sequence, snapshot, events.len()),
    };
    Ok((Executed { aggregate, events }, after))
}

/// The snapshot number after appending `appended` events at `sequence`:
/// cqrs-es's snapshot store writes the next snapshot when the append
/// reaches a multiple of [`SNAPSHOT_EVERY`].
fn snapshot_after(sequence: usize, snapshot: Option<usize>, appended: usize) -> Option<usize> {
    let next_at = SNAPSHOT_EVERY - sequence % SNAPSHOT_EVERY;
    if appended > 0 && appended >= next_at {
        Some(snapshot.map_or(1, |n| n + 1))
    } else {
        snapshot
    }
}
