//! End-to-end tests of the converter, the checker and the synthetic models, on small models
//! written into temporary directories.

use std::path::{Path, PathBuf};

use bitnet_convert::st::{PlannedTensor, StWriter};
use bitnet_convert::synth::{synth, SplitMix64, SynthConfig, SynthOptions};
use bitnet_convert::{check, convert, progress, ConvertError, ConvertOptions};
use bitnet_kernels::pack::{quantize_absmean, unpack_ternary};
use half::{bf16, f16};

const H: usize = 64;
const I: usize = 96;
const KV: usize = 32;
const VOCAB: usize = 300;

/// A tiny full-precision BitNet checkpoint: F32 linears, F16 norms, BF16 embedding, plus a
/// rotary inv_freq buffer (which the converter drops).
fn write_model(dir: &Path, seed: u64) -> Vec<(String, &'static str, Vec<usize>, Vec<f32>)> {
    let mut rng = SplitMix64::new(seed);
    let mut tensors = Vec::new();
    let mut add = |name: String, dtype: &'static str, shape: Vec<usize>, std: f32, ones: bool| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                if ones {
                    1.0 + 0.1 * rng.next_normal()
                } else {
                    std * rng.next_normal()
                }
            })
            .collect();
        // Keep the values as they will be on disk.
        let v = v
            .into_iter()
            .map(|x| match dtype {
                "BF16" => bf16::from_f32(x).to_f32(),
                "F16" => f16::from_f32(x).to_f32(),
                _ => x,
            })
            .collect();
        tensors.push((name, dtype, shape, v));
    };
    add(
        "model.embed_tokens.weight".into(),
        "BF16",
        vec![VOCAB, H],
        0.02,
        false,
    );
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        add(
            format!("{p}.input_layernorm.weight"),
            "F16",
            vec![H],
            0.,
            true,
        );
        add(
            format!("{p}.post_attention_layernorm.weight"),
            "F16",
            vec![H],
            0.,
            true,
        );
        add(
            format!("{p}.self_attn.attn_sub_norm.weight"),
            "F32",
            vec![H],
            0.,
            true,
        );
        add(
            format!("{p}.mlp.ffn_sub_norm.weight"),
            "F32",
            vec![I],
            0.,
            true,
        );
        for (proj, shape) in [
            ("self_attn.q_proj", [H, H]),
            ("self_attn.k_proj", [KV, H]),
            ("self_attn.v_proj", [KV, H]),
            ("self_attn.o_proj", [H, H]),
            ("mlp.gate_proj", [I, H]),
            ("mlp.up_proj", [I, H]),
            ("mlp.down_proj", [H, I]),
        ] {
            add(
                format!("{p}.{proj}.weight"),
                "F32",
                shape.to_vec(),
                0.03,
                false,
            );
        }
        add(
            format!("{p}.self_attn.rotary_emb.inv_freq"),
            "F32",
            vec![8],
            1.0,
            false,
        );
    }
    add("model.norm.weight".into(), "BF16", vec![H], 0., true);
    write_tensors(&dir.join("model.safetensors"), &tensors);
    let config = serde_json::json!({
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
        "hidden_size": H, "intermediate_size": I, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{\"fake\": true}").unwrap();
    std::fs::write(dir.join("generation_config.json"), "{}").unwrap();
    tensors
}

fn write_tensors(path: &Path, tensors: &[(String, &'static str, Vec<usize>, Vec<f32>)]) {
    let plan = tensors
        .iter()
        .map(|(n, d, s, _)| PlannedTensor::new(n.clone(), d, s.clone()))
        .collect();
    let mut w = StWriter::create(path, plan).unwrap();
    for (name, dtype, _, v) in tensors {
        let bytes: Vec<u8> = match *dtype {
            "BF16" => v
                .iter()
                .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                .collect(),
            "F16" => v
                .iter()
                .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                .collect(),
            "I32" => v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect(),
            _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        w.write(name, &bytes).unwrap();
    }
    w.finish().unwrap();
}

fn quiet() -> impl FnMut(&bitnet_convert::Progress<'_>) {
    progress::silent()
}

fn run(input: &Path, output: &Path) -> bitnet_convert::Result<bitnet_convert::Report> {
    convert(&ConvertOptions::new(input, output), &mut quiet())
}

/// Entries of `dir` whose names start with '.' (leftover temporary directories).
fn hidden_entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect()
}

fn dtype_of(v: &safetensors::tensor::TensorView<'_>) -> String {
    format!("{:?}", v.dtype())
}

#[test]
fn packed_output_unpacks_to_quantize_absmean() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    std::fs::create_dir(&src).unwrap();
    let tensors = write_model(&src, 1);
    let report = run(&src, &out).unwrap();
    assert!(report.verified);
    assert_eq!(report.linears, 14);
    assert_eq!(report.dropped.len(), 2, "{:?}", report.dropped);
    assert_eq!(report.files, ["model.safetensors"]);

    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 14 * 2 + 8 + 1 + 1);
    for (name, _, shape, values) in &tensors {
        if name.ends_with("inv_freq") {
            assert!(st.tensor(name).is_err());
            continue;
        }
        let t = st.tensor(name).unwrap();
        if bitnet_convert::is_linear_weight(name) {
            let (o, i) = (shape[0], shape[1]);
            assert_eq!(dtype_of(&t), "U8");
            assert_eq!(t.shape(), [o / 4, i]);
            let (want, gamma) = quantize_absmean(values);
            assert_eq!(unpack_ternary(t.data(), o, i).unwrap(), want, "{name}");
            let s = st.tensor(&format!("{name}_scale")).unwrap();
            assert_eq!(dtype_of(&s), "BF16");
            assert_eq!(s.shape(), [1]);
            assert_eq!(s.data(), bf16::from_f32(gamma).to_le_bytes(), "{name}");
            // A sanity check of the multiply convention: γ ≈ mean|W| ≈ 0.03·√(2/π).
            assert!((gamma - 0.024).abs() < 0.004, "{name}: {gamma}");
        } else {
            assert_eq!(dtype_of(&t), "BF16", "{name}");
            assert_eq!(t.shape(), shape.as_slice());
            let want: Vec<u8> = values
                .iter()
                .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                .collect();
            assert_eq!(t.data(), want.as_slice(), "{name}");
        }
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["quantization_config"],
        serde_json::json!({"quant_method": "bitnet", "linear_class": "autobitlinear",
                           "quantization_mode": "offline"})
    );
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["hidden_size"], H);
    assert!(out.join("tokenizer.json").is_file());
    assert!(out.join("generation_config.json").is_file());
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("packed offline BitNet checkpoint"), "{card}");
    assert!(card.contains(&src.display().to_string()));
    assert!(hidden_entries(tmp.path()).is_empty());

    // --check agrees, exactly.
    let report = check(&out, &src, &mut quiet()).unwrap();
    assert!(report.ok() && report.exact(), "{}", report.table());
    assert_eq!(report.rows.len(), 14 + 8 + 1 + 1);
}

#[test]
fn check_reports_flipped_ternary_values() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    std::fs::create_dir(&src).unwrap();
    write_model(&src, 2);
    run(&src, &out).unwrap();
    // Flip the code of one packed byte of the first tensor in the file (the embedding comes
    // first, so find a linear's data through the header).
    let path = out.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let (start, name) = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let name = "model.layers.1.mlp.up_proj.weight";
        let t = st.tensor(name).unwrap();
        let off = t.data().as_ptr() as usize - bytes.as_ptr() as usize;
        (off, name)
    };
    let b = bytes[start];
    let code = b & 3;
    bytes[start] = (b & !3) | ((code + 1) % 3);
    std::fs::write(&path, &bytes).unwrap();
    let report = check(&out, &src, &mut quiet()).unwrap();
    assert!(!report.ok());
    let bad = report.failures();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].name, name);
    assert_eq!(bad[0].ternary_mismatches, Some(1));
    assert!(report.table().contains("FAILED"));
}

#[test]
fn sharded_input_and_output() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    let mut opts = SynthOptions::new(&src, SynthConfig::preset_tiny());
    opts.float = true;
    opts.shard_size = 200_000;
    let s = synth(&opts, &mut quiet()).unwrap();
    assert!(s.files.len() > 2, "{:?}", s.files);
    assert!(src.join("model.safetensors.index.json").is_file());

    let mut copts = ConvertOptions::new(&src, &out);
    copts.shard_size = 100_000;
    let r = convert(&copts, &mut quiet()).unwrap();
    assert!(r.files.len() > 1 && r.verified);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), 2 * 14 + 8 + 2);
    // A weight and its scale always share a shard.
    for (name, file) in map {
        if let Some(w) = name.strip_suffix("_scale") {
            assert_eq!(map[w], *file);
        }
    }
    let total: u64 = r
        .files
        .iter()
        .map(|f| {
            let b = std::fs::read(out.join(f)).unwrap();
            let st = safetensors::SafeTensors::deserialize(&b).unwrap();
            st.tensors()
                .iter()
                .map(|(_, t)| t.data().len() as u64)
                .sum::<u64>()
        })
        .sum();
    assert_eq!(index["metadata"]["total_size"], total);
    let report = check(&out, &src, &mut quiet()).unwrap();
    assert!(report.exact(), "{}", report.table());
}

/// Asserts that `convert` fails with an error whose message contains each of `needles`, and
/// that it left no output and no temporary directory.
fn assert_fails(src: &Path, needles: &[&str]) -> ConvertError {
    let parent = tempfile::tempdir().unwrap();
    let out = parent.path().join("out");
    let err = run(src, &out).unwrap_err();
    let msg = err.to_string();
    for n in needles {
        assert!(msg.contains(n), "{msg:?} lacks {n:?}");
    }
    assert!(!out.exists(), "{msg}: output left behind");
    assert!(
        std::fs::read_dir(parent.path()).unwrap().next().is_none(),
        "{msg}: something left behind"
    );
    err
}

#[test]
fn truncated_safetensors_is_reported_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(tmp.path(), 3);
    let path = tmp.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 100).unwrap();
    drop(f);
    let err = assert_fails(tmp.path(), &["model.safetensors", "truncated"]);
    assert!(matches!(err, ConvertError::Corrupt { .. }));
    // A file cut inside its header, and one shorter than the length prefix.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(100).unwrap();
    drop(f);
    assert_fails(tmp.path(), &["model.safetensors", "header"]);
    std::fs::write(&path, [1, 2, 3]).unwrap();
    assert_fails(tmp.path(), &["model.safetensors", "3 bytes"]);
    std::fs::write(&path, b"\x05\x00\x00\x00\x00\x00\x00\x00{abc}").unwrap();
    assert_fails(tmp.path(), &["model.safetensors", "JSON"]);
}

#[test]
fn index_naming_a_missing_tensor_or_file() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut opts = SynthOptions::new(&src, SynthConfig::preset_tiny());
    opts.float = true;
    opts.shard_size = 200_000;
    synth(&opts, &mut quiet()).unwrap();
    let index_path = src.join("model.safetensors.index.json");
    let original = std::fs::read_to_string(&index_path).unwrap();
    let mut index: serde_json::Value = serde_json::from_str(&original).unwrap();
    let first = index["weight_map"]["model.embed_tokens.weight"]
        .as_str()
        .unwrap()
        .to_string();
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = first.clone().into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let err = assert_fails(
        &src,
        &[
            "model.layers.0.mlp.extra.weight",
            &first,
            "does not contain it",
        ],
    );
    assert!(matches!(err, ConvertError::MissingTensor { .. }));

    let mut index: serde_json::Value = serde_json::from_str(&original).unwrap();
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors".into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    assert_fails(
        &src,
        &[
            "model.norm.weight",
            "model-00009-of-00009.safetensors",
            "does not exist",
        ],
    );

    // A layer's linear absent altogether.
    let mut index: serde_json::Value = serde_json::from_str(&original).unwrap();
    index["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("model.layers.1.mlp.down_proj.weight");
    std::fs::write(&index_path, index.to_string()).unwrap();
    assert_fails(
        &src,
        &[
            "model.layers.1.mlp.down_proj.weight",
            "missing",
            "num_hidden_layers",
        ],
    );
}

#[test]
fn config_problems() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(tmp.path(), 4);
    let cfg_path = tmp.path().join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();

    std::fs::write(&cfg_path, cfg.replace("\"bitnet\"", "\"gpt2\"")).unwrap();
    let err = assert_fails(tmp.path(), &["gpt2", "model_type"]);
    assert!(matches!(err, ConvertError::UnknownModelType { .. }));

    std::fs::write(&cfg_path, "{not json").unwrap();
    assert_fails(tmp.path(), &["config.json", "invalid JSON"]);

    // A plain llama needs an explicit opt-in.
    let llama = cfg
        .replace("\"bitnet\"", "\"llama\"")
        .replace("BitNetForCausalLM", "LlamaForCausalLM");
    std::fs::write(&cfg_path, &llama).unwrap();
    assert_fails(tmp.path(), &["allow-plain-llama"]);
    let out = tempfile::tempdir().unwrap();
    let mut opts = ConvertOptions::new(tmp.path(), out.path().join("o"));
    opts.allow_plain_llama = true;
    let r = convert(&opts, &mut quiet()).unwrap();
    assert_eq!(r.family, bitnet_convert::Family::Llama);

    std::fs::remove_file(&cfg_path).unwrap();
    let err = assert_fails(tmp.path(), &["config.json"]);
    assert!(matches!(err, ConvertError::MissingConfig(_)));

    let err = assert_fails(&tmp.path().join("nope"), &["nope", "not a directory"]);
    assert!(matches!(err, ConvertError::NotADirectory(_)));
}

#[test]
fn bad_tensors() {
    // out % 4 != 0.
    let tmp = tempfile::tempdir().unwrap();
    let mut tensors = write_model(tmp.path(), 5);
    let k = tensors
        .iter()
        .position(|t| t.0 == "model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    tensors[k].2 = vec![KV - 2, H];
    tensors[k].3.truncate((KV - 2) * H);
    write_tensors(&tmp.path().join("model.safetensors"), &tensors);
    let err = assert_fails(
        tmp.path(),
        &["model.layers.0.self_attn.k_proj.weight", "multiple of 4"],
    );
    assert!(matches!(err, ConvertError::BadShape { .. }));

    // An integer tensor.
    let mut tensors = write_model(tmp.path(), 5);
    let n = tensors
        .iter()
        .position(|t| t.0 == "model.norm.weight")
        .unwrap();
    tensors[n].1 = "I32";
    write_tensors(&tmp.path().join("model.safetensors"), &tensors);
    let err = assert_fails(tmp.path(), &["model.norm.weight", "I32", "floating-point"]);
    assert!(matches!(err, ConvertError::NonFloat { .. }));

    // No weights at all.
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    assert_fails(tmp.path(), &["no model.safetensors"]);
}

#[test]
fn packed_input_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("packed");
    synth(
        &SynthOptions::new(&src, SynthConfig::preset_tiny()),
        &mut quiet(),
    )
    .unwrap();
    let err = assert_fails(&src, &["input is already a packed checkpoint", "U8"]);
    assert!(matches!(err, ConvertError::AlreadyPacked { .. }));
}

#[test]
fn overwriting_needs_force_and_keeps_the_old_output_on_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    std::fs::create_dir(&src).unwrap();
    write_model(&src, 6);
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("marker"), "old").unwrap();

    let err = run(&src, &out).unwrap_err();
    assert!(matches!(err, ConvertError::OutputExists(_)), "{err}");
    assert!(err.to_string().contains("--force"));
    assert!(out.join("marker").is_file());

    // --force with a failing conversion: the old output survives untouched.
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(
        src.join("config.json"),
        cfg.replace("\"bitnet\"", "\"gpt2\""),
    )
    .unwrap();
    let mut opts = ConvertOptions::new(&src, &out);
    opts.force = true;
    assert!(convert(&opts, &mut quiet()).is_err());
    assert!(out.join("marker").is_file());
    std::fs::write(src.join("config.json"), &cfg).unwrap();

    // --force with a working one replaces it.
    convert(&opts, &mut quiet()).unwrap();
    assert!(!out.join("marker").exists());
    assert!(out.join("model.safetensors").is_file());
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // Never onto the input, even with --force.
    let mut opts = ConvertOptions::new(&src, &src);
    opts.force = true;
    let err = convert(&opts, &mut quiet()).unwrap_err();
    assert!(matches!(err, ConvertError::OutputIsInput { .. }), "{err}");
    let mut opts = ConvertOptions::new(&src, tmp.path());
    opts.force = true;
    let err = convert(&opts, &mut quiet()).unwrap_err();
    assert!(matches!(err, ConvertError::OutputIsInput { .. }), "{err}");
    assert!(src.join("model.safetensors").is_file());
}

#[test]
fn synth_is_deterministic_and_its_tokenizer_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let cfg = SynthConfig::preset_tiny();
    let mut opts = SynthOptions::new(&a, cfg.clone());
    opts.seed = 7;
    let r = synth(&opts, &mut quiet()).unwrap();
    opts.output = b.clone();
    synth(&opts, &mut quiet()).unwrap();
    opts.output = c.clone();
    opts.seed = 8;
    synth(&opts, &mut quiet()).unwrap();
    let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(read(&a), read(&b));
    assert_ne!(read(&a), read(&c));
    assert_eq!(r.files, ["model.safetensors"]);

    // Real shapes and names, valid codes, sane scales.
    let bytes = read(&a);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let q = st.tensor("model.layers.1.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.shape(), [cfg.hidden / 4, cfg.hidden]);
    let t = unpack_ternary(q.data(), cfg.hidden, cfg.hidden).unwrap();
    let zeros = t.iter().filter(|&&v| v == 0).count() as f64 / t.len() as f64;
    assert!((zeros - 1.0 / 3.0).abs() < 0.02, "{zeros}");
    let s = st
        .tensor("model.layers.1.mlp.down_proj.weight_scale")
        .unwrap();
    let s = bf16::from_le_bytes([s.data()[0], s.data()[1]]).to_f32();
    assert!((0.02..=0.05).contains(&s), "{s}");
    let kv = st.tensor("model.layers.0.self_attn.k_proj.weight").unwrap();
    assert_eq!(kv.shape(), [cfg.kv_heads * cfg.head_dim() / 4, cfg.hidden]);
    assert!(st.tensor("lm_head.weight").is_err());

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], cfg.vocab);
    assert_eq!(
        config["quantization_config"]["quantization_mode"],
        "offline"
    );

    let tok = tokenizers::Tokenizer::from_file(a.join("tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), cfg.vocab);
    assert_eq!(tok.token_to_id("<|begin_of_text|>"), Some(cfg.bos() as u32));
    assert_eq!(tok.token_to_id("<|end_of_text|>"), Some(cfg.eos() as u32));
    assert_eq!(tok.token_to_id("<|eot_id|>"), Some(cfg.eot() as u32));
    assert_eq!(config["bos_token_id"], cfg.bos());
    let text = "the quick brown fox, naïve café! 123";
    let enc = tok.encode(text, true).unwrap();
    assert_eq!(enc.get_ids()[0], cfg.bos() as u32);
    assert!(enc.get_ids().iter().all(|&i| (i as usize) < cfg.vocab));
    assert!(enc.get_ids().len() < text.len(), "no merges applied");
    assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), text);
    let chat = tok.encode("User: hi<|eot_id|>", false).unwrap();
    assert_eq!(*chat.get_ids().last().unwrap(), cfg.eot() as u32);
}

#[test]
fn synth_2b4t_tokenizer_has_llama3_special_ids() {
    let cfg = SynthConfig::preset_2b4t();
    assert_eq!(
        (cfg.bos(), cfg.eos(), cfg.eot()),
        (128_000, 128_001, 128_009)
    );
    let json = bitnet_convert::synth::tokenizer_json(&cfg).to_string();
    let tok = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap();
    assert_eq!(tok.get_vocab_size(true), 128_256);
    assert_eq!(tok.token_to_id("<|eot_id|>"), Some(128_009));
    let enc = tok.encode("hello world", true).unwrap();
    assert_eq!(enc.get_ids()[0], 128_000);
    assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "hello world");
}

#[test]
fn synth_float_converts_back_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    let mut cfg = SynthConfig::preset_tiny();
    cfg.tied = false;
    let mut opts = SynthOptions::new(&src, cfg);
    opts.float = true;
    synth(&opts, &mut quiet()).unwrap();
    let r = run(&src, &out).unwrap();
    assert_eq!(r.linears, 14);
    let report = check(&out, &src, &mut quiet()).unwrap();
    assert!(report.exact(), "{}", report.table());
    assert!(report.rows.iter().any(|r| r.name == "lm_head.weight"));
}

/// The transformers-made fixtures of tests/fixtures (if present): converting the BF16 master
/// checkpoint reproduces the packed one byte for byte, and the legacy (divide) llama packing
/// checks against its source.
#[test]
fn matches_transformers_fixtures() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    if !fx.join("bitnet-bf16/config.json").is_file() {
        eprintln!("fixtures not present, skipped");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    run(&fx.join("bitnet-bf16"), &out).unwrap();
    let a = std::fs::read(out.join("model.safetensors")).unwrap();
    let b = std::fs::read(fx.join("bitnet-packed/model.safetensors")).unwrap();
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&a).unwrap(),
        safetensors::SafeTensors::deserialize(&b).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (name, t) in b.tensors() {
        let u = a.tensor(&name).unwrap();
        assert_eq!((u.dtype(), u.shape()), (t.dtype(), t.shape()), "{name}");
        assert_eq!(u.data(), t.data(), "{name}");
    }
    let legacy = check(
        &fx.join("llama-packed"),
        &fx.join("llama-bf16"),
        &mut quiet(),
    )
    .unwrap();
    assert_eq!(legacy.convention, bitnet_convert::ScaleConvention::Divide);
    assert!(legacy.ok(), "{}", legacy.table());
    let out = tmp.path().join("llama");
    let r = run(&fx.join("llama-bf16"), &out).unwrap();
    assert_eq!(r.family, bitnet_convert::Family::Llama);
}
