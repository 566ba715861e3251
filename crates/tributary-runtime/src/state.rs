//! Keyed state per partition, backed by compacted changelog topics.
//!
//! Three layers: `base` is what committed transactions wrote (and what a restore rebuilds),
//! `overlay` is what the open transaction has written so far, `staged` is what the record
//! being processed has written. A record that fails drops `staged`; a transaction that aborts
//! drops `overlay`; a commit writes the overlay to the changelogs inside the transaction and
//! then folds it into `base`. Reads see the newest layer first. Values are JSON, so changelogs
//! stay readable with any tool.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The runtime's store of idempotency keys.
pub const IDEMPOTENCY_STORE: &str = "idempotency";
/// The runtime's store of timers.
pub const TIMER_STORE: &str = "timers";

/// The changelog topic of `store` of `service`.
pub fn changelog_topic(service: &str, store: &str) -> String {
    format!("{service}.{store}.changelog")
}

/// State errors.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A value could not be (de)serialised.
    #[error("state {store}/{key}: {source}")]
    Serde {
        /// The store.
        store: String,
        /// The key.
        key: String,
        /// The serde error.
        source: serde_json::Error,
    },
}

/// A timer as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredTimer {
    pub(crate) due_at_ms: i64,
    pub(crate) payload: serde_json::Value,
}

/// The entries of every store, by store name, then partition. Nested rather than keyed by
/// `(store, partition)` so that a lookup by `&str` allocates nothing: the state is read and
/// written several times per record.
type Stores<V> = HashMap<String, HashMap<i32, HashMap<String, V>>>;
/// Changes of a layer: `None` deletes the key.
type Layer = Stores<Option<Vec<u8>>>;

fn entries<'a, V>(stores: &'a Stores<V>, store: &str, partition: i32) -> Option<&'a HashMap<String, V>> {
    stores.get(store)?.get(&partition)
}

fn entries_mut<'a, V>(stores: &'a mut Stores<V>, store: &str, partition: i32) -> &'a mut HashMap<String, V> {
    if !stores.contains_key(store) {
        stores.insert(store.to_owned(), HashMap::new());
    }
    stores.get_mut(store).expect("inserted above").entry(partition).or_default()
}

/// Moves every change of `from` into `to`, keeping `from`'s maps (and their capacity) for the
/// next record or transaction.
fn move_changes(from: &mut Layer, to: &mut Layer) {
    for (store, partitions) in from.iter_mut() {
        for (partition, changes) in partitions.iter_mut().filter(|(_, changes)| !changes.is_empty()) {
            entries_mut(to, store, *partition).extend(changes.drain());
        }
    }
}

fn clear(layer: &mut Layer) {
    layer.values_mut().flat_map(HashMap::values_mut).for_each(HashMap::clear);
}

/// The state of one service instance: every store on every assigned partition.
#[derive(Debug, Default)]
pub struct TxnState {
    base: Stores<Vec<u8>>,
    overlay: Layer,
    staged: Layer,
}

impl TxnState {
    /// Reads `key`.
    pub fn get<V: DeserializeOwned>(&self, store: &str, partition: i32, key: &str) -> Result<Option<V>, StateError> {
        match self.get_raw(store, partition, key) {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(bytes).map(Some).map_err(|source| StateError::Serde {
                store: store.to_owned(),
                key: key.to_owned(),
                source,
            }),
        }
    }

    /// The raw bytes of `key`, newest layer first.
    pub fn get_raw(&self, store: &str, partition: i32, key: &str) -> Option<&[u8]> {
        for layer in [&self.staged, &self.overlay] {
            if let Some(value) = entries(layer, store, partition).and_then(|entries| entries.get(key)) {
                return value.as_deref();
            }
        }
        entries(&self.base, store, partition).and_then(|entries| entries.get(key)).map(Vec::as_slice)
    }

    /// Writes `key` in the record's staged changes.
    pub fn put<V: Serialize>(&mut self, store: &str, partition: i32, key: &str, value: &V) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(value).map_err(|source| StateError::Serde {
            store: store.to_owned(),
            key: key.to_owned(),
            source,
        })?;
        self.stage(store, partition, key, Some(bytes));
        Ok(())
    }

    /// Deletes `key` in the record's staged changes.
    pub fn delete(&mut self, store: &str, partition: i32, key: &str) {
        self.stage(store, partition, key, None);
    }

    fn stage(&mut self, store: &str, partition: i32, key: &str, value: Option<Vec<u8>>) {
        entries_mut(&mut self.staged, store, partition).insert(key.to_owned(), value);
    }

    /// Schedules timer `key` on `partition`.
    pub fn schedule(
        &mut self,
        partition: i32,
        key: &str,
        due_at: DateTime<Utc>,
        payload: serde_json::Value,
    ) -> Result<(), StateError> {
        self.put(TIMER_STORE, partition, key, &StoredTimer { due_at_ms: due_at.timestamp_millis(), payload })
    }

    /// When timer `key` on `partition` is due, if it is scheduled.
    pub fn scheduled(&self, partition: i32, key: &str) -> Result<Option<DateTime<Utc>>, StateError> {
        let timer: Option<StoredTimer> = self.get(TIMER_STORE, partition, key)?;
        Ok(timer.and_then(|t| DateTime::from_timestamp_millis(t.due_at_ms)))
    }

    /// Cancels timer `key` on `partition`.
    pub fn cancel(&mut self, partition: i32, key: &str) {
        self.delete(TIMER_STORE, partition, key);
    }

    /// The record succeeded: its changes join the open transaction.
    pub(crate) fn accept_staged(&mut self) {
        move_changes(&mut self.staged, &mut self.overlay);
    }

    /// The record failed: its changes are dropped.
    pub(crate) fn discard_staged(&mut self) {
        clear(&mut self.staged);
    }

    /// What the open transaction changed, to write to the changelogs before committing.
    pub(crate) fn pending_changes(&self) -> impl Iterator<Item = (&str, i32, &str, Option<&[u8]>)> {
        self.overlay.iter().flat_map(|(store, partitions)| {
            partitions.iter().flat_map(move |(partition, entries)| {
                entries.iter().map(move |(key, value)| (store.as_str(), *partition, key.as_str(), value.as_deref()))
            })
        })
    }

    /// The transaction committed: its changes become the base.
    pub(crate) fn commit(&mut self) {
        for (store, partitions) in self.overlay.iter_mut() {
            for (partition, changes) in partitions.iter_mut().filter(|(_, changes)| !changes.is_empty()) {
                let base = entries_mut(&mut self.base, store, *partition);
                for (key, value) in changes.drain() {
                    match value {
                        Some(value) => base.insert(key, value),
                        None => base.remove(&key),
                    };
                }
            }
        }
    }

    /// The transaction aborted: its changes are dropped.
    pub(crate) fn abort(&mut self) {
        clear(&mut self.overlay);
        clear(&mut self.staged);
    }

    /// A restored changelog record, straight into the base.
    pub(crate) fn restore(&mut self, store: &str, partition: i32, key: String, value: Option<Vec<u8>>) {
        let base = entries_mut(&mut self.base, store, partition);
        match value {
            Some(value) => base.insert(key, value),
            None => base.remove(&key),
        };
    }

    /// Forgets the state of a partition this instance no longer owns.
    pub(crate) fn drop_partition(&mut self, partition: i32) {
        for partitions in self.base.values_mut() {
            partitions.remove(&partition);
        }
        for partitions in self.overlay.values_mut().chain(self.staged.values_mut()) {
            partitions.remove(&partition);
        }
    }

    /// Entries of `store` on `partition` whose key starts with `prefix` and whose value
    /// satisfies `pick`, in key order. Only values under `prefix` are deserialised.
    pub(crate) fn scan<V: DeserializeOwned>(
        &self,
        store: &str,
        partition: i32,
        prefix: &str,
        mut pick: impl FnMut(&str, &V) -> bool,
    ) -> Vec<(String, V)> {
        self.merged(store, partition, prefix)
            .into_iter()
            .filter_map(|(key, value)| {
                let value: V = serde_json::from_slice(value?).ok()?;
                pick(key, &value).then(|| (key.to_owned(), value))
            })
            .collect()
    }

    /// The newest value (`None`: deleted) of every key of `store` on `partition` that starts
    /// with `prefix`: base, then the open transaction, then the record being processed.
    fn merged(&self, store: &str, partition: i32, prefix: &str) -> BTreeMap<&str, Option<&[u8]>> {
        let mut merged: BTreeMap<&str, Option<&[u8]>> = BTreeMap::new();
        if let Some(entries) = entries(&self.base, store, partition) {
            merged.extend(
                entries.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.as_str(), Some(v.as_slice()))),
            );
        }
        for layer in [&self.overlay, &self.staged] {
            if let Some(entries) = entries(layer, store, partition) {
                merged.extend(
                    entries.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.as_str(), v.as_deref())),
                );
            }
        }
        merged
    }

    /// Number of committed keys of `store` on `partition`.
    pub fn len(&self, store: &str, partition: i32) -> usize {
        entries(&self.base, store, partition).map_or(0, HashMap::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_see_the_newest_layer_and_an_abort_restores_the_committed_state() {
        let mut state = TxnState::default();
        state.put("s", 0, "k", &1).unwrap();
        state.accept_staged();
        state.commit();
        assert_eq!(state.get::<i32>("s", 0, "k").unwrap(), Some(1));

        state.put("s", 0, "k", &2).unwrap();
        assert_eq!(state.get::<i32>("s", 0, "k").unwrap(), Some(2), "staged is visible to the record");
        state.discard_staged();
        assert_eq!(state.get::<i32>("s", 0, "k").unwrap(), Some(1), "a failed record leaves no trace");

        state.put("s", 0, "k", &3).unwrap();
        state.delete("s", 0, "other");
        state.accept_staged();
        assert_eq!(state.pending_changes().count(), 2);
        state.abort();
        assert_eq!(state.get::<i32>("s", 0, "k").unwrap(), Some(1), "an aborted transaction leaves no trace");
        assert_eq!(state.pending_changes().count(), 0);
    }

    #[test]
    fn deletes_and_partitions_are_kept_apart() {
        let mut state = TxnState::default();
        state.put("s", 0, "k", &"a").unwrap();
        state.put("s", 1, "k", &"b").unwrap();
        state.accept_staged();
        state.commit();
        state.delete("s", 0, "k");
        state.accept_staged();
        state.commit();
        assert_eq!(state.get::<String>("s", 0, "k").unwrap(), None);
        assert_eq!(state.get::<String>("s", 1, "k").unwrap().as_deref(), Some("b"));
        state.drop_partition(1);
        assert_eq!(state.get::<String>("s", 1, "k").unwrap(), None);
    }
}
