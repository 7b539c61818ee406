//! A separate reward model (`ppo.reward_model_path`, GRPO's `type = "reward_model"`): a
//! `*ForSequenceClassification` folder written by `rlhf merge` from a reward adapter scores as
//! that adapter + head does on the base; a reward model with another vocabulary reads the
//! rollouts re-tokenized; `rlhf ppo` and `rlhf grpo` run with one; broken folders are one-line
//! errors naming the key and the file.

mod common;
use burn::backend::Autodiff;
use burn::tensor::Tensor;
use common::*;
use rlhf::cli::setup::CpuBackend as B;
use rlhf::engine::{new_head, RlhfModel, SeparateReward, HEAD_KEY};
use rlhf::model::lora::Adapter;
use rlhf::model::reward_model::RewardModel;
use rlhf::model::{Llama, LoadOptions};
use rlhf::tokenizer::Tok;
use rlhf_algorithms::trainer::{PolicyModel, Role, TokenBatch};
use std::path::{Path, PathBuf};

type Ad = Autodiff<B>;
const KEY: &str = "ppo.reward_model_path";

/// The tiny base in `dir/model`, a random reward adapter + head saved in `dir/adapter` and
/// merged by `rlhf merge` into `dir/rm`. Returns the adapter and head.
fn merged_reward_model(dir: &Path, seed: u64) -> (Adapter<Ad>, Tensor<Ad, 2>) {
    if !dir.join("model").exists() {
        write_tiny_model(&dir.join("model"), seed);
    }
    let opts = LoadOptions { quantize: false };
    let base = Llama::<Ad>::from_hf_dir(&dir.join("model"), opts, &Default::default()).unwrap();
    let adapter = random_adapter::<Ad>(
        "reward",
        &base.cfg,
        &rlhf::config::ALL_TARGETS,
        0.05,
        seed + 1,
    );
    let head = new_head::<Ad>(32, seed + 2, &Default::default()) * 20.0;
    adapter
        .save_peft(
            &dir.join("adapter"),
            "model",
            &[(HEAD_KEY.to_string(), head.clone())],
        )
        .unwrap();
    merge_in(dir, "rm", &["--dtype", "f32"]);
    (adapter, head)
}

/// The base + reward adapter + head through the engine's reward-adapter path (PPO's reward role).
fn adapter_model(
    dir: &Path,
    quantize: bool,
    adapter: &Adapter<Ad>,
    head: &Tensor<Ad, 2>,
) -> RlhfModel<Ad> {
    let opts = LoadOptions { quantize };
    let base = Llama::<Ad>::from_hf_dir(&dir.join("model"), opts, &Default::default()).unwrap();
    let mut m = RlhfModel::new(base);
    m.adapters.insert(Role::Reward, adapter.clone());
    m.heads.insert(Role::Reward, head.clone());
    m
}

/// Prompt + completion rows of varied lengths (no id 2: the merged config's pad id is eos = 2).
fn rollout() -> TokenBatch {
    let mut rng = Rng::new(5);
    let rows: Vec<(Vec<u32>, Vec<u32>)> = (0..16)
        .map(|_| {
            let ids = |n: usize, rng: &mut Rng| -> Vec<u32> {
                (0..n).map(|_| 3 + rng.below(42) as u32).collect()
            };
            let (np, nc) = (1 + rng.below(4), 1 + rng.below(6));
            let mut p = vec![1];
            p.extend(ids(np, &mut rng));
            (p, ids(nc, &mut rng))
        })
        .collect();
    let pairs: Vec<(&[u32], &[u32])> = rows
        .iter()
        .map(|(p, c)| (p.as_slice(), c.as_slice()))
        .collect();
    TokenBatch::from_pairs(&pairs, 0)
}

/// The merged weights as a causal LM through the policy loader (its LM head tied, unused),
/// quantized or not, with `head` applied at each row's last real token: what the separate reward
/// model must compute.
fn merged_reference(dir: &Path, quantize: bool, head: &Tensor<Ad, 2>, tb: &TokenBatch) -> Vec<f32> {
    let view = dir.join(format!("view-{quantize}"));
    std::fs::create_dir_all(&view).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("rm/config.json")).unwrap())
            .unwrap();
    cfg["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    cfg["tie_word_embeddings"] = serde_json::json!(true);
    std::fs::write(view.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        dir.join("rm/model.safetensors"),
        view.join("model.safetensors"),
    )
    .unwrap();
    let m = Llama::<B>::from_hf_dir(&view, LoadOptions { quantize }, &Default::default()).unwrap();
    let batch = rlhf::model::Batch::new(&tb.ids, tb.valid.clone(), &m.device);
    let hidden = m.forward_hidden(&batch, None, None);
    let [b, t, h] = hidden.dims();
    let hidden: Vec<f32> = hidden.into_data().convert::<f32>().to_vec().unwrap();
    let w: Vec<f32> = head.clone().into_data().convert::<f32>().to_vec().unwrap();
    tb.last_index()
        .iter()
        .enumerate()
        .map(|(i, &j)| {
            let row = &hidden[(i * t + j) * h..(i * t + j + 1) * h];
            row.iter().zip(&w).map(|(x, y)| x * y).sum()
        })
        .take(b)
        .collect()
}

fn mean_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

fn scores(model: &RlhfModel<Ad>, tb: &TokenBatch) -> Vec<f32> {
    let t = model.sequence_scores(Role::Reward, tb).unwrap();
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn with_separate(dir: &Path, quantize: bool) -> RlhfModel<Ad> {
    let rm = RewardModel::<B>::load(&dir.join("rm"), KEY, quantize, &Default::default()).unwrap();
    let tok = Tok::from_file(dir.join("model/tokenizer.json")).unwrap();
    let scorer = SeparateReward::new(rm, &tok, false, 64, "reward_model");
    assert!(scorer.same_vocab(), "merge copies the base's tokenizer");
    // Any base serves: the reward role no longer reads it.
    let base = Llama::<Ad>::from_hf_dir(
        &dir.join("model"),
        LoadOptions { quantize: false },
        &Default::default(),
    )
    .unwrap();
    let mut m = RlhfModel::new(base);
    m.reward_model = Some(Box::new(scorer));
    m
}

#[test]
fn separate_reward_model_scores_as_the_reward_adapter_it_was_merged_from() {
    let dir = tempfile::tempdir().unwrap();
    let (adapter, head) = merged_reward_model(dir.path(), 11);
    let tb = rollout();
    // f32 reference: the unquantized base + adapter + head (the existing reward path).
    let want = scores(&adapter_model(dir.path(), false, &adapter, &head), &tb);
    let plain = {
        let mut m = adapter_model(dir.path(), false, &adapter, &head);
        m.adapters.get_mut(&Role::Reward).unwrap().set_tensors(
            adapter
                .tensors()
                .into_iter()
                .map(|t| t.zeros_like())
                .collect::<Vec<_>>()
                .into_iter(),
        );
        scores(&m, &tb)
    };
    let got = scores(&with_separate(dir.path(), false), &tb);
    let (effect, err) = (max_diff(&want, &plain), max_diff(&want, &got));
    println!("scores {want:?}; adapter effect {effect}; separate f32 error {err}");
    assert!(
        effect > 0.1,
        "the adapter barely changes the scores ({effect})"
    );
    assert!(err < 1e-4, "separate reward model differs by {err}");

    // NF4 quantizes the merged weights as the policy base's loader quantizes any base: the
    // separate model gives what that loader gives on the merged folder.
    let nf4_separate = scores(&with_separate(dir.path(), true), &tb);
    let nf4_merged = merged_reference(dir.path(), true, &head, &tb);
    let err_same = max_diff(&nf4_merged, &nf4_separate);
    let err_f32 = max_diff(&merged_reference(dir.path(), false, &head, &tb), &got);
    println!("separate vs loader on the merged folder: nf4 {err_same}, f32 {err_f32}");
    assert!(
        err_same < 1e-4 && err_f32 < 1e-4,
        "nf4 {err_same}, f32 {err_f32}"
    );
    // Against the f32 reference neither NF4 path is exact: the separate model rounds the merged
    // weights, the adapter path the base's (the adapter stays f32). Both round weights of the
    // same size with the same quantizer, so their mean errors over the rows are of one order
    // (the tiny model, hidden 32 and a head scaled by 20, makes both large in absolute terms).
    let nf4_adapter = scores(&adapter_model(dir.path(), true, &adapter, &head), &tb);
    let (mean_adapter, mean_separate) = (
        mean_diff(&want, &nf4_adapter),
        mean_diff(&want, &nf4_separate),
    );
    println!("nf4 mean error vs f32: adapter path {mean_adapter}, separate {mean_separate}");
    assert!(
        mean_separate > 1e-4,
        "NF4 did not quantize the reward model"
    );
    assert!(
        mean_separate < 3.0 * mean_adapter && mean_adapter < 3.0 * mean_separate,
        "NF4 mean errors: separate {mean_separate}, adapter path {mean_adapter}"
    );
}

#[test]
fn the_plan_counts_the_bytes_the_reward_model_holds() {
    let dir = tempfile::tempdir().unwrap();
    merged_reward_model(dir.path(), 13);
    let rm_dir = dir.path().join("rm");
    let base = rlhf::model::LlamaConfig::from_file(&dir.path().join("model/config.json")).unwrap();
    for quantize in [true, false] {
        let rm = RewardModel::<B>::load(&rm_dir, KEY, quantize, &Default::default()).unwrap();
        let text = format!(
            "[model]\npath = {:?}\nquantize = {:?}\ndevice = \"cpu\"\n[data]\nmax_prompt_length = 16\n[ppo]\nresponse_length = 8\nreward_model_path = {rm_dir:?}\n",
            dir.path().join("model"),
            if quantize { "nf4" } else { "none" }
        );
        let run = rlhf::config::RunConfig::parse(&text, Path::new("run.toml")).unwrap();
        let plan = rlhf::plan::plan(&run, &base, rlhf::plan::Algo::Ppo).unwrap();
        let planned = plan.bytes_of(rlhf::plan::T_REWARD_MODEL, rlhf::plan::Phase::Load);
        println!(
            "quantize {quantize}: planned {planned} B, held {} B",
            rm.storage_bytes()
        );
        assert_eq!(planned, rm.storage_bytes() as u64, "quantize {quantize}");
    }
}

/// Rewrites `dir/tokenizer.json` with the word tokens in reverse id order (specials kept).
fn reverse_words(dir: &Path) {
    let path = dir.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    for i in 0..WORDS {
        vocab.insert(format!("w{i}"), serde_json::json!(5 + WORDS - 1 - i));
    }
    std::fs::write(&path, tok.to_string()).unwrap();
}

#[test]
fn a_reward_model_with_another_vocabulary_reads_re_tokenized_text() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(&dir.path().join("model"), 21);
    reverse_words(&dir.path().join("model"));
    merged_reward_model(dir.path(), 21);
    let policy_dir = dir.path().join("policy");
    write_tiny_model(&policy_dir, 22);
    let policy_tok = Tok::from_file(policy_dir.join("tokenizer.json")).unwrap();
    let rm =
        RewardModel::<B>::load(&dir.path().join("rm"), KEY, false, &Default::default()).unwrap();
    let scorer = SeparateReward::new(rm, &policy_tok, false, 64, "reward_model");
    assert!(!scorer.same_vocab());

    // Policy ids: <s> w3 w7 | w10 MARK w0 </s>, and a shorter row padded.
    let w = |i: u32| 5 + i;
    let rows: Vec<(Vec<u32>, Vec<u32>)> = vec![
        (vec![1, w(3), w(7)], vec![w(10), 4, w(0), 2]),
        (vec![1, w(39)], vec![w(1)]),
    ];
    let pairs: Vec<(&[u32], &[u32])> = rows
        .iter()
        .map(|(p, c)| (p.as_slice(), c.as_slice()))
        .collect();
    let tb = TokenBatch::from_pairs(&pairs, 0);
    let got = scorer.rows_for_tokens(&tb).unwrap();
    // The reward model's ids: special tokens dropped, word i at 5 + 39 - i, MARK unchanged.
    let r = |i: u32| 5 + 39 - i;
    assert_eq!(
        got,
        vec![vec![r(3), r(7), r(10), 4, r(0)], vec![r(39), r(1)]]
    );
    // Those are the ids it scores.
    let direct = scorer.score_ids(&got).unwrap();
    let via_batch = rlhf::engine::SequenceScorer::score_tokens(&scorer, &tb).unwrap();
    assert!(max_diff(&direct, &via_batch) < 1e-6);
    // Scoring the policy's ids unchanged would give other rewards.
    let raw: Vec<Vec<u32>> = rows
        .iter()
        .map(|(p, c)| p.iter().chain(c).copied().filter(|&i| i > 3).collect())
        .collect();
    let wrong = scorer.score_ids(&raw).unwrap();
    assert!(
        max_diff(&direct, &wrong) > 1e-3,
        "the vocabularies should matter"
    );

    // Truncation keeps the end of the sequence (and a leading BOS when there is one).
    let short = SeparateReward::new(
        RewardModel::<B>::load(&dir.path().join("rm"), KEY, false, &Default::default()).unwrap(),
        &policy_tok,
        false,
        3,
        "reward_model",
    );
    assert_eq!(short.rows_for_tokens(&tb).unwrap()[0], vec![r(10), 4, r(0)]);
}

#[test]
fn a_conversation_is_rendered_with_the_reward_models_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(&dir.path().join("model"), 23);
    reverse_words(&dir.path().join("model"));
    merged_reward_model(dir.path(), 23);
    let tc = dir.path().join("rm/tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
    config["chat_template"] = serde_json::json!(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    );
    std::fs::write(&tc, config.to_string()).unwrap();
    let policy_dir = dir.path().join("policy");
    write_tiny_model(&policy_dir, 24);
    let policy_tok = Tok::from_file(policy_dir.join("tokenizer.json")).unwrap();
    let load =
        || RewardModel::<B>::load(&dir.path().join("rm"), KEY, false, &Default::default()).unwrap();
    let mut scorer = SeparateReward::new(load(), &policy_tok, true, 64, "reward_model");
    let w = |i: u32| 5 + i;
    let prompt = vec![1, w(3), w(7)];
    let text = "<s> w3 w7".to_string();
    let messages = vec![rlhf::tokenizer::ChatMessage::new("user", "w3 w7")];
    scorer.add_conversation(prompt.clone(), text.clone(), messages);
    let other = vec![1, w(5)];
    let completion = vec![w(10), 4, w(0), 2];
    let tb = TokenBatch::from_pairs(
        &[
            (prompt.as_slice(), completion.as_slice()),
            (other.as_slice(), &completion),
        ],
        0,
    );
    // "user: w3 w7 assistant: w10 MARK w0 ": the role words are unknown (id 3) to the reward
    // model's word-level vocabulary, its words are in reverse order, MARK is 4.
    let r = |i: u32| 5 + 39 - i;
    let chat = vec![3, r(3), r(7), 3, r(10), 4, r(0)];
    let rows = scorer.rows_for_tokens(&tb).unwrap();
    assert_eq!(rows[0], chat);
    // A prompt that was not a conversation is read as plain text.
    assert_eq!(rows[1], vec![r(5), r(10), 4, r(0)]);
    // GRPO hands the prompt as its rendered text: the same conversation is found.
    let prompts = vec![text, "w5".to_string()];
    let completions = vec!["w10 MARK w0".to_string(), " w10".to_string()];
    let columns = vec![serde_json::Map::new(); 2];
    let batch = rlhf_rewards::RewardBatch::new(&prompts, &completions, &columns).unwrap();
    let rows = scorer.rows_for_texts(&batch).unwrap();
    assert_eq!(rows, vec![chat, vec![r(5), r(10)]]);
    // Without chat templates in the run, the template is not used.
    let plain = SeparateReward::new(load(), &policy_tok, false, 64, "reward_model");
    assert_eq!(
        plain.rows_for_tokens(&tb).unwrap()[0],
        vec![r(3), r(7), r(10), 4, r(0)]
    );
}

/// A PPO or GRPO run on the tiny model, reading prompts from the marker pairs.
fn run_with(run: &Run, name: &str, body: &str) -> std::process::Output {
    let cfg = run.config(&format!("{name}.toml"), name, body);
    rlhf_with(
        &[
            name.split('-').next().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ],
        None,
    )
}

const PPO: &str = "batch_size = 4\nmax_steps = 2\nlearning_rate = 0.01\nsave_steps = 1000\n\n[lora]\nr = 4\nalpha = 8.0\n\n[generation]\ntemperature = 1.0\n\n[ppo]\nresponse_length = 4\n";

/// A run folder with the tiny model and a merged reward model of it in `rm/`.
fn run_with_reward_model(seed: u64) -> (Run, PathBuf) {
    let run = Run::new(seed);
    merged_reward_model(run.dir.path(), seed);
    let rm = run.path("rm");
    (run, rm)
}

#[test]
fn ppo_and_grpo_run_with_a_separate_reward_model() {
    let (run, rm) = run_with_reward_model(31);
    let body = format!("{PPO}reward_model_path = {rm:?}\n");
    let out = run_with(&run, "ppo", &body);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rlhf ppo failed: {stderr}");
    assert!(run.path("ppo/policy/adapter_model.safetensors").exists());
    assert!(run.path("ppo/value/adapter_model.safetensors").exists());
    let lines = std::fs::read_to_string(run.path("ppo/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2, "{lines}");
    let scored = lines.lines().any(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["objective/scores"].as_f64().is_some_and(f64::is_finite)
    });
    assert!(scored, "no reward-model score logged: {lines}");

    let grpo = format!(
        "batch_size = 4\nmax_steps = 2\nlearning_rate = 0.01\nsave_steps = 1000\nlogging_steps = 1\n\n[lora]\nr = 4\nalpha = 8.0\n\n[generation]\ntemperature = 1.0\n\n[grpo]\nnum_generations = 4\nmax_completion_length = 4\n\n[[grpo.rewards]]\ntype = \"reward_model\"\npath = {rm:?}\nname = \"rm\"\n\n[[grpo.rewards]]\ntype = \"contains\"\ntext = \"MARK\"\nweight = 0.5\n"
    );
    let out = run_with(&run, "grpo", &grpo);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rlhf grpo failed: {stderr}");
    let lines = std::fs::read_to_string(run.path("grpo/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2, "{lines}");
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    let mean = first["rewards/rm/mean"].as_f64().unwrap();
    let std = first["rewards/rm/std"].as_f64().unwrap();
    assert!(mean.is_finite() && std > 0.0, "{first}");
    assert!(run.path("grpo/policy/adapter_model.safetensors").exists());

    // `rlhf plan` counts the second base for both.
    for (algo, body) in [("ppo", body.as_str()), ("grpo", grpo.as_str())] {
        let cfg = run.config(&format!("plan-{algo}.toml"), "plan-out", body);
        let table = rlhf(&["plan", "--config", cfg.to_str().unwrap(), "--algo", algo]);
        assert!(table.contains("separate checkpoint"), "{table}");
        assert!(
            table.contains("reward model") || table.contains("[reward]"),
            "{table}"
        );
    }
}

/// The error line of a PPO run whose `ppo.reward_model_path` is `rm`, asserting exit code 2.
fn ppo_error(run: &Run, rm: &Path) -> String {
    let body = format!("{PPO}reward_model_path = {rm:?}\n");
    let out = run_with(run, "ppo-bad", &body);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains(KEY), "{stderr}");
    errors[0].to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn broken_reward_model_folders_are_one_line_errors() {
    let (run, rm) = run_with_reward_model(41);
    let at = |name: &str| run.path(name);

    let e = ppo_error(&run, &at("no-such-rm"));
    assert!(e.contains("no-such-rm") && e.contains("not found"), "{e}");

    copy_dir(&rm, &at("two-labels"));
    edit_config(&at("two-labels"), |v| {
        v["num_labels"] = serde_json::json!(2)
    });
    let e = ppo_error(&run, &at("two-labels"));
    assert!(
        e.contains("config.json") && e.contains("num_labels is 2"),
        "{e}"
    );

    copy_dir(&rm, &at("gpt2"));
    edit_config(&at("gpt2"), |v| {
        v["architectures"] = serde_json::json!(["GPT2ForSequenceClassification"])
    });
    let e = ppo_error(&run, &at("gpt2"));
    assert!(
        e.contains("config.json")
            && e.contains("unsupported architecture `GPT2ForSequenceClassification`"),
        "{e}"
    );

    // A causal LM is not a reward model.
    copy_dir(&run.path("model"), &at("causal"));
    let e = ppo_error(&run, &at("causal"));
    assert!(e.contains("LlamaForCausalLM"), "{e}");

    // A classifier config over weights without `score.weight`.
    copy_dir(&run.path("model"), &at("headless"));
    edit_config(&at("headless"), |v| {
        v["architectures"] = serde_json::json!(["LlamaForSequenceClassification"]);
        v["num_labels"] = serde_json::json!(1);
    });
    let e = ppo_error(&run, &at("headless"));
    assert!(
        e.contains("model.safetensors") && e.contains("score.weight"),
        "{e}"
    );

    copy_dir(&rm, &at("no-tokenizer"));
    std::fs::remove_file(at("no-tokenizer/tokenizer.json")).unwrap();
    let e = ppo_error(&run, &at("no-tokenizer"));
    assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");

    // GRPO names its reward entry.
    let body = format!(
        "batch_size = 4\nmax_steps = 1\n\n[grpo]\nnum_generations = 4\nmax_completion_length = 4\n\n[[grpo.rewards]]\ntype = \"contains\"\ntext = \"MARK\"\n\n[[grpo.rewards]]\ntype = \"reward_model\"\npath = {:?}\n",
        at("two-labels")
    );
    let out = run_with(&run, "grpo-bad", &body);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("error:")
            && stderr.contains("grpo.rewards[1].path")
            && stderr.contains("num_labels is 2"),
        "{stderr}"
    );
}

/// The rollout's scoring passes (`score_logps`, `score_heads`) give the training forward's
/// numbers without gradients, and an evaluation (`set_graphs(false)`) passes none back. (That they
/// record no graph at all, rather than one detached afterwards, shows on the GPU: a detached
/// graph keeps its checkpoints until the next backward; BENCHMARKS.md, PPO's rows.)
#[test]
fn scoring_passes_match_the_training_forward_without_gradients() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(&dir.path().join("model"), 31);
    let opts = LoadOptions { quantize: true };
    let base =
        Llama::<Ad>::from_hf_dir(&dir.path().join("model"), opts, &Default::default()).unwrap();
    let mut adapter =
        random_adapter::<Ad>("policy", &base.cfg, &rlhf::config::ALL_TARGETS, 0.05, 32);
    let tracked: Vec<_> = adapter
        .tensors()
        .into_iter()
        .map(|t| t.require_grad())
        .collect();
    adapter.set_tensors(tracked.into_iter());
    let b = adapter.tensors()[1].clone();
    let head = (new_head::<Ad>(32, 33, &Default::default()) * 20.0).require_grad();
    let mut m = RlhfModel::new(base);
    m.adapters.insert(Role::Policy, adapter.clone());
    m.adapters.insert(Role::Value, adapter);
    m.heads.insert(Role::Value, head);
    let tb = rollout();
    let values = |t: &Tensor<Ad, 2>| {
        t.clone()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap()
    };
    // Whether back-propagating `t` reaches the adapter (its first module's B factor).
    let reaches = |t: Tensor<Ad, 2>| b.grad(&t.sum().backward()).is_some();

    let train = m.token_logps(Role::Policy, &tb, 0.7).unwrap();
    let score = m.score_logps(Role::Policy, &tb, 0.7).unwrap();
    let d = mean_diff(&values(&train), &values(&score));
    assert!(d < 1e-5, "log-probs differ by {d}");
    assert!(reaches(train) && !reaches(score));

    let train = m.head_scores(Role::Value, &tb).unwrap();
    let score = m.score_heads(Role::Value, &tb).unwrap();
    let d = mean_diff(&values(&train), &values(&score));
    assert!(d < 1e-4, "value predictions differ by {d}");
    assert!(reaches(train) && !reaches(score));

    m.set_graphs(false);
    assert!(!reaches(m.token_logps(Role::Policy, &tb, 1.0).unwrap()));
    assert!(!reaches(m.head_scores(Role::Value, &tb).unwrap()));
    m.set_graphs(true);
    assert!(reaches(m.token_logps(Role::Policy, &tb, 1.0).unwrap()));
}
