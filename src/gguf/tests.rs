use super::*;
use std::io::Write;

const SMOLLM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
);
const QUANT_FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/gguf_quants/quants.gguf"
);

fn smollm() -> Option<Gguf> {
    if !Path::new(SMOLLM).exists() {
        eprintln!("note: {SMOLLM} is absent (run scripts/fetch_assets.sh); skipping");
        return None;
    }
    Some(Gguf::open(SMOLLM).expect("open SmolLM2 GGUF"))
}

/// Deterministic pseudo-random numbers (splitmix64) so tests need no extra crate.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

// --- a minimal GGUF writer, following the format description ------------------------

enum W {
    U32(u32),
    F32(f32),
    Str(&'static str),
    StrArray(Vec<&'static str>),
    I32Array(Vec<i32>),
    Raw(u32, Vec<u8>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

struct TestTensor {
    name: &'static str,
    ne: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
}

fn write_gguf(version: u32, kv: &[(&str, W)], tensors: &[TestTensor], alignment: u64) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(version.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_str(&mut out, k);
        match v {
            W::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            W::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            W::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            W::StrArray(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                a.iter().for_each(|s| put_str(&mut out, s));
            }
            W::I32Array(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                a.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
            W::Raw(ty, bytes) => {
                out.extend(ty.to_le_bytes());
                out.extend(bytes);
            }
        }
    }
    let mut offset = 0u64;
    let mut offsets = vec![];
    for t in tensors {
        put_str(&mut out, t.name);
        out.extend((t.ne.len() as u32).to_le_bytes());
        t.ne.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(t.ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len() as u64).next_multiple_of(alignment);
    }
    let start = (out.len() as u64).next_multiple_of(alignment);
    out.resize(start as usize, 0);
    for (t, off) in tensors.iter().zip(offsets) {
        out.resize((start + off) as usize, 0);
        out.extend(&t.data);
    }
    out
}

fn write_tmp(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    f
}

// --- quantizers written from the ggml format definitions ----------------------------

fn f16_bytes(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}
fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// Q8_0: d = max|x| / 127, q = round(x / d). Returns (bytes, expected dequantized).
fn quantize_q8_0(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let (mut bytes, mut expect) = (vec![], vec![]);
    for blk in x.chunks(32) {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        bytes.extend(f16_bytes(d));
        for &v in blk {
            let q = (v * id).round() as i8;
            bytes.push(q as u8);
            expect.push(q as f32 * f16_round(d));
        }
    }
    (bytes, expect)
}

/// Q4_0: d = (signed value of largest magnitude) / -8, q = clamp(round(x / d) + 8, 0, 15),
/// element j in the low nibble of byte j, element j + 16 in its high nibble.
fn quantize_q4_0(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let (mut bytes, mut expect) = (vec![], vec![0f32; x.len()]);
    for (b, blk) in x.chunks(32).enumerate() {
        let max = blk
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        bytes.extend(f16_bytes(d));
        let q: Vec<u8> = blk
            .iter()
            .map(|&v| ((v * id + 8.5) as i32).clamp(0, 15) as u8)
            .collect();
        for j in 0..16 {
            bytes.push(q[j] | (q[j + 16] << 4));
        }
        for (j, &qj) in q.iter().enumerate() {
            expect[b * 32 + j] = (qj as f32 - 8.0) * f16_round(d);
        }
    }
    (bytes, expect)
}

#[test]
fn synthetic_file_all_paths() {
    let mut rng = Rng(7);
    // [out = 3, in = 64]: ne = [64, 3].
    let x: Vec<f32> = (0..192).map(|_| rng.next_f32() * 2.0).collect();
    let f32_bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let f16_data: Vec<u8> = x.iter().flat_map(|&v| f16_bytes(v)).collect();
    let bf16_data: Vec<u8> = x
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    let (q8, q8_expect) = quantize_q8_0(&x);
    let (q4, q4_expect) = quantize_q4_0(&x);
    let t = |name, ty, data: &Vec<u8>| TestTensor {
        name,
        ne: vec![64, 3],
        ty,
        data: data.clone(),
    };
    let bytes = write_gguf(
        3,
        &[
            ("general.architecture", W::Str("llama")),
            ("general.alignment", W::U32(64)),
            ("llama.embedding_length", W::U32(64)),
            ("llama.rope.freq_base", W::F32(500000.0)),
            ("tokenizer.ggml.tokens", W::StrArray(vec!["a", "b", "ü"])),
            ("tokenizer.ggml.token_type", W::I32Array(vec![1, 3, -2])),
            // nested array: [[1u8, 2u8], []]
            (
                "nested",
                W::Raw(9, {
                    let mut v = 9u32.to_le_bytes().to_vec();
                    v.extend(2u64.to_le_bytes());
                    v.extend(0u32.to_le_bytes());
                    v.extend(2u64.to_le_bytes());
                    v.extend([1u8, 2u8]);
                    v.extend(0u32.to_le_bytes());
                    v.extend(0u64.to_le_bytes());
                    v
                }),
            ),
            ("i64", W::Raw(11, (-5i64).to_le_bytes().to_vec())),
            ("f64", W::Raw(12, 0.25f64.to_le_bytes().to_vec())),
            ("flag", W::Raw(7, vec![1])),
        ],
        &[
            t("f32", 0, &f32_bytes),
            t("f16", 1, &f16_data),
            t("bf16", 30, &bf16_data),
            t("q8_0", 8, &q8),
            t("q4_0", 2, &q4),
        ],
        64,
    );
    let file = write_tmp(&bytes);
    let g = Gguf::open(file.path()).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.get_u32("llama.embedding_length").unwrap(), 64);
    assert_eq!(g.get_u64("llama.embedding_length").unwrap(), 64);
    assert_eq!(g.get_f32("llama.rope.freq_base").unwrap(), 500000.0);
    assert_eq!(
        g.get_str_array("tokenizer.ggml.tokens").unwrap(),
        ["a", "b", "ü"]
    );
    assert_eq!(
        g.get_i32_array("tokenizer.ggml.token_type").unwrap(),
        [1, 3, -2]
    );
    assert_eq!(
        g.get("nested").unwrap(),
        &MetaValue::Array(vec![
            MetaValue::Array(vec![MetaValue::U8(1), MetaValue::U8(2)]),
            MetaValue::Array(vec![]),
        ])
    );
    assert_eq!(g.get_i64("i64").unwrap(), -5);
    assert!(g.get_u64("i64").is_err(), "negative value is not a u64");
    assert_eq!(g.get_f32("f64").unwrap(), 0.25);
    assert!(g.get_bool("flag").unwrap());
    let err = g.get_str("llama.embedding_length").unwrap_err().to_string();
    assert!(
        err.contains("should be a string") && err.contains("llama.embedding_length"),
        "{err}"
    );
    let err = g.get_u32("missing.key").unwrap_err().to_string();
    assert!(err.contains("missing metadata key `missing.key`"), "{err}");
    assert_eq!(g.opt("missing.key", Gguf::get_u32).unwrap(), None);

    for t in g.tensors() {
        assert_eq!(t.offset % 64, 0);
        assert_eq!(t.shape(), [3, 64]);
    }
    let (v, shape) = g.tensor_f32("f32").unwrap();
    assert_eq!((v, shape), (x.clone(), vec![3, 64]));
    let (v, _) = g.tensor_f32("f16").unwrap();
    assert_eq!(v, x.iter().map(|&a| f16_round(a)).collect::<Vec<_>>());
    let (v, _) = g.tensor_f32("bf16").unwrap();
    assert_eq!(
        v,
        x.iter()
            .map(|&a| half::bf16::from_f32(a).to_f32())
            .collect::<Vec<_>>()
    );
    let (v, _) = g.tensor_f32("q8_0").unwrap();
    assert_eq!(v, q8_expect);
    // Round trip error bounded by half a quantization step.
    for (blk, vb) in x.chunks(32).zip(v.chunks(32)) {
        let step = blk.iter().fold(0f32, |a, b| a.max(b.abs())) / 127.0;
        for (a, b) in blk.iter().zip(vb) {
            // Half a step, plus the f16 rounding of d (127 * 2^-11 steps at most).
            assert!((a - b).abs() <= step * 0.57, "{a} vs {b}");
        }
    }
    let (v, _) = g.tensor_f32("q4_0").unwrap();
    assert_eq!(v, q4_expect);
    for (blk, vb) in x.chunks(32).zip(v.chunks(32)) {
        let step = blk.iter().fold(0f32, |a, b| a.max(b.abs())) / 8.0;
        for (a, b) in blk.iter().zip(vb) {
            // One step at most: the value opposite the largest one clamps at q = 15.
            assert!((a - b).abs() <= step * 1.01, "{a} vs {b}");
        }
    }
    let err = format!("{:#}", g.tensor_f32("nope").unwrap_err());
    assert!(
        err.contains("no tensor named `nope`") && err.contains(&file.path().display().to_string()),
        "{err}"
    );
}

#[test]
fn malformed_files_are_errors_not_panics() {
    let good = write_gguf(
        3,
        &[("general.architecture", W::Str("llama"))],
        &[TestTensor {
            name: "w",
            ne: vec![32, 2],
            ty: 8,
            data: vec![0; 68],
        }],
        32,
    );
    let open = |bytes: &[u8]| {
        Gguf::open(write_tmp(bytes).path())
            .map(|_| ())
            .map_err(|e| anyhow!("{e:#}"))
    };
    open(&good).unwrap();

    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(open(&bad)
        .unwrap_err()
        .to_string()
        .contains("not a GGUF file"));

    // Every truncation of the file is a clean error.
    for cut in 0..good.len() {
        let err = open(&good[..cut]).unwrap_err().to_string();
        assert!(
            err.contains("truncated") || err.contains("not a GGUF"),
            "cut {cut}: {err}"
        );
    }
    let err = open(&good[..good.len() - 1]).unwrap_err().to_string();
    assert!(err.contains("tensor `w`"), "{err}");

    // Version 1 and big-endian files.
    let mut v1 = good.clone();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(open(&v1).unwrap_err().to_string().contains("version 1"));
    let mut be = good.clone();
    be[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(open(&be).unwrap_err().to_string().contains("big-endian"));

    // Absurd counts and lengths do not allocate or panic.
    let mut huge = good.clone();
    huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open(&huge).unwrap_err().to_string().contains("corrupt"));
    let mut long_key = good.clone();
    long_key[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    assert!(open(&long_key).is_err());
    let huge_array = write_gguf(
        3,
        &[(
            "a",
            W::Raw(
                9,
                [8u32.to_le_bytes().to_vec(), u64::MAX.to_le_bytes().to_vec()].concat(),
            ),
        )],
        &[],
        32,
    );
    assert!(open(&huge_array)
        .unwrap_err()
        .to_string()
        .contains("claims"));

    // Unknown tensor type and value type.
    let bad_type = write_gguf(
        3,
        &[],
        &[TestTensor {
            name: "w",
            ne: vec![32],
            ty: 99,
            data: vec![0; 4],
        }],
        32,
    );
    assert!(open(&bad_type)
        .unwrap_err()
        .to_string()
        .contains("unknown ggml type id 99"));
    let bad_value = write_gguf(3, &[("k", W::Raw(77, vec![]))], &[], 32);
    assert!(open(&bad_value)
        .unwrap_err()
        .to_string()
        .contains("unknown value type 77"));
    // Rows not a whole number of blocks.
    let ragged = write_gguf(
        3,
        &[],
        &[TestTensor {
            name: "w",
            ne: vec![33, 1],
            ty: 8,
            data: vec![0; 68],
        }],
        32,
    );
    assert!(open(&ragged)
        .unwrap_err()
        .to_string()
        .contains("block size"));
    // Unsupported type: opens, but dequantizing names the tensor and the type.
    let iq = write_gguf(
        3,
        &[],
        &[TestTensor {
            name: "w",
            ne: vec![256],
            ty: 16,
            data: vec![0; 66],
        }],
        32,
    );
    let file = write_tmp(&iq);
    let g = Gguf::open(file.path()).unwrap();
    let err = format!("{:#}", g.tensor_f32("w").unwrap_err());
    assert!(err.contains("`w`") && err.contains("IQ2_XXS"), "{err}");
}

/// Checks the dequantizers against llama.cpp's own Python reference (gguf-py
/// `gguf.quants.dequantize`), through a file written by gguf-py's `GGUFWriter`:
/// see scripts/fixtures/gguf_quants.py.
#[test]
fn dequant_matches_gguf_py_reference() {
    let g = Gguf::open(QUANT_FIXTURE).expect("fixture tests/fixtures/gguf_quants/quants.gguf");
    // Metadata of every scalar type written by gguf-py.
    assert_eq!(g.get("test.u8"), Some(&MetaValue::U8(200)));
    assert_eq!(g.get("test.i8"), Some(&MetaValue::I8(-100)));
    assert_eq!(g.get("test.u16"), Some(&MetaValue::U16(60000)));
    assert_eq!(g.get("test.i16"), Some(&MetaValue::I16(-30000)));
    assert_eq!(g.get("test.u32"), Some(&MetaValue::U32(4_000_000_000)));
    assert_eq!(g.get("test.i32"), Some(&MetaValue::I32(-2_000_000_000)));
    assert_eq!(g.get("test.u64"), Some(&MetaValue::U64(1 << 40)));
    assert_eq!(g.get("test.i64"), Some(&MetaValue::I64(-(1 << 40))));
    assert_eq!(g.get("test.f32"), Some(&MetaValue::F32(1.5)));
    assert_eq!(g.get("test.f64"), Some(&MetaValue::F64(-2.25)));
    assert_eq!(g.get("test.bool"), Some(&MetaValue::Bool(true)));
    assert_eq!(g.get_str("test.str").unwrap(), "héllo wörld");
    assert_eq!(g.get_str_array("test.str_array").unwrap(), ["a", "", "ü"]);
    assert_eq!(g.get_f32_array("test.f32_array").unwrap(), [0.5, -1.0]);
    assert_eq!(g.get_i32_array("test.i32_array").unwrap(), [1, -2, 3]);

    let mut checked = vec![];
    for t in g.tensors() {
        let Some(ty) = t.name.strip_prefix("q.") else {
            continue;
        };
        let (got, shape) = g.tensor_f32(&t.name).unwrap();
        let (want, want_shape) = g.tensor_f32(&format!("ref.{ty}")).unwrap();
        assert_eq!(shape, want_shape, "{ty}");
        assert_eq!(t.ggml_type.name(), ty);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            // gguf-py computes in f32 too; allow one rounding of difference in the order
            // of operations.
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                "{ty}[{i}]: {a} vs {b}"
            );
        }
        checked.push(ty.to_string());
    }
    checked.sort();
    assert_eq!(
        checked,
        [
            "BF16", "F16", "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K",
            "Q8_0"
        ]
    );
}

#[test]
fn unpermute_inverts_llama_cpp_permute() {
    let mut rng = Rng(42);
    for &(n_head, head_dim, cols) in &[(1, 2, 1), (9, 64, 5), (3, 8, 7), (4, 16, 1), (2, 6, 3)] {
        let rows = n_head * head_dim;
        let x: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32()).collect();
        let p = permute_qk(&x, n_head, rows, cols).unwrap();
        assert_eq!(unpermute_qk(&p, n_head, rows, cols).unwrap(), x);
        assert_eq!(
            permute_qk(
                &unpermute_qk(&x, n_head, rows, cols).unwrap(),
                n_head,
                rows,
                cols
            )
            .unwrap(),
            x
        );
    }
    // llama.cpp: w.reshape(n_head, 2, half, cols).swapaxes(1, 2).reshape(rows, cols).
    // Rows of one head [a0 a1 a2 b0 b1 b2] become [a0 b0 a1 b1 a2 b2].
    let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
    assert_eq!(
        permute_qk(&x, 2, 12, 1).unwrap(),
        [0., 3., 1., 4., 2., 5., 6., 9., 7., 10., 8., 11.]
    );
    assert!(unpermute_qk(&x, 5, 12, 1).is_err());
    assert!(unpermute_qk(&x, 2, 6, 3).is_err());
}

#[test]
fn hf_names() {
    let cases = [
        ("token_embd.weight", Some("model.embed_tokens.weight")),
        ("output_norm.weight", Some("model.norm.weight")),
        ("output.weight", Some("lm_head.weight")),
        (
            "blk.0.attn_q.weight",
            Some("model.layers.0.self_attn.q_proj.weight"),
        ),
        (
            "blk.12.attn_k.bias",
            Some("model.layers.12.self_attn.k_proj.bias"),
        ),
        (
            "blk.3.attn_v.weight",
            Some("model.layers.3.self_attn.v_proj.weight"),
        ),
        (
            "blk.3.attn_output.weight",
            Some("model.layers.3.self_attn.o_proj.weight"),
        ),
        (
            "blk.3.attn_norm.weight",
            Some("model.layers.3.input_layernorm.weight"),
        ),
        (
            "blk.3.ffn_norm.weight",
            Some("model.layers.3.post_attention_layernorm.weight"),
        ),
        (
            "blk.3.ffn_gate.weight",
            Some("model.layers.3.mlp.gate_proj.weight"),
        ),
        (
            "blk.3.ffn_up.weight",
            Some("model.layers.3.mlp.up_proj.weight"),
        ),
        (
            "blk.3.ffn_down.weight",
            Some("model.layers.3.mlp.down_proj.weight"),
        ),
        (
            "blk.3.attn_q_norm.weight",
            Some("model.layers.3.self_attn.q_norm.weight"),
        ),
        ("rope_freqs.weight", None),
        ("blk.x.attn_q.weight", None),
        ("blk.1.attn_q.scale", None),
        ("blk.1.mystery.weight", None),
    ];
    for (g, hf) in cases {
        assert_eq!(gguf_to_hf_name(g).as_deref(), hf, "{g}");
        // The writer's names are the exact inverse on every name both sides know.
        if let Some(hf) = hf {
            assert_eq!(hf_to_gguf_name(hf).as_deref(), Some(g), "{hf}");
        }
    }
    for hf in [
        "model.layers.x.mlp.up_proj.weight",
        "score.weight",
        "model.rotary.inv_freq",
    ] {
        assert_eq!(hf_to_gguf_name(hf), None, "{hf}");
    }
}

#[test]
fn smollm_metadata_and_config() {
    let Some(g) = smollm() else { return };
    assert_eq!(g.version(), 3);
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(g.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(g.get_u32("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(g.get_u32("llama.attention.head_count").unwrap(), 9);
    assert_eq!(g.get_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(g.get_u32("llama.context_length").unwrap(), 8192);
    assert_eq!(g.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(
        g.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(),
        1e-5
    );
    assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(
        &tokens[..3],
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    );
    assert_eq!(g.get_str_array("tokenizer.ggml.merges").unwrap()[0], "Ġ t");
    assert!(g
        .get_str("tokenizer.chat_template")
        .unwrap()
        .starts_with("{% for message in messages %}"));

    let cfg = g.model_config().unwrap();
    let want = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": true,
        "attention_bias": false,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    });
    assert_eq!(cfg, want);
}

#[test]
fn smollm_tensor_shapes() {
    let Some(g) = smollm() else { return };
    assert_eq!(g.tensors().len(), 272);
    let shape = |n: &str| g.tensor_info(n).unwrap().shape();
    assert_eq!(shape("token_embd.weight"), [49152, 576]);
    assert_eq!(shape("output_norm.weight"), [576]);
    assert_eq!(shape("blk.0.attn_q.weight"), [576, 576]);
    assert_eq!(shape("blk.0.attn_k.weight"), [192, 576]);
    assert_eq!(shape("blk.0.attn_v.weight"), [192, 576]);
    assert_eq!(shape("blk.29.ffn_gate.weight"), [1536, 576]);
    assert_eq!(shape("blk.29.ffn_down.weight"), [576, 1536]);
    assert_eq!(
        g.tensor_info("token_embd.weight").unwrap().ggml_type,
        GgmlType::Q8_0
    );
    assert_eq!(
        g.tensor_info("blk.0.attn_q.weight").unwrap().ggml_type,
        GgmlType::Q4_1
    );
    assert!(!g.has_tensor("output.weight"));
    for t in g.tensors() {
        assert!(gguf_to_hf_name(&t.name).is_some(), "{}", t.name);
    }
    let (v, shape) = g.tensor_f32("blk.0.attn_norm.weight").unwrap();
    assert_eq!(shape, [576]);
    assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|&x| x != 0.0));
}

/// Q4_1 block 0 of `blk.0.attn_q.weight`, decoded by hand from the raw bytes: f16 d at
/// bytes 0..2, f16 m at 2..4, then 16 bytes whose low nibble is element j and high nibble
/// element j + 16; value = d * q + m.
#[test]
fn smollm_q4_1_by_hand() {
    let Some(g) = smollm() else { return };
    let info = g.tensor_info("blk.0.attn_q.weight").unwrap().clone();
    // Read the block with plain file I/O rather than through the mmap.
    let raw = std::fs::read(SMOLLM).unwrap();
    let data_start = g.data_start;
    let b = &raw[data_start + info.offset as usize..][..40];
    let d = half::f16::from_bits(u16::from(b[0]) | (u16::from(b[1]) << 8)).to_f32();
    let m = half::f16::from_bits(u16::from(b[2]) | (u16::from(b[3]) << 8)).to_f32();
    let (v, _) = g.tensor_f32("blk.0.attn_q.weight").unwrap();
    for (j, &byte) in b[4..20].iter().enumerate() {
        assert_eq!(v[j], d * f32::from(byte % 16) + m, "element {j}");
        assert_eq!(
            v[j + 16],
            d * f32::from(byte / 16) + m,
            "element {}",
            j + 16
        );
    }
    // Second block (bytes 20..40) continues the same row.
    let d2 = half::f16::from_bits(u16::from(b[20]) | (u16::from(b[21]) << 8)).to_f32();
    let m2 = half::f16::from_bits(u16::from(b[22]) | (u16::from(b[23]) << 8)).to_f32();
    assert_eq!(v[32 + 5], d2 * f32::from(b[24 + 5] % 16) + m2);
    assert_eq!(v[32 + 21], d2 * f32::from(b[24 + 5] / 16) + m2);
    // Weights of a trained model: small, finite, not all equal.
    assert!(v.iter().all(|x| x.is_finite() && x.abs() < 10.0));
    let (vk, _) = g.tensor_f32("token_embd.weight").unwrap();
    assert_eq!(vk.len(), 49152 * 576);
}

#[test]
fn smollm_hf_layout_unpermutes_q_and_k_only() {
    let Some(g) = smollm() else { return };
    let (q, _) = g.tensor_f32("blk.0.attn_q.weight").unwrap();
    let (q_hf, shape) = g.tensor_f32_hf("blk.0.attn_q.weight").unwrap();
    assert_eq!(q_hf, unpermute_qk(&q, 9, 576, 576).unwrap());
    assert_eq!(shape, [576, 576]);
    let (k, _) = g.tensor_f32("blk.0.attn_k.weight").unwrap();
    let (k_hf, _) = g.tensor_f32_hf("blk.0.attn_k.weight").unwrap();
    assert_eq!(k_hf, unpermute_qk(&k, 3, 192, 576).unwrap());
    assert_ne!(k_hf, k);
    let (v, _) = g.tensor_f32("blk.0.attn_v.weight").unwrap();
    assert_eq!(g.tensor_f32_hf("blk.0.attn_v.weight").unwrap().0, v);
}

#[test]
fn a_block_count_its_tensors_contradict_is_a_corrupt_file() {
    let kv = |blocks: u32| {
        vec![
            ("general.architecture", W::Str("llama")),
            ("llama.block_count", W::U32(blocks)),
            ("llama.embedding_length", W::U32(8)),
            ("llama.feed_forward_length", W::U32(16)),
            ("llama.attention.head_count", W::U32(2)),
            ("llama.context_length", W::U32(64)),
            ("llama.vocab_size", W::U32(4)),
            ("llama.attention.layer_norm_rms_epsilon", W::F32(1e-5)),
        ]
    };
    let norm = |name| TestTensor {
        name,
        ne: vec![8],
        ty: 0,
        data: vec![0; 32],
    };
    let tensors = [
        norm("blk.0.attn_norm.weight"),
        norm("blk.1.attn_norm.weight"),
    ];
    let ok = write_tmp(&write_gguf(3, &kv(2), &tensors, 32));
    let cfg = Gguf::open(ok.path()).unwrap().model_config().unwrap();
    assert_eq!(cfg["num_hidden_layers"], 2);
    let bad = write_tmp(&write_gguf(3, &kv(3_000_000), &tensors, 32));
    let e = Gguf::open(bad.path()).unwrap().model_config().unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("corrupt") && e.contains("block_count"), "{e}");
}
