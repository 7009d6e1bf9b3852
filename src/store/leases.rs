//! Leadership through PostgreSQL: session advisory locks held on a
//! connection of their own, one lock per role. The lock lives exactly as
//! long as the session — a process killed, a connection lost or a network
//! cut (the session times out when idle for [`SESSION_IDLE_TIMEOUT`]) frees
//! it for another instance.

use sqlx::{Connection, PgConnection};

use super::{Store, StoreError};

/// How long PostgreSQL keeps an idle leader session (and its locks): the
/// holder pings well within it, so only a dead or cut-off holder times out.
pub const SESSION_IDLE_TIMEOUT: &str = "5s";

/// A dedicated session holding the roles' locks.
pub struct LeaderSession {
    connection: PgConnection,
}

impl Store {
    /// A new leader session, or `None` on SQLite (a single node holds
    /// every role).
    pub async fn leader_session(&self) -> Result<Option<LeaderSession>, StoreError> {
        let Store::Postgres(db) = self else {
            return Ok(None);
        };
        let mut connection = db.pool.acquire().await?.detach();
        sqlx::query(&format!(
            "SET idle_session_timeout = '{SESSION_IDLE_TIMEOUT}'"
        ))
        .execute(&mut connection)
        .await?;
        Ok(Some(LeaderSession { connection }))
    }
}

impl LeaderSession {
    /// Takes `role`'s lock if no other session holds it; `true` when this
    /// session holds it now. The key is the schema and the role, so
    /// deployments on other schemas of the database never meet.
    pub async fn try_take(&mut self, role: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT pg_try_advisory_lock(hashtext(current_schema()), hashtext($1))",
        )
        .bind(role)
        .fetch_one(&mut self.connection)
        .await?)
    }

    /// Whether the session still answers (its locks are held while it does).
    pub async fn ping(&mut self) -> Result<(), StoreError> {
        Ok(self.connection.ping().await?)
    }

    /// Ends the session, releasing every lock it holds.
    pub async fn close(self) {
        let _ = self.connection.close().await;
    }
}
