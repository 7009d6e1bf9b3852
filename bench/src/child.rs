//! The service under test, as a child process: the `order-saga` binary
//! (`--service-bin`) run as `order-saga serve --http-addr 127.0.0.1:0 …`, its address read from the
//! `listening on http://ADDR` line it prints, its warnings in a log file,
//! stopped with SIGTERM (SIGKILL if it does not stop in time).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Settings the child must not inherit from the suite's environment: its
/// flags alone choose its store and bus.
const CLEARED_ENV: &[&str] = &[
    "DATABASE_URL",
    "DATA_DIR",
    "DATABASE_POOL_SIZE",
    "HTTP_ADDR",
    "KAFKA_BROKERS",
    "KAFKA_PARTITIONS",
    "KAFKA_TOPIC_PREFIX",
    "KAFKA_PRODUCER_CONFIG",
    "KAFKA_CONSUMER_CONFIG",
    "NOTIFY_WEBHOOK_URL",
];

/// How long the service may take to listen, and then to be ready.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long it may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

pub struct ServiceProcess {
    child: Child,
    pub url: String,
    pub pid: u32,
    log: PathBuf,
}

impl ServiceProcess {
    /// Starts `EXE serve ARGS` (the order-saga binary) with `RUST_LOG=warn`, its stderr going
    /// to `log`, and waits until `/readyz` answers 200.
    pub async fn start(exe: &Path, args: &[String], log: &Path) -> Result<ServiceProcess, String> {
        let stderr = std::fs::File::create(log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let mut command = Command::new(exe);
        command
            .arg("serve")
            .arg("--http-addr")
            .arg("127.0.0.1:0")
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        for name in CLEARED_ENV {
            command.env_remove(name);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start the service: {e}"))?;
        let pid = child.id().unwrap_or(0);
        let Some(stdout) = child.stdout.take() else {
            return Err("the service's output is not readable".to_string());
        };
        let mut lines = BufReader::new(stdout).lines();
        let listening = tokio::time::timeout(START_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.trim().strip_prefix("listening on ") {
                    return Some(url.to_string());
                }
            }
            None
        })
        .await;
        let mut service = ServiceProcess {
            child,
            url: String::new(),
            pid,
            log: log.to_path_buf(),
        };
        match listening {
            Ok(Some(url)) => service.url = url,
            Ok(None) => {
                let tail = service.kill().await;
                return Err(format!("the service exited before listening: {tail}"));
            }
            Err(_) => {
                let tail = service.kill().await;
                return Err(format!(
                    "the service did not listen within {}s: {tail}",
                    START_TIMEOUT.as_secs()
                ));
            }
        }
        // Nothing else is expected on stdout, but a full pipe would block it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        if let Err(e) = service.wait_ready().await {
            let tail = service.kill().await;
            return Err(format!("{e}: {tail}"));
        }
        Ok(service)
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(exit) = self.exited() {
                return Err(format!("the service exited while starting ({exit})"));
            }
            if let Ok(r) = client.get(format!("{}/readyz", self.url)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the service was not ready within {}s",
                    START_TIMEOUT.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `Some(exit status)` if the process has ended.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// Resident memory (VmRSS) in KiB, from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
    }

    /// SIGTERM, then waits; SIGKILL if it does not stop in time.
    /// `Err`: it had died before (a crash), with the tail of its log;
    /// `Ok(Some(note))`: it had to be killed.
    pub async fn stop(mut self) -> Result<Option<String>, String> {
        if let Some(exit) = self.exited() {
            return Err(format!(
                "the service had exited ({exit}): {}",
                self.log_tail()
            ));
        }
        let term = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if !matches!(term, Ok(s) if s.success()) {
            self.kill().await;
            return Ok(Some("SIGTERM could not be sent; killed".to_string()));
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(_)) => Ok(None),
            Ok(Err(e)) => Ok(Some(format!("waiting for the service: {e}"))),
            Err(_) => {
                self.kill().await;
                Ok(Some(format!(
                    "the service did not stop within {}s of SIGTERM; killed",
                    STOP_TIMEOUT.as_secs()
                )))
            }
        }
    }

    /// SIGKILL and wait; returns the tail of its log.
    pub async fn kill(&mut self) -> String {
        let _ = self.child.kill().await;
        self.log_tail()
    }

    /// The last lines the service wrote to stderr (warnings and errors).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(4).collect();
        if lines.is_empty() {
            return "(no log output)".to_string();
        }
        let tail: Vec<&str> = lines.into_iter().rev().collect();
        let joined = tail.join(" | ");
        // Keep report cells readable.
        match joined.char_indices().nth(600) {
            Some((cut, _)) => format!("{}…", &joined[..cut]),
            None => joined,
        }
    }
}
