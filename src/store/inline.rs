//! The embedded store's hot reads — log stretches, an aggregate's new
//! events, an order's holds, notification progress — run in place, on the
//! calling task's thread, through rusqlite on read-only connections of
//! their own. sqlx's SQLite connections answer every statement from a
//! worker thread of their own: two thread switches and a channel per
//! statement, which under load cost more processor time than these short
//! indexed reads themselves (ARCHITECTURE.md, "Performance", "SQLite
//! without a thread per statement"). Longer reads (listings, replays,
//! rebuilds) stay on sqlx's pool, where they do not hold up the runtime.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::OpenFlags;

use super::group::sqlx_error;

/// Read-only connections kept open: as many reads run at once as the
/// runtime has threads.
const KEPT: usize = 4;

/// Prepared statements each connection keeps.
const PREPARED: usize = 32;

/// Read-only rusqlite connections to the store's file, opened as needed.
#[derive(Debug)]
pub(super) struct Readers {
    path: PathBuf,
    busy_timeout: Duration,
    cache_size: &'static str,
    idle: Mutex<Vec<rusqlite::Connection>>,
}

impl Readers {
    pub(super) fn new(path: &Path, busy_timeout: Duration, cache_size: &'static str) -> Self {
        Readers {
            path: path.to_path_buf(),
            busy_timeout,
            cache_size,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `read` on an idle connection (a new one if none is idle).
    pub(super) fn read<T>(
        &self,
        read: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Result<T, sqlx::Error> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => self.open().map_err(sqlx_error)?,
        };
        let result = read(&conn).map_err(sqlx_error);
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < KEPT {
            idle.push(conn);
        }
        result
    }

    fn open(&self) -> rusqlite::Result<rusqlite::Connection> {
        let conn = rusqlite::Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(self.busy_timeout)?;
        conn.execute_batch(&format!("PRAGMA cache_size = {};", self.cache_size))?;
        conn.set_prepared_statement_cache_capacity(PREPARED);
        Ok(conn)
    }
}
