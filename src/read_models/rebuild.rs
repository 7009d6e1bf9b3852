//! Rebuilding the read models from position 0 beside the live ones, then
//! swapping them in while the live projection is held still.

use super::apply::apply_entries;
use super::{ReadModels, BATCH};
use crate::store::read_models::{
    create_next_tables, lock_checkpoint, swap_in_next_tables, ReadModelTx, Target, CHECKPOINT,
    NEXT_CHECKPOINT,
};
use crate::store::StoreError;

impl ReadModels {
    /// Builds the read models again from position 0 beside the live ones
    /// (`<table>_next`), while readers keep reading the live tables; then,
    /// in one transaction that holds the live projection still, finishes
    /// the last stretch and swaps the tables. `progress` hears (position
    /// reached, log head) after each batch.
    pub async fn rebuild(&self, mut progress: impl FnMut(i64, i64)) -> Result<(), StoreError> {
        create_next_tables(&self.store).await?;
        self.forget_claimed(Target::Next);

        let head = self.store.head_position().await?;
        while let (Some(position), _) = self.apply_batch(Target::Next).await? {
            progress(position, head.max(position));
        }

        let mut tx = ReadModelTx::begin(&self.store).await?;
        // Hold the live projection: its checkpoint row stays ours until the
        // swap commits.
        let live = lock_checkpoint(&mut tx, CHECKPOINT).await?;
        let mut position = lock_checkpoint(&mut tx, NEXT_CHECKPOINT).await?;
        loop {
            let entries = self.store.read_log(position, BATCH).await?;
            let Some(last) = entries.last().map(|e| e.position) else {
                break;
            };
            apply_entries(&mut tx, &entries, Target::Next, &self.starts).await?;
            position = last;
        }
        swap_in_next_tables(&mut tx, &self.store, position.max(live)).await?;
        tx.commit().await?;
        self.forget_claimed(Target::Live);
        progress(position, position);
        self.progress.send_replace(position);
        Ok(())
    }
}
