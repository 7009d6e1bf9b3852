//! Starting and stopping the suite's instances: a fresh store (a
//! temporary directory, or a PostgreSQL database made for the run) and a
//! fresh topic prefix for every run, all removed afterwards. A run on
//! PostgreSQL may start several processes of the service on that one store
//! (and prefix), as an operator runs several instances.

use std::path::PathBuf;
use std::time::Duration;

use super::{short_id, Suite};
use crate::ceilings::{
    self, BENCH_KAFKA_CONSUMER_CONFIG, BENCH_KAFKA_PARTITIONS, BENCH_KAFKA_PRODUCER_CONFIG,
};
use crate::child::ServiceProcess;
use crate::results::Backend;

/// A running instance — one or more processes of the service on one
/// store — and what to clean up after it.
pub(super) struct Instance {
    /// Never empty while the instance runs.
    pub(super) services: Vec<ServiceProcess>,
    /// The flags every process of it is started with.
    args: Vec<String>,
    /// Processes started so far (each its own log file).
    started: usize,
    pub(super) workdir: PathBuf,
    pub(super) database: Option<String>,
    pub(super) topic_prefix: Option<String>,
}

/// What stopping an instance found.
impl Instance {
    /// The first process: the one queries go to.
    pub(super) fn service(&self) -> &ServiceProcess {
        &self.services[0]
    }

    pub(super) fn service_mut(&mut self) -> &mut ServiceProcess {
        &mut self.services[0]
    }

    /// Every process's address: where the orders go, round-robin.
    pub(super) fn urls(&self) -> Vec<String> {
        self.services.iter().map(|s| s.url.clone()).collect()
    }
}

pub(super) struct Stopped {
    pub(super) crash: Option<String>,
    pub(super) note: Option<String>,
    pub(super) xact_commit: Option<i64>,
}

impl Suite {
    pub(super) async fn xact_commit(&self, database: &str) -> Option<i64> {
        let admin = self.admin.as_ref().ok()?;
        match admin.xact_commit(database).await {
            Ok(n) => Some(n),
            Err(e) => {
                self.progress(&format!("  {e}"));
                None
            }
        }
    }

    /// A fresh instance: a new store (and topic prefix), one process of
    /// the service started on it and ready.
    pub(super) async fn start(&self, backend: Backend) -> Result<Instance, String> {
        self.start_many(backend, 1, None).await
    }

    /// A fresh instance of `count` processes on one new store, each ready;
    /// with `jwt_secret`, run with `--auth jwt` and that HS256 secret.
    pub(super) async fn start_many(
        &self,
        backend: Backend,
        count: usize,
        jwt_secret: Option<&str>,
    ) -> Result<Instance, String> {
        self.usable(backend)?;
        if count > 1 && !backend.uses_postgres() {
            return Err("the embedded store serves one process".to_string());
        }
        let id = short_id();
        let workdir = std::env::temp_dir().join(format!("order-saga-bench-{id}"));
        std::fs::create_dir_all(&workdir)
            .map_err(|e| format!("cannot create {}: {e}", workdir.display()))?;
        let mut instance_args: Vec<String> = Vec::new();
        let mut database = None;
        let mut topic_prefix = None;
        if backend.uses_postgres() {
            let admin = self.admin.as_ref().map_err(Clone::clone)?;
            let name = match admin.create_database().await {
                Ok(name) => name,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&workdir);
                    return Err(e);
                }
            };
            instance_args.extend(["--database-url".to_string(), admin.url_of(&name)]);
            database = Some(name);
        } else {
            let data = workdir.join("data");
            instance_args.extend(["--data-dir".to_string(), data.display().to_string()]);
        }
        if backend == Backend::PostgresKafka {
            let brokers = self.config.kafka_brokers.clone().unwrap_or_default();
            let prefix = format!("bench{id}.");
            instance_args.extend([
                "--kafka-brokers".to_string(),
                brokers,
                "--kafka-topic-prefix".to_string(),
                prefix.clone(),
                // Fitted to the test broker: see the constants.
                "--kafka-partitions".to_string(),
                BENCH_KAFKA_PARTITIONS.to_string(),
                "--kafka-consumer-config".to_string(),
                BENCH_KAFKA_CONSUMER_CONFIG.to_string(),
                "--kafka-producer-config".to_string(),
                BENCH_KAFKA_PRODUCER_CONFIG.to_string(),
            ]);
            topic_prefix = Some(prefix);
        }
        if let Some(secret) = jwt_secret {
            instance_args.extend(["--auth", "jwt", "--jwt-secret", secret].map(String::from));
        }
        self.leftovers()
            .push((workdir.clone(), database.clone(), topic_prefix.clone()));
        let mut instance = Instance {
            services: Vec::with_capacity(count),
            args: instance_args,
            started: 0,
            workdir,
            database,
            topic_prefix,
        };
        for _ in 0..count.max(1) {
            if let Err(e) = self.add_service(&mut instance).await {
                self.stop(instance).await;
                return Err(e);
            }
        }
        Ok(instance)
    }

    /// Starts one more process of the instance, on its store, and waits
    /// until it is ready.
    pub(super) async fn add_service(&self, instance: &mut Instance) -> Result<(), String> {
        instance.started += 1;
        let log = match instance.started {
            1 => instance.workdir.join("serve.log"),
            n => instance.workdir.join(format!("serve-{n}.log")),
        };
        let service = ServiceProcess::start(&self.config.service_bin, &instance.args, &log).await?;
        instance.services.push(service);
        Ok(())
    }

    /// Stops the service and removes its store; reads the database's commit
    /// counter last (the service's connections flush their statistics as
    /// they close).
    pub(super) async fn stop(&self, instance: Instance) -> Stopped {
        let (mut crashes, mut notes) = (Vec::new(), Vec::new());
        for service in instance.services {
            match service.stop().await {
                Ok(Some(note)) => notes.push(note),
                Ok(None) => {}
                Err(crash) => crashes.push(crash),
            }
        }
        let joined = |texts: Vec<String>| (!texts.is_empty()).then(|| texts.join("; "));
        let (crash, note) = (joined(crashes), joined(notes));
        let mut xact_commit = None;
        if let Some(db) = &instance.database {
            tokio::time::sleep(Duration::from_millis(500)).await;
            xact_commit = self.xact_commit(db).await;
        }
        self.clean_up(
            &instance.workdir,
            instance.database.as_deref(),
            instance.topic_prefix.as_deref(),
        )
        .await;
        Stopped {
            crash,
            note,
            xact_commit,
        }
    }

    pub(super) async fn clean_up(
        &self,
        workdir: &PathBuf,
        database: Option<&str>,
        prefix: Option<&str>,
    ) {
        self.leftovers().retain(|(dir, _, _)| dir != workdir);
        if let (Some(db), Ok(admin)) = (database, &self.admin) {
            if let Err(e) = admin.drop_database(db).await {
                self.progress(&format!("  cleaning up: {e}"));
            }
        }
        if let (Some(prefix), Some(brokers)) = (prefix, &self.config.kafka_brokers) {
            ceilings::delete_topics(brokers, |name| name.starts_with(prefix)).await;
        }
        if let Err(e) = std::fs::remove_dir_all(workdir) {
            self.progress(&format!(
                "  cleaning up: cannot remove {}: {e}",
                workdir.display()
            ));
        }
    }
}
