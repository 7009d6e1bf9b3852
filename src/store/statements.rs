//! PostgreSQL connections for single statements, kept between uses without
//! sqlx's release ping.
//!
//! sqlx 0.8's pool tests every connection it takes back: it sends a Sync
//! and waits for the server's ReadyForQuery — a round trip after every
//! statement run on `&pool`, which PostgreSQL answers with a wake-up, a read
//! and a write of its own. Under load that doubled the round trips of the
//! saga's statements (ARCHITECTURE.md, "Performance", "No ping after every
//! statement"). [`Statements`] is an executor (`.execute(&*statements)`,
//! `.fetch_all(..)`, …) over connections of its own: a statement takes one,
//! and gives it back when it has run to the end, failed or not — the
//! connection itself reads up to the server's next ReadyForQuery before
//! its next statement. A statement dropped half-way (its caller gone)
//! drops its connection instead, since part of a message may have been
//! sent; so does one that failed on the wire. Transactions, migrations and
//! the libraries' own queries stay on sqlx's pool.

use std::sync::Mutex;

use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgQueryResult, PgRow, PgStatement};
use sqlx::postgres::{PgTypeInfo, Postgres};
use sqlx::{ConnectOptions, Describe, Either, Execute, Executor};
use tokio::sync::{Semaphore, SemaphorePermit};

/// At most `size` connections, opened when first needed.
#[derive(Debug)]
pub struct Statements {
    options: PgConnectOptions,
    idle: Mutex<Vec<PgConnection>>,
    permits: Semaphore,
}

impl Statements {
    pub fn new(options: PgConnectOptions, size: u32) -> Self {
        Statements {
            options,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(size.max(1) as usize),
        }
    }

    /// A connection of the set, waiting for one while all are busy.
    async fn lease(&self) -> Result<Lease<'_>, sqlx::Error> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match idle {
            Some(conn) => conn,
            None => self.options.connect().await?,
        };
        Ok(Lease {
            conn: Some(conn),
            home: self,
            _permit: permit,
        })
    }

    /// Closes the idle connections; new statements open new ones.
    pub async fn close(&self) {
        let idle = match self.idle.lock() {
            Ok(mut idle) => std::mem::take(&mut *idle),
            Err(_) => return,
        };
        for conn in idle {
            let _ = sqlx::Connection::close(conn).await;
        }
    }
}

/// After these the connection is in step with the server: the statement
/// ran, or the server refused it (and the connection reads on to its
/// ReadyForQuery before the next). Failures on the wire or in the protocol
/// leave it in doubt.
fn reusable<T>(result: &Result<T, sqlx::Error>) -> bool {
    !matches!(
        result,
        Err(sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed)
    )
}

/// A connection taken from the set. Dropped without [`Lease::finish`] (the
/// statement's future was dropped half-way), it closes.
struct Lease<'a> {
    conn: Option<PgConnection>,
    home: &'a Statements,
    _permit: SemaphorePermit<'a>,
}

impl Lease<'_> {
    fn conn(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        self.conn.as_mut().ok_or(sqlx::Error::PoolClosed)
    }

    /// Gives the connection back, unless `result` leaves it in doubt.
    fn finish<T>(mut self, result: &Result<T, sqlx::Error>) {
        if let (Some(conn), true) = (self.conn.take(), reusable(result)) {
            if let Ok(mut idle) = self.home.idle.lock() {
                idle.push(conn);
            }
        }
    }
}

impl<'s> Executor<'s> for &'s Statements {
    type Database = Postgres;

    /// Collects the statement's results before handing them on, so the
    /// connection is back in the set before the caller reads them.
    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        's: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        stream::once(async move {
            let mut lease = self.lease().await?;
            let result: Result<Vec<_>, _> = lease.conn()?.fetch_many(query).try_collect().await;
            lease.finish(&result);
            result
        })
        .map_ok(|results: Vec<_>| stream::iter(results.into_iter().map(Ok)))
        .try_flatten()
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        's: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        Box::pin(async move {
            let mut lease = self.lease().await?;
            let result = lease.conn()?.fetch_optional(query).await;
            lease.finish(&result);
            result
        })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement<'q>, sqlx::Error>>
    where
        's: 'e,
    {
        Box::pin(async move {
            let mut lease = self.lease().await?;
            let result = lease.conn()?.prepare_with(sql, parameters).await;
            lease.finish(&result);
            result
        })
    }

    fn describe<'e, 'q: 'e>(
        self,
        sql: &'q str,
    ) -> BoxFuture<'e, Result<Describe<Postgres>, sqlx::Error>>
    where
        's: 'e,
    {
        Box::pin(async move {
            let mut lease = self.lease().await?;
            let result = lease.conn()?.describe(sql).await;
            lease.finish(&result);
            result
        })
    }
}
