//! The stock side: reserves an order's items when it is created and
//! releases what it holds when it is cancelled (the compensating
//! transaction), through the StockReservation aggregate.

use cqrs_es::AggregateError;
use order_saga_domain::{
    StockItem, StockReservation, StockReservationCommand, StockReservationError,
};

use super::integration::IntegrationEvent;
use super::{store_failure, Cause, HandlerError, PayloadType, Saga};

impl Saga {
    pub(super) async fn reserve_stock(
        &self,
        event: &IntegrationEvent,
        items: Vec<StockItem>,
    ) -> Result<(), HandlerError> {
        let command = StockReservationCommand::ReserveStock {
            order_id: event.order_id.clone(),
            items,
            causation_id: Some(event.event_id),
        };
        let done = self
            .stock_command(&event.order_id, command, &Cause::of(event))
            .await?;
        if let Some(envelope) = done.events.first() {
            let outcome = envelope.payload_type();
            metrics::counter!("order_saga_stock_reservations_total", "outcome" => outcome)
                .increment(1);
        }
        Ok(())
    }

    pub(super) async fn release_stock(
        &self,
        event: &IntegrationEvent,
        items: Vec<StockItem>,
    ) -> Result<(), HandlerError> {
        let command = StockReservationCommand::ReleaseStock {
            order_id: event.order_id.clone(),
            items,
            causation_id: Some(event.event_id),
        };
        self.stock_command(&event.order_id, command, &Cause::of(event))
            .await?;
        Ok(())
    }

    /// The order was paid: what it holds is sold (`stock.confirmed`).
    pub(super) async fn sell_stock(
        &self,
        event: &IntegrationEvent,
        payment_id: String,
    ) -> Result<(), HandlerError> {
        let command = StockReservationCommand::SellStock {
            order_id: event.order_id.clone(),
            payment_id,
            causation_id: Some(event.event_id),
        };
        self.stock_command(&event.order_id, command, &Cause::of(event))
            .await?;
        Ok(())
    }

    pub(super) async fn stock_command(
        &self,
        order_id: &str,
        command: StockReservationCommand,
        cause: &Cause,
    ) -> Result<crate::store::Executed<StockReservation>, HandlerError> {
        self.store
            .execute_retrying::<StockReservation>(
                order_id,
                command,
                &self.stock_services,
                cause.metadata(),
                20,
            )
            .await
            .map_err(|e| match e {
                AggregateError::UserError(StockReservationError::Invalid(e)) => {
                    HandlerError::Permanent(e.to_string())
                }
                AggregateError::UserError(e @ StockReservationError::NothingHeld(_)) => {
                    HandlerError::Permanent(e.to_string())
                }
                AggregateError::UserError(StockReservationError::Ledger(e)) => {
                    HandlerError::transient(e.to_string())
                }
                other => store_failure(other),
            })
    }
}
