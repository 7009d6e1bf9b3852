//! What readers ask of the read models: orders, their history and status
//! changes, products and the saga's statistics.

use order_saga_projections::{
    HistoryRecord, OrderFilter, OrderStatusView, ProductRecord, StatRecord, StatusChange,
};

use super::ReadModels;
use crate::store::StoreError;

impl ReadModels {
    pub async fn order(&self, order_id: &str) -> Result<Option<OrderStatusView>, StoreError> {
        self.store.order_view(order_id).await
    }

    /// Orders matching `filter`, oldest first, after the cursor position.
    pub async fn orders(
        &self,
        filter: &OrderFilter,
        after: i64,
        limit: i64,
    ) -> Result<Vec<OrderStatusView>, StoreError> {
        self.store.order_views(filter, after, limit).await
    }

    pub async fn history(&self, order_id: &str) -> Result<Vec<HistoryRecord>, StoreError> {
        self.store.order_history(order_id).await
    }

    /// Every status the order has had, oldest first.
    pub async fn status_history(&self, order_id: &str) -> Result<Vec<StatusChange>, StoreError> {
        let history = self.history(order_id).await?;
        Ok(history
            .into_iter()
            .filter(|h| h.aggregate_type == "Order")
            .filter_map(|h| h.status_change(order_id))
            .collect())
    }

    pub async fn product(&self, product_id: &str) -> Result<Option<ProductRecord>, StoreError> {
        Ok(self
            .products()
            .await?
            .into_iter()
            .find(|p| p.product_id == product_id))
    }

    pub async fn products(&self) -> Result<Vec<ProductRecord>, StoreError> {
        self.store.product_views().await
    }

    pub async fn stats(&self) -> Result<Vec<StatRecord>, StoreError> {
        self.store.saga_stats().await
    }
}
