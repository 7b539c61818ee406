// The parity cases, compiled once per CPU backend by `forward_parity.rs` (`B` is the backend).

use burn::tensor::{Tensor, TensorData};
use rlhf::model::lora::Adapter;
use rlhf::model::{Batch, Llama, LoadOptions};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name);
    assert!(
        p.exists(),
        "fixture missing: {} (run scripts/fixtures/hf_forward.py)",
        p.display()
    );
    p
}

struct Reference {
    ids: Vec<Vec<u32>>,
    valid: Vec<Vec<bool>>,
    logits: Vec<f32>,
    vocab: usize,
}

fn i64s(view: &safetensors::tensor::TensorView) -> Vec<i64> {
    assert_eq!(view.dtype(), safetensors::Dtype::I64);
    view.data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn reference(dir: &Path, logits_from: &Path) -> Reference {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids_v = st.tensor("input_ids").unwrap();
    let [b, t] = [ids_v.shape()[0], ids_v.shape()[1]];
    let ids = i64s(&ids_v);
    let mask = i64s(&st.tensor("attention_mask").unwrap());
    let lbytes = std::fs::read(logits_from.join("reference.safetensors")).unwrap();
    let lst = safetensors::SafeTensors::deserialize(&lbytes).unwrap();
    let lv = lst.tensor("logits").unwrap();
    let vocab = lv.shape()[2];
    let logits = rlhf::model::weights::view_to_f32(&lv).unwrap();
    Reference {
        ids: (0..b)
            .map(|i| ids[i * t..(i + 1) * t].iter().map(|&x| x as u32).collect())
            .collect(),
        valid: (0..b)
            .map(|i| mask[i * t..(i + 1) * t].iter().map(|&x| x == 1).collect())
            .collect(),
        logits,
        vocab,
    }
}

/// Max |ours - theirs| over real (non-padding) positions.
fn max_abs_diff(ours: Tensor<B, 3>, r: &Reference) -> f32 {
    let ours = ours.into_data().to_vec::<f32>().unwrap();
    let t = r.ids[0].len();
    let mut worst = 0f32;
    for (i, valid) in r.valid.iter().enumerate() {
        for (j, &v) in valid.iter().enumerate() {
            if !v {
                continue;
            }
            let o = (i * t + j) * r.vocab;
            for k in 0..r.vocab {
                worst = worst.max((ours[o + k] - r.logits[o + k]).abs());
            }
        }
    }
    worst
}

fn load(name: &str, quantize: bool) -> (Llama<B>, Reference) {
    let dir = fixture(name);
    let model =
        Llama::<B>::from_hf_dir(&dir, LoadOptions { quantize }, &Default::default()).unwrap();
    let r = reference(&dir, &dir);
    (model, r)
}

fn check_parity(name: &str) {
    let (model, r) = load(name, false);
    let batch = Batch::new(&r.ids, r.valid.clone(), &Default::default());
    let diff = max_abs_diff(model.forward(&batch, None), &r);
    assert!(diff < 1e-4, "{name}: max |logits - transformers| = {diff}");
}

#[test]
fn llama_with_llama3_rope_matches_transformers() {
    check_parity("llama");
}

#[test]
fn qwen2_with_biases_and_tied_embeddings_matches_transformers() {
    check_parity("qwen2");
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    check_parity("mistral");
}

#[test]
fn nf4_base_stays_close_to_full_precision() {
    let (full, r) = load("llama", false);
    let (q, _) = load("llama", true);
    let batch = Batch::new(&r.ids, r.valid.clone(), &Default::default());
    let a = full
        .forward(&batch, None)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let b = q.forward(&batch, None).into_data().to_vec::<f32>().unwrap();
    let num: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f32 = a.iter().map(|x| x * x).sum();
    let rel = (num / den).sqrt();
    // 4-bit weights perturb the logits, but must not scramble them.
    assert!(
        rel > 0.0 && rel < 0.25,
        "relative error of NF4 logits {rel}"
    );
    assert!(q.storage_bytes() < full.storage_bytes());
}

#[test]
fn peft_adapter_matches_peft_logits() {
    let base = fixture("llama");
    let ad = fixture("llama_lora");
    let (model, _) = load("llama", false);
    let (adapter, extra) =
        Adapter::<B>::load_peft(&ad, "policy", &model.cfg, &Default::default()).unwrap();
    assert!(extra.is_empty());
    let r = reference(&base, &ad);
    let batch = Batch::new(&r.ids, r.valid.clone(), &Default::default());
    let diff = max_abs_diff(model.forward(&batch, Some(&adapter)), &r);
    assert!(diff < 1e-4, "max |logits - PEFT| = {diff}");
}

fn random_b(adapter: &mut Adapter<B>) {
    let ts: Vec<Tensor<B, 2>> = adapter
        .tensors()
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let dims = t.dims();
            let n = dims[0] * dims[1];
            let v: Vec<f32> = (0..n)
                .map(|k| (((k * 7 + i * 13) % 17) as f32 - 8.0) * 0.01)
                .collect();
            Tensor::from_data(TensorData::new(v, dims), &Default::default())
        })
        .collect();
    adapter.set_tensors(ts.into_iter());
}

#[test]
fn saved_adapter_reloads_to_identical_logits_in_peft_layout() {
    let (model, r) = load("llama", false);
    let cfg = rlhf::config::LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: rlhf::config::ALL_TARGETS
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    let mut adapter =
        Adapter::<B>::new("policy", &cfg, &model.cfg, 3, &Default::default()).unwrap();
    random_b(&mut adapter);
    let dir = tempfile::tempdir().unwrap();
    adapter.save_peft(dir.path(), "tiny-llama", &[]).unwrap();
    let (back, _) =
        Adapter::<B>::load_peft(dir.path(), "policy", &model.cfg, &Default::default()).unwrap();
    let batch = Batch::new(&r.ids, r.valid.clone(), &Default::default());
    let a = model
        .forward(&batch, Some(&adapter))
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let b = model
        .forward(&batch, Some(&back))
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    assert_eq!(a, b, "reloaded adapter changed the logits");
    let base = model
        .forward(&batch, None)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    assert_ne!(a, base, "the adapter must change the logits");

    // Same tensor names, shapes and config fields as the adapter PEFT itself saved.
    let peft_dir = fixture("llama_lora");
    let ours = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
    let theirs = std::fs::read(peft_dir.join("adapter_model.safetensors")).unwrap();
    let ours = safetensors::SafeTensors::deserialize(&ours).unwrap();
    let theirs = safetensors::SafeTensors::deserialize(&theirs).unwrap();
    let mut on: Vec<(String, Vec<usize>)> = ours
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec()))
        .collect();
    let mut tn: Vec<(String, Vec<usize>)> = theirs
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec()))
        .collect();
    on.sort();
    tn.sort();
    assert_eq!(on, tn);
    let oc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(peft_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "bias",
        "fan_in_fan_out",
        "use_rslora",
        "use_dora",
    ] {
        assert_eq!(
            oc.get(key),
            tc.get(key),
            "adapter_config.json field `{key}`"
        );
    }
    let mut ot: Vec<String> = serde_json::from_value(oc["target_modules"].clone()).unwrap();
    let mut tt: Vec<String> = serde_json::from_value(tc["target_modules"].clone()).unwrap();
    ot.sort();
    tt.sort();
    assert_eq!(ot, tt);
}

/// Sampling runs on the backend without autodiff (`Llama::inner`, `Adapter::inner`): the model
/// loaded on the autodiff backend and viewed there must still give PEFT's logits.
#[test]
fn inner_backend_view_matches_peft_logits() {
    type Ad = burn::backend::Autodiff<B>;
    let base = fixture("llama");
    let ad = fixture("llama_lora");
    let opts = LoadOptions { quantize: false };
    let model = Llama::<Ad>::from_hf_dir(&base, opts, &Default::default()).unwrap();
    let (adapter, _) =
        Adapter::<Ad>::load_peft(&ad, "policy", &model.cfg, &Default::default()).unwrap();
    let (inner, inner_adapter) = (model.inner(), adapter.inner());
    let r = reference(&base, &ad);
    let batch = Batch::<B>::new(&r.ids, r.valid.clone(), &Default::default());
    let diff = max_abs_diff(inner.forward(&batch, Some(&inner_adapter)), &r);
    assert!(diff < 1e-4, "max |inner logits - PEFT| = {diff}");
}
