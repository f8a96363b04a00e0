//! When each layer's download starts. Layers start in order, each once the layer before it
//! has a head start (a `1 / max_concurrent_downloads` share of its bytes, or has ended), so
//! downloads overlap but finish one after another, bottom layer first: each can be unpacked
//! while the later ones still download, and only the top layer's unpack is left at the end.
//! Started all at once, equal layers finish together and every unpack waits for the last byte.

use tokio::sync::watch;

/// One gate per blob slot (see `unpack::Arrivals`); a slot's gate opens at its head start.
#[derive(Debug)]
pub(super) struct Stagger {
    gates: Vec<watch::Sender<bool>>,
    share: u64,
}

/// The slot before which nothing waits: the config (slot 0) and the first layer (slot 1)
/// start at once.
const FIRST_GATED: usize = 2;

impl Stagger {
    /// Gates for `slots` blobs; a head start is `1 / share` of a blob.
    pub(super) fn new(slots: usize, share: usize) -> Self {
        Self {
            gates: (0..slots).map(|_| watch::Sender::new(false)).collect(),
            share: u64::try_from(share.max(1)).unwrap_or(u64::MAX),
        }
    }

    /// Waits until the download of `slot` may start.
    pub(super) async fn wait_turn(&self, slot: usize) {
        if slot < FIRST_GATED {
            return;
        }
        if let Some(before) = self.gates.get(slot - 1) {
            let mut open = before.subscribe();
            // The sender lives as long as `self`: an error cannot happen while we wait.
            open.wait_for(|open| *open).await.ok();
        }
    }

    /// The handle through which the download of `slot` (of `size` bytes) opens the next one.
    pub(super) fn head_start(&self, slot: usize, size: u64) -> HeadStart {
        HeadStart {
            after: size / self.share,
            gate: self.gates.get(slot).cloned(),
        }
    }
}

/// Opens the next download once enough bytes are in, and at the latest when dropped (the
/// download ended, whichever way).
#[derive(Debug)]
pub(super) struct HeadStart {
    after: u64,
    gate: Option<watch::Sender<bool>>,
}

impl HeadStart {
    /// `seen` bytes of the blob are in.
    pub(super) fn reached(&mut self, seen: u64) {
        if seen >= self.after {
            self.open();
        }
    }

    fn open(&mut self) {
        if let Some(gate) = self.gate.take() {
            gate.send_replace(true);
        }
    }
}

impl Drop for HeadStart {
    fn drop(&mut self) {
        self.open();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Layer `index`'s slot: slot 0 is the config.
    const fn layer_slot(index: usize) -> usize {
        index + 1
    }

    const WAIT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn a_layer_starts_once_the_one_below_has_its_head_start() {
        let stagger = Stagger::new(4, 4);
        // The config and the first layer never wait.
        tokio::time::timeout(WAIT, stagger.wait_turn(0))
            .await
            .unwrap();
        tokio::time::timeout(WAIT, stagger.wait_turn(layer_slot(0)))
            .await
            .unwrap();

        let mut first = stagger.head_start(layer_slot(0), 100);
        first.reached(24);
        tokio::time::timeout(WAIT, stagger.wait_turn(layer_slot(1)))
            .await
            .expect_err("24 of 100 bytes is less than a quarter");
        first.reached(25);
        tokio::time::timeout(WAIT, stagger.wait_turn(layer_slot(1)))
            .await
            .expect("a quarter is in");

        let second = stagger.head_start(layer_slot(1), 100);
        tokio::time::timeout(WAIT, stagger.wait_turn(layer_slot(2)))
            .await
            .expect_err("the second layer has no bytes yet");
        drop(second);
        tokio::time::timeout(WAIT, stagger.wait_turn(layer_slot(2)))
            .await
            .expect("a download that ended (or failed) lets the next one go");
    }
}
