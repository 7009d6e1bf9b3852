//! The global log: every stored event with a dense, commit-ordered
//! position ([`Store::read_log`]), the wake-up its readers wait on
//! ([`AppendWatch`]), and the readers' checkpoints. How the position is made
//! safe on each backend is in ARCHITECTURE.md ("The global log").

use std::time::Duration;

use tokio::sync::watch;

pub use order_saga_projections::LogEntry;

use super::{postgres, sqlite, tail, Store, StoreError, MAX_LOG_BATCH};

/// What this process has appended, counted in all and per aggregate type.
#[derive(Debug, Clone, Default)]
pub struct Appends {
    pub(super) total: u64,
    by_type: Vec<(&'static str, u64)>,
}

impl Appends {
    fn count(&mut self, aggregate_type: &'static str) {
        self.total = self.total.wrapping_add(1);
        match self.by_type.iter_mut().find(|(t, _)| *t == aggregate_type) {
            Some((_, n)) => *n = n.wrapping_add(1),
            None => self.by_type.push((aggregate_type, 1)),
        }
    }

    /// Appends of these types (`[]`: of any type).
    fn of(&self, interest: &[&str]) -> u64 {
        if interest.is_empty() {
            return self.total;
        }
        self.by_type
            .iter()
            .filter(|(t, _)| interest.contains(t))
            .fold(0, |sum, (_, n)| sum.wrapping_add(*n))
    }
}

/// A log reader's wake-up: [`AppendWatch::mark`] before looking for work,
/// then [`AppendWatch::changed`] resolves once this process has appended
/// an event of interest since the mark.
pub struct AppendWatch {
    receiver: watch::Receiver<Appends>,
    interest: &'static [&'static str],
    seen: u64,
}

impl AppendWatch {
    pub fn mark(&mut self) {
        self.seen = self.receiver.borrow_and_update().of(self.interest);
    }

    /// Errs only when the store is gone.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        let (seen, interest) = (self.seen, self.interest);
        self.receiver
            .wait_for(|a| a.of(interest) != seen)
            .await
            .map(|_| ())
    }
}

/// A reader runs the sequencer at least this often even when this process
/// appended nothing: other processes may have.
pub(super) const SEQUENCE_AT_LEAST_EVERY: Duration = Duration::from_millis(100);

impl Store {
    /// Wakes on every append through this store in this process: a log
    /// reader that found nothing waits for this, or for its poll interval —
    /// appends by other processes are seen by polling only.
    pub fn appends(&self) -> AppendWatch {
        self.appends_of(&[])
    }

    /// [`Store::appends`] for a reader with work only in some aggregate
    /// types' events (`[]`: all of them): appends of other types do not wake
    /// it, and cost it no read.
    pub fn appends_of(&self, interest: &'static [&'static str]) -> AppendWatch {
        AppendWatch {
            receiver: self.shared().appended.subscribe(),
            interest,
            seen: 0,
        }
    }

    pub(super) fn appended(&self, aggregate_type: &'static str) {
        self.shared()
            .appended
            .send_modify(|a| a.count(aggregate_type));
    }

    /// Gives every committed event a global position now, instead of at the
    /// next read. A no-op on SQLite, where the position is assigned at
    /// insert. Returns how many events were numbered.
    pub async fn sequence_pending(&self) -> Result<u64, StoreError> {
        match self {
            Store::Postgres(db) => postgres::sequence(&db.statements, MAX_LOG_BATCH).await,
            Store::Sqlite(_) => Ok(0),
        }
    }

    /// Before a read of aggregates' log entries on PostgreSQL: runs the
    /// sequencer if due ([`Pg::sequencing`]; a read of the global log runs
    /// it in its own statement instead).
    pub(super) async fn sequence_for_reading(&self) -> Result<(), StoreError> {
        let Store::Postgres(db) = self else {
            return Ok(());
        };
        db.sequencing(|due| async move {
            match due {
                true => postgres::sequence(&db.statements, MAX_LOG_BATCH)
                    .await
                    .map(|n| ((), n)),
                false => Ok(((), 0)),
            }
        })
        .await
    }

    /// Up to `limit` log entries after `after`, in position order. Positions
    /// are dense and appear in order: a reader that checkpoints the last
    /// position it handled never skips an event.
    ///
    /// Readers near the end of the log share one database read per new
    /// stretch (the log tail, `src/store/tail.rs`); the answer is the same
    /// as a direct read's.
    pub async fn read_log(&self, after: i64, limit: i64) -> Result<Vec<LogEntry>, StoreError> {
        let limit = limit.clamp(1, MAX_LOG_BATCH);
        let tail = &self.shared().tail;
        let wanted = usize::try_from(limit).unwrap_or(usize::MAX);
        match tail.lookup(after, wanted) {
            tail::Lookup::Served(entries) => Ok(entries),
            tail::Lookup::AtHead { head, generation } => {
                let _refreshing = tail.refresh.lock().await;
                match tail.after_wait(generation, after, wanted) {
                    tail::AfterWait::Served(entries) => Ok(entries),
                    tail::AfterWait::Refresh => {
                        let mut read = self
                            .read_log_directly(head, tail::TAIL_REFRESH.max(limit))
                            .await?;
                        tail.extend(head, &read);
                        read.truncate(wanted);
                        Ok(read)
                    }
                    tail::AfterWait::Outside => self.read_log_directly(after, limit).await,
                }
            }
            tail::Lookup::Outside { generation } => {
                let read = self.read_log_directly(after, limit).await?;
                if read.len() < wanted {
                    tail.seed(generation, after, &read);
                }
                Ok(read)
            }
        }
    }

    /// [`Store::read_log`] from the database. On PostgreSQL the sequencer
    /// runs in the same statement unless it ran since this process last
    /// appended and not long ago (see [`Pg::sequencing`]).
    pub(super) async fn read_log_directly(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<LogEntry>, StoreError> {
        let db = match self {
            Store::Postgres(db) => db,
            Store::Sqlite(db) => return sqlite::read_log(&db.readers, after, limit),
        };
        db.sequencing(|due| {
            postgres::read_log(&db.statements, after, limit, due.then_some(MAX_LOG_BATCH))
        })
        .await
    }

    /// The log entries of the given aggregates with this id (e.g. an order
    /// and its stock reservation), in position order.
    pub async fn aggregate_log(
        &self,
        aggregate_types: &[&str],
        aggregate_id: &str,
    ) -> Result<Vec<LogEntry>, StoreError> {
        self.sequence_for_reading().await?;
        let mut entries = Vec::new();
        for aggregate_type in aggregate_types {
            entries.extend(match self {
                Store::Postgres(db) => {
                    postgres::read_aggregate(&db.statements, aggregate_type, aggregate_id).await?
                }
                Store::Sqlite(db) => {
                    sqlite::read_aggregate(&db.readers, aggregate_type, aggregate_id)?
                }
            });
        }
        entries.sort_by_key(|e| e.position);
        Ok(entries)
    }

    /// The highest global position assigned so far.
    pub async fn head_position(&self) -> Result<i64, StoreError> {
        let head: Option<i64> = on_read_pool!(self, |pool| {
            sqlx::query_scalar("SELECT MAX(position) FROM events")
                .fetch_one(pool)
                .await
        })?;
        Ok(head.unwrap_or(0))
    }

    /// Ids of every aggregate of a type that has events, sorted.
    pub async fn aggregate_ids(&self, aggregate_type: &str) -> Result<Vec<String>, StoreError> {
        let ids = on_read_pool!(self, |pool| {
            sqlx::query_scalar(
                "SELECT DISTINCT aggregate_id FROM events WHERE aggregate_type = $1 ORDER BY 1",
            )
            .bind(aggregate_type)
            .fetch_all(pool)
            .await
        })?;
        Ok(ids)
    }

    /// The last position the named reader recorded (0 if none).
    pub async fn load_checkpoint(&self, name: &str) -> Result<i64, StoreError> {
        let position: Option<i64> = on_read_pool!(self, |pool| {
            sqlx::query_scalar("SELECT position FROM checkpoints WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await
        })?;
        Ok(position.unwrap_or(0))
    }

    /// Records how far the named reader has come; a checkpoint only moves
    /// forward (a lower `position` leaves it as it is). On PostgreSQL without
    /// waiting for the flush to disk (see [`RELAXED`]): a checkpoint lost
    /// to a database crash only means messages delivered again.
    pub async fn save_checkpoint(&self, name: &str, position: i64) -> Result<(), StoreError> {
        let sql = match self {
            Store::Postgres(_) => include_str!("sql/pg_save_checkpoint.sql"),
            Store::Sqlite(_) => include_str!("sql/save_checkpoint.sql"),
        };
        write_statement!(self, sql, [name.to_string(), position])?;
        Ok(())
    }

    /// Sets the named reader's checkpoint to `position`, backwards too: an
    /// operator's replay of a consumer (while it is not running).
    pub async fn reset_checkpoint(&self, name: &str, position: i64) -> Result<(), StoreError> {
        write_statement!(
            self,
            "INSERT INTO checkpoints (name, position) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET position = excluded.position",
            [name.to_string(), position]
        )?;
        Ok(())
    }
}
