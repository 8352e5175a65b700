//! `vessel apply`'s progress display: it subscribes to the executor's `Progress` (a `watch`
//! channel) and shows steps done of total, the step in flight and how long it has run (a
//! health wait counts its seconds). On a terminal it is one line redrawn in place; otherwise
//! plain lines: one when a step starts, and one every `PLAIN_EVERY` while it runs. Display
//! only: it changes nothing and nothing reads back from it.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::exec::{InFlight, Progress};

/// How often the terminal line is redrawn.
const REDRAW: Duration = Duration::from_millis(250);
/// How often a plain line says a step is still running.
pub const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// The terminal line for `p` at `now` (without the carriage return and erase).
pub fn line(p: &Progress, now: Instant) -> String {
    let Some(first) = p.running.first() else {
        return format!("[{}/{}]", p.done, p.total);
    };
    let more = match p.running.len() {
        1 => String::new(),
        n => format!(" (+{} more)", n - 1),
    };
    format!("[{}/{}] {}{more}", p.done, p.total, running(first, now))
}

/// `wait-healthy alice 12s/60s`: what runs and for how long, of its timeout.
fn running(s: &InFlight, now: Instant) -> String {
    format!(
        "{} {} {}s/{}s",
        s.action,
        s.object,
        now.saturating_duration_since(s.started).as_secs(),
        s.timeout.as_secs()
    )
}

/// Show progress until `stop`: redrawn in place when `tty`, plain lines otherwise.
pub async fn show(mut rx: watch::Receiver<Progress>, tty: bool, stop: CancellationToken) {
    let mut out = std::io::stdout();
    // Plain mode: when each running step was last mentioned.
    let mut told: BTreeMap<usize, Instant> = BTreeMap::new();
    let mut drawn = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = rx.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(if tty { REDRAW } else { Duration::from_secs(1) }) => {}
        }
        let p = rx.borrow_and_update().clone();
        let now = Instant::now();
        if tty {
            let text = if p.running.is_empty() {
                String::new()
            } else {
                line(&p, now)
            };
            let _ = write!(out, "\r\x1b[K{text}");
            let _ = out.flush();
            drawn = !text.is_empty();
            continue;
        }
        told.retain(|id, _| p.running.iter().any(|r| r.step == *id));
        for s in &p.running {
            match told.get(&s.step) {
                None => {
                    let _ = writeln!(
                        out,
                        "  ... [{}/{} done] {} {}",
                        p.done, p.total, s.action, s.object
                    );
                    told.insert(s.step, now);
                }
                Some(last) if now.duration_since(*last) >= PLAIN_EVERY => {
                    let _ = writeln!(
                        out,
                        "  ... {} {}: still running after {}s (times out after {}s)",
                        s.action,
                        s.object,
                        now.saturating_duration_since(s.started).as_secs(),
                        s.timeout.as_secs()
                    );
                    told.insert(s.step, now);
                }
                Some(_) => {}
            }
        }
    }
    if tty && drawn {
        let _ = write!(out, "\r\x1b[K");
        let _ = out.flush();
    }
}

/// Before a line of output on a terminal with a progress line: erase that line first.
pub fn clear_line(tty: bool) -> &'static str {
    if tty { "\r\x1b[K" } else { "" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_done_of_total_and_the_step_in_flight() {
        let t0 = Instant::now();
        let step = |id, action, object: &str, ago: u64| InFlight {
            step: id,
            action,
            object: object.into(),
            started: t0,
            timeout: Duration::from_secs(60 + ago),
        };
        let now = t0 + Duration::from_secs(12);
        let p = Progress {
            total: 7,
            done: 3,
            running: vec![step(3, "wait-healthy", "alice", 0)],
        };
        assert_eq!(line(&p, now), "[3/7] wait-healthy alice 12s/60s");
        let p = Progress {
            total: 7,
            done: 3,
            running: vec![
                step(3, "wait-healthy", "alice", 0),
                step(4, "create", "bob", 60),
            ],
        };
        assert_eq!(line(&p, now), "[3/7] wait-healthy alice 12s/60s (+1 more)");
        assert_eq!(line(&Progress::default(), now), "[0/0]");
    }
}
