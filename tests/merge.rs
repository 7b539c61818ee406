//! `rlhf merge` through the binary: the merged folder, reloaded with rlhf's own (dense) loader,
//! gives the logits of base + adapter (f32 within 1e-4, bf16 within bf16 rounding); a reward
//! adapter becomes a sequence classifier whose `score.weight` reproduces the head's scores; a
//! non-empty `--out` is refused; the SmolLM2 GGUF base merges into a folder that reloads with
//! the same tokenizer and logits.

mod common;
use burn::tensor::{Tensor, TensorData};
use common::*;
use rlhf::cli::setup::CpuBackend as B;
use rlhf::config::LoraConfig;
use rlhf::engine::HEAD_KEY;
use rlhf::model::lora::Adapter;
use rlhf::model::{Batch, Llama, LlamaConfig, LoadOptions};
use serde_json::Value;
use std::path::Path;

const DENSE: LoadOptions = LoadOptions { quantize: false };

/// An adapter on `cfg` whose B matrices are random too, so the delta is far from zero.
fn random_adapter(cfg: &LlamaConfig, targets: &[&str], scale: f32, seed: u64) -> Adapter<B> {
    let lora = LoraConfig {
        r: 4,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
    };
    let dev = Default::default();
    let mut a = Adapter::<B>::new("policy", &lora, cfg, seed, &dev).unwrap();
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

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn tokens() -> Vec<Vec<u32>> {
    vec![
        vec![1, 7, 12, 4, 30, 9, 22, 41],
        vec![1, 44, 5, 5, 18, 2, 11, 3],
    ]
}

fn logits(model: &Llama<B>, adapter: Option<&Adapter<B>>, rows: &[Vec<u32>]) -> Vec<f32> {
    values(model.forward(&Batch::dense(rows, &model.device), adapter))
}

/// The tiny model and a random adapter saved in PEFT's layout (with `head` as the score head).
fn setup(dir: &Path, head: Option<&Tensor<B, 2>>) -> (Llama<B>, Adapter<B>) {
    write_tiny_model(&dir.join("model"), 11);
    let base = Llama::<B>::from_hf_dir(&dir.join("model"), DENSE, &Default::default()).unwrap();
    let adapter = random_adapter(&base.cfg, &rlhf::config::ALL_TARGETS, 0.05, 3);
    let extra: Vec<(String, Tensor<B, 2>)> = head
        .map(|h| vec![(HEAD_KEY.to_string(), h.clone())])
        .unwrap_or_default();
    adapter
        .save_peft(&dir.join("adapter"), "model", &extra)
        .unwrap();
    (base, adapter)
}

fn merge(dir: &Path, out: &str, dtype: &str) -> std::path::PathBuf {
    let p = |s: &str| dir.join(s).to_string_lossy().to_string();
    rlhf(&[
        "merge",
        "--model",
        &p("model"),
        "--adapter",
        &p("adapter"),
        "--out",
        &p(out),
        "--dtype",
        dtype,
    ]);
    dir.join(out)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// (name -> (dtype, shape)) of a safetensors file.
fn header(path: &Path) -> std::collections::BTreeMap<String, (String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (format!("{:?}", v.dtype()), v.shape().to_vec())))
        .collect()
}

#[test]
fn merged_f32_folder_gives_base_plus_adapter_logits() {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter) = setup(dir.path(), None);
    let out = merge(dir.path(), "merged", "f32");
    let merged = Llama::<B>::from_hf_dir(&out, DENSE, &Default::default()).unwrap();
    let rows = tokens();
    let want = logits(&base, Some(&adapter), &rows);
    let plain = logits(&base, None, &rows);
    let got = logits(&merged, None, &rows);
    let effect = max_diff(&want, &plain);
    let err = max_diff(&want, &got);
    println!("adapter effect {effect}, merged error {err}");
    assert!(
        effect > 0.1,
        "the adapter barely changes the logits ({effect})"
    );
    assert!(err < 1e-4, "merged logits differ by {err}");

    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["torch_dtype"], "float32");
    let h = header(&out.join("model.safetensors"));
    assert_eq!(h["model.layers.1.self_attn.q_proj.weight"].0, "F32");
    assert_eq!(h["lm_head.weight"].1, vec![45, 32]);
    assert_eq!(h["model.embed_tokens.weight"].1, vec![45, 32]);
    assert!(h.contains_key("model.layers.0.post_attention_layernorm.weight"));
    assert!(!h.contains_key("score.weight"));
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(dir.path().join("model").join(f)).unwrap(),
            "{f} is not a copy of the base's"
        );
    }
}

#[test]
fn merged_bf16_folder_is_within_bf16_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter) = setup(dir.path(), None);
    let out = merge(dir.path(), "merged", "bf16");
    let h = header(&out.join("model.safetensors"));
    assert!(h.values().all(|(dtype, _)| dtype == "BF16"), "{h:?}");
    assert_eq!(
        read_json(&out.join("config.json"))["torch_dtype"],
        "bfloat16"
    );
    let merged = Llama::<B>::from_hf_dir(&out, DENSE, &Default::default()).unwrap();
    let rows = tokens();
    let want = logits(&base, Some(&adapter), &rows);
    let plain = logits(&base, None, &rows);
    let got = logits(&merged, None, &rows);
    let effect = max_diff(&want, &plain);
    let err = max_diff(&want, &got);
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    println!("adapter effect {effect}, merged error {err}, largest logit {scale}");
    // bf16 keeps 8 significant bits: each weight is off by up to 2^-9 of itself.
    assert!(err < 0.02 * scale, "bf16 merged logits differ by {err}");
    assert!(
        effect > 5.0 * err,
        "the adapter's effect {effect} is within the bf16 error"
    );
}

#[test]
fn reward_adapter_merges_into_a_sequence_classifier() {
    let dir = tempfile::tempdir().unwrap();
    let head = rlhf::engine::new_head::<B>(32, 5, &Default::default()) * 20.0;
    let (base, adapter) = setup(dir.path(), Some(&head));
    let out = merge(dir.path(), "rm", "f32");
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(cfg["num_labels"], 1);
    assert_eq!(
        cfg["pad_token_id"], 2,
        "eos stands in for the missing pad id"
    );
    let h = header(&out.join("model.safetensors"));
    assert_eq!(h["score.weight"].1, vec![1, 32]);
    assert!(!h.contains_key("lm_head.weight"));

    // Our loader reads a causal LM: point it at the same weights with the LM head tied (it is
    // not used here) and apply `score.weight` to the final hidden states.
    let view = dir.path().join("view");
    std::fs::create_dir(&view).unwrap();
    let mut causal = cfg.clone();
    causal["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    causal["tie_word_embeddings"] = serde_json::json!(true);
    std::fs::write(view.join("config.json"), causal.to_string()).unwrap();
    std::fs::copy(
        out.join("model.safetensors"),
        view.join("model.safetensors"),
    )
    .unwrap();
    let merged = Llama::<B>::from_hf_dir(&view, DENSE, &Default::default()).unwrap();
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let score = rlhf::model::weights::view_to_f32(&st.tensor("score.weight").unwrap()).unwrap();
    let score = Tensor::<B, 2>::from_data(TensorData::new(score, [1, 32]), &Default::default());

    let rows = tokens();
    let scores = |m: &Llama<B>, a: Option<&Adapter<B>>, w: &Tensor<B, 2>| {
        let hidden = m.forward_hidden(&Batch::dense(&rows, &m.device), a, None);
        let [b, t, d] = hidden.dims();
        values(hidden.reshape([b * t, d]).matmul(w.clone().transpose()))
    };
    let want = scores(&base, Some(&adapter), &head);
    let got = scores(&merged, None, &score);
    let plain = scores(&base, None, &head);
    let (effect, err) = (max_diff(&want, &plain), max_diff(&want, &got));
    println!("adapter effect {effect}, merged error {err}");
    assert!(
        effect > 0.1,
        "the adapter barely changes the scores ({effect})"
    );
    assert!(err < 1e-4, "merged scores differ by {err}");
}

#[test]
fn merge_refuses_a_non_empty_out() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), None);
    let out = dir.path().join("taken");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let p = |s: &str| dir.path().join(s).to_string_lossy().to_string();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["merge", "--model", &p("model"), "--adapter", &p("adapter")])
        .args(["--out", &p("taken")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--out"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);

    // An empty folder is fine, and nothing but it is left in its parent.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    merge(dir.path(), "empty", "bf16");
    assert!(empty.join("model.safetensors").exists());
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["adapter", "empty", "model", "taken"]);
}

#[test]
fn smollm2_gguf_merge_reloads_with_its_tokenizer() {
    let gguf = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.exists() {
        eprintln!(
            "skipping: {} missing (run scripts/fetch_assets.sh)",
            gguf.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dev = Default::default();
    let (base, tok, chat) = rlhf::model::gguf_source::load_gguf::<B>(&gguf, DENSE, &dev).unwrap();
    let adapter = random_adapter(&base.cfg, &["q_proj", "v_proj", "down_proj"], 0.02, 9);
    adapter
        .save_peft(&dir.path().join("adapter"), "smollm2", &[])
        .unwrap();
    let out = dir.path().join("merged");
    rlhf(&[
        "merge",
        "--model",
        gguf.to_str().unwrap(),
        "--adapter",
        dir.path().join("adapter").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert!(!header(&out.join("model.safetensors")).contains_key("lm_head.weight"));

    let merged_tok = rlhf::tokenizer::Tok::from_file(out.join("tokenizer.json")).unwrap();
    let merged_chat = rlhf::tokenizer::ChatTemplate::from_dir(&out)
        .unwrap()
        .unwrap();
    let chat = chat.unwrap();
    let q = "What is the capital of France?";
    let text = chat.render_user(q, true).unwrap();
    assert_eq!(merged_chat.render_user(q, true).unwrap(), text);
    let ids = tok.encode(&text, false).unwrap();
    assert_eq!(merged_tok.encode(&text, false).unwrap(), ids);
    assert_eq!(merged_tok.eos_id(), tok.eos_id());
    assert_eq!(merged_tok.bos_id(), tok.bos_id());

    let merged = Llama::<B>::from_hf_dir(&out, DENSE, &dev).unwrap();
    assert_eq!(merged.cfg, base.cfg);
    let rows = vec![ids];
    let want = logits(&base, Some(&adapter), &rows);
    let plain = logits(&base, None, &rows);
    let got = logits(&merged, None, &rows);
    let (effect, err) = (max_diff(&want, &plain), max_diff(&want, &got));
    println!("adapter effect {effect}, merged error {err}");
    assert!(
        effect > 0.1,
        "the adapter barely changes the logits ({effect})"
    );
    assert!(err < 1e-3, "merged logits differ by {err}");
}

/// Runs `rlhf merge` expecting exit 2 with one `error:` line; returns it.
fn merge_error(dir: &Path, model: &str, adapter: &str) -> String {
    let p = |s: &str| dir.join(s).to_string_lossy().to_string();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["merge", "--model", &p(model), "--adapter", &p(adapter)])
        .args(["--out", &p("out")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr).to_string();
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

#[test]
fn merge_errors_are_one_line_and_leave_no_folder() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), None);
    let e = merge_error(dir.path(), "nope", "adapter");
    assert!(e.contains("--model"), "{e}");
    let e = merge_error(dir.path(), "model", "nope");
    assert!(e.contains("--adapter"), "{e}");

    // An adapter for another shape of model.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let mut cfg = read_json(&dir.path().join("model/config.json"));
    cfg["intermediate_size"] = serde_json::json!(48);
    std::fs::write(other.join("config.json"), cfg.to_string()).unwrap();
    let e = merge_error(dir.path(), "other", "adapter");
    assert!(e.contains("--adapter") && e.contains("shape"), "{e}");

    // A base whose weights disagree with its config fails while writing: nothing is left.
    let mut cfg = read_json(&dir.path().join("model/config.json"));
    cfg["vocab_size"] = serde_json::json!(46);
    std::fs::write(dir.path().join("model/config.json"), cfg.to_string()).unwrap();
    let e = merge_error(dir.path(), "model", "adapter");
    assert!(e.contains("model.embed_tokens.weight"), "{e}");
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["adapter", "model", "other"]);
}
