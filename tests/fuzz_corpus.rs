//! The fuzz targets' inputs on stable Rust: every committed seed (`fuzz/corpus/<target>/seed-*`)
//! and every input a fuzzer once crashed on (`fuzz/regressions/<target>/*`) goes through its
//! `rlhf::fuzzing` entry point, then a few hundred deterministic mutations of each seed (byte
//! flips, truncations, splices). A panic anywhere fails the test. cargo-fuzz (fuzz/README.md)
//! explores far more; this keeps what it found fixed.

use rlhf::data::batch::SplitMix64 as Rng;
use std::path::{Path, PathBuf};

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 5] = [
    ("gguf", rlhf::fuzzing::gguf),
    ("model_config", rlhf::fuzzing::model_config),
    ("safetensors", rlhf::fuzzing::safetensors),
    ("run_config", rlhf::fuzzing::run_config),
    ("dataset", rlhf::fuzzing::dataset),
];

/// The files in `dir` whose names start with `prefix` (a local fuzzing run adds its own inputs
/// to the corpus folders; only the committed seeds count here).
fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| {
        p.is_file()
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
    });
    v.sort();
    v
}

fn fuzz_dir(sub: &str, target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(sub)
        .join(target)
}

/// One mutation of `seed`: a few bytes overwritten (often with boundary values), a cut, or a
/// stretch repeated.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    if v.is_empty() {
        return vec![rng.next_u64() as u8];
    }
    match rng.below(4) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(v.len());
                v[i] = [0x00, 0xFF, 0x7F, 0x80, rng.next_u64() as u8][rng.below(5)];
            }
        }
        1 => v.truncate(rng.below(v.len())),
        2 => {
            // A little-endian u64 field set to a huge value (lengths, counts, offsets).
            let i = rng.below(v.len().saturating_sub(8).max(1));
            let big = [u64::MAX, 1 << 40, 1 << 32, u32::MAX as u64][rng.below(4)];
            for (k, b) in big.to_le_bytes().iter().enumerate() {
                if i + k < v.len() {
                    v[i + k] = *b;
                }
            }
        }
        _ => {
            let a = rng.below(v.len());
            let b = (a + 1 + rng.below(64)).min(v.len());
            let chunk = v[a..b].to_vec();
            let at = rng.below(v.len());
            v.splice(at..at, chunk);
        }
    }
    v
}

#[test]
fn seeds_and_regressions_never_panic() {
    for (name, target) in TARGETS {
        let seeds = files(&fuzz_dir("corpus", name), "seed-");
        assert!(!seeds.is_empty(), "fuzz/corpus/{name} has no seed");
        let mut inputs = seeds.clone();
        inputs.extend(files(&fuzz_dir("regressions", name), ""));
        for path in &inputs {
            let bytes = std::fs::read(path).unwrap();
            target(&bytes);
        }
        let mut rng = Rng(0x5EED ^ name.len() as u64);
        for path in &seeds {
            let seed = std::fs::read(path).unwrap();
            for _ in 0..300 {
                target(&mutate(&seed, &mut rng));
            }
        }
    }
}

/// The seeds are worth fuzzing from only if they parse: a seed rejected at its first byte
/// would leave the fuzzer exploring the error path.
#[test]
fn seeds_parse() {
    let g = rlhf::gguf::Gguf::open(fuzz_dir("corpus", "gguf").join("seed-tiny-llama.gguf"))
        .expect("the GGUF seed opens");
    rlhf::tokenizer::Tok::from_gguf(&g).expect("its tokenizer loads");
    rlhf::tokenizer::ChatTemplate::from_gguf(&g).expect("its chat template loads");
    g.tensor_f32("blk.0.ffn_gate.weight")
        .expect("its Q8_0 tensor dequantizes");
    for cfg in files(&fuzz_dir("corpus", "run_config"), "seed-") {
        let text = std::fs::read_to_string(&cfg).unwrap();
        rlhf::config::RunConfig::parse(&text, &cfg).unwrap_or_else(|e| panic!("{e:#}"));
    }
    let bytes =
        std::fs::read(fuzz_dir("corpus", "safetensors").join("seed-tiny.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("the safetensors seed loads");
    assert_eq!(st.tensors().len(), 3);
    let rows = rlhf::data::read_rows(&fuzz_dir("corpus", "dataset").join("seed-rows.jsonl"))
        .expect("the dataset seed reads");
    assert!(rows.len() >= 6);
}
