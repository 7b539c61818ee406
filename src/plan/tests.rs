use super::evaluate::evaluate;
use super::*;
use crate::config::{Device, Dtype, LoraConfig, ModelConfig, Quantize, ReferenceModel};
use std::time::Instant;

const GIB_U: u64 = 1 << 30;

fn manifest(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn model(name: &str) -> LlamaConfig {
    LlamaConfig::from_file(&manifest(&format!("configs/models/{name}.json"))).unwrap()
}

fn config(name: &str) -> RunConfig {
    RunConfig::load(&manifest(&format!("configs/{name}"))).unwrap()
}

/// bf16 compute on cuda, everything else at its default.
fn cuda_run() -> RunConfig {
    let mut r = RunConfig::default();
    r.model.dtype = Dtype::Bf16;
    r.model.device = Device::Cuda;
    r
}

/// Applies `key = value` suggestions through TOML, as a user editing the file would.
fn apply(run: &RunConfig, changes: &[String]) -> RunConfig {
    let mut v = toml::Value::try_from(run).unwrap();
    for c in changes {
        let (key, val) = c.split_once(" = ").unwrap();
        let (section, field) = key.split_once('.').unwrap();
        let val = toml::from_str::<toml::Table>(&format!("x = {val}")).unwrap()["x"].clone();
        v.get_mut(section)
            .and_then(|s| s.as_table_mut())
            .unwrap()
            .insert(field.into(), val);
    }
    v.try_into().unwrap()
}

/// A plain causal-LM fine-tuning step over `rows` sequences of `tokens`, the setup of the
/// published QLoRA memory figures (not a command of ours, so built here).
fn sft_plan(run: &RunConfig, m: &LlamaConfig, rows: u64, tokens: u64) -> Plan {
    let pass = Pass {
        label: "sft",
        kind: PassKind::Forward { grad: true },
        rows,
        tokens,
        logits_tokens: tokens,
        lora: true,
        reward_model: false,
    };
    let w = Workload {
        adapters: vec![("policy", true)],
        heads: vec![],
        phases: vec![(Phase::Load, vec![]), (Phase::TrainStep, vec![pass])],
        rollout: None,
        notes: vec![],
    };
    evaluate(run, m, &RewardSource::None, Algo::Dpo, w)
}

#[test]
fn nf4_double_quant_is_4_127_bits_per_param() {
    // 20B gate_proj, 16384 x 6144 = 100_663_296 params:
    // 4-bit codes n/2 = 50_331_648; absmax codes n/64 = 1_572_864 bytes;
    // second-level fp32 absmax 1_572_864/256 = 6_144 x 4 = 24_576; offset 4.
    let n = 16_384 * 6_144;
    assert_eq!(nf4_bytes(n), 50_331_648 + 1_572_864 + 24_576 + 4);
    let bits = nf4_bytes(n) as f64 * 8.0 / n as f64;
    assert!((bits - 4.127).abs() < 5e-4, "{bits}");
    // Partial blocks round up: 100 params -> 50 + 2 blocks + 1 nested block x 4 + 4 = 60.
    assert_eq!(nf4_bytes(100), 60);
}

#[test]
fn base_weight_terms_20b() {
    let m = model("llama-20b-class");
    let p = plan(&config("20b-grpo-24gb.toml"), &m, Algo::Grpo).unwrap();
    // Per layer: q, o 6144x6144 -> 18_874_368 + 589_824 + 4 x 2_304 + 4 = 19_473_412 each;
    // k, v 1024x6144 -> 3_145_728 + 98_304 + 4 x 384 + 4 = 3_245_572 each;
    // gate, up, down 16384x6144 -> 51_929_092 each (above).
    let layer = 2 * 19_473_412 + 2 * 3_245_572 + 3 * 51_929_092;
    assert_eq!(layer, 201_225_244);
    assert_eq!(p.bytes_of(T_LINEARS, Phase::Load), 48 * layer);
    assert_eq!(p.bytes_of(T_LINEARS, Phase::TrainStep), 9_658_811_712);
    // Embeddings + untied lm_head 2 x 65536 x 6144, 2 x 48 + 1 norms of 6144, bf16.
    assert_eq!(
        p.bytes_of(T_DENSE, Phase::Rollout),
        (2 * 65_536 * 6_144 + 97 * 6_144) * 2
    );
    // Quantize staging: the largest linear (gate) in f32 while loading; dequant workspace:
    // the same linear in bf16 whenever a pass runs.
    assert_eq!(p.bytes_of(T_STAGING, Phase::Load), 100_663_296 * 4);
    assert_eq!(p.bytes_of(T_STAGING, Phase::Rollout), 0);
    assert_eq!(p.bytes_of(T_WORKSPACE, Phase::Load), 0);
    assert_eq!(p.bytes_of(T_WORKSPACE, Phase::TrainStep), 100_663_296 * 2);
    // Context: a constant, whatever the model.
    assert_eq!(
        p.bytes_of(T_CONTEXT, Phase::Load),
        CALIBRATION.cuda_context_bytes as u64
    );

    // quantize = none, f32: 2 x 37_748_736 + 2 x 6_291_456 + 3 x 100_663_296 = 390_070_272
    // params per layer x 48 x 4 B; dense 805_902_336 params x 4 B; no staging, no workspace.
    let mut run = config("20b-grpo-24gb.toml");
    run.model.quantize = Quantize::None;
    run.model.dtype = Dtype::F32;
    run.plan.budget_gib = 1000.0;
    let p = plan(&run, &m, Algo::Grpo).unwrap();
    assert_eq!(p.bytes_of(T_LINEARS, Phase::Load), 390_070_272 * 48 * 4);
    assert_eq!(p.bytes_of(T_DENSE, Phase::Load), 805_902_336 * 4);
    assert_eq!(p.bytes_of(T_STAGING, Phase::Load), 0);
    assert_eq!(p.bytes_of(T_WORKSPACE, Phase::TrainStep), 0);
    assert_eq!(p.model.params, 390_070_272 * 48 + 805_902_336);
}

#[test]
fn adapter_grad_and_optimizer_terms() {
    let m = model("llama-20b-class");
    // r = 16 per layer: q, o 16 x (6144 + 6144) = 196_608; k, v 16 x (6144 + 1024) = 114_688;
    // gate, up, down 16 x (6144 + 16384) = 360_448.
    let layer = 2 * 196_608 + 2 * 114_688 + 3 * 360_448;
    assert_eq!(layer, 1_703_936);
    let adapter = 48 * layer * 4; // 81_788_928 params x 4 B = 327_155_712
    assert_eq!(adapter, 327_155_712);

    // Paged AdamW, gradient accumulation 4: grads live from the first micro-batch on; on the
    // GPU only one layer's moments at a time, 2 x 1_703_936 x 4 B.
    let run = config("20b-grpo-24gb.toml");
    let p = plan(&run, &m, Algo::Grpo).unwrap();
    assert_eq!(p.bytes_of(T_ADAPTERS, Phase::Load), adapter);
    assert_eq!(p.bytes_of(T_GRADS, Phase::Load), 0);
    assert_eq!(p.bytes_of(T_GRADS, Phase::Rollout), adapter);
    assert_eq!(p.bytes_of(T_MOMENTS, Phase::Rollout), 0);
    assert_eq!(p.bytes_of(T_MOMENTS, Phase::TrainStep), 2 * 1_703_936 * 4);

    // Not paged, no accumulation: moments everywhere after load, grads in the step only.
    let mut run = config("20b-grpo-24gb.toml");
    run.optimizer.paged = false;
    run.train.gradient_accumulation_steps = 1;
    let p = plan(&run, &m, Algo::Grpo).unwrap();
    assert_eq!(p.bytes_of(T_GRADS, Phase::Rollout), 0);
    assert_eq!(p.bytes_of(T_GRADS, Phase::TrainStep), adapter);
    assert_eq!(p.bytes_of(T_MOMENTS, Phase::Load), 0);
    assert_eq!(p.bytes_of(T_MOMENTS, Phase::Rollout), 2 * adapter);

    // PPO: policy + value trained, reward adapter frozen; heads of 6144 + 1 params, f32:
    // value and score params + the value head's grads (moments paged) = 3 copies.
    let p = plan(&config("20b-ppo-24gb.toml"), &m, Algo::Ppo).unwrap();
    assert_eq!(p.bytes_of(T_ADAPTERS, Phase::Rollout), 3 * adapter);
    assert_eq!(p.bytes_of(T_GRADS, Phase::TrainStep), 2 * adapter);
    assert_eq!(p.bytes_of(T_HEADS, Phase::TrainStep), 3 * 6_145 * 4);
    assert_eq!(p.bytes_of(T_HEADS, Phase::Load), 2 * 6_145 * 4);
}

#[test]
fn rollout_terms_20b_grpo() {
    let m = model("llama-20b-class");
    let p = plan(&config("20b-grpo-24gb.toml"), &m, Algo::Grpo).unwrap();
    assert_eq!(
        p.phases,
        [
            Phase::Load,
            Phase::Rollout,
            Phase::Scoring,
            Phase::TrainStep
        ]
    );
    // 8 rows of 256 prompt + 512 completion tokens:
    // 2 x 48 layers x 8 kv heads x 128 x 768 x 8 rows x 2 B.
    assert_eq!(
        p.bytes_of(T_KV, Phase::Rollout),
        2 * 48 * 8 * 128 * 768 * 8 * 2
    );
    assert_eq!(p.bytes_of(T_KV, Phase::Rollout), 1_207_959_552);
    assert_eq!(p.bytes_of(T_KV, Phase::TrainStep), 0);
    // 6 [8, 65536] f32 buffers while sampling.
    assert_eq!(p.bytes_of(T_SAMPLING, Phase::Rollout), 6 * 8 * 65_536 * 4);
    // Rollout tensors: 8 x 768 tokens x 32 B, until the step.
    assert_eq!(p.bytes_of(T_ROLLOUT, Phase::TrainStep), 8 * 768 * 32);
    // Prefill working set: 2 x (3 x 6144 + max(4 x 6144, 3 x 16384)) + 4 x 16384
    // = 2 x 67_584 + 65_536 = 200_704 B/token x 8 rows x 256 prompt tokens.
    assert_eq!(p.bytes_of(T_BLOCK, Phase::Rollout), 200_704 * 8 * 256);
    // Scoring (beta > 0): the reference pass over 768 tokens, logits of the 512 completion
    // tokens chunked to 1024 rows x 65536 x 4 B x 2 buffers.
    assert_eq!(p.bytes_of(T_LOGITS, Phase::Scoring), 1024 * 65_536 * 4 * 2);

    // beta = 0 and one iteration: no gradient-free pass, no scoring phase.
    let mut run = config("20b-grpo-24gb.toml");
    run.grpo.beta = 0.0;
    let p = plan(&run, &m, Algo::Grpo).unwrap();
    assert_eq!(p.phases, [Phase::Load, Phase::Rollout, Phase::TrainStep]);

    // generate: load and rollout only, 4 rows of 256 + 128 new tokens.
    let mut run = config("20b-grpo-24gb.toml");
    run.train.batch_size = 4;
    run.generation.max_new_tokens = 128;
    let p = plan(&run, &m, Algo::Generate).unwrap();
    assert_eq!(p.phases, [Phase::Load, Phase::Rollout]);
    assert_eq!(
        p.bytes_of(T_KV, Phase::Rollout),
        2 * 48 * 8 * 128 * 384 * 4 * 2
    );
    assert_eq!(p.bytes_of(T_GRADS, Phase::Rollout), 0);
}

#[test]
fn per_token_activation_formulas_7b() {
    let m = model("llama-2-7b");
    let mut lora = LoraConfig {
        r: 8,
        ..LoraConfig::default()
    };
    // saved = 2 x (2 x 4096 + 3 x 4096 + 4 x 11008)      = 2 x 64_512 = 129_024
    //       + 4 x (4096 [q/k/v in] + 4096 [o in] + 4096 [gate/up in] + 11008 [down in]) = 93_184
    //       + 4 x 8 x 7 modules = 224, + 8
    assert_eq!(
        saved_bytes_per_token(&m, Some(&lora), 2),
        129_024 + 93_184 + 224 + 8
    );
    assert_eq!(saved_bytes_per_token(&m, None, 2), 129_024 + 8);
    // backward = 2 x (3 x 4096 + 3 x 11008) + 4 x 11008 = 90_624 + 44_032
    assert_eq!(backward_bytes_per_token(&m, Some(&lora), 2), 134_656);
    // inference = 2 x (3 x 4096 + max(4 x 4096, 3 x 11008)) + 4 x 11008 = 90_624 + 44_032
    assert_eq!(inference_bytes_per_token(&m, Some(&lora), 2), 134_656);
    // f32 compute, no adapters: 4 x (12_288 + 33_024)
    assert_eq!(inference_bytes_per_token(&m, None, 4), 181_248);
    // Dropout: 5 B per input element per targeted module (dropped f32 copy + mask):
    // 5 x (3 x 4096 + 4096 + 2 x 4096 + 11008) = 5 x 35_584 = 177_920.
    lora.dropout = 0.1;
    assert_eq!(
        saved_bytes_per_token(&m, Some(&lora), 2),
        129_024 + 177_920 + 224 + 8
    );
    // Only q and v targeted, no dropout: one shared f32 input copy of 4096.
    lora.dropout = 0.0;
    lora.target_modules = vec!["q_proj".into(), "v_proj".into()];
    assert_eq!(
        saved_bytes_per_token(&m, Some(&lora), 2),
        129_024 + 4 * 4096 + 4 * 8 * 2 + 8
    );
}

#[test]
fn training_activation_terms_7b_dpo() {
    let m = model("llama-2-7b");
    let mut run = cuda_run();
    run.lora.r = 8;
    run.train.batch_size = 1; // one pair = 2 rows
    run.data.max_length = 512;
    run.data.max_prompt_length = 256;
    run.plan.budget_gib = 1000.0;
    let p = plan(&run, &m, Algo::Dpo).unwrap();
    // Checkpointed: 32 layers x 4096 x 2 B x 2 rows x 512 tokens.
    assert_eq!(p.bytes_of(T_KEPT, Phase::TrainStep), 32 * 4096 * 2 * 1024);
    // One block recomputed + its backward: (222_440 + 134_656) B/token x 1024 tokens.
    assert_eq!(
        p.bytes_of(T_BLOCK, Phase::TrainStep),
        (222_440 + 134_656) * 1024
    );
    // (2 kept + 2 grads) x [2, 32, 512, 512] x 2 B.
    assert_eq!(
        p.bytes_of(T_ATTENTION, Phase::TrainStep),
        4 * 2 * 32 * 512 * 512 * 2
    );
    // Logits: 2 x 512 tokens x 32000 x 4 B x 3 buffers.
    assert_eq!(
        p.bytes_of(T_LOGITS, Phase::TrainStep),
        1024 * 32_000 * 4 * 3
    );
    // The reference pass: no adapters, no grads; decomposed attention, 2 x [2, 32, 512, 512]
    // x 2 B (no flash kernel on cuda either).
    assert_eq!(p.bytes_of(T_BLOCK, Phase::Scoring), 90_624 * 1024);
    assert_eq!(p.bytes_of(T_LOGITS, Phase::Scoring), 1024 * 32_000 * 4 * 2);
    assert_eq!(
        p.bytes_of(T_ATTENTION, Phase::Scoring),
        2 * 2 * 32 * 512 * 512 * 2
    );

    // No checkpointing: every layer keeps 222_440 B/token, 32 x 2 score tensors + 2 grads.
    run.train.gradient_checkpointing = false;
    let p = plan(&run, &m, Algo::Dpo).unwrap();
    assert_eq!(p.bytes_of(T_KEPT, Phase::TrainStep), 32 * 222_440 * 1024);
    assert_eq!(p.bytes_of(T_BLOCK, Phase::TrainStep), 134_656 * 1024);
    assert_eq!(
        p.bytes_of(T_ATTENTION, Phase::TrainStep),
        (32 * 2 + 2) * 2 * 32 * 512 * 512 * 2
    );

    // Chunked logits: 256 rows x 32000 x 4 B x 3.
    run.plan.logits_chunk = 256;
    let p = plan(&run, &m, Algo::Dpo).unwrap();
    assert_eq!(p.bytes_of(T_LOGITS, Phase::TrainStep), 256 * 32_000 * 4 * 3);

    // On the cpu, f32: no CUDA context; the reference pass's attention is decomposed,
    // 2 x [2, 32, 512, 512] x 4 B.
    run.model.device = Device::Cpu;
    run.model.dtype = Dtype::F32;
    let p = plan(&run, &m, Algo::Dpo).unwrap();
    assert_eq!(p.bytes_of(T_CONTEXT, Phase::Load), 0);
    assert_eq!(
        p.bytes_of(T_ATTENTION, Phase::Scoring),
        2 * 2 * 32 * 512 * 512 * 4
    );
}

#[test]
fn grpo_reward_model_is_counted_with_its_scoring_pass() {
    let m = model("llama-20b-class");
    let mut run = config("20b-grpo-24gb.toml");
    run.plan.budget_gib = 1000.0;
    let without = plan(&run, &m, Algo::Grpo).unwrap();
    let path = manifest("configs/models/llama-2-7b.json");
    let entry = format!("type = \"reward_model\"\npath = {:?}\nweight = 0.5", path);
    run.grpo.rewards.push(toml::from_str(&entry).unwrap());
    let p = plan(&run, &m, Algo::Grpo).unwrap();
    // As PPO's separate checkpoint: the 7B linears in nf4, its embeddings, norms and score head.
    let linears = (4 * 8_654_852 + 3 * 23_259_908) * 32;
    let d = run.model.dtype.bytes() as u64;
    let table = if p.model.device == "cuda" && d == 4 {
        2
    } else {
        d
    };
    let rm = linears + 32_000 * 4096 * table + 66 * 4096 * d;
    for phase in [Phase::Load, Phase::Rollout, Phase::TrainStep] {
        assert_eq!(p.bytes_of(T_REWARD_MODEL, phase), rm, "{phase:?}");
        assert_eq!(without.bytes_of(T_REWARD_MODEL, phase), 0);
    }
    // Its scoring pass runs in the scoring phase, which holds at least its weights more (its
    // activations, of the 7B's narrower dims, stay under the policy pass's).
    assert!(
        p.total_of(Phase::Scoring) >= without.total_of(Phase::Scoring) + rm,
        "{} vs {}",
        p.total_of(Phase::Scoring),
        without.total_of(Phase::Scoring)
    );
    assert!(p
        .notes
        .iter()
        .any(|n| n.contains("grpo: separate reward model")));
    // A second reward model is refused, naming the key.
    run.grpo.rewards.push(toml::from_str(&entry).unwrap());
    let e = plan(&run, &m, Algo::Grpo).unwrap_err().to_string();
    assert!(
        e.contains("grpo.rewards") && e.contains("at most one"),
        "{e}"
    );
}

#[test]
fn reward_model_checkpoint_is_counted() {
    let m = model("llama-20b-class");
    let mut run = config("20b-ppo-24gb.toml");
    run.ppo.reward_adapter = None;
    run.ppo.reward_model_path = Some(manifest("configs/models/llama-2-7b.json"));
    run.plan.budget_gib = 1000.0;
    let p = plan(&run, &m, Algo::Ppo).unwrap();
    // 7B linears: 4 x nf4(4096 x 4096) + 3 x nf4(11008 x 4096) per layer, x 32:
    // nf4(16_777_216) = 8_388_608 + 262_144 + 4 x 1_024 + 4 = 8_654_852;
    // nf4(45_088_768) = 22_544_384 + 704_512 + 4 x 2_752 + 4 = 23_259_908.
    let linears = (4 * 8_654_852 + 3 * 23_259_908) * 32;
    assert_eq!(linears, 3_340_772_224);
    // Embeddings and 2 x 32 + 1 norms + the 1-wide score head, bf16.
    let dense = (32_000 * 4096 + 66 * 4096) * 2;
    assert_eq!(p.bytes_of(T_REWARD_MODEL, Phase::Scoring), linears + dense);
    // Two trained adapters only: the reward is not an adapter now.
    assert_eq!(p.bytes_of(T_ADAPTERS, Phase::Load), 2 * 327_155_712);

    // An unreadable config: the base's dims stand in, and the plan says so.
    run.ppo.reward_model_path = Some(manifest("no/such/reward-model"));
    let p = plan(&run, &m, Algo::Ppo).unwrap();
    let base_dense = (65_536 * 6144 + 98 * 6144) * 2;
    assert_eq!(
        p.bytes_of(T_REWARD_MODEL, Phase::Load),
        9_658_811_712 + base_dense
    );
    assert!(
        p.notes
            .iter()
            .any(|n| n.contains("assuming the base model's dims")),
        "{:?}",
        p.notes
    );
}

#[test]
fn anchor_70b_nf4_weights_alone_exceed_24_gib() {
    let m = model("llama-3-70b");
    let p = plan(&config("70b-grpo-24gb.toml"), &m, Algo::Grpo).unwrap();
    // 80 x (2 x nf4(8192^2) + 2 x nf4(1024 x 8192) + 3 x nf4(28672 x 8192))
    // = 80 x (2 x 34_619_396 + 2 x 4_327_428 + 3 x 121_167_876) = 35_311_782_080 B = 32.89 GiB.
    let linears = p.bytes_of(T_LINEARS, Phase::Load);
    assert_eq!(linears, 35_311_782_080);
    assert!(linears > 24 * GIB_U);
    assert!(!p.fits);
}

#[test]
fn anchor_65b_qlora_fits_48_gb_at_short_sequence() {
    // QLoRA paper (Dettmers et al. 2023): LLaMA-65B finetuned on one 48 GB GPU; its memory
    // figure uses batch 1, sequence 512; r = 64 on all linears, dropout 0.05, paged AdamW,
    // gradient checkpointing, bf16 compute.
    let m = model("llama-65b");
    let mut run = cuda_run();
    run.lora.r = 64;
    run.lora.dropout = 0.05;
    run.optimizer.paged = true;
    let p = sft_plan(&run, &m, 1, 512);
    assert!(p.peak_bytes < 48_000_000_000, "{:.2} GiB", p.peak_gib());
    // And it is mostly weights: 80 layers of 809.5M linear params at 4.127 bits = 33.4 GB.
    assert!(p.bytes_of(T_LINEARS, Phase::TrainStep) > 33_000_000_000);
    // The same run without paging and checkpointing at batch 4 x 2048 tokens does not fit.
    run.optimizer.paged = false;
    run.train.gradient_checkpointing = false;
    assert!(sft_plan(&run, &m, 4, 2048).peak_bytes > 48_000_000_000);
}

#[test]
fn anchor_7b_qlora_needs_5_to_6_gb() {
    // LLaMA-Factory's hardware table: QLoRA 4-bit 7B = 6 GB, with its defaults lora_rank 8
    // on all linears, AdamW (not paged), gradient checkpointing; batch 1, sequence 512.
    let m = model("llama-2-7b");
    let mut run = cuda_run();
    run.lora.r = 8;
    let p = sft_plan(&run, &m, 1, 512);
    assert!(
        p.peak_bytes >= 5_000_000_000 && p.peak_bytes <= 6 * GIB_U,
        "{:.2} GiB",
        p.peak_gib()
    );
}

#[test]
fn every_config_plans_and_the_20b_ones_fit() {
    let mut checked = Vec::new();
    let dir = manifest("configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    for file in files {
        let run = RunConfig::load(&file).unwrap();
        if run.model.path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let m = read_model_config(&manifest(run.model.path.to_str().unwrap())).unwrap();
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        let algo = algo_from_file_name(&file)
            .unwrap_or_else(|| panic!("{name}: no algorithm in the name"));
        let p = plan(&run, &m, algo).unwrap();
        let table = render_table(&p);
        assert!(table.contains("verdict: "), "{name}\n{table}");
        if name.starts_with("20b-") {
            assert!(p.fits, "{name}\n{table}");
            assert!(
                p.peak_bytes > 12 * GIB_U,
                "{name}: a 24 GiB config should use the card\n{table}"
            );
        }
        if name.starts_with("70b-") {
            assert!(!p.fits, "{name}\n{table}");
            assert!(!p.suggestions.is_empty(), "{name}\n{table}");
            for s in &p.suggestions {
                let fixed = plan(&apply(&run, &s.changes), &m, algo).unwrap();
                assert!(
                    fixed.fits,
                    "{name}: {:?}\n{}",
                    s.changes,
                    render_table(&fixed)
                );
                assert_eq!(fixed.peak_bytes, s.peak_bytes);
            }
        }
        checked.push(name);
    }
    for want in [
        "20b-dpo", "20b-grpo", "20b-ppo", "70b-dpo", "70b-grpo", "70b-ppo",
    ] {
        assert!(
            checked.iter().any(|c| c.starts_with(want)),
            "{want} missing: {checked:?}"
        );
    }
}

#[test]
fn suggestions_fit_and_are_the_largest() {
    let m = model("llama-20b-class");
    let mut run = config("20b-grpo-24gb.toml");
    run.train.batch_size = 16; // 2 prompts x 8
    let p = plan(&run, &m, Algo::Grpo).unwrap();
    assert!(!p.fits);
    let batch = p
        .suggestions
        .iter()
        .find(|s| s.changes.iter().any(|c| c.starts_with("train.batch_size")))
        .expect("a batch suggestion");
    let fixed = apply(&run, &batch.changes);
    assert!(fixed.train.batch_size.is_multiple_of(8));
    assert!(plan(&fixed, &m, Algo::Grpo).unwrap().fits);
    // One more prompt's group would not fit.
    let mut bigger = fixed.clone();
    bigger.train.batch_size += 8;
    assert!(!plan(&bigger, &m, Algo::Grpo).unwrap().fits);
    let len = p
        .suggestions
        .iter()
        .find(|s| {
            s.changes
                .iter()
                .any(|c| c.starts_with("grpo.max_completion_length"))
        })
        .expect("a length suggestion");
    let fixed = apply(&run, &len.changes);
    assert!(plan(&fixed, &m, Algo::Grpo).unwrap().fits);
    let mut longer = fixed.clone();
    longer.grpo.max_completion_length += 32;
    assert!(!plan(&longer, &m, Algo::Grpo).unwrap().fits);
    for s in &p.suggestions {
        assert!(s.peak_bytes <= p.budget_bytes, "{s:?}");
    }

    // Too long for even one prompt's group: the longest completion at 8, and fewer generations.
    run.train.batch_size = 32;
    run.grpo.max_completion_length = 1536;
    let p = plan(&run, &m, Algo::Grpo).unwrap();
    let both = p
        .suggestions
        .iter()
        .find(|s| s.changes.len() == 2 && s.changes[0] == "train.batch_size = 8")
        .unwrap_or_else(|| panic!("{}", render_table(&p)));
    assert!(both.changes[1].starts_with("grpo.max_completion_length = "));
    assert!(
        plan(&apply(&run, &both.changes), &m, Algo::Grpo)
            .unwrap()
            .fits
    );
    let fewer = p
        .suggestions
        .iter()
        .find(|s| s.changes[0].starts_with("grpo.num_generations"))
        .unwrap_or_else(|| panic!("{}", render_table(&p)));
    assert!(
        plan(&apply(&run, &fewer.changes), &m, Algo::Grpo)
            .unwrap()
            .fits
    );

    // DPO with the switches off: each switch is offered when it alone makes the run fit.
    let mut run = config("20b-dpo-24gb.toml");
    run.train.gradient_checkpointing = false;
    run.train.batch_size = 1;
    run.data.max_length = 512;
    run.data.max_prompt_length = 256;
    let p = plan(&run, &m, Algo::Dpo).unwrap();
    assert!(!p.fits, "{}", render_table(&p));
    assert!(
        p.suggestions
            .iter()
            .any(|s| s.changes == ["train.gradient_checkpointing = true"]),
        "{}",
        render_table(&p)
    );
    for s in &p.suggestions {
        assert!(
            plan(&apply(&run, &s.changes), &m, Algo::Dpo).unwrap().fits,
            "{s:?}"
        );
    }
}

#[test]
fn bad_input_names_the_key() {
    let m = model("llama-2-7b");
    let err = |run: &RunConfig, algo| plan(run, &m, algo).unwrap_err().to_string();

    let mut run = cuda_run();
    run.train.batch_size = 0;
    let e = err(&run, Algo::Dpo);
    assert!(
        e.contains("train.batch_size") && e.contains("positive"),
        "{e}"
    );

    let mut run = cuda_run();
    run.train.batch_size = 12;
    let e = err(&run, Algo::Grpo);
    assert!(
        e.contains("train.batch_size") && e.contains("multiple of `grpo.num_generations` (8)"),
        "{e}"
    );

    // Llama-2-7B has 4096 positions and no rope scaling.
    let mut run = cuda_run();
    run.train.batch_size = 8;
    run.data.max_prompt_length = 256;
    run.grpo.max_completion_length = 3900;
    let e = err(&run, Algo::Grpo);
    assert!(
        e.contains("grpo.max_completion_length") && e.contains("4156") && e.contains("4096"),
        "{e}"
    );
    let mut run = cuda_run();
    run.data.max_length = 8192;
    let e = err(&run, Algo::Dpo);
    assert!(
        e.contains("data.max_length") && e.contains("max_position_embeddings 4096"),
        "{e}"
    );
    // With rope scaling the same length is the user's call.
    let mut scaled = m.clone();
    scaled.rope_scaling = Some(crate::model::config::RopeScaling::Linear { factor: 2.0 });
    plan(&run, &scaled, Algo::Dpo).unwrap();

    let mut run = cuda_run();
    run.ppo.reward_adapter = Some("a".into());
    run.ppo.reward_model_path = Some("b".into());
    let e = err(&run, Algo::Ppo);
    assert!(
        e.contains("ppo.reward_adapter") && e.contains("ppo.reward_model_path"),
        "{e}"
    );

    let mut run = cuda_run();
    run.train.batch_size = 8;
    run.grpo.max_completion_length = 0;
    assert!(err(&run, Algo::Grpo).contains("grpo.max_completion_length"));
    let mut run = cuda_run();
    run.lora.target_modules.clear();
    assert!(err(&run, Algo::Dpo).contains("lora.target_modules"));
}

#[test]
fn table_json_and_summary() {
    let m = model("llama-20b-class");
    let p = plan(&config("20b-grpo-24gb.toml"), &m, Algo::Grpo).unwrap();
    let table = render_table(&p);
    assert!(table.contains(&format!("*{}", p.peak_phase)), "{table}");
    for t in &p.terms {
        assert!(table.contains(t.name), "{table}");
    }
    // Totals are the column sums.
    for (i, total) in p.totals.iter().enumerate() {
        assert_eq!(*total, p.terms.iter().map(|t| t.bytes[i]).sum::<u64>());
    }
    assert_eq!(p.peak_bytes, *p.totals.iter().max().unwrap());
    let v = serde_json::to_value(&p).unwrap();
    assert_eq!(v["algo"], "grpo");
    assert_eq!(v["phases"][3], "train_step");
    assert_eq!(v["fits"], true);
    assert!(summary_line(&p).contains("fits"));

    let p = plan(
        &config("70b-dpo-24gb.toml"),
        &model("llama-3-70b"),
        Algo::Dpo,
    )
    .unwrap();
    assert!(
        summary_line(&p).contains("does NOT fit"),
        "{}",
        summary_line(&p)
    );
    assert!(render_table(&p).contains("plan.budget_gib"));
}

#[test]
fn plans_a_70b_config_in_well_under_a_second() {
    let m = model("llama-3-70b");
    let run = config("70b-ppo-24gb.toml");
    let t = Instant::now();
    let p = plan(&run, &m, Algo::Ppo).unwrap();
    let took = t.elapsed();
    assert!(!p.suggestions.is_empty());
    assert!(took.as_secs_f64() < 0.25, "{took:?}");
}

#[test]
fn algo_from_names() {
    assert_eq!(
        algo_from_file_name(Path::new("configs/20b-grpo-24gb.toml")),
        Some(Algo::Grpo)
    );
    assert_eq!(algo_from_file_name(Path::new("my_rm.toml")), Some(Algo::Rm));
    assert_eq!(algo_from_file_name(Path::new("run.toml")), None);
    assert_eq!("ppo".parse::<Algo>().unwrap(), Algo::Ppo);
    assert_eq!(
        algo_from_file_name(Path::new("configs/sft-smollm2.toml")),
        Some(Algo::Sft)
    );
    assert_eq!("sft".parse::<Algo>().unwrap(), Algo::Sft);
    let e = "kto".parse::<Algo>().unwrap_err().to_string();
    assert!(e.contains("sft, dpo"), "{e}");
}

#[test]
fn sft_is_one_policy_pass_without_reference() {
    let m = model("llama-2-7b");
    let mut run = cuda_run();
    run.lora.r = 8;
    run.train.batch_size = 2;
    run.data.max_length = 512;
    let p = plan(&run, &m, Algo::Sft).unwrap();
    assert_eq!(p.phases, vec![Phase::Load, Phase::TrainStep]);
    assert_eq!(p.peak_bytes, sft_plan(&run, &m, 2, 512).peak_bytes);
    // DPO at the same batch runs twice the rows, plus a reference pass.
    let dpo = plan(&run, &m, Algo::Dpo).unwrap();
    assert!(dpo.peak_bytes > p.peak_bytes);
    assert_eq!(
        dpo.tensor_peak_bytes,
        sft_plan(&run, &m, 4, 512).tensor_peak_bytes
    );
}

#[test]
fn an_initial_reference_counts_one_more_frozen_adapter() {
    let m = model("llama-2-7b");
    let mut run = cuda_run();
    run.lora.r = 8;
    run.train.batch_size = 8;
    run.data.max_length = 512;
    let base = plan(&run, &m, Algo::Dpo).unwrap();
    run.model.adapter = Some(PathBuf::from("sft/policy"));
    for algo in [Algo::Dpo, Algo::Grpo] {
        let before = plan(
            &RunConfig {
                model: ModelConfig {
                    adapter: None,
                    ..run.model.clone()
                },
                ..run.clone()
            },
            &m,
            algo,
        )
        .unwrap();
        let after = plan(&run, &m, algo).unwrap();
        for phase in [Phase::Load, Phase::TrainStep] {
            assert_eq!(
                after.bytes_of(T_ADAPTERS, phase),
                2 * before.bytes_of(T_ADAPTERS, phase),
                "{algo:?} {phase:?}"
            );
            // Frozen: no gradients or optimizer state of its own.
            assert_eq!(
                after.bytes_of(T_GRADS, phase),
                before.bytes_of(T_GRADS, phase)
            );
            assert_eq!(
                after.bytes_of(T_MOMENTS, phase),
                before.bytes_of(T_MOMENTS, phase)
            );
        }
        let term = after.terms.iter().find(|t| t.name == T_ADAPTERS).unwrap();
        assert!(
            term.detail.starts_with("2 x ")
                && term.detail.contains("reference (frozen initial adapter)"),
            "{}",
            term.detail
        );
    }
    // PPO: policy, value and reward adapters, plus the frozen reference.
    let one = base.bytes_of(T_ADAPTERS, Phase::Load);
    let ppo = plan(&run, &m, Algo::Ppo).unwrap();
    assert_eq!(ppo.bytes_of(T_ADAPTERS, Phase::Load), 4 * one);
    // `reference = "base"` with the same start adapter: adapters off, nothing more.
    run.model.reference = Some(ReferenceModel::Base);
    let p = plan(&run, &m, Algo::Dpo).unwrap();
    assert_eq!(
        p.bytes_of(T_ADAPTERS, Phase::Load),
        base.bytes_of(T_ADAPTERS, Phase::Load)
    );
    // SFT has no reference pass: the start adapter alone.
    run.model.reference = None;
    let sft = plan(&run, &m, Algo::Sft).unwrap();
    assert_eq!(
        sft.bytes_of(T_ADAPTERS, Phase::Load),
        base.bytes_of(T_ADAPTERS, Phase::Load)
    );
}

#[test]
fn long_rows_plan_attention_and_mlp_linear_in_the_row_length() {
    // The shipped 16K-token 8b DPO config fits a 24 GiB card, its attention in query blocks.
    let run = config("8b-dpo-16k-24gb.toml");
    let m = model("llama-3.1-8b");
    let p = plan(&run, &m, Algo::Dpo).unwrap();
    assert!(p.fits, "{}", p.verdict);
    assert!(
        crate::model::ops::attention_query_block(2, 32, 8, 16_384, 16_384).is_some(),
        "16K-token rows run attention in query blocks"
    );
    // Doubling the rows' length at most doubles the training step's block workspace (whole
    // scores would quadruple it: 64 GiB at 16K tokens).
    let block = |len: usize| {
        let mut r = run.clone();
        r.data.max_length = len;
        r.data.max_prompt_length = len / 2;
        r.plan.budget_gib = 1000.0;
        plan(&r, &m, Algo::Dpo)
            .unwrap()
            .bytes_of(T_BLOCK, Phase::TrainStep)
    };
    let (b8, b16) = (block(8_192), block(16_384));
    assert!(
        b16 <= 2 * b8 + (64 << 20),
        "block workspace 8K {b8} -> 16K {b16}"
    );
    assert!(b16 < 5 * GIB_U, "{b16}");
}
