//! Keyed async locks: one lock per key (an order id, a container id, an image name, a blob
//! digest), so work on one key is serialised and work on others is not. Unused keys are pruned.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

/// One lock of type `L` per key.
#[derive(Debug)]
pub struct Keyed<L> {
    locks: std::sync::Mutex<HashMap<String, Arc<L>>>,
}

impl<L> Default for Keyed<L> {
    fn default() -> Self {
        Self {
            locks: std::sync::Mutex::default(),
        }
    }
}

impl<L: Default> Keyed<L> {
    fn get(&self, key: String) -> Arc<L> {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(key).or_default().clone()
    }
}

/// One async mutex per key.
pub type KeyedLocks = Keyed<Mutex<()>>;

impl KeyedLocks {
    pub async fn lock(&self, key: String) -> OwnedMutexGuard<()> {
        self.get(key).lock_owned().await
    }
}

/// One async reader-writer lock per key: many readers or one writer (fair, writers are not
/// starved by a stream of readers).
pub type KeyedRwLocks = Keyed<RwLock<()>>;

impl KeyedRwLocks {
    pub async fn read(&self, key: String) -> OwnedRwLockReadGuard<()> {
        self.get(key).read_owned().await
    }

    pub async fn write(&self, key: String) -> OwnedRwLockWriteGuard<()> {
        self.get(key).write_owned().await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const WAIT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn keyed_locks_serialise_one_key_only() {
        let locks = KeyedLocks::default();
        let a = locks.lock("a".into()).await;
        let b = tokio::time::timeout(WAIT, locks.lock("b".into())).await;
        b.expect("another key must not wait");
        let again = tokio::time::timeout(WAIT, locks.lock("a".into())).await;
        again.expect_err("the same key must wait");
        drop(a);
        let again = tokio::time::timeout(WAIT, locks.lock("a".into())).await;
        again.unwrap();
    }

    #[tokio::test]
    async fn readers_share_a_key_and_a_writer_excludes_them() {
        let locks = KeyedRwLocks::default();
        let r1 = locks.read("a".into()).await;
        let r2 = tokio::time::timeout(WAIT, locks.read("a".into()))
            .await
            .expect("readers must share");
        tokio::time::timeout(WAIT, locks.write("a".into()))
            .await
            .expect_err("a writer must wait for the readers");
        tokio::time::timeout(WAIT, locks.write("b".into()))
            .await
            .expect("another key must not wait");
        drop((r1, r2));
        let w = tokio::time::timeout(WAIT, locks.write("a".into()))
            .await
            .expect("the writer goes once the readers are gone");
        tokio::time::timeout(WAIT, locks.read("a".into()))
            .await
            .expect_err("a reader must wait for the writer");
        let r = w.downgrade();
        tokio::time::timeout(WAIT, locks.read("a".into()))
            .await
            .expect("a downgraded writer shares with readers");
        drop(r);
    }
}
