//! Progress reporting: events from the library, and a ready-made stderr printer.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// What a long operation reports as it goes.
#[derive(Debug, Clone)]
pub enum Progress<'a> {
    /// A phase begins: "converting", "verifying", "checking", "writing", ...
    Phase(&'a str),
    /// Tensor `index` (1-based) of `total` of the current phase is done; `bytes` of
    /// `total_bytes` have been processed after `elapsed`.
    Tensor {
        phase: &'a str,
        index: usize,
        total: usize,
        name: &'a str,
        bytes: u64,
        total_bytes: u64,
        elapsed: Duration,
    },
    /// Something the user should know that does not stop the operation.
    Warning(&'a str),
}

/// A progress sink that ignores everything.
pub fn silent() -> impl FnMut(&Progress<'_>) {
    |_: &Progress<'_>| {}
}

/// A progress sink printing to stderr: a self-updating line on a terminal, otherwise a line
/// about every 10% (and at each phase's end).
pub fn stderr() -> impl FnMut(&Progress<'_>) {
    let tty = std::io::stderr().is_terminal();
    let mut last_print = Instant::now();
    let mut last_decile = usize::MAX;
    move |p: &Progress<'_>| {
        let mut err = std::io::stderr().lock();
        match p {
            Progress::Phase(name) => {
                let _ = writeln!(err, "{name}...");
                last_decile = usize::MAX;
            }
            Progress::Warning(w) => {
                if tty {
                    let _ = write!(err, "\r\x1b[K");
                }
                let _ = writeln!(err, "warning: {w}");
            }
            Progress::Tensor {
                phase,
                index,
                total,
                name,
                bytes,
                total_bytes,
                elapsed,
            } => {
                let mb = |b: u64| b as f64 / 1e6;
                let rate = mb(*bytes) / elapsed.as_secs_f64().max(1e-9);
                let line = format!(
                    "{phase} [{index}/{total}] {:.1}/{:.1} MB, {rate:.0} MB/s  {name}",
                    mb(*bytes),
                    mb(*total_bytes)
                );
                let done = index == total;
                if tty {
                    if done || last_print.elapsed() >= Duration::from_millis(100) {
                        let _ = write!(err, "\r\x1b[K{line}");
                        if done {
                            let _ = writeln!(err);
                        }
                        last_print = Instant::now();
                    }
                } else {
                    let decile = index * 10 / (*total).max(1);
                    if done || decile != last_decile {
                        let _ = writeln!(err, "{line}");
                        last_decile = decile;
                    }
                }
            }
        }
    }
}
