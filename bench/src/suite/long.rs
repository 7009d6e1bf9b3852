//! The long run: memory and throughput over time on one embedded
//! instance.

use std::time::Duration;

use tokio::time::Instant;

use super::{warm_up, LongConfig, Suite, LONG_SETTLE, MAX_ITEMS, SOAK_OVERRUN, STOCK};
use crate::results::{Backend, LongRun};
use crate::BenchConfig;

impl Suite {
    /// The long run on one embedded instance: a throughput probe, a soak at
    /// 200/s sampling resident memory, orders up to the total, the probe
    /// again.
    pub(super) async fn long_run(&self, long: &LongConfig) -> LongRun {
        let max = self
            .results
            .backend(Backend::Embedded)
            .and_then(|b| b.max_sustainable)
            .filter(|r| *r > 0.0);
        let probe_rate = (1.5 * max.unwrap_or(1000.0)).round();
        let feed_rate = max.unwrap_or(1000.0);
        let mut run = LongRun {
            products: long.products,
            probe_rate,
            probe_s: long.probe.as_secs_f64(),
            soak_rate: long.rate,
            soak_s: (long.duration + SOAK_OVERRUN).as_secs_f64(),
            rss_early_at_s: long.duration.as_secs_f64() / 10.0,
            rss_late_at_s: long.duration.as_secs_f64(),
            ..LongRun::default()
        };
        self.progress(&format!(
            "long run: embedded, {} products, probe at {probe_rate:.0}/s, {:.0}s at {:.0}/s, probe again after {} orders",
            long.products,
            long.duration.as_secs_f64(),
            long.rate,
            long.orders
        ));
        let mut instance = match self.start(Backend::Embedded).await {
            Ok(instance) => instance,
            Err(e) => {
                run.errors.push(format!("starting the service: {e}"));
                return run;
            }
        };
        let url = instance.service().url.clone();
        let phase = |rate: f64, duration: Duration| BenchConfig {
            url: url.clone(),
            order_urls: Vec::new(),
            rate,
            duration,
            products: long.products,
            stock: STOCK,
            max_items: MAX_ITEMS,
            hot: 0.0,
            settle: LONG_SETTLE,
            setup: true,
            jwt_secret: None,
        };
        if let Err(e) = warm_up(&phase(1.0, long.probe)).await {
            run.errors.push(e);
        }
        let mut orders = 0;

        self.progress(&format!(
            "long run: throughput probe at {probe_rate:.0}/s for {:.0}s",
            long.probe.as_secs_f64()
        ));
        match crate::run(&phase(probe_rate, long.probe)).await {
            Ok(r) => {
                self.progress(&format!("  sagas finished at {:.1}/s", r.saga_rate));
                orders += r.accepted;
                run.start_probe = Some(r);
            }
            Err(e) => run.errors.push(format!("first probe: {e}")),
        }

        self.progress(&format!(
            "long run: {:.0}/s for {:.0}s, resident memory at {:.0}s and {:.0}s",
            long.rate, run.soak_s, run.rss_early_at_s, run.rss_late_at_s
        ));
        // The soak sends a little past the last sample, so that the sample
        // sees the service at the soak's rate, not answering the listing
        // of the orders that follows the sending.
        let soak_config = phase(long.rate, long.duration + SOAK_OVERRUN);
        let service = instance.service();
        let sampler = async {
            let start = Instant::now();
            tokio::time::sleep_until(start + long.duration / 10).await;
            let early = service.rss_kib();
            tokio::time::sleep_until(start + long.duration).await;
            (early, service.rss_kib())
        };
        let (soak, (early, late)) = tokio::join!(crate::run(&soak_config), sampler);
        run.rss_early_kib = early;
        run.rss_late_kib = late;
        match soak {
            Ok(r) => {
                self.progress(&format!(
                    "  {} accepted, saga p99 {:.1} ms; RSS {} → {} KiB",
                    r.accepted,
                    r.saga.p99_ms,
                    early.unwrap_or(0),
                    late.unwrap_or(0)
                ));
                orders += r.accepted;
                run.soak = Some(r);
            }
            Err(e) => run.errors.push(format!("soak: {e}")),
        }

        if orders < long.orders {
            let remaining = long.orders - orders;
            let duration = Duration::from_secs_f64((remaining as f64 / feed_rate).max(1.0));
            self.progress(&format!(
                "long run: {remaining} more orders at {feed_rate:.0}/s"
            ));
            match crate::run(&phase(feed_rate, duration)).await {
                Ok(r) => {
                    orders += r.accepted;
                    run.feed = Some(r);
                }
                Err(e) => run.errors.push(format!("feeding orders: {e}")),
            }
        }
        run.orders_before_end_probe = orders;

        self.progress(&format!(
            "long run: throughput probe after {orders} orders at {probe_rate:.0}/s"
        ));
        match crate::run(&phase(probe_rate, long.probe)).await {
            Ok(r) => {
                self.progress(&format!("  sagas finished at {:.1}/s", r.saga_rate));
                run.end_probe = Some(r);
            }
            Err(e) => run.errors.push(format!("second probe: {e}")),
        }
        if let Some(exit) = instance.service_mut().exited() {
            run.errors.push(format!("the service exited ({exit})"));
        }
        let stopped = self.stop(instance).await;
        run.errors.extend(stopped.crash);
        run.errors.extend(stopped.note);
        run
    }
}
