//! The failover scenario: two processes of the service on one PostgreSQL
//! store; [`FAILOVER_KILLS`] times the one holding the roles is SIGKILLed
//! while orders go to the other, the time until the survivor's `/readyz`
//! shows every role held is measured, the sagas of that load must all
//! finish, and a replacement process is started for the next kill.

use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::instances::Instance;
use super::{warm_up, Suite};
use crate::child::ServiceProcess;
use crate::results::{Backend, Failover, Kill, FAILOVER_KILLS};
use crate::BenchConfig;

/// The load each kill happens in: orders per second to the survivor, for
/// how long, and how far into it the kill comes.
const LOAD_RATE: f64 = 50.0;
const LOAD_FOR: Duration = Duration::from_secs(4);
const KILL_AFTER: Duration = Duration::from_secs(1);
const LOAD_SETTLE: Duration = Duration::from_secs(60);
/// How often the survivor's `/readyz` is asked, and for how long.
const POLL_EVERY: Duration = Duration::from_millis(20);
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(60);

impl Suite {
    pub(super) async fn failover(&self, backend: Backend) -> Failover {
        let mut result = Failover {
            backend,
            kills: Vec::new(),
            load_rate: LOAD_RATE,
            load_s: LOAD_FOR.as_secs_f64(),
            errors: Vec::new(),
        };
        self.progress(&format!(
            "failover {} ×2: {FAILOVER_KILLS} SIGKILLs of the role holder …",
            backend.name()
        ));
        let mut instance = match self.start_many(backend, 2, None).await {
            Ok(instance) => instance,
            Err(e) => {
                result.errors.push(format!("starting the service: {e}"));
                return result;
            }
        };
        let load = |url: &str, setup: bool| BenchConfig {
            url: url.to_string(),
            setup,
            ..self.load(LOAD_RATE, LOAD_FOR, LOAD_SETTLE)
        };
        if let Err(e) = warm_up(&load(&instance.service().url, true)).await {
            result.errors.push(e);
        }
        for _ in 0..FAILOVER_KILLS {
            match self.kill_holder(&mut instance, &load).await {
                Ok(kill) => result.kills.push(kill),
                Err(e) => {
                    result.errors.push(e);
                    break;
                }
            }
            if let Err(e) = self.add_service(&mut instance).await {
                result.errors.push(format!("starting a replacement: {e}"));
                break;
            }
        }
        let stopped = self.stop(instance).await;
        result.errors.extend(stopped.crash);
        match result.p50_max_ms() {
            Some((p50, max)) => self.progress(&format!(
                "  taken over in p50 {p50:.0} ms, max {max:.0} ms; {} sagas failed or unfinished",
                result.unfinished()
            )),
            None => self.progress(&format!("  failed: {}", result.errors.join("; "))),
        }
        result
    }

    /// SIGKILLs the process holding the most roles while orders go to
    /// another, and times the takeover.
    async fn kill_holder(
        &self,
        instance: &mut Instance,
        load: &impl Fn(&str, bool) -> BenchConfig,
    ) -> Result<Kill, String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| e.to_string())?;
        let mut held = Vec::new();
        for service in &instance.services {
            held.push(roles(&client, service).await?.held());
        }
        let holder = (0..held.len())
            .max_by_key(|&i| held[i].len())
            .ok_or("no process is running")?;
        let survivor = (0..held.len())
            .find(|&i| i != holder)
            .ok_or("no process would survive the kill")?;
        let survivor_url = instance.services[survivor].url.clone();
        let config = load(&survivor_url, false);
        let sending = tokio::spawn(async move { crate::run(&config).await });
        tokio::time::sleep(KILL_AFTER).await;
        let mut killed = instance.services.remove(holder);
        let at = Instant::now();
        killed.kill().await;
        let survivor = &instance.services[if survivor > holder {
            survivor - 1
        } else {
            survivor
        }];
        let taken_over_ms = loop {
            if let Ok(states) = roles(&client, survivor).await {
                if !states.0.is_empty() && states.0.iter().all(|(_, held)| *held) {
                    break Some(at.elapsed().as_secs_f64() * 1000.0);
                }
            }
            if at.elapsed() >= TAKEOVER_TIMEOUT {
                break None;
            }
            tokio::time::sleep(POLL_EVERY).await;
        };
        let report = match sending.await {
            Ok(Ok(report)) => Some(report),
            Ok(Err(e)) => return Err(format!("the load across a kill: {e}")),
            Err(e) => return Err(format!("the load across a kill failed: {e}")),
        };
        self.progress(&format!(
            "  killed the holder of {}: {}",
            held[holder].join(", "),
            match (taken_over_ms, &report) {
                (Some(ms), Some(r)) => format!(
                    "taken over in {ms:.0} ms; {} accepted, {} failed, {} unfinished",
                    r.accepted, r.failed, r.unfinished
                ),
                _ => format!("not taken over within {} s", TAKEOVER_TIMEOUT.as_secs()),
            }
        ));
        Ok(Kill {
            roles: held[holder].clone(),
            taken_over_ms,
            load: report,
        })
    }
}

/// A process's roles as its `/readyz` reports them: (name, held).
struct RoleStates(Vec<(String, bool)>);

impl RoleStates {
    fn held(&self) -> Vec<String> {
        self.0
            .iter()
            .filter(|(_, held)| *held)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

async fn roles(client: &reqwest::Client, service: &ServiceProcess) -> Result<RoleStates, String> {
    let body: Value = client
        .get(format!("{}/readyz", service.url))
        .send()
        .await
        .map_err(|e| format!("/readyz: {e}"))?
        .json()
        .await
        .map_err(|e| format!("/readyz: {e}"))?;
    let states = body["roles"]
        .as_array()
        .ok_or_else(|| format!("/readyz: no roles in {body}"))?
        .iter()
        .filter_map(|r| Some((r["role"].as_str()?.to_string(), r["held"].as_bool()?)))
        .collect();
    Ok(RoleStates(states))
}
