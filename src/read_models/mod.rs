//! Keeps the read models (`order_views`, `order_history`, `product_views`,
//! `saga_stats`) up to date from the global log, and answers queries on
//! them.
//!
//! Each batch of log entries is applied in one transaction together with
//! the projection's checkpoint, and the checkpoint moves only if it still
//! holds the position the batch was read from — so every event is applied
//! exactly once, even should two instances apply it at once, and a
//! crash at any instant loses nothing. After a commit, status changes go to
//! subscribers and waiters learn the new position.

mod apply;
mod queries;
mod rebuild;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use order_saga_projections::{project, OrderStatusView, StageStart, StatusChange};
use tokio::sync::{broadcast, watch};

use crate::health::{pause, pause_until_append, Heartbeat, Shutdown, Tasks};
use crate::leadership::Roles;
pub use crate::store::read_models::CHECKPOINT;
use crate::store::read_models::{claim, ReadModelTx, Target};
use crate::store::{Store, StoreError};

use self::apply::apply_entries;

const BATCH: i64 = 500;
/// How long the background projection lets appends gather before a pass:
/// read models lag the log by about this much more, for a fraction of the
/// statements (under steady load a pass per append had been the norm).
const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// How often an instance that does not apply the log looks at what the
/// applying one has applied (for its subscribers). Its own appends do not
/// wake it: the other instance applies them first.
const FOLLOW_EVERY: Duration = Duration::from_millis(50);

/// The read models' maintainer: applies the log to them and tells
/// subscribers and waiters what changed.
pub struct ReadModels {
    store: Store,
    changes: broadcast::Sender<StatusChange>,
    progress: watch::Sender<i64>,
    heartbeat: Heartbeat,
    starts: StageStarts,
    /// Where this process last moved each target's checkpoint to, so the
    /// next batch need not read it back; if another instance moved it
    /// since, the claim fails and the checkpoint is read again.
    claimed: std::sync::Mutex<HashMap<Target, i64>>,
    /// Whether this process applies the log ([`PROJECTIONS_ROLE`]) or
    /// follows the instance that does.
    roles: Roles,
    /// How far a follower has told subscribers and waiters (`None`: not
    /// yet following: starts at the applied checkpoint).
    followed: std::sync::Mutex<Option<i64>>,
}

/// The single-instance role of applying the log to the read models; the
/// other instances follow its checkpoint to tell their own subscribers.
pub const PROJECTIONS_ROLE: &str = "projections";

/// When recent orders reached each stage start (created, stock replied,
/// confirmed), as the projection wrote it to `order_views`: timing a stage
/// needs its start, and reading it back cost a query per stage. Each of
/// these columns is written once per order, from its event's recorded time,
/// so a remembered value is the stored one (whichever instance applied
/// it); a miss reads the table. Bounded: starts over when full.
#[derive(Default)]
struct StageStarts {
    entries: std::sync::Mutex<HashMap<(Target, String, StageStart), i64>>,
}

/// Stage starts remembered at most: enough for the orders in flight (a
/// miss only costs the query).
const STAGE_STARTS_KEPT: usize = 10_000;

impl StageStarts {
    fn remember(&self, target: Target, order_id: &str, start: StageStart, at_ms: i64) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= STAGE_STARTS_KEPT {
            entries.clear();
        }
        entries.insert((target, order_id.to_string(), start), at_ms);
    }

    fn recall(&self, target: Target, order_id: &str, start: StageStart) -> Option<i64> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.get(&(target, order_id.to_string(), start)).copied()
    }
}

impl ReadModels {
    pub fn new(store: Store) -> Arc<Self> {
        Self::with_roles(store, Roles::solo())
    }

    /// A maintainer that applies the log while this process holds
    /// [`PROJECTIONS_ROLE`] and follows it otherwise.
    pub fn with_roles(store: Store, roles: Roles) -> Arc<Self> {
        let (changes, _) = broadcast::channel(4096);
        let (progress, _) = watch::channel(0);
        Arc::new(ReadModels {
            store,
            changes,
            progress,
            heartbeat: Heartbeat::default(),
            starts: StageStarts::default(),
            claimed: std::sync::Mutex::default(),
            roles,
            followed: std::sync::Mutex::default(),
        })
    }

    /// Status changes as they are projected.
    pub fn subscribe(&self) -> broadcast::Receiver<StatusChange> {
        self.changes.subscribe()
    }

    /// The last log position applied (0 before anything).
    pub async fn position(&self) -> Result<i64, StoreError> {
        self.store.load_checkpoint(CHECKPOINT).await
    }

    /// Applies the next batch of the log; returns how many entries.
    pub async fn run_once(&self) -> Result<usize, StoreError> {
        let (applied, changes) = self.apply_batch(Target::Live).await?;
        for change in changes {
            let _ = self.changes.send(change);
        }
        if let Some(last) = applied {
            self.progress.send_replace(last);
        }
        Ok(usize::from(applied.is_some()))
    }

    /// On an instance that does not apply the log: tells subscribers and
    /// waiters what the applying instance has applied since the last look
    /// (the status changes are the log's, projected without writing). With
    /// no subscriber the log is not read: waiters need only the position,
    /// and a subscriber that comes later reads the history the applying
    /// instance wrote up to it, then listens.
    async fn follow_once(&self) -> Result<usize, StoreError> {
        let applied = self.store.load_checkpoint(CHECKPOINT).await?;
        let seen = *self.followed.lock().unwrap_or_else(|e| e.into_inner());
        let skip_to = |applied: i64| {
            *self.followed.lock().unwrap_or_else(|e| e.into_inner()) = Some(applied);
            self.progress.send_replace(applied);
        };
        let Some(seen) = seen else {
            skip_to(applied);
            return Ok(0);
        };
        if applied <= seen {
            return Ok(0);
        }
        if self.changes.receiver_count() == 0 {
            skip_to(applied);
            return Ok(0);
        }
        let entries = self
            .store
            .read_log(seen, (applied - seen).min(BATCH))
            .await?;
        let Some(last) = entries.last().map(|e| e.position) else {
            return Ok(0);
        };
        for entry in &entries {
            for op in project(entry).unwrap_or_default() {
                if let Some(change) = op.status_change() {
                    let _ = self.changes.send(change);
                }
            }
        }
        *self.followed.lock().unwrap_or_else(|e| e.into_inner()) = Some(last);
        self.progress.send_replace(last);
        Ok(entries.len())
    }

    /// One pass of the background loop: apply while this process holds the
    /// role, follow otherwise.
    async fn pass(&self) -> Result<usize, StoreError> {
        if self.roles.holds(PROJECTIONS_ROLE) {
            // Whatever this process last followed or applied, the
            // checkpoint is read afresh when it takes over.
            if self
                .followed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .is_some()
            {
                self.forget_claimed(Target::Live);
            }
            self.run_once().await
        } else {
            self.follow_once().await
        }
    }

    /// Applies the next batch to `target`, with its checkpoint; returns the
    /// position reached (none if there was nothing, or another instance
    /// applied it first) and the status changes.
    pub(crate) async fn apply_batch(
        &self,
        target: Target,
    ) -> Result<(Option<i64>, Vec<StatusChange>), StoreError> {
        let remembered = self.claimed_position(target, None);
        let from = match remembered {
            Some(from) => from,
            None => self.store.load_checkpoint(target.checkpoint()).await?,
        };
        let entries = self.store.read_log(from, BATCH).await?;
        let Some(last) = entries.last().map(|e| e.position) else {
            return Ok((None, Vec::new()));
        };
        let mut tx = ReadModelTx::begin_batch(&self.store).await?;
        if !claim(&mut tx, target.checkpoint(), from, last).await? {
            self.forget_claimed(target);
            return Ok((None, Vec::new()));
        }
        let changes = apply_entries(&mut tx, &entries, target, &self.starts).await;
        let committed = match changes {
            Ok(changes) => tx.commit().await.map(|applied| applied.then_some(changes)),
            Err(e) => Err(e),
        };
        match committed {
            Ok(None) => {
                self.forget_claimed(target);
                Ok((None, Vec::new()))
            }
            Ok(Some(changes)) => {
                self.claimed_position(target, Some(last));
                Ok((Some(last), changes))
            }
            Err(e) => {
                self.forget_claimed(target);
                Err(e)
            }
        }
    }

    /// The remembered checkpoint of `target`, after setting it to `set`.
    pub(crate) fn claimed_position(&self, target: Target, set: Option<i64>) -> Option<i64> {
        let mut claimed = self.claimed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(position) = set {
            claimed.insert(target, position);
        }
        claimed.get(&target).copied()
    }

    pub(crate) fn forget_claimed(&self, target: Target) {
        let mut claimed = self.claimed.lock().unwrap_or_else(|e| e.into_inner());
        claimed.remove(&target);
    }

    /// Runs until the projection has caught up with the log as it is now
    /// (whichever instance applies the batches).
    pub async fn catch_up(&self) -> Result<(), StoreError> {
        self.store.sequence_pending().await?;
        let head = self.store.head_position().await?;
        while self.position().await? < head {
            if self.run_once().await? == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok(())
    }

    /// Keeps the read models up to date in the background until
    /// `shutdown` turns true.
    pub fn spawn(self: &Arc<Self>, poll: Duration, mut shutdown: Shutdown) -> Tasks {
        let this = self.clone();
        let mut tasks = Tasks::default();
        tasks.push(tokio::spawn(async move {
            let mut appends = this.store.appends();
            loop {
                this.heartbeat.beat();
                appends.mark();
                let idle = match this.pass().await {
                    Ok(n) => n == 0,
                    Err(e) => {
                        tracing::warn!(error = %e, "projection failed; retrying");
                        true
                    }
                };
                let applying = this.roles.holds(PROJECTIONS_ROLE);
                let stop = match (idle, applying) {
                    (false, _) => false,
                    (true, true) => pause_until_append(poll, &mut shutdown, &mut appends).await,
                    (true, false) => pause(FOLLOW_EVERY, &mut shutdown).await,
                };
                if stop || *shutdown.borrow() {
                    break;
                }
                // Let more appends gather, so one batch — one transaction,
                // one statistics write per metric — covers several events
                // instead of each append waking a batch of its own.
                tokio::time::sleep(BATCH_WINDOW).await;
            }
        }));
        tasks
    }

    /// Beats while the projection loop runs.
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// Waits (at most `timeout`) until the order's read model has reached
    /// `version`; returns it as it then is.
    pub async fn wait_for_order(
        &self,
        order_id: &str,
        version: i64,
        timeout: Duration,
    ) -> Result<Option<OrderStatusView>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut progress = self.progress.subscribe();
        loop {
            let record = self.order(order_id).await?;
            if record.as_ref().is_some_and(|r| r.version >= version)
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(record);
            }
            // Woken by this instance's projection, or re-checked shortly in
            // case another instance applied it.
            let _ = tokio::time::timeout(Duration::from_millis(20), progress.changed()).await;
        }
    }
}
