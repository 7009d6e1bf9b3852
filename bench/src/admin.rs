//! The benchmark suite's PostgreSQL administration: a fresh database for
//! every run (`CREATE DATABASE bench_<random>`, dropped with `FORCE`
//! afterwards), and the server's commit counter.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

/// A connection to the server through `--admin-url` (any database on it;
/// the suite's own queries never run in the databases it measures).
#[derive(Clone, Debug)]
pub struct Admin {
    pool: PgPool,
    url: String,
    /// Databases created and not yet dropped.
    created: Arc<Mutex<Vec<String>>>,
}

impl Admin {
    pub async fn connect(url: &str) -> Result<Admin, String> {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|e| format!("--admin-url: cannot connect to {url}: {e}"))?;
        Ok(Admin {
            pool,
            url: url.to_string(),
            created: Arc::default(),
        })
    }

    /// `SELECT version()`.
    pub async fn version(&self) -> Result<String, String> {
        sqlx::query_scalar("SELECT version()")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| e.to_string())
    }

    /// Creates an empty database with a random name; returns its name.
    pub async fn create_database(&self) -> Result<String, String> {
        let name = format!("bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\""))
            .execute(&self.pool)
            .await
            .map_err(|e| format!("CREATE DATABASE {name}: {e}"))?;
        self.created().push(name.clone());
        Ok(name)
    }

    /// Writes every dirty page out now (`CHECKPOINT`), so a run does not
    /// pay for the one before it: the checkpoint and the full-page writes
    /// after it would otherwise fall at a random moment of the run.
    pub async fn checkpoint(&self) -> Result<(), String> {
        sqlx::raw_sql("CHECKPOINT")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| format!("CHECKPOINT: {e}"))
    }

    /// Drops the database, closing whatever is still connected to it.
    pub async fn drop_database(&self, name: &str) -> Result<(), String> {
        sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&self.pool)
            .await
            .map_err(|e| format!("DROP DATABASE {name}: {e}"))?;
        self.created().retain(|n| n != name);
        Ok(())
    }

    /// Drops every database this created and has not dropped yet (after
    /// an interruption).
    pub async fn drop_leftovers(&self) {
        let names = self.created().clone();
        for name in names {
            if let Err(e) = self.drop_database(&name).await {
                eprintln!("bench: {e}");
            }
        }
    }

    fn created(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.created.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The URL of database `name` on the admin URL's server.
    pub fn url_of(&self, name: &str) -> String {
        with_database(&self.url, name)
    }

    /// Transactions committed in database `name` so far (PostgreSQL's
    /// statistics, flushed by each backend at least about once a second
    /// while busy and when it disconnects).
    pub async fn xact_commit(&self, name: &str) -> Result<i64, String> {
        sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| format!("pg_stat_database: {e}"))
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// `url` with its database (the path) replaced by `database`, query
/// parameters kept.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    let query = query.map(|q| format!("?{q}")).unwrap_or_default();
    format!("{}/{database}{query}", &base[..path])
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_database_of_a_url_is_replaced() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "b"),
            "postgres://postgres@127.0.0.1:5432/b"
        );
        assert_eq!(
            with_database("postgres://u:p@h/test?sslmode=disable", "b"),
            "postgres://u:p@h/b?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:5432", "b"),
            "postgres://h:5432/b"
        );
    }
}
