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
    let go = |seed: &str, extra: &[&str]| {
        let mut args = vec![
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
        ];
        args.extend_from_slice(extra);
        let o = ok(run(&args));
        let out: Value = serde_json::from_str(&stdout(&o)).unwrap();
        ids(&out["tokens"])
    };
    let a = go("7", &[]);
    assert_eq!(a.len(), 16);
    assert_eq!(a, go("7", &[]));
    // The CPU always samples on the host: the flag that asks for it there changes nothing.
    assert_eq!(a, go("7", &["--host-sampler"]));
}

/// Greedy decoding (`generation::decode` after the first token) against the sampler's top-1 pick,
/// up to the end of the fixture's 256-token context and exactly at it.
#[test]
fn greedy_decoding_equals_top1_sampling_up_to_the_context_end() {
    let model = packed();
    let go = |max_tokens: &str, sampling: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "The river",
            "--max-tokens",
            max_tokens,
            "--ignore-eos",
            "--json",
        ];
        args.extend_from_slice(sampling);
        let out: Value = serde_json::from_str(&stdout(&ok(run(&args)))).unwrap();
        let prompt = out["prompt_tokens"].as_array().unwrap().len();
        (ids(&out["tokens"]), out["stop_reason"].clone(), prompt)
    };
    let greedy = ["--temperature", "0"];
    let top1 = ["--temperature", "1", "--top-k", "1", "--seed", "3"];
    let (tokens, stop, prompt) = go("400", &greedy);
    // The prompt fills positions 0..prompt, each generated token but the last one more.
    let fits = 256 - prompt + 1;
    assert_eq!((tokens.len(), &stop), (fits, &Value::from("context_full")));
    assert_eq!(go("400", &top1), (tokens.clone(), stop, prompt));
    let exact = fits.to_string();
    let (at_end, stop, _) = go(&exact, &greedy);
    assert_eq!((at_end, stop), (tokens, Value::from("max_tokens")));
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

    // The quantized heads approximate the exact one. A tied embedding keeps the checkpoint's
    // exact rows (quantizing it with the head moved this random model's mean NLL by ~0.36 for
    // q4); the heads alone move it ~0.002 (q8) and ~0.01 (q4).
    for (head, tolerance) in [("q8", 0.1), ("q4", 0.05)] {
        let o = ok(run(&[
            "perplexity",
            "--model",
            model.to_str().unwrap(),
            "--file",
            file.to_str().unwrap(),
            "--head",
            head,
            "--json",
        ]));
        let q: Value = serde_json::from_str(&stdout(&o)).unwrap();
        let q_mean = q["mean_nll"].as_f64().unwrap();
        assert!(
            q_mean != mean && (q_mean - mean).abs() < tolerance,
            "{head} {q_mean} vs exact {mean}"
        );
    }

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
        text.contains("| pp8 |") && text.contains("| tg4 |") && text.contains("| tg4 sampled |"),
        "{text}"
    );
    // The head format and the decode row's effective bandwidth (weights read per token × t/s).
    assert!(
        text.contains("| exact |")
            && text.contains("eff. GB/s")
            && text.contains("weights read per generated token"),
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
    let o = ok(run(&[
        "convert",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
        "--shard-size",
        "60KB",
    ]));
    assert!(
        stderr(&o).contains("loads in bitnet-model"),
        "{}",
        stderr(&o)
    );
    assert!(out.join("model.safetensors.index.json").is_file());
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

    // Packing the bf16 master weights gives the packed fixture: same greedy ids. Served by
    // the hub stand-in, this also covers downloading an index and its shards.
    let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    assert!(
        files
            .iter()
            .filter(|(n, _)| n.ends_with(".safetensors"))
            .count()
            > 1
    );
    let (endpoint, _) = fake_hub("someone/sharded", files);
    let r = reference();
    let o = bitnet(&[
        "generate",
        "--model",
        "someone/sharded",
        "--prompt",
        r["greedy_prompt"].as_str().unwrap(),
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--json",
    ])
    .env("HF_HOME", dir.path().join("hf"))
    .env("HF_ENDPOINT", endpoint)
    .output()
    .unwrap();
    let out: Value = serde_json::from_str(&stdout(&ok(o))).unwrap();
    assert_eq!(
        ids(&out["tokens"]),
        ids(&r["dtypes"]["f32"]["greedy"]["ids"])
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
        "generation_config.json",
        "else 0.8]",
        "else 0.95]",
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
    // A non-UTF-8 argument is refused with its flag's name.
    for (flag, rest) in [("--prompt", &[][..]), ("--stop", &["--prompt", "hi"][..])] {
        use std::os::unix::ffi::OsStrExt;
        let mut cmd = bitnet(&["generate", "--model", m]);
        cmd.args(rest)
            .arg(flag)
            .arg(std::ffi::OsStr::from_bytes(b"ab\xffcd"));
        fails_with(cmd.output().unwrap(), &[flag, "not valid UTF-8"]);
    }

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

#[test]
fn offline_hub_ids_resolve_from_the_local_cache() {
    // The layout huggingface_hub and hf-hub write: refs/<rev> holds the commit of snapshots/<commit>/.
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--someone--bitnet-tiny");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let model = packed();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(model.join(f), snapshot.join(f)).unwrap();
    }
    let r = reference();
    for revision in ["main", commit] {
        let o = bitnet(&[
            "generate",
            "--model",
            "someone/bitnet-tiny",
            "--revision",
            revision,
            "--offline",
            "--prompt",
            r["greedy_prompt"].as_str().unwrap(),
            "--temperature",
            "0",
            "--max-tokens",
            "24",
            "--json",
        ])
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
        let out: Value = serde_json::from_str(&stdout(&ok(o))).unwrap();
        assert_eq!(
            ids(&out["tokens"]),
            ids(&r["dtypes"]["f32"]["greedy"]["ids"])
        );
    }
    // Online but the hub is unreachable: the complete cached snapshot is used, with a warning.
    let o = bitnet(&["inspect", "-m", "someone/bitnet-tiny"])
        .env("HF_HOME", home.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(stderr(&ok(o)).contains("using the cached snapshot"));
    // An unknown branch, and a snapshot missing its weights, are named.
    let o = bitnet(&["inspect", "-m", "someone/bitnet-tiny", "--revision", "dev"])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    fails_with(
        o,
        &[
            "someone/bitnet-tiny@dev",
            "not in the local Hugging Face cache",
        ],
    );
    std::fs::remove_file(snapshot.join("model.safetensors")).unwrap();
    let o = bitnet(&["inspect", "-m", "someone/bitnet-tiny", "--offline"])
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    fails_with(o, &["model.safetensors"]);
}

/// A minimal stand-in for the Hugging Face hub's HTTP API (what hf-hub's sync client calls):
/// `GET /api/models/<id>/revision/<rev>` lists the files, `GET /<id>/resolve/<rev>/<file>` with
/// a `Range` header serves them with the `ETag` / `X-Repo-Commit` / `Content-Range` headers.
/// Returns the endpoint URL and a log of the requested paths.
fn fake_hub(
    id: &'static str,
    files: Vec<(String, Vec<u8>)>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = log.clone();
    std::thread::spawn(move || {
        let commit = "fedcba9876543210fedcba9876543210fedcba98";
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            let mut range = None;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = Some(v.trim().to_string());
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            seen.lock().unwrap().push(path.clone());
            let (status, headers, body) = if path == format!("/api/models/{id}/revision/main") {
                let siblings: Vec<Value> = files
                    .iter()
                    .map(|(n, _)| serde_json::json!({ "rfilename": n }))
                    .collect();
                let body = serde_json::json!({ "siblings": siblings, "sha": commit }).to_string();
                ("200 OK", String::new(), body.into_bytes())
            } else if let Some((name, data)) = files
                .iter()
                .find(|(n, _)| path == format!("/{id}/resolve/main/{n}"))
            {
                let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
                    Some((a, b)) => (
                        a.parse::<usize>().unwrap(),
                        b.parse::<usize>().unwrap_or(data.len() - 1),
                    ),
                    None => (0, data.len() - 1),
                };
                let etag: u64 = data.iter().fold(1469598103934665603u64, |h, &b| {
                    (h ^ b as u64).wrapping_mul(1099511628211)
                });
                let headers = format!(
                    "ETag: \"{etag:016x}{}\"\r\nX-Repo-Commit: {commit}\r\nContent-Range: bytes {start}-{end}/{}\r\n",
                    name.len(),
                    data.len()
                );
                ("206 Partial Content", headers, data[start..=end].to_vec())
            } else {
                ("404 Not Found", String::new(), b"not found".to_vec())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    (url, log)
}

#[test]
fn hub_ids_download_into_the_cache_then_work_offline() {
    let model = packed();
    let mut files: Vec<(String, Vec<u8>)> = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model.safetensors",
        "reference.json",
    ]
    .iter()
    .map(|f| (f.to_string(), std::fs::read(model.join(f)).unwrap()))
    .collect();
    files.push(("README.md".into(), b"# a model card\n".to_vec()));
    let (endpoint, log) = fake_hub("someone/tiny", files);
    let home = tempfile::tempdir().unwrap();
    let r = reference();
    let generate = |offline: bool| {
        let mut cmd = bitnet(&[
            "generate",
            "--model",
            "someone/tiny",
            "--prompt",
            r["greedy_prompt"].as_str().unwrap(),
            "--temperature",
            "0",
            "--max-tokens",
            "24",
            "--json",
        ]);
        cmd.env("HF_HOME", home.path())
            .env("HF_ENDPOINT", &endpoint);
        if offline {
            cmd.arg("--offline");
        }
        let out: Value = serde_json::from_str(&stdout(&ok(cmd.output().unwrap()))).unwrap();
        ids(&out["tokens"])
    };
    let expected = ids(&r["dtypes"]["f32"]["greedy"]["ids"]);
    assert_eq!(generate(false), expected);
    let requested = log.lock().unwrap().clone();
    assert!(
        requested.iter().any(|p| p.ends_with("/model.safetensors")),
        "{requested:?}"
    );
    // Only what the model needs is fetched.
    assert!(!requested
        .iter()
        .any(|p| p.ends_with("reference.json") || p.ends_with("README.md")));
    let snapshot = home
        .path()
        .join("hub/models--someone--tiny/snapshots/fedcba9876543210fedcba9876543210fedcba98");
    assert!(snapshot.join("model.safetensors").is_file());
    // Now from the cache alone.
    let before = log.lock().unwrap().len();
    assert_eq!(generate(true), expected);
    assert_eq!(
        log.lock().unwrap().len(),
        before,
        "offline must not touch the network"
    );
}
