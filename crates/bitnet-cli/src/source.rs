//! `--model`: a local directory or a Hugging Face hub id, resolved to a directory.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

/// Where the model comes from.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Model")]
pub struct SourceArgs {
    /// Model to use: a directory with config.json, tokenizer.json and model.safetensors (or
    /// model.safetensors.index.json + shards), or a Hugging Face hub id such as
    /// microsoft/bitnet-b1.58-2B-4T, downloaded once into the HF cache ($HF_HOME/hub,
    /// default ~/.cache/huggingface/hub). [default: the repository's models/bitnet-kjv-tiny]
    #[arg(long, short = 'm', value_name = "DIR|HUB_ID", value_parser = crate::util::text_arg())]
    pub model: Option<String>,

    /// Revision of a hub id: branch, tag or commit hash.
    #[arg(long, default_value = "main", value_name = "REV", value_parser = crate::util::text_arg())]
    pub revision: String,

    /// Use only the local Hugging Face cache for a hub id, never the network (same as the
    /// environment variable HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
}

/// A model directory ready to load.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The directory holding config.json, the tokenizer and the weights.
    pub dir: PathBuf,
    /// How to name the model to the user (the hub id or the directory's name).
    pub name: String,
}

/// The model the repository ships, `<workspace>/models/bitnet-kjv-tiny`.
pub fn default_model_dir() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.pop();
    dir.pop();
    dir.join("models").join("bitnet-kjv-tiny")
}

/// Files every model needs besides the weights.
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
/// Files used when present.
const OPTIONAL: [&str; 3] = [
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

impl SourceArgs {
    /// Finds (and for a hub id, downloads) the model directory.
    pub fn resolve(&self) -> Result<ModelDir> {
        let Some(spec) = &self.model else {
            let dir = default_model_dir();
            if !dir.is_dir() {
                bail!(
                    "the default model {} does not exist (yet): it is produced from train/ (see \
                     train/README.md). Pass --model DIR for a local checkpoint, or a Hugging Face \
                     hub id such as --model microsoft/bitnet-b1.58-2B-4T",
                    dir.display()
                );
            }
            return local(&dir);
        };
        let path = Path::new(spec);
        if path.exists() {
            if !path.is_dir() {
                bail!(
                    "--model {spec}: is a file; pass the directory that holds config.json, \
                     tokenizer.json and the safetensors weights"
                );
            }
            return local(path);
        }
        if !looks_like_hub_id(spec) {
            bail!(
                "--model {spec}: no such directory (and not a Hugging Face hub id of the form \
                 owner/name)"
            );
        }
        let offline = self.offline || env_offline();
        let resolved = if offline {
            from_cache(spec, &self.revision)
        } else {
            download(spec, &self.revision)
        };
        resolved.with_context(|| {
            format!("--model {spec}: not a local directory, so resolved as a Hugging Face hub id")
        })
    }
}

fn local(dir: &Path) -> Result<ModelDir> {
    if !dir.join("config.json").is_file() {
        bail!(
            "{}: no config.json; --model must point at a Hugging Face model directory",
            dir.display()
        );
    }
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    Ok(ModelDir {
        dir: dir.to_path_buf(),
        name,
    })
}

/// `owner/name` with the characters the Hub allows.
fn looks_like_hub_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && !s.starts_with('-')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if ok(a) && ok(b))
}

fn env_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// Shard file names listed by an index's `weight_map`.
fn shards(index: &Path) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", index.display()))?;
    let Some(map) = value["weight_map"].as_object() else {
        bail!("{}: no weight_map object", index.display());
    };
    map.values()
        .map(|v| {
            v.as_str().map(str::to_string).with_context(|| {
                format!("{}: weight_map value {v} is not a string", index.display())
            })
        })
        .collect()
}

/// Resolves `id` at `revision` from the local cache only.
fn from_cache(id: &str, revision: &str) -> Result<ModelDir> {
    let cache = Cache::from_env();
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());
    let root = cache.path().join(repo.folder_name());
    let not_cached = || {
        format!(
            "{id}@{revision} is not in the local Hugging Face cache ({}); run once without \
             --offline / HF_HUB_OFFLINE=1 to download it",
            cache.path().display()
        )
    };
    let commit = match std::fs::read_to_string(root.join("refs").join(revision)) {
        Ok(c) => c.trim().to_string(),
        Err(_) if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) => {
            revision.to_string()
        }
        Err(_) => bail!(not_cached()),
    };
    let dir = root.join("snapshots").join(&commit);
    if !dir.is_dir() {
        bail!(not_cached());
    }
    let mut missing: Vec<String> = REQUIRED
        .iter()
        .filter(|f| !dir.join(f).is_file())
        .map(|f| f.to_string())
        .collect();
    if dir.join(INDEX).is_file() {
        missing.extend(
            shards(&dir.join(INDEX))?
                .into_iter()
                .filter(|f| !dir.join(f).is_file()),
        );
    } else if !dir.join(SINGLE).is_file() {
        missing.push(format!("{SINGLE} (or {INDEX})"));
    }
    if !missing.is_empty() {
        bail!(
            "{id}@{revision}: the cached snapshot {} lacks {}; run once without --offline / \
             HF_HUB_OFFLINE=1 to complete it",
            dir.display(),
            missing.join(", ")
        );
    }
    Ok(ModelDir {
        dir,
        name: id.to_string(),
    })
}

/// Downloads what `id` at `revision` needs into the HF cache (files already there are reused).
fn download(id: &str, revision: &str) -> Result<ModelDir> {
    let api = ApiBuilder::from_env()
        .with_progress(std::io::stderr().is_terminal())
        .build()
        .context("cannot set up the Hugging Face hub client")?;
    let repo = api.repo(Repo::with_revision(
        id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let info = match repo.info() {
        Ok(info) => info,
        Err(e) => {
            // Unreachable hub (or no such repo): a complete cached snapshot still works.
            if let Ok(cached) = from_cache(id, revision) {
                eprintln!(
                    "warning: cannot reach the Hugging Face hub ({e}); using the cached snapshot \
                     {}",
                    cached.dir.display()
                );
                return Ok(cached);
            }
            bail!(
                "cannot list {id}@{revision} on the Hugging Face hub (no network, a typo, or a \
                 gated repo needing `huggingface-cli login`?) and it is not in the local cache: {e}"
            );
        }
    };
    let listed: BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    for f in REQUIRED {
        if !listed.contains(f) {
            bail!(
                "{id}@{revision} has no {f}; it is not a transformers checkpoint this tool can run"
            );
        }
    }
    let mut files: Vec<String> = REQUIRED.iter().map(|f| f.to_string()).collect();
    files.extend(
        OPTIONAL
            .iter()
            .filter(|f| listed.contains(**f))
            .map(|f| f.to_string()),
    );
    let fetch = |name: &str| {
        repo.get(name)
            .with_context(|| format!("downloading {name} of {id}@{revision}"))
    };
    if listed.contains(INDEX) {
        let index = fetch(INDEX)?;
        files.push(INDEX.to_string());
        files.extend(shards(&index)?);
    } else if listed.contains(SINGLE) {
        files.push(SINGLE.to_string());
    } else {
        bail!(
            "{id}@{revision} has no {SINGLE} or {INDEX} (only safetensors weights are supported)"
        );
    }
    let mut paths = Vec::new();
    for f in &files {
        paths.push(fetch(f)?);
    }
    // Files reused from the cache can belong to an older snapshot than new downloads; the model
    // needs them side by side, so fetch everything from the current commit if they differ.
    let parent = |p: &PathBuf| p.parent().map(Path::to_path_buf);
    if paths.iter().any(|p| parent(p) != parent(&paths[0])) {
        paths.clear();
        for f in &files {
            paths.push(
                repo.download(f)
                    .with_context(|| format!("downloading {f} of {id}@{revision}"))?,
            );
        }
    }
    let dir = paths
        .first()
        .and_then(parent)
        .context("the hub client returned no file")?;
    Ok(ModelDir {
        dir,
        name: id.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        assert!(looks_like_hub_id("microsoft/bitnet-b1.58-2B-4T"));
        assert!(looks_like_hub_id("HF1BitLLM/Llama3-8B-1.58-100B-tokens"));
        assert!(!looks_like_hub_id("./models/x"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("single"));
        assert!(!looks_like_hub_id("../x"));
    }
}
