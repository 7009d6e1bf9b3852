//! Infrastructure faults: the store unreachable or out of space. One
//! classification for the HTTP layer (503 with `Retry-After` and a code
//! naming the cause) and for every consumer, timer and relay loop (waited
//! out with backoff, never counted toward dead-lettering).
//!
//! An error is a fault when anything in its chain is: a connection that
//! failed or was lost, a pool that timed out, PostgreSQL's connection,
//! resource, shutdown, serialization and lock-timeout classes, SQLite's
//! FULL, BUSY, LOCKED, IOERR and CANTOPEN. Some errors cross a task
//! boundary as text (a batched statement's, a group commit's); their text
//! is read for the same causes.

use std::error::Error;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The store cannot be reached or is refusing work for now.
    StoreUnavailable,
    /// The store has no space left to write.
    StorageFull,
}

impl Fault {
    /// The API's error code (`error.code`, GraphQL's `extensions.code`).
    pub fn code(self) -> &'static str {
        match self {
            Fault::StoreUnavailable => "STORE_UNAVAILABLE",
            Fault::StorageFull => "STORAGE_FULL",
        }
    }

    /// The `reason` label of `order_saga_waiting`.
    pub fn reason(self) -> &'static str {
        match self {
            Fault::StoreUnavailable => "store_unavailable",
            Fault::StorageFull => "storage_full",
        }
    }

    /// What a client is told to wait before trying again (`Retry-After`):
    /// a lost connection comes back in moments, space takes an operator.
    pub fn retry_after(self) -> Duration {
        match self {
            Fault::StoreUnavailable => Duration::from_secs(1),
            Fault::StorageFull => Duration::from_secs(5),
        }
    }

    /// The fault in `error`'s chain, if any.
    pub fn of(error: &(dyn Error + 'static)) -> Option<Fault> {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(fault) = typed(e) {
                return Some(fault);
            }
            next = e.source();
        }
        Fault::in_text(&error.to_string())
    }

    /// The fault an error's text names (for errors that crossed a task
    /// boundary as text).
    pub fn in_text(message: &str) -> Option<Fault> {
        let message = message.to_ascii_lowercase();
        let any = |needles: &[&str]| needles.iter().any(|n| message.contains(n));
        if any(FULL) {
            Some(Fault::StorageFull)
        } else if any(UNAVAILABLE) {
            Some(Fault::StoreUnavailable)
        } else {
            None
        }
    }
}

/// SQLite's and PostgreSQL's words for a full disk.
const FULL: &[&str] = &[
    "database or disk is full",
    "no space left on device",
    "os error 28",
    "could not extend file",
    "disk full",
];

/// Connection, shutdown, contention and I/O failures, as sqlx, SQLite and
/// PostgreSQL word them.
const UNAVAILABLE: &[&str] = &[
    "error communicating with database",
    "connection refused",
    "connection reset",
    "broken pipe",
    "pool timed out",
    "closed pool",
    "pool closed",
    "terminating connection",
    "server closed the connection",
    "the database system is",
    "unexpected end of file",
    "database is locked",
    "database table is locked",
    "disk i/o error",
    "unable to open database file",
    "could not serialize access",
    "deadlock detected",
    "lock timeout",
    "statement timeout",
    "the store's writer has stopped",
];

fn typed(e: &(dyn Error + 'static)) -> Option<Fault> {
    if let Some(e) = e.downcast_ref::<sqlx::Error>() {
        return match e {
            sqlx::Error::Io(io) => Some(io_fault(io)),
            sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => Some(Fault::StoreUnavailable),
            sqlx::Error::Database(db) => db.code().and_then(|code| database_fault(&code)),
            _ => None,
        };
    }
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        use std::io::ErrorKind::*;
        return match io.kind() {
            ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | BrokenPipe
            | TimedOut | UnexpectedEof | StorageFull => Some(io_fault(io)),
            _ => io
                .raw_os_error()
                .filter(|c| *c == 28)
                .map(|_| Fault::StorageFull),
        };
    }
    None
}

fn io_fault(io: &std::io::Error) -> Fault {
    if io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28) {
        Fault::StorageFull
    } else {
        Fault::StoreUnavailable
    }
}

/// PostgreSQL's SQLSTATE or SQLite's (extended) result code.
fn database_fault(code: &str) -> Option<Fault> {
    // SQLite's codes are numbers below 10,000; SQLSTATEs are five characters.
    if let Ok(sqlite) = code
        .parse::<i32>()
        .map_err(drop)
        .and_then(|c| (c < 10_000).then_some(c).ok_or(()))
    {
        return match sqlite & 0xff {
            13 => Some(Fault::StorageFull),
            5 | 6 | 10 | 14 => Some(Fault::StoreUnavailable),
            _ => None,
        };
    }
    match code {
        "53100" => Some(Fault::StorageFull),
        "40001" | "40P01" | "55P03" | "57014" => Some(Fault::StoreUnavailable),
        _ if code.starts_with("08") || code.starts_with("53") || code.starts_with("57P") => {
            Some(Fault::StoreUnavailable)
        }
        _ => None,
    }
}

/// Capped exponential backoff with jitter, for a loop waiting a fault out.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(5);

    /// The wait before the next try: doubling from 100 ms up to 5 s, each
    /// drawn from its upper half so that instances do not try in step.
    pub fn next_wait(&mut self) -> Duration {
        let ceiling = Self::FIRST
            .saturating_mul(2u32.saturating_pow(self.failures))
            .min(Self::CAP);
        self.failures = self.failures.saturating_add(1);
        // A v4 id's random bits: no random-number crate for one draw.
        let draw = (uuid::Uuid::new_v4().as_u128() as u64) as f64 / u64::MAX as f64;
        ceiling.mul_f64(0.5 + draw / 2.0)
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Whether a wait was drawn since the last reset.
    pub fn waited(&self) -> bool {
        self.failures > 0
    }
}

/// Marks a loop as waiting a fault out (`order_saga_waiting{loop, reason}`
/// 1), or as running again (every reason 0).
pub fn waiting(name: &str, fault: Option<Fault>) {
    for reason in [Fault::StoreUnavailable, Fault::StorageFull] {
        let on = if fault == Some(reason) { 1.0 } else { 0.0 };
        metrics::gauge!("order_saga_waiting", "loop" => name.to_string(), "reason" => reason.reason())
            .set(on);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_disks_and_lost_connections_are_faults_and_bad_data_is_not() {
        let full = sqlx::Error::Io(std::io::Error::from_raw_os_error(28));
        assert_eq!(Fault::of(&full), Some(Fault::StorageFull));
        let refused = sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert_eq!(Fault::of(&refused), Some(Fault::StoreUnavailable));
        assert_eq!(
            Fault::of(&sqlx::Error::PoolTimedOut),
            Some(Fault::StoreUnavailable)
        );
        assert_eq!(
            Fault::in_text("database error: (code: 13) database or disk is full"),
            Some(Fault::StorageFull)
        );
        assert_eq!(
            Fault::in_text("FATAL: terminating connection due to administrator command"),
            Some(Fault::StoreUnavailable)
        );
        assert_eq!(Fault::of(&sqlx::Error::RowNotFound), None);
        assert_eq!(
            Fault::in_text("stored event at position 3 is unreadable"),
            None
        );
        assert_eq!(database_fault("23505"), None);
        assert_eq!(database_fault("2067"), None);
        assert_eq!(database_fault("53100"), Some(Fault::StorageFull));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_starts_over_after_a_reset() {
        let mut backoff = Backoff::default();
        let waits: Vec<Duration> = (0..10).map(|_| backoff.next_wait()).collect();
        assert!(waits[0] <= Duration::from_millis(100));
        assert!(waits[3] >= Duration::from_millis(400));
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(5)));
        assert!(waits[9] >= Duration::from_millis(2500));
        backoff.reset();
        assert!(backoff.next_wait() <= Duration::from_millis(100));
    }
}
