//! The schema's roots: queries over the read models, mutations through
//! the service's use cases, and the status-change subscription.

use async_graphql::connection::{query, Connection, Edge};
use async_graphql::{Context, Error, Object, Subscription, ID};
use futures_util::stream::{Stream, StreamExt};
use order_saga_domain as domain;
use order_saga_projections::{OrderFilter, OrderStatusView};

use crate::objects::{
    CreateOrderInput, HistoryEvent, LogEvent, Order, OrderFilterInput, OrderStatusChange, Product,
    SagaStats,
};
use crate::operations::{DeadLetter, DeadLetterStatus, Redrive, StuckSaga};
use crate::{
    backend, caller, order_not_found, BackendError, ErrorCode, NewOrder, MAX_EVENTS, MAX_PAGE,
};

/// The id of a dead letter, or BAD_USER_INPUT naming `id`.
fn dead_letter_id(id: &ID) -> Result<i64, BackendError> {
    id.parse().map_err(|_| {
        BackendError::bad_input("id", format!("id: '{}' is not a dead letter's id", id.0))
    })
}

fn no_dead_letter(id: i64) -> BackendError {
    BackendError::new(ErrorCode::NotFound, format!("id: no dead letter {id}"))
}

/// The order if the caller may see it: another customer's is `None`, as an
/// unknown one.
async fn visible_order(
    ctx: &Context<'_>,
    order_id: &str,
) -> Result<Option<OrderStatusView>, Error> {
    let caller = caller(ctx)?;
    Ok(backend(ctx)?
        .order(order_id)
        .await?
        .filter(|order| caller.owns(&order.user_id)))
}

pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// One order, from the read model.
    async fn order(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Order>, Error> {
        Ok(visible_order(ctx, &id).await?.map(Order))
    }

    /// Orders, oldest first, filtered; Relay-style cursor pagination
    /// (`first` at most 100, default 20). A customer sees only their own.
    async fn orders(
        &self,
        ctx: &Context<'_>,
        filter: Option<OrderFilterInput>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Connection<i64, Order>, Error> {
        let backend = backend(ctx)?.clone();
        let filter = filter.unwrap_or_default();
        let mut filter = OrderFilter {
            status: filter.status.map(Into::into),
            user_id: filter.user_id,
            store_id: filter.store_id,
        };
        // A customer's filter is narrowed to their own orders: asking for
        // another user's finds none.
        let mut nobody_else = false;
        if let Some(me) = caller(ctx)?.customer() {
            nobody_else = filter.user_id.as_deref().is_some_and(|u| u != me);
            filter.user_id = Some(me.to_string());
        }
        let first = first.unwrap_or(20);
        if !(0..=MAX_PAGE).contains(&first) {
            return Err(BackendError::bad_input(
                "first",
                format!("first: must be between 0 and {MAX_PAGE}"),
            )
            .into());
        }
        query(
            after,
            None,
            Some(first),
            None,
            |after: Option<i64>, _before: Option<i64>, first, _last| async move {
                let limit = first.unwrap_or(20) as i64;
                let mut records = if nobody_else {
                    Vec::new()
                } else {
                    backend
                        .orders(&filter, after.unwrap_or(0), limit + 1)
                        .await?
                };
                let has_next = records.len() as i64 > limit;
                records.truncate(limit as usize);
                let mut connection = Connection::new(after.is_some(), has_next);
                connection.edges.extend(
                    records
                        .into_iter()
                        .map(|r| Edge::new(r.created_position, Order(r))),
                );
                Ok::<_, Error>(connection)
            },
        )
        .await
    }

    /// The order's history: its events and its stock reservation's.
    async fn order_history(&self, ctx: &Context<'_>, id: ID) -> Result<Vec<HistoryEvent>, Error> {
        if visible_order(ctx, &id).await?.is_none() {
            return Err(order_not_found(&id).into());
        }
        Ok(backend(ctx)?
            .history(&id)
            .await?
            .into_iter()
            .map(HistoryEvent)
            .collect())
    }

    async fn product(&self, ctx: &Context<'_>, product_id: ID) -> Result<Option<Product>, Error> {
        Ok(backend(ctx)?.product(&product_id).await?.map(Product))
    }

    /// The global log after a position, for analysts' notebooks: at most
    /// `first` (≤ 1000) events, optionally only of the given event types.
    /// Operators only.
    async fn events(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 0)] after: i64,
        #[graphql(default = 100)] first: i32,
        #[graphql(name = "type")] types: Option<Vec<String>>,
    ) -> Result<Vec<LogEvent>, Error> {
        caller(ctx)?.require_operator("events")?;
        if !(1..=MAX_EVENTS).contains(&first) {
            return Err(BackendError::bad_input(
                "first",
                format!("first: must be between 1 and {MAX_EVENTS}"),
            )
            .into());
        }
        let events = backend(ctx)?
            .events(after, i64::from(first), &types.unwrap_or_default())
            .await?;
        Ok(events.into_iter().map(LogEvent).collect())
    }

    /// Counts per outcome and cancel reason, and per-stage durations.
    /// Operators only.
    async fn saga_stats(&self, ctx: &Context<'_>) -> Result<SagaStats, Error> {
        caller(ctx)?.require_operator("sagaStats")?;
        Ok(SagaStats::from_records(&backend(ctx)?.stats().await?))
    }

    /// Messages a consumer gave up on, oldest first: those in `status`
    /// (PENDING unless asked), or all with `status: null`. Operators only.
    async fn dead_letters(
        &self,
        ctx: &Context<'_>,
        #[graphql(default_with = "Some(DeadLetterStatus::Pending)")] status: Option<
            DeadLetterStatus,
        >,
    ) -> Result<Vec<DeadLetter>, Error> {
        caller(ctx)?.require_operator("deadLetters")?;
        let letters = backend(ctx)?
            .dead_letters(status.map(DeadLetterStatus::as_str))
            .await?;
        Ok(letters.into_iter().map(DeadLetter).collect())
    }

    /// One dead letter. Operators only.
    async fn dead_letter(&self, ctx: &Context<'_>, id: ID) -> Result<Option<DeadLetter>, Error> {
        caller(ctx)?.require_operator("deadLetter")?;
        let id = dead_letter_id(&id)?;
        Ok(backend(ctx)?.dead_letter(id).await?.map(DeadLetter))
    }

    /// Sagas that have not ended in time, oldest first (at most 1,000),
    /// with their last step: orders created or confirmed more than
    /// `olderThanSeconds` ago, or waiting for their payment longer than the
    /// payment timeout plus that. Operators only.
    async fn stuck_sagas(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 300)] older_than_seconds: i32,
    ) -> Result<Vec<StuckSaga>, Error> {
        caller(ctx)?.require_operator("stuckSagas")?;
        let seconds = u64::try_from(older_than_seconds).map_err(|_| {
            BackendError::bad_input("olderThanSeconds", "olderThanSeconds: must not be negative")
        })?;
        let stuck = backend(ctx)?
            .stuck_sagas(std::time::Duration::from_secs(seconds))
            .await?;
        Ok(stuck.into_iter().map(StuckSaga).collect())
    }
}

pub struct MutationRoot;

#[Object]
impl MutationRoot {
    /// Accepts an order (prices come from the catalog); the saga runs on.
    async fn create_order(
        &self,
        ctx: &Context<'_>,
        input: CreateOrderInput,
    ) -> Result<Order, Error> {
        let order = NewOrder {
            user_id: caller(ctx)?.order_user(input.user_id.unwrap_or_default())?,
            store_id: input.store_id,
            items: input
                .items
                .into_iter()
                .map(|i| domain::ItemRequest {
                    product_id: i.product_id,
                    quantity: i.quantity,
                })
                .collect(),
        };
        Ok(Order(backend(ctx)?.create_order(order).await?))
    }

    /// Cancels an order at the customer's request (CUSTOMER_REQUEST); only
    /// before it waits for payment. A customer only their own.
    async fn cancel_order(&self, ctx: &Context<'_>, id: ID) -> Result<Order, Error> {
        if caller(ctx)?.customer().is_some() && visible_order(ctx, &id).await?.is_none() {
            return Err(order_not_found(&id).into());
        }
        Ok(Order(backend(ctx)?.cancel_order(&id).await?))
    }

    /// Sets a product's price (decimal string) and/or available stock.
    /// Operators only.
    async fn set_product(
        &self,
        ctx: &Context<'_>,
        product_id: ID,
        price: Option<String>,
        stock: Option<i64>,
    ) -> Result<Product, Error> {
        caller(ctx)?.require_operator("setProduct")?;
        let price = price
            .map(|p| p.parse::<domain::Money>())
            .transpose()
            .map_err(|e| BackendError::bad_input("price", format!("price: {e}")))?;
        let stock = stock.map(u32::try_from).transpose().map_err(|_| {
            BackendError::bad_input("stock", "stock: must be between 0 and 1000000000")
        })?;
        Ok(Product(
            backend(ctx)?.set_product(&product_id, price, stock).await?,
        ))
    }

    /// Hands a pending dead letter back to its consumer, once: HANDLED (it
    /// is REDRIVEN), FAILED (it stays PENDING with the new error) or
    /// NOT_PENDING. Operators only.
    async fn redrive_dead_letter(&self, ctx: &Context<'_>, id: ID) -> Result<Redrive, Error> {
        caller(ctx)?.require_operator("redriveDeadLetter")?;
        let id = dead_letter_id(&id)?;
        let done = backend(ctx)?
            .redrive_dead_letter(id)
            .await?
            .ok_or_else(|| no_dead_letter(id))?;
        Ok(Redrive {
            outcome: done.outcome,
            error: done.error,
            dead_letter: DeadLetter(done.dead_letter),
        })
    }

    /// Sets a pending dead letter aside for good (kept, DISCARDED).
    /// Operators only.
    async fn discard_dead_letter(&self, ctx: &Context<'_>, id: ID) -> Result<DeadLetter, Error> {
        caller(ctx)?.require_operator("discardDeadLetter")?;
        let id = dead_letter_id(&id)?;
        let dead = backend(ctx)?
            .discard_dead_letter(id)
            .await?
            .ok_or_else(|| no_dead_letter(id))?;
        Ok(DeadLetter(dead))
    }
}

pub struct SubscriptionRoot;

#[Subscription]
impl SubscriptionRoot {
    /// Every status the order has had, then each new one as it happens; the
    /// stream ends after PAYMENT_WAIT or ORDER_CANCELLED.
    async fn order_status_changed(
        &self,
        ctx: &Context<'_>,
        order_id: ID,
    ) -> Result<impl Stream<Item = OrderStatusChange>, Error> {
        if visible_order(ctx, &order_id).await?.is_none() {
            return Err(order_not_found(&order_id).into());
        }
        Ok(backend(ctx)?
            .status_changes(&order_id)
            .map(OrderStatusChange::from))
    }
}
