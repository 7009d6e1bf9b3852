//! Which of this deployment's single-instance roles this process holds.
//!
//! Some work must run on exactly one instance at a time: the relay (log →
//! Kafka) and, with the in-process bus, each saga consumer and the
//! projection. Each such role is a PostgreSQL session advisory lock taken
//! by [`Roles::elect`] on a connection of its own; a standby tries the free
//! roles every [`TRY_EVERY`], so it takes over within about a second of the
//! holder's session ending (killed process, lost connection) and within
//! [`store::SESSION_IDLE_TIMEOUT`](crate::store::SESSION_IDLE_TIMEOUT) plus
//! that second after a network cut — by which time the holder, whose ping
//! failed, has stepped down. A role that is not elected (SQLite: one node;
//! Kafka consumers: the broker's group shares partitions) is always held.
//!
//! The loops that run a role look at [`Roles::holds`] before every pass, so
//! a holder that loses its lock finishes at most the pass in flight.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::health::Tasks;
use crate::store::{LeaderSession, Store};

/// How often a process tries the roles it does not hold and pings the
/// session of those it does.
pub const TRY_EVERY: Duration = Duration::from_millis(500);
/// A ping slower than this counts as a lost session.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The roles this process may hold, and which it holds now.
#[derive(Clone, Default)]
pub struct Roles {
    elected: Arc<BTreeMap<String, Held>>,
    changes: Option<watch::Sender<u64>>,
}

#[derive(Default)]
struct Held {
    held: AtomicBool,
    since_ms: AtomicI64,
}

/// One role as `/readyz` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoleState {
    pub role: String,
    pub held: bool,
    /// When this process took it (RFC 3339), if it holds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

impl Roles {
    /// Every role held, none elected: a single node.
    pub fn solo() -> Self {
        Self::default()
    }

    /// Elects `names` through the store: takes what is free now, then
    /// keeps trying and holding in the background until `stop` is sent.
    /// On SQLite every role is this process's.
    pub async fn elect(
        store: &Store,
        names: &[String],
        stop: watch::Receiver<bool>,
    ) -> (Self, Tasks) {
        let mut tasks = Tasks::default();
        if store.is_single_node() || names.is_empty() {
            return (Self::solo(), tasks);
        }
        let (changes, _) = watch::channel(0);
        let roles = Roles {
            elected: Arc::new(
                names
                    .iter()
                    .map(|name| (name.clone(), Held::default()))
                    .collect(),
            ),
            changes: Some(changes),
        };
        for name in names {
            metrics::gauge!("order_saga_leader", "role" => name.clone()).set(0.0);
        }
        let mut session = None;
        roles.pass(store, &mut session).await;
        let this = roles.clone();
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut stop = stop;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(TRY_EVERY) => {}
                    _ = stop.changed() => break,
                }
                if *stop.borrow() {
                    break;
                }
                this.pass(&store, &mut session).await;
            }
            this.lose_all("stopping");
            if let Some(session) = session {
                session.close().await;
            }
        }));
        (roles, tasks)
    }

    /// One round: ping the session (a failed ping loses every role and
    /// drops the session), then try each role not held.
    async fn pass(&self, store: &Store, session: &mut Option<LeaderSession>) {
        if let Some(open) = session.as_mut() {
            let answered = tokio::time::timeout(PING_TIMEOUT, open.ping()).await;
            if !matches!(answered, Ok(Ok(()))) {
                self.lose_all("the leader session stopped answering");
                *session = None;
            }
        }
        if session.is_none() {
            match store.leader_session().await {
                Ok(open) => *session = open,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the leader session; retrying");
                    return;
                }
            }
        }
        let Some(open) = session.as_mut() else {
            return;
        };
        for (name, state) in self.elected.iter() {
            if state.held.load(Ordering::Acquire) {
                continue;
            }
            match tokio::time::timeout(PING_TIMEOUT, open.try_take(name)).await {
                Ok(Ok(true)) => self.take(name, state),
                Ok(Ok(false)) => {}
                _ => {
                    self.lose_all("the leader session stopped answering");
                    *session = None;
                    return;
                }
            }
        }
    }

    fn take(&self, name: &str, state: &Held) {
        let now = chrono::Utc::now().timestamp_millis();
        state.since_ms.store(now, Ordering::Release);
        state.held.store(true, Ordering::Release);
        metrics::gauge!("order_saga_leader", "role" => name.to_string()).set(1.0);
        metrics::gauge!("order_saga_leader_since_seconds", "role" => name.to_string())
            .set(now as f64 / 1000.0);
        tracing::info!(role = name, "took the role");
        self.changed();
    }

    fn lose_all(&self, why: &str) {
        for (name, state) in self.elected.iter() {
            if state.held.swap(false, Ordering::AcqRel) {
                metrics::gauge!("order_saga_leader", "role" => name.clone()).set(0.0);
                tracing::warn!(role = %name, why, "gave up the role");
            }
        }
        self.changed();
    }

    fn changed(&self) {
        if let Some(changes) = &self.changes {
            changes.send_modify(|n| *n += 1);
        }
    }

    /// Whether this process may run `role` now (a role not elected always).
    pub fn holds(&self, role: &str) -> bool {
        self.elected
            .get(role)
            .is_none_or(|state| state.held.load(Ordering::Acquire))
    }

    /// Waits until a role is taken or lost, or `timeout` passes.
    pub async fn wait_change(&self, timeout: Duration) {
        match &self.changes {
            Some(changes) => {
                let mut changes = changes.subscribe();
                let _ = tokio::time::timeout(timeout, changes.changed()).await;
            }
            None => tokio::time::sleep(timeout).await,
        }
    }

    /// The elected roles and whether this process holds each.
    pub fn states(&self) -> Vec<RoleState> {
        self.elected
            .iter()
            .map(|(name, state)| {
                let held = state.held.load(Ordering::Acquire);
                let since = held
                    .then(|| {
                        chrono::DateTime::from_timestamp_millis(
                            state.since_ms.load(Ordering::Acquire),
                        )
                    })
                    .flatten()
                    .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
                RoleState {
                    role: name.clone(),
                    held,
                    since,
                }
            })
            .collect()
    }
}
