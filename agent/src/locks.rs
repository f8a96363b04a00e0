//! Keyed async locks: one mutex per key (an order id, a container id, an image name, a blob
//! digest), so work on one key is serialised and work on others is not. Unused keys are pruned.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard};

/// One async mutex per key.
#[derive(Debug, Default)]
pub(crate) struct KeyedLocks {
    locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl KeyedLocks {
    pub(crate) async fn lock(&self, key: String) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self
                .locks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            locks.entry(key).or_default().clone()
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn keyed_locks_serialise_one_key_only() {
        let locks = KeyedLocks::default();
        let a = locks.lock("a".into()).await;
        let b = tokio::time::timeout(Duration::from_millis(50), locks.lock("b".into())).await;
        b.expect("another key must not wait");
        let again = tokio::time::timeout(Duration::from_millis(50), locks.lock("a".into())).await;
        again.expect_err("the same key must wait");
        drop(a);
        let again = tokio::time::timeout(Duration::from_millis(50), locks.lock("a".into())).await;
        again.unwrap();
    }
}
