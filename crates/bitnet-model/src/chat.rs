//! Tokenizer loading and chat prompts rendered from the checkpoint's own Jinja template.
//!
//! `tokenizer_config.json`'s `chat_template` is rendered with minijinja, as transformers'
//! `apply_chat_template` does with Jinja2. Checkpoints without one get the
//! microsoft/bitnet-b1.58-2B-4T format: BOS, then `Role: content<|eot_id|>` per message, then
//! `Assistant: ` to generate.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// Loads `dir/tokenizer.json`, with an error that says what is missing.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(Error::Tokenizer {
            path,
            reason: "not found; the model directory needs the tokenizer.json of its checkpoint"
                .into(),
        });
    }
    Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
        path,
        reason: e.to_string(),
    })
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with the given role.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The 2B-4T chat template, used when `tokenizer_config.json` has none.
pub const BITNET_2B4T_TEMPLATE: &str = "{% for message in messages %}\
{% set content = message['role'] | capitalize + ': ' + message['content'] | trim + '<|eot_id|>' %}\
{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}\
{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}";

/// A chat template with the special tokens it refers to.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    origin: PathBuf,
}

impl ChatTemplate {
    /// Reads `dir/tokenizer_config.json`'s template and special tokens; falls back to
    /// [`BITNET_2B4T_TEMPLATE`] with Llama 3's tokens when the file or the key is absent.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|source| Error::Json {
                path: path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
            Err(source) => return Err(Error::Io { path, source }),
        };
        // Special tokens are either strings or `{"content": ...}` objects.
        let token = |key: &str, default: &str| match &config[key] {
            Value::String(s) => s.clone(),
            Value::Object(o) => o
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_string(),
            _ => default.to_string(),
        };
        let source = match &config["chat_template"] {
            Value::String(s) => s.clone(),
            // A list of named templates: take "default".
            Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .unwrap_or(BITNET_2B4T_TEMPLATE)
                .to_string(),
            _ => BITNET_2B4T_TEMPLATE.to_string(),
        };
        Ok(Self {
            source,
            bos_token: token("bos_token", "<|begin_of_text|>"),
            eos_token: token("eos_token", "<|end_of_text|>"),
            origin: path,
        })
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// reply begins. Encode the result with `add_special_tokens = false`: the template already
    /// holds the BOS token.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let fail = |e: minijinja::Error| Error::ChatTemplate {
            path: self.origin.clone(),
            reason: e.to_string(),
        };
        env.add_template("chat", &self.source).map_err(fail)?;
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => &self.bos_token,
                    eos_token => &self.eos_token,
                })
            })
            .map_err(fail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_renders_the_2b4t_format() {
        let dir = tempfile::tempdir().unwrap();
        let t = ChatTemplate::from_dir(dir.path()).unwrap();
        let text = t
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", " How are you? "),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            text,
            "<|begin_of_text|>System: Be brief.<|eot_id|>User: How are you?<|eot_id|>Assistant: "
        );
    }

    #[test]
    fn template_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template": "{% for %}"}"#,
        )
        .unwrap();
        let err = ChatTemplate::from_dir(dir.path())
            .unwrap()
            .render(&[], true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokenizer_config.json"), "{err}");
        let err = load_tokenizer(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("not found"),
            "{err}"
        );
    }
}
