//! Dead letters: messages a consumer could not handle after its retries,
//! kept with the error for an operator to look at.

use super::{Store, StoreError};

impl Store {
    /// Keeps a message its consumer gave up on, with the reason; `false`
    /// when the group had dead-lettered this event already (another
    /// instance gave up on it too).
    pub async fn record_dead_letter(
        &self,
        consumer: &str,
        topic: &str,
        event_id: Option<&str>,
        error: &str,
        payload: &str,
    ) -> Result<bool, StoreError> {
        let inserted = on_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO dead_letters (consumer, topic, event_id, error, payload) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (consumer, event_id) WHERE event_id IS NOT NULL DO NOTHING",
            )
            .bind(consumer)
            .bind(topic)
            .bind(event_id)
            .bind(error)
            .bind(payload)
            .execute(pool)
            .await
            .map(|done| done.rows_affected() > 0)
        })?;
        Ok(inserted)
    }

    /// Dead letters as (consumer, topic, event id, error), oldest first.
    pub async fn dead_letters(
        &self,
    ) -> Result<Vec<(String, String, Option<String>, String)>, StoreError> {
        let rows = on_pool!(self, |pool| {
            sqlx::query_as("SELECT consumer, topic, event_id, error FROM dead_letters ORDER BY id")
                .fetch_all(pool)
                .await
        })?;
        Ok(rows)
    }
}
