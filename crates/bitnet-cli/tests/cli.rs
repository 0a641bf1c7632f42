//! End-to-end tests of the `bitnet` binary on the committed fixtures (tests/fixtures), against
//! the transformers references in `reference.json`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn packed() -> PathBuf {
    fixture("bitnet-packed")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(packed().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn bitnet(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bitnet"));
    cmd.args(args)
        .env_remove("HF_HUB_OFFLINE")
        .env("RAYON_NUM_THREADS", "2");
    cmd
}

fn run(args: &[&str]) -> Output {
    bitnet(args).output().unwrap()
}

fn run_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = bitnet(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "failed: {}", stderr(&o));
    o
}

/// Exit code 1 and a message on stderr containing every `needle`.
fn fails_with(o: Output, needles: &[&str]) {
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains("error:"), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
}

#[test]
fn greedy_generation_reproduces_transformers() {
    let r = reference();
    let model = packed();
    let prompt = r["greedy_prompt"].as_str().unwrap();
    let o = ok(run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--json",
    ]));
    let out: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(ids(&out["prompt_tokens"]), ids(&r["greedy_prompt_ids"]));
    let expected = ids(&r["dtypes"]["f32"]["greedy"]["ids"]);
    let got = ids(&out["tokens"]);
    // The reference never stops at eos; if we stopped early on one, compare up to there.
    let special = [507u64, 508];
    let until = expected
        .iter()
        .position(|t| special.contains(t))
        .unwrap_or(expected.len());
    assert_eq!(got[..], expected[..until.min(got.len())]);
    assert_eq!(got.len(), until);
    assert_eq!(out["stop_reason"], "max_tokens");
    assert_eq!(out["text"], r["dtypes"]["f32"]["greedy"]["text"]);
    for key in [
        "load_s",
        "prefill_s",
        "decode_s",
        "prefill_tok_s",
        "decode_tok_s",
    ] {
        assert!(out["timings"][key].as_f64().unwrap() > 0.0, "{key}");
    }
}

#[test]
fn streaming_prints_the_same_text_and_a_summary() {
    let r = reference();
    let model = packed();
    let o = ok(run(&[
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        r["greedy_prompt"].as_str().unwrap(),
        "--temperature",
        "0",
        "-n",
        "24",
    ]));
    let text = r["dtypes"]["f32"]["greedy"]["text"].as_str().unwrap();
    assert_eq!(stdout(&o), format!("{text}\n"));
    let err = stderr(&o);
    assert!(
        err.contains("prompt eval time") && err.contains("tokens per second"),
        "{err}"
    );
    assert!(err.contains("kernel "), "{err}");
}

#[test]
fn chat_mode_uses_the_template_and_stdin_prompt() {
    let r = reference();
    let case = &r["chat"][0];
    let model = packed();
    let o = ok(run_stdin(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--chat",
            "--system",
            case["messages"][0]["content"].as_str().unwrap(),
            "--prompt",
            "-",
            "--temperature",
            "0",
            "--max-tokens",
            "4",
            "--json",
        ],
        case["messages"][1]["content"].as_str().unwrap().as_bytes(),
    ));
    let out: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(ids(&out["prompt_tokens"]), ids(&case["ids"]));
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let model = packed();
    let go = |seed: &str| {
        let o = ok(run(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "The river",
            "--seed",
            seed,
            "--top-k",
            "40",
            "--max-tokens",
            "16",
            "--ignore-eos",
            "--json",
        ]));
        let out: Value = serde_json::from_str(&stdout(&o)).unwrap();
        ids(&out["tokens"])
    };
    let a = go("7");
    assert_eq!(a.len(), 16);
    assert_eq!(a, go("7"));
}

#[test]
fn stop_string_cuts_the_text() {
    let r = reference();
    let model = packed();
    // Greedy text is known: stop at a piece of it.
    let full = r["dtypes"]["f32"]["greedy"]["text"].as_str().unwrap();
    let o = ok(run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        r["greedy_prompt"].as_str().unwrap(),
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--stop",
        "one",
        "--json",
    ]));
    let out: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let at = full.find("one").unwrap();
    assert_eq!(out["text"].as_str().unwrap(), &full[..at]);
    assert_eq!(out["stop_reason"], "stop_string");
}

#[test]
fn perplexity_matches_transformers() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("text.txt");
    std::fs::write(&file, r["text"].as_str().unwrap()).unwrap();
    let model = packed();
    let o = ok(run(&[
        "perplexity",
        "--model",
        model.to_str().unwrap(),
        "--file",
        file.to_str().unwrap(),
        "--json",
    ]));
    let out: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let expected = r["dtypes"]["f32"]["mean_nll"].as_f64().unwrap();
    let mean = out["mean_nll"].as_f64().unwrap();
    assert!((mean - expected).abs() < 2e-3, "{mean} vs {expected}");
    assert_eq!(out["tokens"], 81);
    let nll = out["nll"].as_array().unwrap();
    let ref_nll = r["dtypes"]["f32"]["nll"].as_array().unwrap();
    assert_eq!(nll.len(), ref_nll.len());
    for (a, b) in nll.iter().zip(ref_nll) {
        assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-2);
    }
    assert!((out["ppl"].as_f64().unwrap() - mean.exp()).abs() < 1e-6 * mean.exp());

    // Windows of 20 tokens and --limit: 40 tokens → 2 windows → 38 scored.
    let o = ok(run(&[
        "perplexity",
        "--model",
        model.to_str().unwrap(),
        "--file",
        file.to_str().unwrap(),
        "--context",
        "20",
        "--limit",
        "40",
        "--json",
    ]));
    let out: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(out["tokens"], 40);
    assert_eq!(out["nll"].as_array().unwrap().len(), 38);
    // The first window is the same text as the full run's start.
    let first = out["nll"][0].as_f64().unwrap();
    assert!((first - ref_nll[0].as_f64().unwrap()).abs() < 1e-2);

    // Human-readable form.
    let o = ok(run(&[
        "perplexity",
        "--model",
        model.to_str().unwrap(),
        "--file",
        file.to_str().unwrap(),
    ]));
    let text = stdout(&o);
    assert!(
        text.contains("perplexity:") && text.contains("mean NLL:"),
        "{text}"
    );
}

#[test]
fn chat_reuses_the_cache_without_changing_replies() {
    let model = packed();
    let input = b"Hello there\nWhat is the river?\n/reset\nAgain\n";
    let args = |extra: &'static [&'static str]| {
        let mut a = vec![
            "chat",
            "--model",
            model.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            "--system",
            "Be brief.",
            "--verbose",
        ];
        a.extend_from_slice(extra);
        a
    };
    let cached = ok(run_stdin(&args(&[]), input));
    let fresh = ok(run_stdin(&args(&["--no-cache-reuse"]), input));
    assert_eq!(stdout(&cached), stdout(&fresh));
    assert_eq!(stdout(&cached).lines().count(), 3, "{}", stdout(&cached));
    let err = stderr(&cached);
    assert!(err.contains("conversation reset"), "{err}");
    // The second turn fed only the tokens not already cached.
    let reused: Vec<usize> = err
        .lines()
        .filter_map(|l| {
            l.split(" from cache")
                .next()?
                .rsplit('(')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(reused.len(), 3, "{err}");
    assert!(reused[1] > 0, "{err}");
    assert_eq!(reused[2], 0, "{err}");
}

#[test]
fn inspect_and_bench_describe_the_model() {
    let model = packed();
    let o = ok(run(&["inspect", "--model", model.to_str().unwrap()]));
    let text = stdout(&o);
    for needle in [
        "bitnet",
        "offline",
        "multiplied",
        "<|eot_id|> = 508",
        "warnings",
    ] {
        assert!(text.contains(needle), "{needle} not in {text}");
    }
    let o = ok(run(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--prompt-len",
        "8",
        "--gen",
        "4",
        "--repetitions",
        "1",
        "--threads",
        "1",
    ]));
    let text = stdout(&o);
    assert!(
        text.contains("| pp8 |") && text.contains("| tg4 |"),
        "{text}"
    );
    assert!(text.contains("| 1 |"), "threads column: {text}");
    assert!(text.contains("peak RSS"), "{text}");
}

#[test]
fn convert_packs_and_checks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("packed");
    let src = fixture("bitnet-bf16");
    ok(run(&[
        "convert",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
    ]));
    ok(run(&[
        "convert",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
        "--check",
    ]));
    // An existing output needs --force.
    fails_with(
        run(&["convert", src.to_str().unwrap(), out.to_str().unwrap()]),
        &[],
    );
}

#[test]
fn help_teaches() {
    let o = ok(run(&["--help"]));
    let text = stdout(&o);
    assert!(
        text.contains("bitnet generate --prompt \"In the beginning\""),
        "{text}"
    );
    assert!(
        text.contains("--offline") && text.contains("perplexity --file"),
        "{text}"
    );
    let o = ok(run(&["generate", "--help"]));
    let text = stdout(&o);
    for needle in [
        "[default: 128]",
        "[default: 0.8]",
        "[default: 0.95]",
        "greedy",
        "--dtype",
    ] {
        assert!(text.contains(needle), "{needle} not in {text}");
    }
}

#[test]
fn bad_inputs_fail_with_a_message_naming_them() {
    let model = packed();
    let m = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("no-such-model");
    fails_with(
        run(&[
            "generate",
            "--model",
            missing.to_str().unwrap(),
            "--prompt",
            "hi",
        ]),
        &["no-such-model", "no such directory"],
    );

    let no_tok = dir.path().join("no-tokenizer");
    std::fs::create_dir(&no_tok).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer_config.json"] {
        std::fs::copy(model.join(f), no_tok.join(f)).unwrap();
    }
    fails_with(
        run(&[
            "generate",
            "--model",
            no_tok.to_str().unwrap(),
            "--prompt",
            "hi",
        ]),
        &["tokenizer.json", "not found"],
    );

    fails_with(
        run(&["generate", "--model", m, "--prompt", "hi", "--top-p", "1.5"]),
        &["--top-p", "1.5"],
    );

    let long = "word ".repeat(300);
    fails_with(
        run(&["generate", "--model", m, "--prompt", &long]),
        &["--prompt", "context of 256 tokens"],
    );

    let bad = dir.path().join("latin1.txt");
    std::fs::write(&bad, b"caf\xe9 au lait").unwrap();
    fails_with(
        run(&["perplexity", "--model", m, "--file", bad.to_str().unwrap()]),
        &["latin1.txt", "UTF-8"],
    );
    fails_with(
        run_stdin(&["generate", "--model", m, "--prompt", "-"], b"\xff\xfe"),
        &["--prompt -", "UTF-8"],
    );

    fails_with(
        run(&["generate", "--model", m, "--prompt", "hi", "--dtype", "f16"]),
        &["--dtype", "f16", "overflow"],
    );
    fails_with(
        run(&[
            "generate", "--model", m, "--prompt", "hi", "--device", "cuda",
        ]),
        &["--device cuda"],
    );
    fails_with(
        run(&["perplexity", "--model", m, "--file", "/no/such/file.txt"]),
        &["/no/such/file.txt"],
    );
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "some text to score").unwrap();
    fails_with(
        run(&[
            "perplexity",
            "--model",
            m,
            "--file",
            text.to_str().unwrap(),
            "--context",
            "1000",
        ]),
        &["--context 1000"],
    );

    // A hub id that is not cached, offline: no network needed.
    let o = bitnet(&["inspect", "--model", "nobody/no-such-model", "--offline"])
        .env("HF_HOME", dir.path())
        .output()
        .unwrap();
    fails_with(o, &["nobody/no-such-model", "cache", "--offline"]);
    let o = bitnet(&["inspect", "--model", "nobody/no-such-model"])
        .env("HF_HOME", dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    fails_with(o, &["nobody/no-such-model", "cache"]);

    // Usage errors exit 1 too (clap's default would be 2).
    fails_with(run(&["generate", "--model", m]), &["--prompt"]);
}

#[test]
fn missing_default_model_says_how_to_choose_one() {
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bitnet-kjv-tiny");
    if default.is_dir() {
        return; // The shipped model exists: nothing to report.
    }
    fails_with(
        run(&["generate", "--prompt", "hi"]),
        &["bitnet-kjv-tiny", "--model"],
    );
}
