//! Pull progress from the PullImage stream: per-layer bars on a terminal, plain lines
//! otherwise, or one JSON object per event.

use std::collections::HashMap;
use std::io::Write;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{output, CmdError};
use crate::api::pb;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Bars on stderr (a terminal).
    Bars,
    /// `resolved …`, `layer … n/m bytes`, `done …` lines.
    Lines,
    /// One JSON object per event.
    Json,
    /// Nothing.
    Quiet,
}

/// Renders pull events in one mode.
pub(super) struct Progress {
    mode: Mode,
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Progress {
    pub(super) fn new(mode: Mode) -> Self {
        Self {
            mode,
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: HashMap::new(),
        }
    }

    /// Shows one event; lines and JSON go to `out`.
    pub(super) fn event(
        &mut self,
        event: &pb::PullEvent,
        out: &mut (dyn Write + Send),
    ) -> Result<(), CmdError> {
        match self.mode {
            Mode::Quiet => Ok(()),
            Mode::Json => output::write_json_line(out, &output::pull_event_json(event)),
            Mode::Lines => match output::pull_event_line(event) {
                Some(line) => {
                    output::write_line(out, &line)?;
                    out.flush().map_err(CmdError::Output)
                }
                None => Ok(()),
            },
            Mode::Bars => {
                self.bar_event(event);
                Ok(())
            }
        }
    }

    fn bar_event(&mut self, event: &pb::PullEvent) {
        match &event.event {
            Some(pb::pull_event::Event::Queued(queued)) => {
                self.multi
                    .println(format!(
                        "{} queued (position {} in this host's pull queue); waiting for a turn",
                        queued.image, queued.position
                    ))
                    .ok();
            }
            Some(pb::pull_event::Event::Resolved(resolved)) => {
                self.multi
                    .println(format!(
                        "{} → {} ({} layers, {})",
                        resolved.image,
                        short(&resolved.digest),
                        resolved.layers,
                        indicatif::HumanBytes(resolved.total_bytes)
                    ))
                    .ok();
            }
            Some(pb::pull_event::Event::Layer(layer)) => {
                let bar = self.bars.entry(layer.digest.clone()).or_insert_with(|| {
                    let bar = self.multi.add(ProgressBar::new(layer.total_bytes));
                    if let Ok(style) = ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {bytes}/{total_bytes} {msg}",
                    ) {
                        bar.set_style(style.progress_chars("=> "));
                    }
                    bar.set_prefix(short(&layer.digest).to_owned());
                    bar
                });
                bar.set_position(layer.done_bytes);
                if layer.cached {
                    bar.finish_with_message("cached");
                } else if layer.done_bytes >= layer.total_bytes {
                    bar.finish_with_message("done");
                }
            }
            Some(pb::pull_event::Event::Done(done)) => {
                for bar in self.bars.values() {
                    if !bar.is_finished() {
                        bar.finish();
                    }
                }
                if done.signature == "verified" {
                    self.multi.println("signature verified").ok();
                }
                self.multi
                    .println(format!("pulled {}", short(&done.digest)))
                    .ok();
            }
            None => {}
        }
    }
}

/// `sha256:0123456789ab` for display.
fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(done: u64) -> pb::PullEvent {
        pb::PullEvent {
            event: Some(pb::pull_event::Event::Layer(pb::LayerProgress {
                digest: format!("sha256:{}", "a".repeat(64)),
                done_bytes: done,
                total_bytes: 10,
                cached: false,
            })),
        }
    }

    #[test]
    fn lines_and_json_go_to_out_and_quiet_prints_nothing() {
        let mut out = Vec::new();
        Progress::new(Mode::Lines)
            .event(&layer(5), &mut out)
            .unwrap();
        assert!(String::from_utf8_lossy(&out).contains("5/10 bytes"));
        let mut out = Vec::new();
        Progress::new(Mode::Json)
            .event(&layer(5), &mut out)
            .unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["layer"]["done_bytes"], 5);
        let mut out = Vec::new();
        Progress::new(Mode::Quiet)
            .event(&layer(5), &mut out)
            .unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn bars_track_each_layer() {
        let mut progress = Progress::new(Mode::Bars);
        progress.multi.set_draw_target(ProgressDrawTarget::hidden());
        let mut out = Vec::new();
        progress.event(&layer(5), &mut out).unwrap();
        progress.event(&layer(10), &mut out).unwrap();
        assert!(out.is_empty(), "bars draw on stderr, not stdout");
        let bar = progress.bars.values().next().unwrap();
        assert_eq!(bar.position(), 10);
        assert!(bar.is_finished());
    }
}
