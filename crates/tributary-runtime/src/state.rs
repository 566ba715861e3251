//! Keyed state per partition, backed by compacted changelog topics.
//!
//! Each assigned partition has its own [`PartitionState`]: `base` is what committed
//! transactions wrote (and what a restore rebuilds), `overlay` is what the open transaction has
//! written so far. The record or timer being processed writes into its own [`Staged`] changes,
//! which join the overlay only when it succeeds; a transaction that aborts drops the overlay; a
//! commit writes the overlay to the changelogs inside the transaction and then folds it into
//! `base`. Reads see the newest layer first.
//!
//! A partition's state sits behind a lock of its own so that a slow record of one partition
//! (a call to the ERP) can be in flight while the loop commits, or processes other partitions.
//! Only one record or timer of a partition is in flight at a time, so its staged changes never
//! race another writer of the same partition.
//!
//! Values are versioned JSON (`<version>:<json>`), so that changelogs stay readable with any
//! tool and a service can change its structs without losing state: see [`StoredValue`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::marker::PhantomData;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The runtime's store of idempotency keys (value: when the key was recorded, clock millis).
pub const IDEMPOTENCY_STORE: &str = "idempotency";
/// The runtime's store of timers.
pub const TIMER_STORE: &str = "timers";

/// The changelog topic of `store` of `service`.
pub fn changelog_topic(service: &str, store: &str) -> String {
    format!("{service}.{store}.changelog")
}

/// A named store whose values are `V`: declared once by the processor, so that every read and
/// write of the store agrees on its value type.
pub struct Store<V> {
    name: &'static str,
    value: PhantomData<fn() -> V>,
}

impl<V> Store<V> {
    /// The store `name` (also its changelog's name: `<service>.<name>.changelog`).
    pub const fn new(name: &'static str) -> Self {
        Self { name, value: PhantomData }
    }

    /// The store's name.
    pub const fn name(&self) -> &'static str {
        self.name
    }
}

impl<V> Clone for Store<V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<V> Copy for Store<V> {}

impl<V> std::fmt::Debug for Store<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.name)
    }
}

/// A value kept in a state store.
///
/// Every value is written with its type's [`VERSION`](Self::VERSION). A value written by an
/// older release is read through [`upgrade`](Self::upgrade), which by default reads it as the
/// current struct (a field added with `#[serde(default)]` needs nothing more); a struct that
/// renames or reshapes fields raises its version and converts the old JSON in `upgrade`. A
/// value written by a newer release than this one is refused: rolling back past a state
/// change must be a decision, not silent data loss.
pub trait StoredValue: Serialize + DeserializeOwned + Send + Sync {
    /// The version written with every value.
    const VERSION: u32 = 1;

    /// Reads a value written with an older `version` (0: written before values carried one).
    fn upgrade(version: u32, value: serde_json::Value) -> Result<Self, serde_json::Error> {
        let _ = version;
        serde_json::from_value(value)
    }
}

macro_rules! stored_as_is {
    ($($ty:ty),*) => {$(impl StoredValue for $ty {})*};
}

stored_as_is!(i64, u64, i32, bool, String, serde_json::Value);

/// State errors: a value that cannot be written or read back is a bug of ours, never bad input
/// (the runtime stops the partition instead of dead-lettering the record).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A value could not be serialised.
    #[error("state {store}/{key}: cannot serialise: {source}")]
    Encode {
        /// The store.
        store: &'static str,
        /// The key.
        key: String,
        /// The serde error.
        source: serde_json::Error,
    },
    /// A stored value could not be read as the store's type.
    #[error("state {store}/{key}: cannot read version {version}: {reason}")]
    Decode {
        /// The store.
        store: &'static str,
        /// The key.
        key: String,
        /// The version it was written with.
        version: u32,
        /// What failed.
        reason: String,
    },
    /// A stored value was written by a newer release.
    #[error("state {store}/{key}: written as version {found} by a newer release; this one reads up to {known}")]
    NewerVersion {
        /// The store.
        store: &'static str,
        /// The key.
        key: String,
        /// The version found.
        found: u32,
        /// The newest version this release knows.
        known: u32,
    },
}

/// `value` as stored: its version, a colon, its JSON.
pub(crate) fn encode_value<V: StoredValue>(store: &'static str, key: &str, value: &V) -> Result<Vec<u8>, StateError> {
    let mut bytes = format!("{}:", V::VERSION).into_bytes();
    serde_json::to_writer(&mut bytes, value).map_err(|source| StateError::Encode {
        store,
        key: key.to_owned(),
        source,
    })?;
    Ok(bytes)
}

/// The version prefix of a stored value and the JSON after it; a value without a prefix (written
/// before values were versioned) is version 0. JSON never starts with digits and a colon, so
/// the two cannot be confused.
fn split_version(bytes: &[u8]) -> (u32, &[u8]) {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits > 0 && digits < 10 && bytes.get(digits) == Some(&b':') {
        let version = std::str::from_utf8(&bytes[..digits]).ok().and_then(|d| d.parse().ok()).unwrap_or(0);
        (version, &bytes[digits + 1..])
    } else {
        (0, bytes)
    }
}

/// Reads a stored value of `V`, upgrading older versions.
pub(crate) fn decode_value<V: StoredValue>(store: &'static str, key: &str, bytes: &[u8]) -> Result<V, StateError> {
    let (version, json) = split_version(bytes);
    let failed = |reason: String| StateError::Decode { store, key: key.to_owned(), version, reason };
    if version == V::VERSION {
        return serde_json::from_slice(json).map_err(|e| failed(e.to_string()));
    }
    if version > V::VERSION {
        return Err(StateError::NewerVersion { store, key: key.to_owned(), found: version, known: V::VERSION });
    }
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|e| failed(e.to_string()))?;
    V::upgrade(version, value).map_err(|e| failed(e.to_string()))
}

/// A timer as stored in [`TIMER_STORE`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredTimer {
    pub(crate) due_at_ms: i64,
    pub(crate) payload: serde_json::Value,
}

impl StoredValue for StoredTimer {}

/// The due times of one partition's timers, ordered, so that finding the due ones costs
/// nothing per timer that is not due.
#[derive(Debug, Default)]
struct TimerIndex {
    by_due: BTreeSet<(i64, String)>,
    due_of: HashMap<String, i64>,
}

impl TimerIndex {
    fn set(&mut self, key: &str, due_at_ms: Option<i64>) {
        if let Some(old) = self.due_of.remove(key) {
            self.by_due.remove(&(old, key.to_owned()));
        }
        if let Some(due) = due_at_ms {
            self.due_of.insert(key.to_owned(), due);
            self.by_due.insert((due, key.to_owned()));
        }
    }

    fn first(&self) -> Option<&(i64, String)> {
        self.by_due.first()
    }
}

/// The due time of a stored timer value (`None`: deleted, or unreadable, which the timer's
/// firing reports).
fn timer_due(key: &str, value: Option<&[u8]>) -> Option<i64> {
    value.and_then(|bytes| decode_value::<StoredTimer>(TIMER_STORE, key, bytes).ok()).map(|t| t.due_at_ms)
}

/// Changes of one store: `None` deletes the key.
pub(crate) type Changes = HashMap<String, Option<Vec<u8>>>;

#[derive(Debug, Default)]
struct Layers {
    base: HashMap<&'static str, HashMap<String, Vec<u8>>>,
    overlay: HashMap<&'static str, Changes>,
    /// Over base and overlay together.
    timers: TimerIndex,
}

impl Layers {
    fn read(&self, store: &str, key: &str) -> Option<&[u8]> {
        if let Some(change) = self.overlay.get(store).and_then(|changes| changes.get(key)) {
            return change.as_deref();
        }
        self.base.get(store).and_then(|entries| entries.get(key)).map(Vec::as_slice)
    }

    fn write(&mut self, store: &'static str, key: String, value: Option<Vec<u8>>) {
        if store == TIMER_STORE {
            self.timers.set(&key, timer_due(&key, value.as_deref()));
        }
        self.overlay.entry(store).or_default().insert(key, value);
    }
}

/// The state of one partition: every store, committed and pending.
#[derive(Debug)]
pub struct PartitionState {
    partition: i32,
    layers: RwLock<Layers>,
}

impl PartitionState {
    pub(crate) fn new(partition: i32) -> Arc<Self> {
        Arc::new(Self { partition, layers: RwLock::default() })
    }

    /// The partition number.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    fn layers(&self) -> std::sync::RwLockReadGuard<'_, Layers> {
        self.layers.read().expect("state lock poisoned")
    }

    fn layers_mut(&self) -> std::sync::RwLockWriteGuard<'_, Layers> {
        self.layers.write().expect("state lock poisoned")
    }

    /// Reads `key` of `store` (pending changes first).
    pub(crate) fn get<V: StoredValue>(&self, store: &'static str, key: &str) -> Result<Option<V>, StateError> {
        self.layers().read(store, key).map(|bytes| decode_value(store, key, bytes)).transpose()
    }

    /// Reads `key` of `store` as committed transactions left it (no pending changes).
    fn get_committed<V: StoredValue>(&self, store: &'static str, key: &str) -> Result<Option<V>, StateError> {
        let layers = self.layers();
        let bytes = layers.base.get(store).and_then(|entries| entries.get(key));
        bytes.map(|bytes| decode_value(store, key, bytes)).transpose()
    }

    /// Whether `key` of `store` holds a value.
    pub(crate) fn contains(&self, store: &str, key: &str) -> bool {
        self.layers().read(store, key).is_some()
    }

    /// Writes (or with `None` deletes) `key` straight into the open transaction: the runtime's
    /// own bookkeeping (idempotency keys, expiry, a dead-lettered timer).
    pub(crate) fn write(&self, store: &'static str, key: String, value: Option<Vec<u8>>) {
        self.layers_mut().write(store, key, value);
    }

    /// A record or timer succeeded: its changes join the open transaction.
    pub(crate) fn accept(&self, staged: HashMap<&'static str, Changes>) {
        let mut layers = self.layers_mut();
        for (store, changes) in staged {
            for (key, value) in changes {
                layers.write(store, key, value);
            }
        }
    }

    /// Calls `each` with every change of the open transaction (for the changelogs).
    pub(crate) fn for_each_pending(&self, mut each: impl FnMut(&'static str, &str, Option<&[u8]>)) {
        let layers = self.layers();
        for (store, changes) in &layers.overlay {
            for (key, value) in changes {
                each(store, key, value.as_deref());
            }
        }
    }

    /// Whether the open transaction changed anything here.
    pub(crate) fn has_pending(&self) -> bool {
        self.layers().overlay.values().any(|changes| !changes.is_empty())
    }

    /// The transaction committed: its changes become the base.
    pub(crate) fn commit(&self) {
        let mut layers = self.layers_mut();
        let Layers { base, overlay, .. } = &mut *layers;
        for (store, changes) in overlay.iter_mut() {
            let entries = base.entry(store).or_default();
            for (key, value) in changes.drain() {
                match value {
                    Some(value) => entries.insert(key, value),
                    None => entries.remove(&key),
                };
            }
        }
    }

    /// The transaction aborted: its changes are dropped, and the timer index is rebuilt from
    /// what is committed.
    pub(crate) fn abort(&self) {
        let mut layers = self.layers_mut();
        layers.overlay.clear();
        let mut index = TimerIndex::default();
        if let Some(timers) = layers.base.get(TIMER_STORE) {
            for (key, value) in timers {
                index.set(key, timer_due(key, Some(value)));
            }
        }
        layers.timers = index;
    }

    /// A restored changelog record, straight into the base.
    pub(crate) fn restore(&self, store: &'static str, key: String, value: Option<Vec<u8>>) {
        let mut layers = self.layers_mut();
        if store == TIMER_STORE {
            layers.timers.set(&key, timer_due(&key, value.as_deref()));
        }
        let entries = layers.base.entry(store).or_default();
        match value {
            Some(value) => entries.insert(key, value),
            None => entries.remove(&key),
        };
    }

    /// The earliest timer due at or before `now_ms`, with its due time.
    pub(crate) fn first_due_timer(&self, now_ms: i64) -> Option<(i64, String)> {
        self.layers().timers.first().filter(|(due, _)| *due <= now_ms).cloned()
    }

    /// Every scheduled timer: key and due time, in due order.
    pub fn timers(&self) -> Vec<(String, DateTime<Utc>)> {
        self.layers()
            .timers
            .by_due
            .iter()
            .filter_map(|(due, key)| Some((key.clone(), DateTime::from_timestamp_millis(*due)?)))
            .collect()
    }

    /// The newest value (`None`: deleted) of every key of `store` starting with `prefix`,
    /// merged with `staged`, in key order, each passed to `each` while the lock is held.
    fn merged(&self, store: &str, prefix: &str, staged: Option<&Changes>, mut each: impl FnMut(&str, &[u8])) {
        let layers = self.layers();
        let mut merged: BTreeMap<&str, Option<&[u8]>> = BTreeMap::new();
        if let Some(entries) = layers.base.get(store) {
            merged.extend(
                entries.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.as_str(), Some(v.as_slice()))),
            );
        }
        for changes in [layers.overlay.get(store), staged].into_iter().flatten() {
            merged
                .extend(changes.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.as_str(), v.as_deref())));
        }
        for (key, value) in merged {
            if let Some(value) = value {
                each(key, value);
            }
        }
    }

    /// Committed and pending entries of `store` whose key starts with `prefix`, raw, for the
    /// runtime's own sweeps.
    pub(crate) fn scan_raw(&self, store: &str, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let mut found = Vec::new();
        self.merged(store, prefix, None, |key, value| found.push((key.to_owned(), value.to_vec())));
        found
    }

    /// Number of keys of `store` (committed and pending).
    pub fn len(&self, store: &str) -> usize {
        let mut count = 0;
        self.merged(store, "", None, |_, _| count += 1);
        count
    }

    /// Committed and pending value of `key` in `store`, read as `V`; for tests and tools.
    pub fn read<V: StoredValue>(&self, store: Store<V>, key: &str) -> Result<Option<V>, StateError> {
        self.get(store.name(), key)
    }
}

/// A read-only view of the committed state of the partitions an instance holds, for queries
/// from outside the processing loop (an admin endpoint that answers "what is this account's
/// state?"). It never shows what an open transaction wrote, which may still abort; a partition
/// joins the view once its state is restored and leaves it when it is revoked.
#[derive(Debug, Clone, Default)]
pub struct StateView {
    partitions: Arc<RwLock<BTreeMap<i32, Arc<PartitionState>>>>,
}

impl StateView {
    pub(crate) fn insert(&self, state: Arc<PartitionState>) {
        self.partitions.write().expect("view lock").insert(state.partition(), state);
    }

    pub(crate) fn remove(&self, partition: i32) {
        self.partitions.write().expect("view lock").remove(&partition);
    }

    /// The partitions whose state this instance holds, restored.
    pub fn held(&self) -> Vec<i32> {
        self.partitions.read().expect("view lock").keys().copied().collect()
    }

    /// The committed value of `key` in `store`, with the partition holding it, if any partition
    /// this instance holds has it. Keys are per partition; a key found in none of them is
    /// unknown here, or held by another instance of the group.
    pub fn find<V: StoredValue>(&self, store: Store<V>, key: &str) -> Result<Option<(i32, V)>, StateError> {
        let partitions: Vec<Arc<PartitionState>> =
            self.partitions.read().expect("view lock").values().cloned().collect();
        for state in partitions {
            if let Some(value) = state.get_committed(store.name(), key)? {
                return Ok(Some((state.partition(), value)));
            }
        }
        Ok(None)
    }
}

/// What one record or timer writes while it is processed, over its partition's state.
#[derive(Debug)]
pub struct Staged {
    partition: Arc<PartitionState>,
    changes: HashMap<&'static str, Changes>,
}

impl Staged {
    pub(crate) fn new(partition: Arc<PartitionState>) -> Self {
        Self { partition, changes: HashMap::new() }
    }

    /// The staged changes, to accept once the record succeeded.
    pub(crate) fn into_changes(self) -> HashMap<&'static str, Changes> {
        self.changes
    }

    pub(crate) fn get<V: StoredValue>(&self, store: &'static str, key: &str) -> Result<Option<V>, StateError> {
        match self.changes.get(store).and_then(|changes| changes.get(key)) {
            Some(Some(bytes)) => decode_value(store, key, bytes).map(Some),
            Some(None) => Ok(None),
            None => self.partition.get(store, key),
        }
    }

    pub(crate) fn put<V: StoredValue>(&mut self, store: &'static str, key: &str, value: &V) -> Result<(), StateError> {
        let bytes = encode_value(store, key, value)?;
        self.changes.entry(store).or_default().insert(key.to_owned(), Some(bytes));
        Ok(())
    }

    pub(crate) fn delete(&mut self, store: &'static str, key: &str) {
        self.changes.entry(store).or_default().insert(key.to_owned(), None);
    }

    pub(crate) fn scan<V: StoredValue>(
        &self,
        store: &'static str,
        prefix: &str,
    ) -> Result<Vec<(String, V)>, StateError> {
        let mut found = Vec::new();
        let mut failure = None;
        self.partition.merged(store, prefix, self.changes.get(store), |key, bytes| {
            match decode_value(store, key, bytes) {
                Ok(value) => found.push((key.to_owned(), value)),
                Err(error) => failure = failure.take().or(Some(error)),
            }
        });
        failure.map_or(Ok(found), Err)
    }

    pub(crate) fn schedule(
        &mut self,
        key: &str,
        due_at: DateTime<Utc>,
        payload: serde_json::Value,
    ) -> Result<(), StateError> {
        self.put(TIMER_STORE, key, &StoredTimer { due_at_ms: due_at.timestamp_millis(), payload })
    }

    pub(crate) fn scheduled(&self, key: &str) -> Result<Option<DateTime<Utc>>, StateError> {
        let timer: Option<StoredTimer> = self.get(TIMER_STORE, key)?;
        Ok(timer.and_then(|t| DateTime::from_timestamp_millis(t.due_at_ms)))
    }

    pub(crate) fn cancel(&mut self, key: &str) {
        self.delete(TIMER_STORE, key);
    }

    /// Whether this record or timer changed timer `key`.
    pub(crate) fn touched_timer(&self, key: &str) -> bool {
        self.changes.get(TIMER_STORE).is_some_and(|changes| changes.contains_key(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Store<i64> = Store::new("s");

    fn staged(partition: &Arc<PartitionState>) -> Staged {
        Staged::new(partition.clone())
    }

    #[test]
    fn reads_see_the_newest_layer_and_an_abort_restores_the_committed_state() {
        let state = PartitionState::new(0);
        let mut record = staged(&state);
        record.put(S.name(), "k", &1).unwrap();
        state.accept(record.into_changes());
        state.commit();
        assert_eq!(state.get::<i64>("s", "k").unwrap(), Some(1));

        let mut record = staged(&state);
        record.put(S.name(), "k", &2).unwrap();
        assert_eq!(record.get::<i64>("s", "k").unwrap(), Some(2), "staged is visible to the record");
        drop(record);
        assert_eq!(state.get::<i64>("s", "k").unwrap(), Some(1), "a failed record leaves no trace");

        let mut record = staged(&state);
        record.put(S.name(), "k", &3).unwrap();
        record.delete(S.name(), "other");
        state.accept(record.into_changes());
        let mut pending = 0;
        state.for_each_pending(|_, _, _| pending += 1);
        assert_eq!(pending, 2);
        state.abort();
        assert_eq!(state.get::<i64>("s", "k").unwrap(), Some(1), "an aborted transaction leaves no trace");
        assert!(!state.has_pending());
    }

    #[test]
    fn timers_are_indexed_by_due_time_through_every_layer() {
        let state = PartitionState::new(0);
        let at = |ms| DateTime::from_timestamp_millis(ms).unwrap();
        let mut record = staged(&state);
        record.schedule("late", at(300), serde_json::Value::Null).unwrap();
        record.schedule("early", at(100), serde_json::Value::Null).unwrap();
        state.accept(record.into_changes());
        state.commit();
        assert_eq!(state.first_due_timer(50), None, "nothing due yet");
        assert_eq!(state.first_due_timer(1_000), Some((100, "early".into())));

        let mut record = staged(&state);
        record.cancel("early");
        record.schedule("late", at(200), serde_json::Value::Null).unwrap();
        state.accept(record.into_changes());
        assert_eq!(state.first_due_timer(1_000), Some((200, "late".into())), "moved and cancelled");
        state.abort();
        assert_eq!(state.first_due_timer(1_000), Some((100, "early".into())), "the abort restores the index");
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Old {
        total: i64,
    }
    impl StoredValue for Old {}

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct New {
        amount: i64,
        #[serde(default)]
        currency: String,
    }
    impl StoredValue for New {
        const VERSION: u32 = 2;
        fn upgrade(version: u32, mut value: serde_json::Value) -> Result<Self, serde_json::Error> {
            if version < 2 {
                value["amount"] = value["total"].take();
            }
            serde_json::from_value(value)
        }
    }

    #[test]
    fn an_older_version_is_upgraded_and_a_newer_one_refused() {
        let old = encode_value("s", "k", &Old { total: 7 }).unwrap();
        assert!(old.starts_with(b"1:{"), "{}", String::from_utf8_lossy(&old));
        let upgraded: New = decode_value("s", "k", &old).unwrap();
        assert_eq!(upgraded, New { amount: 7, currency: String::new() });
        let unversioned: New = decode_value("s", "k", br#"{"total":3}"#).unwrap();
        assert_eq!(unversioned.amount, 3, "values from before versioning read as version 0");

        let new = encode_value("s", "k", &New { amount: 1, currency: "EUR".into() }).unwrap();
        assert!(matches!(
            decode_value::<Old>("s", "k", &new),
            Err(StateError::NewerVersion { found: 2, known: 1, .. })
        ));
        assert!(matches!(decode_value::<New>("s", "k", b"2:{not json"), Err(StateError::Decode { version: 2, .. })));
    }

    #[test]
    fn scans_merge_every_layer_in_key_order() {
        let state = PartitionState::new(0);
        let mut record = staged(&state);
        for (key, value) in [("a/2", 2), ("a/1", 1), ("b/1", 9)] {
            record.put(S.name(), key, &value).unwrap();
        }
        state.accept(record.into_changes());
        state.commit();
        let mut record = staged(&state);
        record.delete(S.name(), "a/1");
        record.put(S.name(), "a/3", &3).unwrap();
        let found: Vec<(String, i64)> = record.scan("s", "a/").unwrap();
        assert_eq!(found, vec![("a/2".into(), 2), ("a/3".into(), 3)]);
        assert_eq!(state.len("s"), 3);
    }
}
