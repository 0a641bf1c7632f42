//! Output directory handling, JSON helpers, names and sizes.

use std::path::{Path, PathBuf};

use crate::error::{ConvertError, IoContext, Result};

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).at(path)?;
    serde_json::from_str(&text).map_err(|e| ConvertError::Json {
        path: path.to_path_buf(),
        msg: format!("invalid JSON ({e})"),
    })
}

pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| ConvertError::Json {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    text.push('\n');
    std::fs::write(path, text).at(path)
}

/// A new output directory, built under a temporary name next to its final place and renamed
/// into place by [`OutputDir::commit`]. Dropped uncommitted, it removes itself, so a failed run
/// leaves nothing behind; an existing output is only replaced once the new one is complete.
#[derive(Debug)]
pub(crate) struct OutputDir {
    pub tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl OutputDir {
    /// Checks that `target` may be written (refusing an existing one without `force`, and
    /// anything that is or contains `input`), then creates the temporary directory.
    pub fn create(target: &Path, force: bool, input: Option<&Path>) -> Result<Self> {
        let name = target
            .file_name()
            .ok_or_else(|| {
                ConvertError::InvalidOptions(format!(
                    "output {} must name a directory",
                    target.display()
                ))
            })?
            .to_string_lossy()
            .into_owned();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if let Some(input) = input {
            let input = std::fs::canonicalize(input).at(input)?;
            // The output's future absolute path, even if it does not exist yet.
            let parent_abs = std::fs::canonicalize(&parent).ok();
            if let Some(p) = parent_abs {
                let out_abs = p.join(&name);
                let out_abs = std::fs::canonicalize(&out_abs).unwrap_or(out_abs);
                if input.starts_with(&out_abs) {
                    return Err(ConvertError::OutputIsInput {
                        output: target.to_path_buf(),
                        input,
                    });
                }
            }
        }
        if target.symlink_metadata().is_ok() && !force {
            return Err(ConvertError::OutputExists(target.to_path_buf()));
        }
        std::fs::create_dir_all(&parent).at(&parent)?;
        let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).at(&tmp)?;
        }
        std::fs::create_dir(&tmp).at(&tmp)?;
        Ok(Self {
            tmp,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// Moves the finished directory into place, replacing an existing output only now.
    pub fn commit(mut self) -> Result<()> {
        let target = self.target.clone();
        if target.symlink_metadata().is_ok() {
            let name = target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let old = self
                .tmp
                .with_file_name(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(&target, &old).at(&target)?;
            if let Err(e) = std::fs::rename(&self.tmp, &target) {
                // Put the old output back; the new one is removed on drop.
                let _ = std::fs::rename(&old, &target);
                return Err(e).at(&target);
            }
            self.committed = true;
            let removed = if old.is_dir() {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
            removed.at(&old)?;
        } else {
            std::fs::rename(&self.tmp, &target).at(&target)?;
            self.committed = true;
        }
        Ok(())
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Sort key that orders `model.layers.10` after `model.layers.9`, with the embedding first and
/// the layers before the final norm and head.
pub(crate) fn natural_key(name: &str) -> (u8, Vec<(u64, String)>) {
    let group = if name.contains("embed_tokens") {
        0
    } else if name.contains(".layers.") {
        1
    } else {
        2
    };
    let parts = name
        .split('.')
        .map(|p| match p.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (u64::MAX, p.to_string()),
        })
        .collect();
    (group, parts)
}

/// Parses a size such as `2GB`, `500MB`, `1.5GiB` or `123456` (bytes), as transformers does
/// (`GB` = 10^9, `GiB` = 2^30).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| {
        ConvertError::InvalidOptions(format!(
            "size {s:?}: expected a number with an optional unit (KB, MB, GB, KiB, MiB, GiB)"
        ))
    })?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" | "K" => 1e3,
        "MB" | "M" => 1e6,
        "GB" | "G" => 1e9,
        "TB" | "T" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(ConvertError::InvalidOptions(format!(
                "size {s:?}: unknown unit {u:?} (use KB, MB, GB, KiB, MiB or GiB)"
            )))
        }
    };
    let bytes = (num * mult).round();
    if bytes.is_nan() || bytes < 1.0 {
        return Err(ConvertError::InvalidOptions(format!(
            "size {s:?} must be positive"
        )));
    }
    Ok(bytes as u64)
}

/// Today's UTC date as `YYYY-MM-DD` (no calendar crate needed).
pub(crate) fn utc_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Files besides the weights that a converted checkpoint carries over from its source.
pub(crate) const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1.5 MiB").unwrap(), 1_572_864);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("abc").is_err());
        assert!(parse_size("2XB").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn natural_order() {
        let mut v = vec![
            "model.norm.weight",
            "model.layers.10.mlp.up_proj.weight",
            "lm_head.weight",
            "model.layers.9.mlp.up_proj.weight",
            "model.embed_tokens.weight",
        ];
        v.sort_by_key(|n| natural_key(n));
        assert_eq!(
            v,
            [
                "model.embed_tokens.weight",
                "model.layers.9.mlp.up_proj.weight",
                "model.layers.10.mlp.up_proj.weight",
                "lm_head.weight",
                "model.norm.weight"
            ]
        );
    }

    #[test]
    fn date_is_plausible() {
        let d = utc_date();
        assert_eq!(d.len(), 10);
        assert!(d.as_str() >= "2024-01-01", "{d}");
    }
}
