//! Shared test helpers: a tiny random Llama written as a Hugging Face folder (config.json,
//! model.safetensors, a word-level tokenizer.json), and synthetic marker-preference data.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub const WORDS: usize = 40;

/// Tiny deterministic PRNG for test data (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next() >> 11) as f64 / (1u64 << 53) as f64).max(1e-12);
        let u2 = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

fn vocab() -> Vec<String> {
    let mut v: Vec<String> = ["<pad>", "<s>", "</s>", "<unk>", "MARK"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend((0..WORDS).map(|i| format!("w{i}")));
    v
}

/// Writes a tiny random Llama (vocab 45, hidden 32, 2 layers) with a word-level tokenizer.
pub fn write_tiny_model(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let v = vocab();
    let (h, inter, layers, heads, kv) = (32usize, 64usize, 2usize, 4usize, 2usize);
    let hd = h / heads;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": v.len(), "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    let mut rng = Rng::new(seed);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, ones: bool, rng: &mut Rng| {
        let n: usize = shape.iter().product();
        let vals = (0..n)
            .map(|_| if ones { 1.0 } else { scale * rng.normal() })
            .collect();
        tensors.push((name, shape, vals));
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![v.len(), h],
        0.5,
        false,
        &mut rng,
    );
    add(
        "lm_head.weight".into(),
        vec![v.len(), h],
        0.2,
        false,
        &mut rng,
    );
    add("model.norm.weight".into(), vec![h], 0.0, true, &mut rng);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (m, o, i) in [
            ("self_attn.q_proj", heads * hd, h),
            ("self_attn.k_proj", kv * hd, h),
            ("self_attn.v_proj", kv * hd, h),
            ("self_attn.o_proj", h, heads * hd),
            ("mlp.gate_proj", inter, h),
            ("mlp.up_proj", inter, h),
            ("mlp.down_proj", h, inter),
        ] {
            add(
                format!("{p}.{m}.weight"),
                vec![o, i],
                1.0 / (i as f32).sqrt(),
                false,
                &mut rng,
            );
        }
        add(
            format!("{p}.input_layernorm.weight"),
            vec![h],
            0.0,
            true,
            &mut rng,
        );
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            0.0,
            true,
            &mut rng,
        );
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, &None).unwrap(),
    )
    .unwrap();

    let added: Vec<serde_json::Value> = v[..5]
        .iter()
        .enumerate()
        .filter(|(_, t)| t.starts_with('<'))
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let vocab_map: serde_json::Map<String, serde_json::Value> = v
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab_map, "unk_token": "<unk>"}
    });
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string(&tok).unwrap(),
    )
    .unwrap();
    let tc = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

fn words(rng: &mut Rng, n: usize) -> Vec<String> {
    (0..n).map(|_| format!("w{}", rng.below(WORDS))).collect()
}

/// Preference pairs: the chosen answer contains MARK, the rejected one does not.
pub fn write_marker_pairs(path: &Path, n: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut out = String::new();
    for _ in 0..n {
        let prompt = words(&mut rng, 3).join(" ");
        let mut chosen = words(&mut rng, 4);
        let at = rng.below(chosen.len() + 1);
        chosen.insert(at, "MARK".into());
        let rejected = words(&mut rng, 5);
        out.push_str(&serde_json::json!({"prompt": prompt, "chosen": chosen.join(" "), "rejected": rejected.join(" ")}).to_string());
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

/// The `rlhf` binary the tests drive: `RLHF_TEST_BIN` when set (to check another build against
/// the same tests), else the one cargo built with them.
pub fn rlhf_bin() -> std::ffi::OsString {
    std::env::var_os("RLHF_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_rlhf").into())
}

/// A command that runs [`rlhf_bin`].
pub fn rlhf_command() -> std::process::Command {
    std::process::Command::new(rlhf_bin())
}

/// Runs the `rlhf` binary with a fault point armed (`RLHF_FAULT`, see `rlhf::rundir`) or
/// none, and returns its output whatever its exit status.
pub fn rlhf_with(args: &[&str], fault: Option<&str>) -> std::process::Output {
    let mut cmd = rlhf_command();
    cmd.args(args);
    match fault {
        Some(f) => cmd.env("RLHF_FAULT", f),
        None => cmd.env_remove("RLHF_FAULT"),
    };
    cmd.output().unwrap()
}

/// The largest absolute difference of two equally long lists.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs the `rlhf` binary; panics with its stderr on failure.
pub fn rlhf(args: &[&str]) -> String {
    let out = rlhf_command().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rlhf {args:?} failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A run folder with the tiny model, train/eval data and a config written from `body`.
pub struct Run {
    pub dir: tempfile::TempDir,
}

impl Run {
    pub fn new(seed: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(&dir.path().join("model"), seed);
        write_marker_pairs(&dir.path().join("train.jsonl"), 256, seed + 1);
        write_marker_pairs(&dir.path().join("eval.jsonl"), 64, seed + 2);
        Self { dir }
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    /// Writes `run.toml` with the model/data paths filled in, then `body`.
    pub fn config(&self, name: &str, out: &str, body: &str) -> PathBuf {
        let p = self.path(name);
        let text = format!(
            "[model]\npath = {:?}\nquantize = \"nf4\"\n\n[data]\ntrain = {:?}\neval = {:?}\nmax_length = 32\nmax_prompt_length = 16\n\n[train]\noutput_dir = {:?}\n{body}",
            self.path("model"),
            self.path("train.jsonl"),
            self.path("eval.jsonl"),
            self.path(out),
        );
        std::fs::write(&p, text).unwrap();
        p
    }
}

pub fn eval_metric(run_dir: &Path, key: &str) -> f64 {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("eval_metrics.json")).unwrap())
            .unwrap();
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// A LoRA adapter named `name` on `cfg` (r 4, alpha 16) whose B matrices are random too
/// (`scale` x normal), so its delta is far from zero.
pub fn random_adapter<B: burn::tensor::backend::Backend>(
    name: &str,
    cfg: &rlhf::model::LlamaConfig,
    targets: &[&str],
    scale: f32,
    seed: u64,
) -> rlhf::model::lora::Adapter<B> {
    use burn::tensor::{Tensor, TensorData};
    let lora = rlhf::config::LoraConfig {
        r: 4,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
    };
    let dev = Default::default();
    let mut a = rlhf::model::lora::Adapter::<B>::new(name, &lora, cfg, seed, &dev).unwrap();
    let mut rng = Rng::new(seed + 7);
    let ts: Vec<Tensor<B, 2>> = a
        .tensors()
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            if i % 2 == 0 {
                return t;
            }
            let [o, r] = t.dims();
            let v: Vec<f32> = (0..o * r).map(|_| scale * rng.normal()).collect();
            Tensor::from_data(TensorData::new(v, [o, r]), &dev)
        })
        .collect();
    a.set_tensors(ts.into_iter());
    a
}

/// `rlhf merge --model DIR/model --adapter DIR/adapter --out DIR/OUT` plus `flags`: the merged
/// folder.
pub fn merge_in(dir: &Path, out: &str, flags: &[&str]) -> PathBuf {
    let p = |s: &str| dir.join(s).to_string_lossy().to_string();
    let (model, adapter, to) = (p("model"), p("adapter"), p(out));
    let mut args = vec![
        "merge",
        "--model",
        &model,
        "--adapter",
        &adapter,
        "--out",
        &to,
    ];
    args.extend_from_slice(flags);
    rlhf(&args);
    dir.join(out)
}
