//! Shared helpers for the end-to-end tests: the transformers fixtures under `fixtures/`
//! (see `fixtures/README.md` for how they were made and what `reference.json` holds).

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::Value;

/// The fixture checkpoints, each in its own directory.
pub const FIXTURES: [&str; 4] = ["bitnet-packed", "bitnet-bf16", "llama-packed", "llama-bf16"];

/// Directory of fixture `name`: under this crate's source directory, or, for a test binary
/// carried to another machine (docs/CUDA.md), under `tests/fixtures` of the working directory.
pub fn fixture_dir(name: &str) -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let root = if built.is_dir() {
        built
    } else {
        PathBuf::from("tests/fixtures")
    };
    root.join(name)
}

/// A fixture's `reference.json`: transformers' outputs on its weights.
pub struct Reference(pub Value);

impl Reference {
    /// Reads `fixtures/<name>/reference.json`.
    pub fn load(name: &str) -> Result<Self> {
        let path = fixture_dir(name).join("reference.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(Self(
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
        ))
    }

    /// Token ids under `key` (a JSON pointer such as `/input_ids`).
    pub fn ids(&self, pointer: &str) -> Vec<u32> {
        self.array(pointer)
            .iter()
            .map(|v| v.as_u64().unwrap_or(u64::MAX) as u32)
            .collect()
    }

    /// Floats under `pointer`.
    pub fn floats(&self, pointer: &str) -> Vec<f32> {
        self.array(pointer)
            .iter()
            .map(|v| v.as_f64().unwrap_or(f64::NAN) as f32)
            .collect()
    }

    /// A number under `pointer`.
    pub fn float(&self, pointer: &str) -> f64 {
        self.0
            .pointer(pointer)
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN)
    }

    /// The JSON array under `pointer` (empty if absent, so that comparisons fail loudly).
    pub fn array(&self, pointer: &str) -> &[Value] {
        self.0
            .pointer(pointer)
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice)
    }
}
