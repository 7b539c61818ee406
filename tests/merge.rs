//! `rlhf merge` through the binary: the merged folder, reloaded with rlhf's own (dense) loader,
//! gives the logits of base + adapter (f32 within 1e-4, bf16 within bf16 rounding); a reward
//! adapter becomes a sequence classifier whose `score.weight` reproduces the head's scores; a
//! non-empty `--out` is refused; the SmolLM2 GGUF base merges into a folder that reloads with
//! the same tokenizer and logits. `--gguf f16|q8_0` files reload through rlhf's GGUF loader with
//! the folder's logits (within f16 / Q8_0 rounding) and the base's tokenizer, and, where
//! llama.cpp's gguf-py is installed, match its conversion of the f32 folder byte for byte.

mod common;
use burn::tensor::{Tensor, TensorData};
use common::*;
use rlhf::cli::setup::CpuBackend as B;
use rlhf::engine::HEAD_KEY;
use rlhf::model::lora::Adapter;
use rlhf::model::{Batch, Llama, LlamaConfig, LoadOptions};
use serde_json::Value;
use std::path::Path;

const DENSE: LoadOptions = LoadOptions { quantize: false };

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
    let adapter = random_adapter::<B>("policy", &base.cfg, &rlhf::config::ALL_TARGETS, 0.05, 3);
    let extra: Vec<(String, Tensor<B, 2>)> = head
        .map(|h| vec![(HEAD_KEY.to_string(), h.clone())])
        .unwrap_or_default();
    adapter
        .save_peft(&dir.join("adapter"), "model", &extra)
        .unwrap();
    (base, adapter)
}

fn merge(dir: &Path, out: &str, dtype: &str) -> std::path::PathBuf {
    merge_in(dir, out, &["--dtype", dtype])
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
    let run = common::rlhf_command()
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
    let adapter = random_adapter::<B>(
        "policy",
        &base.cfg,
        &["q_proj", "v_proj", "down_proj"],
        0.02,
        9,
    );
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
        "--gguf",
        "q8_0",
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

    // The Q8_0 GGUF beside it: the base's tokenizer metadata as stored, close logits.
    let file = out.join("model-q8_0.gguf");
    llama_cpp_reader_check(&file, &out);
    let (from_gguf, gguf_tok, gguf_chat) =
        rlhf::model::gguf_source::load_gguf::<B>(&file, DENSE, &dev).unwrap();
    let (g, base_g) = (
        rlhf::gguf::Gguf::open(&file).unwrap(),
        rlhf::gguf::Gguf::open(&gguf).unwrap(),
    );
    for (k, v) in base_g.metadata() {
        if k.starts_with("tokenizer.") {
            assert_eq!(g.get(k), Some(v), "{k}");
        }
    }
    assert_eq!(gguf_chat.unwrap().render_user(q, true).unwrap(), text);
    assert_eq!(gguf_tok.encode(&text, false).unwrap(), rows[0]);
    assert_eq!(
        (gguf_tok.bos_id(), gguf_tok.eos_id()),
        (tok.bos_id(), tok.eos_id())
    );
    assert!(!g.has_tensor("output.weight"), "tied embeddings stay tied");
    // The folder's rebuilt tokenizer.json converts back to the base's metadata: what an HF
    // base with SmolLM2's tokenizer gets.
    let from_hf = rlhf::tokenizer::hf_tokenizer_gguf_metadata(&out, base.cfg.vocab_size).unwrap();
    let keys: Vec<&str> = from_hf.iter().map(|(k, _)| k.as_str()).collect();
    for k in [
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
    ] {
        assert!(keys.contains(&k), "{k} not written: {keys:?}");
    }
    for (k, v) in &from_hf {
        if let Some(stored) = base_g.get(k) {
            assert_eq!(v.to_json(), stored.to_json(), "{k}");
        }
    }
    assert_eq!(from_gguf.cfg, base.cfg);
    let q8 = logits(&from_gguf, None, &rows);
    let q8_err = max_diff(&want, &q8);
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let mean = |a: &[f32], b: &[f32]| {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
    };
    let (q8_mean, from_base) = (mean(&want, &q8), mean(&plain, &q8));
    let vocab = base.cfg.vocab_size;
    let argmax = |l: &[f32]| -> Vec<usize> {
        l.chunks(vocab)
            .map(|r| (0..r.len()).max_by(|&i, &j| r[i].total_cmp(&r[j])).unwrap())
            .collect()
    };
    let (top_want, top_q8) = (argmax(&want), argmax(&q8));
    let same = top_want.iter().zip(&top_q8).filter(|(a, b)| a == b).count();
    println!(
        "q8_0 GGUF: largest logit {scale}, error {q8_err} (mean {q8_mean}; mean distance from the \
         base without the adapter {from_base}), same top token at {same} of {} positions",
        top_want.len()
    );
    // Q8_0 steps are 1/127 of each 32-weight block's largest |w|, over 30 layers: allow 5% of
    // the logit scale at the worst of 49k x positions logits, logits clearly nearer the adapted
    // model's than the base's (the adapter survives the rounding), and the same greedy token
    // almost everywhere.
    assert!(q8_err < 0.05 * scale, "q8_0 GGUF logits differ by {q8_err}");
    assert!(
        2.0 * q8_mean < from_base,
        "mean error {q8_mean} vs distance from the base {from_base}"
    );
    assert!(
        same * 10 >= top_want.len() * 9,
        "top tokens: {top_want:?} vs {top_q8:?}"
    );
}

/// Runs `rlhf merge` expecting exit 2 with one `error:` line; returns it.
fn merge_error(dir: &Path, model: &str, adapter: &str) -> String {
    let p = |s: &str| dir.join(s).to_string_lossy().to_string();
    let run = common::rlhf_command()
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

// ---------------------------------------------------------------------------------------
// --gguf
// ---------------------------------------------------------------------------------------

/// Replaces the tiny model's word-level tokenizer with a byte-level BPE one of the same 45 ids
/// (5 special tokens, a-z, `Ġ` (space), `Ċ` (newline), 12 merges), BOS added on encode, and a
/// ChatML template: the kind of tokenizer llama.cpp's `gpt2` model holds.
fn write_bpe_tokenizer(dir: &Path) {
    let specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"];
    let mut vocab: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
    vocab.extend(('a'..='z').map(|c| c.to_string()));
    vocab.extend(["Ġ".to_string(), "Ċ".to_string()]);
    let merges = [
        ("u", "s"),
        ("e", "r"),
        ("us", "er"),
        ("h", "e"),
        ("Ġ", "t"),
        ("Ġt", "he"),
        ("a", "s"),
        ("s", "i"),
        ("as", "si"),
        ("a", "n"),
        ("an", "t"),
        ("Ġ", "a"),
    ];
    vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    assert_eq!(vocab.len(), 45);
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let vocab_map: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "decoder": byte_level,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab_map,
            "merges": merges.iter().map(|(a, b)| serde_json::json!([a, b])).collect::<Vec<_>>()}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let template = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let tc = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "chat_template": template});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

/// Runs `scripts/check_gguf.py` (llama.cpp's gguf-py reader and quantizer against the f32
/// folder) when its Python (`RLHF_GGUF_PYTHON`, else `python3`) can import `gguf`.
fn llama_cpp_reader_check(file: &Path, folder: &Path) {
    let python = std::env::var("RLHF_GGUF_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = std::process::Command::new(&python)
        .args(["-c", "import gguf"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipping the gguf-py check: `{python} -c 'import gguf'` fails (pip install gguf, or set RLHF_GGUF_PYTHON)");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_gguf.py");
    let run = std::process::Command::new(&python)
        .arg(script)
        .arg(file)
        .arg("--hf")
        .arg(folder)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    println!("{stdout}");
    assert!(
        run.status.success(),
        "check_gguf.py failed:\n{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

fn merge_gguf(dir: &Path, out: &str, gguf: &str) -> std::path::PathBuf {
    merge_in(dir, out, &["--dtype", "f32", "--gguf", gguf])
}

/// The merged folder and its GGUF file give the same model: `(largest |logit|, adapter
/// effect, GGUF error)` over `rows`, and the GGUF's tokenizer encodes the chat-rendered sample
/// like the base's `tokenizer.json`.
fn compare_gguf(dir: &Path, out: &Path, file: &str, rows: &[Vec<u32>]) -> (f32, f32, f32) {
    let dev = Default::default();
    let merged = Llama::<B>::from_hf_dir(out, DENSE, &dev).unwrap();
    let (from_gguf, tok, chat) =
        rlhf::model::gguf_source::load_gguf::<B>(&out.join(file), DENSE, &dev).unwrap();
    // A GGUF stores Llama 3's rope scaling as a tensor the loader applies, not as a config field.
    let no_scaling = |c: &LlamaConfig| LlamaConfig {
        rope_scaling: None,
        ..c.clone()
    };
    assert_eq!(no_scaling(&from_gguf.cfg), no_scaling(&merged.cfg));
    let base = Llama::<B>::from_hf_dir(&dir.join("model"), DENSE, &dev).unwrap();
    let want = logits(&merged, None, rows);
    let got = logits(&from_gguf, None, rows);
    let plain = logits(&base, None, rows);
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));

    let hf_tok = rlhf::tokenizer::Tok::from_file(dir.join("model/tokenizer.json")).unwrap();
    let hf_chat = rlhf::tokenizer::ChatTemplate::from_dir(dir.join("model"))
        .unwrap()
        .unwrap();
    let chat = chat.expect("the GGUF carries the chat template");
    let text = hf_chat
        .render_user("the user asks the assistant", true)
        .unwrap();
    assert_eq!(
        chat.render_user("the user asks the assistant", true)
            .unwrap(),
        text
    );
    for special in [false, true] {
        let ids = hf_tok.encode(&text, special).unwrap();
        assert!(ids.len() > 10, "{ids:?}");
        assert_eq!(tok.encode(&text, special).unwrap(), ids, "{text:?}");
    }
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (Some(1), Some(2), Some(0))
    );
    (scale, max_diff(&want, &plain), max_diff(&want, &got))
}

#[test]
fn gguf_f16_and_q8_0_reload_with_the_merged_logits_and_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), None);
    write_bpe_tokenizer(&dir.path().join("model"));
    let rows = tokens();
    let mut errors = vec![];
    for (ty, file) in [("f16", "model-f16.gguf"), ("q8_0", "model-q8_0.gguf")] {
        let out = merge_gguf(dir.path(), ty, ty);
        let g = rlhf::gguf::Gguf::open(out.join(file)).unwrap();
        assert_eq!(g.version(), 3);
        // The metadata llama.cpp reads for a llama model, against the tiny model's config.json.
        for (key, want) in [
            ("llama.context_length", 256.0),
            ("llama.embedding_length", 32.0),
            ("llama.block_count", 2.0),
            ("llama.feed_forward_length", 64.0),
            ("llama.attention.head_count", 4.0),
            ("llama.attention.head_count_kv", 2.0),
            ("llama.rope.dimension_count", 8.0),
            ("llama.rope.freq_base", 10000.0),
            ("llama.attention.layer_norm_rms_epsilon", 1e-5),
            ("general.file_type", if ty == "f16" { 1.0 } else { 7.0 }),
            ("general.alignment", 32.0),
        ] {
            let got = g.get(key).and_then(|v| v.as_f64());
            assert_eq!(got.map(|v| v as f32), Some(want as f32), "{key}");
        }
        assert_eq!(g.architecture().unwrap(), "llama");
        assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
        assert_eq!(g.get_str_array("tokenizer.ggml.tokens").unwrap().len(), 45);
        let names: Vec<&str> = g.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names.len(), 1 + 2 * 9 + 2, "{names:?}");
        for name in ["token_embd.weight", "output_norm.weight", "output.weight"] {
            assert!(names.contains(&name), "{name} missing: {names:?}");
        }
        for t in g.tensors() {
            let want = match (t.dims.len(), ty) {
                (1, _) => rlhf::gguf::GgmlType::F32,
                // Every row of the tiny model is 32 or 64 values: whole Q8_0 blocks.
                (_, "q8_0") => rlhf::gguf::GgmlType::Q8_0,
                _ => rlhf::gguf::GgmlType::F16,
            };
            assert_eq!(t.ggml_type, want, "{}", t.name);
        }
        llama_cpp_reader_check(&out.join(file), &out);
        let (scale, effect, err) = compare_gguf(dir.path(), &out, file, &rows);
        println!("{ty}: largest logit {scale}, adapter effect {effect}, GGUF error {err}");
        errors.push((scale, effect, err));
    }
    // f16 keeps 11 significant bits (each weight within 2^-11 of itself): through two layers the
    // logits stay within 1% of their scale.
    let (scale, effect, err) = errors[0];
    assert!(err < 0.01 * scale, "f16 GGUF logits differ by {err}");
    assert!(
        effect > 20.0 * err,
        "adapter effect {effect} vs f16 error {err}"
    );
    // Q8_0 rounds each weight to a step of 1/127 of its block's largest |w| (about 1/300 of
    // these weights' spread, 16x f16's step): allow 5% of the logit scale.
    let (scale, effect, err) = errors[1];
    assert!(err < 0.05 * scale, "q8_0 GGUF logits differ by {err}");
    assert!(
        effect > 3.0 * err,
        "adapter effect {effect} vs q8_0 error {err}"
    );
    assert!(err > errors[0].2, "q8_0 cannot be closer than f16");
}

#[test]
fn gguf_keeps_llama3_rope_scaling() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), None);
    write_bpe_tokenizer(&dir.path().join("model"));
    let path = dir.path().join("model/config.json");
    let mut cfg = read_json(&path);
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
    std::fs::write(&path, cfg.to_string()).unwrap();
    let out = merge_gguf(dir.path(), "merged", "f16");
    let g = rlhf::gguf::Gguf::open(out.join("model-f16.gguf")).unwrap();
    assert!(g.has_tensor("rope_freqs.weight"));
    // Long rows, so the low frequencies the scaling changes turn noticeably.
    let rows: Vec<Vec<u32>> = (0..2)
        .map(|r| (0..48).map(|i| ((i * 7 + r * 3) % 45) as u32).collect())
        .collect();
    let (scale, _, err) = compare_gguf(dir.path(), &out, "model-f16.gguf", &rows);
    // The same model with the scaling removed, to show the scaling matters at this length.
    let dev = Default::default();
    let (mut unscaled, _, _) =
        rlhf::model::gguf_source::load_gguf::<B>(&out.join("model-f16.gguf"), DENSE, &dev).unwrap();
    let (div, _) = g.tensor_f32("rope_freqs.weight").unwrap();
    let scaled = logits(&unscaled, None, &rows);
    for (f, d) in unscaled.inv_freq.iter_mut().zip(div) {
        *f *= d;
    }
    let rope_effect = max_diff(&scaled, &logits(&unscaled, None, &rows));
    println!("largest logit {scale}, rope scaling effect {rope_effect}, GGUF error {err}");
    assert!(err < 0.01 * scale, "f16 GGUF logits differ by {err}");
    assert!(
        rope_effect > 10.0 * err,
        "rope effect {rope_effect} vs error {err}"
    );
}

#[test]
fn gguf_refuses_score_heads_and_unknown_tokenizers_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let head = rlhf::engine::new_head::<B>(32, 5, &Default::default());
    setup(dir.path(), Some(&head));
    write_bpe_tokenizer(&dir.path().join("model"));
    let p = |s: &str| dir.path().join(s).to_string_lossy().to_string();
    let run = |model: &str, adapter: &str| {
        let out = common::rlhf_command()
            .args(["merge", "--model", &p(model), "--adapter", &p(adapter)])
            .args(["--out", &p("out"), "--gguf", "q8_0"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(!dir.path().join("out").exists());
        stderr
    };
    let e = run("model", "adapter");
    assert!(e.contains("--gguf") && e.contains("score head"), "{e}");

    // A word-level tokenizer has no llama.cpp equivalent.
    let plain = dir.path().join("plain");
    random_adapter::<B>(
        "policy",
        &Llama::<B>::from_hf_dir(&dir.path().join("model"), DENSE, &Default::default())
            .unwrap()
            .cfg,
        &["q_proj"],
        0.05,
        1,
    )
    .save_peft(&plain, "model", &[])
    .unwrap();
    write_tiny_model(&dir.path().join("wordlevel"), 11);
    let e = run("wordlevel", "plain");
    assert!(
        e.contains("tokenizer.json") && e.contains("WordLevel"),
        "{e}"
    );
}
