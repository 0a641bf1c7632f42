//! Small helpers: reading UTF-8 input, rates, JSON numbers.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Checks that `bytes` are UTF-8, naming `what` and the first bad byte otherwise.
pub fn utf8(bytes: Vec<u8>, what: &str) -> Result<String> {
    String::from_utf8(bytes).or_else(|e| {
        let why = not_utf8(e.as_bytes());
        bail!("{what}: {why}; convert the text to UTF-8 first")
    })
}

/// "not valid UTF-8 (byte … at offset …)" for `bytes`, which are not UTF-8.
fn not_utf8(bytes: &[u8]) -> String {
    let at = std::str::from_utf8(bytes)
        .err()
        .map_or(0, |e| e.valid_up_to());
    let byte = bytes.get(at).copied().unwrap_or(0);
    format!("not valid UTF-8 (byte 0x{byte:02x} at offset {at})")
}

/// clap parser for text arguments: like `String`, but a value that is not UTF-8 is refused
/// with the flag's name (clap's own message for `String` names no argument).
pub fn text_arg() -> impl clap::builder::TypedValueParser<Value = String> {
    use clap::builder::TypedValueParser;
    clap::builder::OsStringValueParser::new().try_map(|s| {
        s.into_string()
            .map_err(|s| format!("{}; pass UTF-8 text", not_utf8(s.as_encoded_bytes())))
    })
}

/// Reads a whole UTF-8 text file given by `flag`.
pub fn read_text_file(flag: &str, path: &Path) -> Result<String> {
    let what = format!("{flag} {}", path.display());
    let bytes = std::fs::read(path).with_context(|| format!("{what}: cannot read"))?;
    utf8(bytes, &what)
}

/// Reads all of stdin as UTF-8.
pub fn read_stdin(what: &str) -> Result<String> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .read_to_end(&mut bytes)
        .with_context(|| format!("{what}: cannot read standard input"))?;
    utf8(bytes, what)
}

/// `n / seconds`, or `None` when nothing was timed.
pub fn rate(n: usize, seconds: f64) -> Option<f64> {
    (n > 0 && seconds > 0.0).then(|| n as f64 / seconds)
}

/// A finite float as JSON, `null` otherwise.
pub fn json_f64(x: Option<f64>) -> serde_json::Value {
    x.filter(|v| v.is_finite())
        .map_or(serde_json::Value::Null, serde_json::Value::from)
}

/// Bytes with a binary unit, as llama-bench prints sizes.
pub fn human_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", n / (1024.0 * 1024.0 * 1024.0))
    } else if n >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", n / (1024.0 * 1024.0))
    } else {
        format!("{:.2} KiB", n / 1024.0)
    }
}

/// A count with an SI suffix: 5.50 M, 2.41 B.
pub fn human_count(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.2} K", n / 1e3)
    } else {
        format!("{n}")
    }
}

/// Writes `text` to stdout. A closed pipe (`bitnet inspect | head`) is not an error.
pub fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing to standard output")
        }
        _ => Ok(()),
    }
}
