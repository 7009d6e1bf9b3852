//! The log tail: the newest stretch of the global log, kept in memory and
//! shared by every reader in this process.
//!
//! The readers (each consumer, the projection, the relay) wake on the same
//! appends and each used to read the same new entries from the database —
//! a third of all statements under load. Now the first reader to find the
//! tail exhausted reads the database once for everyone; the others wait
//! for that read and are served from memory. A reader that is behind the
//! kept stretch (catching up after a restart, a replay from position 0) or
//! ahead of it reads the database directly, as before.
//!
//! The tail holds every entry in `(covered_from, head]`: positions appear
//! in order and never behind one already read (see `Store::read_log`), so
//! what a direct read would return after any `after` in that range is
//! exactly what the tail holds after it.

use std::collections::VecDeque;
use std::sync::Mutex;

use super::LogEntry;

/// Entries kept at most (a few megabytes); older ones are dropped first.
pub(super) const TAIL_CAPACITY: usize = 4096;

/// Entries one refresh reads at most.
pub(super) const TAIL_REFRESH: i64 = 1000;

#[derive(Debug, Default)]
pub(super) struct LogTail {
    state: Mutex<TailState>,
    /// Held by the one reader that refreshes the tail from the database.
    pub(super) refresh: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct TailState {
    /// `None` until the first read seeds it.
    covered: Option<Covered>,
    entries: VecDeque<LogEntry>,
    /// Counts refreshes and seeds: a reader that waited for the refresh lock
    /// sees whether someone read the database meanwhile.
    generation: u64,
}

#[derive(Debug, Clone, Copy)]
struct Covered {
    /// Every entry after this position, up to `head`, is in `entries`.
    from: i64,
    /// The last position read.
    head: i64,
}

/// What a reader that waited for the refresh lock does next.
pub(super) enum AfterWait {
    /// Nobody refreshed meanwhile: this reader reads the database.
    Refresh,
    /// Another reader refreshed: its entries after `after` (possibly none:
    /// the log had nothing new).
    Served(Vec<LogEntry>),
    /// The tail moved elsewhere meanwhile (re-seeded): read directly.
    Outside,
}

/// What the tail can do for a reader at `after`.
pub(super) enum Lookup {
    /// Entries after `after`, from memory (never empty).
    Served(Vec<LogEntry>),
    /// The reader is at the tail's head: refresh it (one reader at a time),
    /// unless `generation` moved meanwhile.
    AtHead { head: i64, generation: u64 },
    /// The tail cannot answer (empty, or `after` outside it): read the
    /// database directly; `generation` is for [`LogTail::seed`].
    Outside { generation: u64 },
}

impl LogTail {
    fn state(&self) -> std::sync::MutexGuard<'_, TailState> {
        // A panic elsewhere while holding this lock leaves consistent data:
        // every change is made in one step below.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn lookup(&self, after: i64, limit: usize) -> Lookup {
        let state = self.state();
        let generation = state.generation;
        match state.covered {
            Some(c) if after == c.head => Lookup::AtHead {
                head: c.head,
                generation,
            },
            Some(c) if c.from <= after && after < c.head => {
                Lookup::Served(serve(&state.entries, after, limit))
            }
            _ => Lookup::Outside { generation },
        }
    }

    /// After waiting for the refresh lock: whether another reader
    /// refreshed since `generation`.
    pub(super) fn after_wait(&self, generation: u64, after: i64, limit: usize) -> AfterWait {
        let state = self.state();
        if state.generation == generation {
            return AfterWait::Refresh;
        }
        match state.covered {
            Some(c) if c.from <= after && after <= c.head => {
                AfterWait::Served(serve(&state.entries, after, limit))
            }
            _ => AfterWait::Outside,
        }
    }

    /// Adds what a refresh from `head` read (the caller holds the refresh
    /// lock, so `head` is still the tail's head).
    pub(super) fn extend(&self, head: i64, read: &[LogEntry]) {
        let mut state = self.state();
        state.generation = state.generation.wrapping_add(1);
        let Some(covered) = state.covered.as_mut() else {
            return;
        };
        if covered.head != head {
            return;
        }
        if let Some(last) = read.last() {
            covered.head = last.position;
        }
        state.entries.extend(read.iter().cloned());
        trim(&mut state);
    }

    /// A direct read that reached the end of the log (it returned fewer
    /// entries than asked) restarts the tail from it, if the tail is empty
    /// or behind it and nobody refreshed since `generation`.
    pub(super) fn seed(&self, generation: u64, after: i64, read: &[LogEntry]) {
        let mut state = self.state();
        if state.generation != generation {
            return;
        }
        let head = read.last().map_or(after, |e| e.position);
        if state.covered.is_some_and(|c| c.head >= head) {
            return;
        }
        state.generation = state.generation.wrapping_add(1);
        state.covered = Some(Covered { from: after, head });
        state.entries = read.iter().cloned().collect();
        trim(&mut state);
    }
}

fn serve(entries: &VecDeque<LogEntry>, after: i64, limit: usize) -> Vec<LogEntry> {
    let start = entries.partition_point(|e| e.position <= after);
    entries.range(start..).take(limit).cloned().collect()
}

fn trim(state: &mut TailState) {
    while state.entries.len() > TAIL_CAPACITY {
        if let (Some(dropped), Some(covered)) = (state.entries.pop_front(), state.covered.as_mut())
        {
            covered.from = dropped.position;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(position: i64) -> LogEntry {
        LogEntry {
            position,
            event_id: uuid::Uuid::new_v4(),
            recorded_at: chrono::Utc::now(),
            aggregate_type: "Order".into(),
            aggregate_id: format!("o{position}"),
            sequence: 1,
            event_type: "OrderCreated".into(),
            event_version: "1".into(),
            payload: serde_json::json!({}),
            metadata: serde_json::json!({}),
        }
    }

    fn positions(entries: &[LogEntry]) -> Vec<i64> {
        entries.iter().map(|e| e.position).collect()
    }

    #[test]
    fn an_empty_tail_sends_readers_to_the_database() {
        let tail = LogTail::default();
        assert!(matches!(tail.lookup(0, 10), Lookup::Outside { .. }));
    }

    #[test]
    fn a_seeded_tail_serves_readers_inside_it_and_refreshes_at_its_head() {
        let tail = LogTail::default();
        let Lookup::Outside { generation } = tail.lookup(10, 10) else {
            panic!("expected a direct read");
        };
        tail.seed(generation, 10, &[entry(11), entry(12), entry(13)]);
        match tail.lookup(11, 10) {
            Lookup::Served(entries) => assert_eq!(positions(&entries), vec![12, 13]),
            _ => panic!("expected entries from memory"),
        }
        match tail.lookup(10, 2) {
            Lookup::Served(entries) => assert_eq!(positions(&entries), vec![11, 12]),
            _ => panic!("expected entries from memory"),
        }
        assert!(matches!(tail.lookup(9, 10), Lookup::Outside { .. }));
        assert!(matches!(tail.lookup(14, 10), Lookup::Outside { .. }));
        let Lookup::AtHead { head, generation } = tail.lookup(13, 10) else {
            panic!("expected a refresh");
        };
        assert_eq!(head, 13);
        assert!(matches!(
            tail.after_wait(generation, 13, 10),
            AfterWait::Refresh
        ));
        tail.extend(head, &[entry(14)]);
        // A reader that waited for that refresh is served by it.
        match tail.after_wait(generation, 13, 10) {
            AfterWait::Served(entries) => assert_eq!(positions(&entries), vec![14]),
            _ => panic!("expected the refresh's entries"),
        }
    }

    #[test]
    fn a_refresh_that_found_nothing_still_answers_the_waiting_readers() {
        let tail = LogTail::default();
        tail.seed(0, 0, &[entry(1)]);
        let Lookup::AtHead { head, generation } = tail.lookup(1, 10) else {
            panic!("expected a refresh");
        };
        tail.extend(head, &[]);
        match tail.after_wait(generation, 1, 10) {
            AfterWait::Served(entries) => assert!(entries.is_empty()),
            _ => panic!("expected an empty answer from the refresh"),
        }
    }

    #[test]
    fn the_oldest_entries_are_dropped_beyond_capacity() {
        let tail = LogTail::default();
        let many: Vec<LogEntry> = (1..=TAIL_CAPACITY as i64 + 10).map(entry).collect();
        tail.seed(0, 0, &many);
        assert!(matches!(tail.lookup(5, 10), Lookup::Outside { .. }));
        match tail.lookup(10, 1) {
            Lookup::Served(entries) => assert_eq!(positions(&entries), vec![11]),
            _ => panic!("expected entries from memory"),
        }
    }

    #[test]
    fn a_stale_direct_read_does_not_replace_a_newer_tail() {
        let tail = LogTail::default();
        let Lookup::Outside { generation } = tail.lookup(0, 10) else {
            panic!("expected a direct read");
        };
        tail.seed(generation, 0, &[entry(1), entry(2)]);
        // A reader that looked before that seed brings an older read.
        tail.seed(generation, 0, &[entry(1)]);
        match tail.lookup(0, 10) {
            Lookup::Served(entries) => assert_eq!(positions(&entries), vec![1, 2]),
            _ => panic!("expected entries from memory"),
        }
    }
}
