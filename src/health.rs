//! Liveness of the background loops, for `/readyz`: each loop beats a
//! [`Heartbeat`] every pass; a loop that has not beaten for a while is
//! stuck or gone.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, Default)]
pub struct Heartbeat(Arc<AtomicI64>);

impl Heartbeat {
    pub fn beat(&self) {
        self.0
            .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    /// Whether it beat within `window`.
    pub fn alive(&self, window: Duration) -> bool {
        let last = self.0.load(Ordering::Relaxed);
        let window = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        last > 0 && chrono::Utc::now().timestamp_millis() - last <= window
    }
}

/// The components `/readyz` checks besides the store.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    pub components: Vec<(&'static str, Heartbeat)>,
}

/// Tells background loops to stop after their current pass.
pub type Shutdown = tokio::sync::watch::Receiver<bool>;

/// Waits `poll` before the next pass; returns `true` when the loop should
/// stop instead.
pub async fn pause(poll: Duration, shutdown: &mut Shutdown) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(poll) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

/// [`pause`], cut short when the store appends what `wake` is interested
/// in (a log reader has work). Call `wake.mark()` before looking for work,
/// so an append during the look is not missed.
pub async fn pause_until_append(
    poll: Duration,
    shutdown: &mut Shutdown,
    wake: &mut crate::store::AppendWatch,
) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(poll) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
        _ = wake.changed() => *shutdown.borrow(),
    }
}

/// Background loops that stop on a shutdown signal; dropping them aborts
/// whatever is still running.
#[derive(Default)]
pub struct Tasks {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Tasks {
    pub fn push(&mut self, task: tokio::task::JoinHandle<()>) {
        self.tasks.push(task);
    }

    pub fn extend(&mut self, other: Tasks) {
        let mut other = other;
        self.tasks.append(&mut other.tasks);
    }

    /// Waits up to `timeout` for the loops to finish their pass and stop.
    pub async fn join(mut self, timeout: Duration) {
        let all = futures_util::future::join_all(self.tasks.drain(..));
        let _ = tokio::time::timeout(timeout, all).await;
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
