//! The GraphQL schema's [`Backend`]: reads from the read models, commands
//! through [`App`], and read-your-writes — a mutation answers only once the
//! read model shows its effect (bounded wait), so whatever the client reads
//! next includes it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::{BoxStream, StreamExt};
use order_saga_domain::Money;
use order_saga_graphql::{Backend, BackendError, ErrorCode, NewOrder, RedriveRecord};
use order_saga_projections::{
    DeadLetterRecord, HistoryRecord, LogEntry, OrderFilter, OrderStatusView, ProductRecord,
    StatRecord, StatusChange, StuckSagaRecord,
};
use tokio::sync::broadcast::error::RecvError;

use crate::fault::Fault;
use crate::read_models::ReadModels;
use crate::saga::{Redrive, Saga, SagaConfig, SagaError};
use crate::service::{App, AppError, CreateOrderRequest};
use crate::store::{DeadLetterStatus, StoreError};

/// Longest a mutation waits for the read model to show its effect.
const READ_YOUR_WRITES: Duration = Duration::from_secs(5);

pub struct ApiBackend {
    app: Arc<App>,
    projections: Arc<ReadModels>,
    /// The running saga, for redrives (none: dead letters are read-only).
    saga: Option<Arc<Saga>>,
}

impl ApiBackend {
    pub fn new(app: Arc<App>, projections: Arc<ReadModels>) -> Self {
        Self {
            app,
            projections,
            saga: None,
        }
    }

    pub fn with_saga(mut self, saga: Arc<Saga>) -> Self {
        self.saga = Some(saga);
        self
    }

    async fn existing_dead_letter(&self, id: i64) -> Result<DeadLetterRecord, BackendError> {
        self.app.store().dead_letter(id).await?.ok_or_else(|| {
            BackendError::new(ErrorCode::NotFound, format!("id: no dead letter {id}"))
        })
    }

    async fn caught_up(
        &self,
        order_id: &str,
        version: i64,
    ) -> Result<OrderStatusView, BackendError> {
        self.projections
            .wait_for_order(order_id, version, READ_YOUR_WRITES)
            .await?
            .filter(|r| r.version >= version)
            .ok_or_else(|| {
                BackendError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "order '{order_id}' is stored but not yet readable; query it again shortly"
                    ),
                )
            })
    }
}

impl From<AppError> for BackendError {
    fn from(e: AppError) -> Self {
        let message = e.to_string();
        match e {
            AppError::Invalid(field) => BackendError {
                code: ErrorCode::BadUserInput,
                message,
                field: Some(field.field),
            },
            AppError::UnknownProduct { field, .. } => BackendError {
                code: ErrorCode::BadUserInput,
                message,
                field: Some(field),
            },
            AppError::NotFound => BackendError::new(ErrorCode::NotFound, message),
            AppError::Conflict(_) => BackendError::new(ErrorCode::Conflict, message),
            AppError::Fault { fault, .. } => BackendError::new(
                match fault {
                    Fault::StoreUnavailable => ErrorCode::StoreUnavailable,
                    Fault::StorageFull => ErrorCode::StorageFull,
                },
                message,
            ),
            AppError::Internal(_) => BackendError::new(ErrorCode::Internal, message),
        }
    }
}

impl From<StoreError> for BackendError {
    fn from(e: StoreError) -> Self {
        AppError::from(e).into()
    }
}

#[async_trait]
impl Backend for ApiBackend {
    /// Read-your-writes for one order, whatever wrote last: the read model
    /// is brought (bounded) to the order's version in the event store.
    async fn order(&self, order_id: &str) -> Result<Option<OrderStatusView>, BackendError> {
        let Some(view) = self.app.order(order_id).await? else {
            return Ok(None);
        };
        let record = self
            .projections
            .wait_for_order(order_id, view.version, READ_YOUR_WRITES)
            .await?;
        Ok(record)
    }

    async fn orders(
        &self,
        filter: &OrderFilter,
        after: i64,
        limit: i64,
    ) -> Result<Vec<OrderStatusView>, BackendError> {
        Ok(self.projections.orders(filter, after, limit).await?)
    }

    async fn history(&self, order_id: &str) -> Result<Vec<HistoryRecord>, BackendError> {
        Ok(self.projections.history(order_id).await?)
    }

    async fn product(&self, product_id: &str) -> Result<Option<ProductRecord>, BackendError> {
        Ok(self.projections.product(product_id).await?)
    }

    async fn stats(&self) -> Result<Vec<StatRecord>, BackendError> {
        Ok(self.projections.stats().await?)
    }

    async fn events(
        &self,
        after: i64,
        first: i64,
        types: &[String],
    ) -> Result<Vec<LogEntry>, BackendError> {
        // Scan pages of the log until enough events of the asked types are
        // found, at most this far past `after` per query.
        const SCAN_LIMIT: i64 = 100_000;
        let store = self.app.store();
        let mut found = Vec::new();
        let mut position = after;
        while found.len() < first as usize && position - after < SCAN_LIMIT {
            let page = store.read_log(position, 1_000).await?;
            let Some(last) = page.last() else { break };
            position = last.position;
            for e in page {
                if found.len() < first as usize
                    && (types.is_empty() || types.contains(&e.event_type))
                {
                    found.push(e);
                }
            }
        }
        Ok(found)
    }

    async fn create_order(&self, order: NewOrder) -> Result<OrderStatusView, BackendError> {
        let request = CreateOrderRequest {
            user_id: order.user_id,
            store_id: order.store_id,
            items: order.items,
        };
        let view = self.app.create_order(request, None).await?;
        self.caught_up(&view.order_id, view.version).await
    }

    async fn cancel_order(&self, order_id: &str) -> Result<OrderStatusView, BackendError> {
        let view = self.app.cancel_order(order_id).await?;
        self.caught_up(order_id, view.version).await
    }

    async fn dead_letters(
        &self,
        status: Option<&str>,
    ) -> Result<Vec<DeadLetterRecord>, BackendError> {
        let status = DeadLetterStatus::ALL
            .into_iter()
            .find(|s| Some(s.as_str()) == status);
        Ok(self.app.store().dead_letters_in(status).await?)
    }

    async fn dead_letter(&self, id: i64) -> Result<Option<DeadLetterRecord>, BackendError> {
        Ok(self.app.store().dead_letter(id).await?)
    }

    async fn redrive_dead_letter(&self, id: i64) -> Result<Option<RedriveRecord>, BackendError> {
        let saga = self.saga.as_ref().ok_or_else(|| {
            BackendError::new(
                ErrorCode::Unavailable,
                "redrive: no saga runs in this process",
            )
        })?;
        let outcome = match saga.redrive(id).await {
            Ok(Some(outcome)) => outcome,
            Ok(None) => return Ok(None),
            Err(SagaError::Store(e)) => return Err(e.into()),
            Err(e @ SagaError::Fault(fault)) => {
                return Err(AppError::Fault {
                    fault,
                    message: e.to_string(),
                }
                .into())
            }
            Err(e) => return Err(BackendError::new(ErrorCode::Internal, e.to_string())),
        };
        let (outcome, error) = match outcome {
            Redrive::Handled => ("HANDLED", None),
            Redrive::Failed { error } => ("FAILED", Some(error)),
            Redrive::NotPending { .. } => ("NOT_PENDING", None),
        };
        Ok(Some(RedriveRecord {
            outcome: outcome.to_string(),
            error,
            dead_letter: self.existing_dead_letter(id).await?,
        }))
    }

    async fn discard_dead_letter(&self, id: i64) -> Result<Option<DeadLetterRecord>, BackendError> {
        let now = chrono::Utc::now().timestamp_millis();
        match self.app.store().discard_dead_letter(id, now).await? {
            Ok(dead) => Ok(Some(dead)),
            Err(None) => Ok(None),
            Err(Some(status)) => Err(BackendError::new(
                ErrorCode::Conflict,
                format!("id: dead letter {id} is {status}, not PENDING"),
            )),
        }
    }

    async fn stuck_sagas(
        &self,
        older_than: Duration,
    ) -> Result<Vec<StuckSagaRecord>, BackendError> {
        let payment_timeout = self
            .saga
            .as_ref()
            .map_or(SagaConfig::default().payment_timeout, |s| {
                s.config().payment_timeout
            });
        Ok(self.app.stuck_sagas(older_than, payment_timeout).await?)
    }

    async fn set_product(
        &self,
        product_id: &str,
        price: Option<Money>,
        stock: Option<u32>,
    ) -> Result<ProductRecord, BackendError> {
        let set = self.app.set_product(product_id, price, stock).await?;
        let deadline = tokio::time::Instant::now() + READ_YOUR_WRITES;
        loop {
            self.projections.run_once().await?;
            let record = self.projections.product(product_id).await?;
            let shows_it = record
                .as_ref()
                .is_some_and(|r| r.price == set.price && r.available == i64::from(set.available));
            if shows_it || tokio::time::Instant::now() >= deadline {
                return record.ok_or_else(|| {
                    BackendError::new(ErrorCode::Unavailable, "product not yet readable")
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn status_changes(&self, order_id: &str) -> BoxStream<'static, StatusChange> {
        let projections = self.projections.clone();
        let order_id = order_id.to_string();
        let (tx, rx) = tokio::sync::mpsc::channel::<StatusChange>(16);
        tokio::spawn(async move {
            // Listen first, then read what already happened, so nothing falls
            // between the two.
            let mut live = projections.subscribe();
            let mut last_version = 0;
            let mut backlog = match projections.status_history(&order_id).await {
                Ok(history) => history,
                Err(_) => return,
            };
            loop {
                for change in backlog.drain(..) {
                    if change.version <= last_version {
                        continue;
                    }
                    last_version = change.version;
                    let done = change.status.is_final();
                    if tx.send(change).await.is_err() || done {
                        return;
                    }
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    received = live.recv() => match received {
                        Ok(change) if change.order_id == order_id => backlog.push(change),
                        Ok(_) => {}
                        Err(RecvError::Lagged(_)) => match projections.status_history(&order_id).await {
                            Ok(history) => backlog = history,
                            Err(_) => return,
                        },
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        });
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
            .boxed()
    }
}
