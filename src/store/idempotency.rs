//! Idempotency keys of order creation: a key is bound to the order it
//! created, with a fingerprint of the request, so a repeat answers with the
//! same order and a different request under the same key is refused.

use super::{Store, StoreError};

impl Store {
    /// Binds `key` to `order_id` unless it is bound already; returns the
    /// binding that holds (`order_id`, `fingerprint`).
    pub async fn claim_idempotency_key(
        &self,
        key: &str,
        order_id: &str,
        fingerprint: &str,
    ) -> Result<(String, String), StoreError> {
        let claimed = on_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO idempotency_keys (key, order_id, fingerprint) VALUES ($1, $2, $3) \
                 ON CONFLICT (key) DO NOTHING",
            )
            .bind(key)
            .bind(order_id)
            .bind(fingerprint)
            .execute(pool)
            .await?;
            sqlx::query_as("SELECT order_id, fingerprint FROM idempotency_keys WHERE key = $1")
                .bind(key)
                .fetch_one(pool)
                .await
        })?;
        Ok(claimed)
    }

    /// Forgets a key that created nothing (its request was refused).
    pub async fn release_idempotency_key(
        &self,
        key: &str,
        order_id: &str,
    ) -> Result<(), StoreError> {
        on_pool!(self, |pool| {
            sqlx::query("DELETE FROM idempotency_keys WHERE key = $1 AND order_id = $2")
                .bind(key)
                .bind(order_id)
                .execute(pool)
                .await
                .map(|_| ())
        })?;
        Ok(())
    }
}
