//! What this process keeps about aggregates between commands: their
//! recent states ([`AggregateCache`]) and a lock per aggregate
//! ([`KeyedLocks`]) so that contending commands queue instead of failing
//! their append and retrying.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cqrs_es::persist::EventStoreAggregateContext;
use cqrs_es::Aggregate;

/// Recently used aggregates' states, so that loading one reads only the
/// events stored since (none, usually) instead of its snapshot and the
/// events after it. Never a source of truth: every load still asks the
/// store for newer events, and a failed command forgets the entry. Written
/// under the aggregate's lock: by commands, and by reads that found a newer
/// state while no command of this process was on it (another instance
/// writes the products this one prices orders with) — so an entry is what
/// this process committed or read last, and a stale one only costs a
/// conflict and a reload. Bounded, in two generations: new
/// entries go to the young one; when it is full the old one is dropped and
/// the young one becomes old, and an old entry that is used again moves
/// back to the young one. So what is in use — a busy product above all —
/// stays, while orders that are done age out. (Dropping everything when
/// full made every busy product reload at once, every minute or so.)
#[derive(Default)]
pub(super) struct AggregateCache {
    generations: Mutex<Generations>,
}

pub(super) type Entries = HashMap<AggregateKey, Box<dyn Any + Send>>;

#[derive(Default)]
pub(super) struct Generations {
    young: Entries,
    old: Entries,
}

impl Generations {
    fn insert(&mut self, key: AggregateKey, entry: Box<dyn Any + Send>) {
        self.old.remove(&key);
        if self.young.len() >= CACHE_CAPACITY / 2 {
            self.old = std::mem::take(&mut self.young);
            self.old.remove(&key);
        }
        self.young.insert(key, entry);
    }
}

/// An aggregate's type and id.
pub(super) type AggregateKey = (&'static str, String);

/// A lock per aggregate, held while a command on it runs.
#[derive(Default, Debug)]
pub(super) struct KeyedLocks {
    locks: Mutex<HashMap<AggregateKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds one aggregate's lock; the lock is dropped from the map when its
/// last holder or waiter is done.
pub(super) struct Turn<'a> {
    locks: &'a KeyedLocks,
    key: AggregateKey,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    pub(super) async fn lock(&self, aggregate_type: &'static str, aggregate_id: &str) -> Turn<'_> {
        let key = (aggregate_type, aggregate_id.to_string());
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(key.clone()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        Turn {
            locks: self,
            key,
            guard: Some(guard),
        }
    }

    /// The aggregate's turn if no command of this process has it now.
    pub(super) fn try_lock(
        &self,
        aggregate_type: &'static str,
        aggregate_id: &str,
    ) -> Option<Turn<'_>> {
        let key = (aggregate_type, aggregate_id.to_string());
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(key.clone()).or_default().clone()
        };
        // Taken: its holder's turn removes the entry when it is done.
        let guard = lock.try_lock_owned().ok()?;
        Some(Turn {
            locks: self,
            key,
            guard: Some(guard),
        })
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.locks.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map holds it now: nobody waits for it.
        if locks
            .get(&self.key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            locks.remove(&self.key);
        }
    }
}

/// Aggregates held at most by one store's cache.
pub(super) const CACHE_CAPACITY: usize = 20_000;

impl std::fmt::Debug for AggregateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AggregateCache")
    }
}

impl AggregateCache {
    pub(super) fn get<A: Aggregate + Clone + 'static>(
        &self,
        aggregate_id: &str,
    ) -> Option<EventStoreAggregateContext<A>> {
        let key = (A::TYPE, aggregate_id.to_string());
        let mut generations = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = generations.old.remove(&key) {
            generations.insert(key.clone(), entry);
        }
        let cached = generations
            .young
            .get(&key)?
            .downcast_ref::<(A, usize, Option<usize>)>()?;
        Some(EventStoreAggregateContext {
            aggregate_id: aggregate_id.to_string(),
            aggregate: cached.0.clone(),
            current_sequence: cached.1,
            current_snapshot: cached.2,
        })
    }

    pub(super) fn put<A: Aggregate + 'static>(
        &self,
        aggregate_id: &str,
        context: EventStoreAggregateContext<A>,
    ) {
        let mut generations = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        generations.insert(
            (A::TYPE, aggregate_id.to_string()),
            Box::new((
                context.aggregate,
                context.current_sequence,
                context.current_snapshot,
            )),
        );
    }

    /// The cached entry's sequence, if there is one.
    pub(super) fn sequence_of<A: Aggregate + 'static>(&self, aggregate_id: &str) -> Option<usize> {
        let key = (A::TYPE, aggregate_id.to_string());
        let generations = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        let entry = generations
            .young
            .get(&key)
            .or_else(|| generations.old.get(&key))?;
        entry
            .downcast_ref::<(A, usize, Option<usize>)>()
            .map(|cached| cached.1)
    }

    pub(super) fn forget<A: Aggregate>(&self, aggregate_id: &str) {
        let key = (A::TYPE, aggregate_id.to_string());
        let mut generations = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        generations.young.remove(&key);
        generations.old.remove(&key);
    }
}
