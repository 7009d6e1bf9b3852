//! The analysts' tools over the event log: an order's full history, its
//! state at any moment (time travel), a product's stock movements, and
//! streaming replays of the whole log as JSON lines or as an Avro object
//! container file — in constant memory, optionally following new events.

use std::io::Write;
use std::time::Duration;

use apache_avro::schema::Schema;
use apache_avro::types::Value;
use chrono::{DateTime, Utc};
use order_saga_domain::{Order, OrderEvent};

use crate::saga::avro::{Contract, SCHEMA_FILES};
use crate::saga::integration::IntegrationEvent;
use crate::store::{LogEntry, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
    #[error("avro: {0}")]
    Avro(String),
    #[error("stored event at position {0} is unreadable: {1}")]
    Corrupt(i64, String),
}

/// An order's events and its stock reservation's, in log order.
pub async fn order_history(store: &Store, order_id: &str) -> Result<Vec<LogEntry>, StoreError> {
    store
        .aggregate_log(&["Order", "StockReservation"], order_id)
        .await
}

/// A product's events: price and stock levels set, stock held and returned
/// (with the order that caused each hold or return).
pub async fn product_history(store: &Store, product_id: &str) -> Result<Vec<LogEntry>, StoreError> {
    store.aggregate_log(&["Product"], product_id).await
}

/// A moment in the log: a position, or a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    Position(i64),
    Time(DateTime<Utc>),
}

impl std::str::FromStr for AsOf {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(position) = s.parse::<i64>() {
            return Ok(AsOf::Position(position));
        }
        DateTime::parse_from_rfc3339(s)
            .map(|t| AsOf::Time(t.with_timezone(&Utc)))
            .map_err(|_| format!("'{s}' is neither a log position nor an RFC 3339 time"))
    }
}

impl AsOf {
    fn includes(&self, entry: &LogEntry) -> bool {
        match self {
            AsOf::Position(p) => entry.position <= *p,
            AsOf::Time(t) => entry.recorded_at <= *t,
        }
    }
}

/// The order as it was at `as_of`, rebuilt from its events, and how many
/// of them it had then; `None` if it did not exist yet.
pub async fn order_as_of(
    store: &Store,
    order_id: &str,
    as_of: AsOf,
) -> Result<Option<(Order, i64)>, AnalyticsError> {
    let mut order = Order::default();
    let mut version = 0;
    for entry in store.aggregate_log(&["Order"], order_id).await? {
        if !as_of.includes(&entry) {
            break;
        }
        let event: OrderEvent = serde_json::from_value(entry.payload.clone())
            .map_err(|e| AnalyticsError::Corrupt(entry.position, e.to_string()))?;
        cqrs_es::Aggregate::apply(&mut order, event);
        version = entry.sequence;
    }
    Ok((version > 0).then_some((order, version)))
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayFilter {
    /// Entries after this position.
    pub from: i64,
    /// Up to and including this position.
    pub to: Option<i64>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Domain event types to keep (all when empty).
    pub types: Vec<String>,
}

impl ReplayFilter {
    fn keeps(&self, e: &LogEntry) -> bool {
        self.since.is_none_or(|t| e.recorded_at >= t)
            && self.until.is_none_or(|t| e.recorded_at <= t)
            && (self.types.is_empty() || self.types.contains(&e.event_type))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplayFormat {
    /// Domain events with their metadata, one JSON object a line.
    Jsonl,
    /// An Avro object container file of the integration events.
    Avro,
}

/// The schema of a replay's Avro file: a union of every topic's record.
pub fn replay_schema() -> Result<Schema, AnalyticsError> {
    let union = format!("[{}]", SCHEMA_FILES.map(|(_, text)| text).join(","));
    Schema::parse_str(&union).map_err(|e| AnalyticsError::Avro(e.to_string()))
}

/// Streams the log to `out` a page at a time. With `follow`, keeps waiting
/// for new events (until `to`, if given). `progress` hears the position
/// reached after each page. Returns how many events were written.
pub async fn replay<W: Write>(
    store: &Store,
    filter: &ReplayFilter,
    format: ReplayFormat,
    out: W,
    follow: bool,
    mut progress: impl FnMut(i64),
) -> Result<u64, AnalyticsError> {
    const PAGE: i64 = 1_000;
    let schema = replay_schema()?;
    let mut sink = match format {
        ReplayFormat::Jsonl => Sink::Jsonl(std::io::BufWriter::new(out)),
        ReplayFormat::Avro => Sink::Avro(Box::new(
            apache_avro::Writer::new(&schema, out)
                .map_err(|e| AnalyticsError::Avro(e.to_string()))?,
        )),
    };
    let mut position = filter.from;
    let mut written = 0;
    loop {
        let page = store.read_log(position, PAGE).await?;
        if page.is_empty() {
            sink.flush()?;
            if follow {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            break;
        }
        for entry in &page {
            if filter.to.is_some_and(|to| entry.position > to) {
                sink.flush()?;
                return Ok(written);
            }
            position = entry.position;
            if filter.keeps(entry) && sink.write(entry)? {
                written += 1;
            }
        }
        progress(position);
        if follow {
            sink.flush()?;
        }
    }
    sink.finish()?;
    Ok(written)
}

enum Sink<'a, W: Write> {
    Jsonl(std::io::BufWriter<W>),
    Avro(Box<apache_avro::Writer<'a, W>>),
}

impl<W: Write> Sink<'_, W> {
    /// Writes one entry; `false` when it has no integration event (Avro).
    fn write(&mut self, entry: &LogEntry) -> Result<bool, AnalyticsError> {
        match self {
            Sink::Jsonl(out) => {
                serde_json::to_writer(&mut *out, entry).map_err(std::io::Error::from)?;
                out.write_all(b"\n")?;
                Ok(true)
            }
            Sink::Avro(writer) => {
                let event = IntegrationEvent::from_log(entry)
                    .map_err(|e| AnalyticsError::Corrupt(entry.position, e))?;
                let Some(event) = event else { return Ok(false) };
                let index = SCHEMA_FILES
                    .iter()
                    .position(|(topic, _)| *topic == event.topic())
                    .ok_or_else(|| {
                        AnalyticsError::Avro(format!("no schema for {}", event.topic()))
                    })?;
                let value = Value::Union(index as u32, Box::new(Contract::to_value(&event)));
                writer
                    .append_value(value)
                    .map_err(|e| AnalyticsError::Avro(e.to_string()))?;
                Ok(true)
            }
        }
    }

    fn flush(&mut self) -> Result<(), AnalyticsError> {
        match self {
            Sink::Jsonl(out) => out.flush()?,
            Sink::Avro(writer) => {
                writer
                    .flush()
                    .map_err(|e| AnalyticsError::Avro(e.to_string()))?;
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<(), AnalyticsError> {
        match self {
            Sink::Jsonl(mut out) => out.flush()?,
            Sink::Avro(writer) => {
                writer
                    .into_inner()
                    .map_err(|e| AnalyticsError::Avro(e.to_string()))?
                    .flush()?;
            }
        }
        Ok(())
    }
}
