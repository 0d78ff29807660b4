//! A bounded record of a binding's recent events, for debugging.
//!
//! Entries keep only names and times: no token, no spec and no message text, so a journal can
//! be logged or served as it is.

use std::collections::VecDeque;

use jiff::Timestamp;

use crate::command::Command;
use crate::event::BindingEvent;

/// Number of entries a journal keeps unless configured otherwise.
pub const DEFAULT_JOURNAL_CAPACITY: usize = 32;

/// One handled event and the commands it produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalEntry {
    /// When the event was handled.
    pub at: Timestamp,
    /// The event's variant name, such as `TokenIssued`.
    pub event: &'static str,
    /// The variant names of the commands, such as `ApplySecret` or `ArmTimer`.
    pub commands: Vec<&'static str>,
}

/// A ring of the most recent [`JournalEntry`] values; the oldest entry goes first when full.
#[derive(Clone, Debug)]
pub struct Journal {
    entries: VecDeque<JournalEntry>,
    capacity: usize,
}

impl Default for Journal {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_JOURNAL_CAPACITY)
    }
}

impl Journal {
    /// Creates a journal that keeps `capacity` entries; a capacity of 0 keeps none.
    #[must_use]
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            entries: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Appends an entry for `event` and its `commands`, dropping the oldest one when full.
    pub fn record(&mut self, at: Timestamp, event: &BindingEvent, commands: &[Command]) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(JournalEntry {
            at,
            event: event.kind(),
            commands: commands.iter().map(Command::kind).collect(),
        });
    }

    /// Returns the entries, oldest first.
    #[must_use]
    pub fn entries(&self) -> Vec<JournalEntry> {
        self.entries.iter().cloned().collect()
    }

    /// Returns the number of entries held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Returns whether the journal contains no entry.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::TimerPurpose;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    #[test]
    fn journal_drops_oldest_when_full() {
        let mut journal = Journal::with_capacity(3);
        for second in 0..5 {
            journal.record(at(second), &BindingEvent::TimerFired, &[]);
        }

        let times: Vec<Timestamp> = journal.entries().iter().map(|entry| entry.at).collect();
        assert_eq!(times, vec![at(2), at(3), at(4)]);
    }

    #[test]
    fn journal_records_kinds_only() {
        let mut journal = Journal::default();
        let commands = [Command::ArmTimer {
            at: at(10),
            purpose: TimerPurpose::Refresh,
        }];

        journal.record(at(1), &BindingEvent::DeletionRequested, &commands);

        assert_eq!(
            journal.entries(),
            vec![JournalEntry {
                at: at(1),
                event: "DeletionRequested",
                commands: vec!["ArmTimer"],
            }]
        );
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let mut journal = Journal::with_capacity(0);
        journal.record(at(1), &BindingEvent::TimerFired, &[]);
        assert!(journal.is_empty());
    }
}
