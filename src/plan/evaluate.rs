//! Evaluation: what is alive in each phase of a workload, summed into the plan's terms.

use super::formulas::{
    backward_bytes_per_token, dense_params, inference_bytes_per_token, kv_cache_bytes,
    largest_linear, linear_weight_bytes, lora_params, lora_params_per_layer, saved_bytes_per_token,
};
use super::workload::workload;
use super::{
    count, engine_mlp_rows, logits_rows, phase_tensor_bytes, Algo, Item, Life, ModelSummary, Pass,
    PassKind, Phase, Plan, RewardSource, Setup, Term, Workload, CALIBRATION, GIB,
    ROLLOUT_BYTES_PER_TOKEN, TERM_ORDER, T_ADAPTERS, T_ATTENTION, T_BLOCK, T_CONTEXT, T_DENSE,
    T_GRADS, T_HEADS, T_KEPT, T_KV, T_LINEARS, T_LOGITS, T_MOMENTS, T_REWARD_MODEL, T_ROLLOUT,
    T_SAMPLING, T_SLACK, T_STAGING, T_WORKSPACE,
};
use crate::config::{Device, Quantize, RunConfig};
use crate::model::config::LlamaConfig;
use anyhow::Result;

fn item(name: &'static str, life: Life, bytes: u64, detail: String) -> Item {
    Item {
        name,
        life,
        bytes,
        detail,
    }
}
pub(super) fn plan_with(
    run: &RunConfig,
    model: &LlamaConfig,
    reward: &RewardSource,
    algo: Algo,
) -> Result<Plan> {
    let w = workload(run, model, reward, algo)?;
    Ok(evaluate(run, model, reward, algo, w))
}
/// Sums what is alive in each phase of `w`.
pub(super) fn evaluate(
    run: &RunConfig,
    model: &LlamaConfig,
    reward: &RewardSource,
    algo: Algo,
    w: Workload,
) -> Plan {
    let reward_model = match reward {
        RewardSource::Checkpoint { config, .. } => Some(config.as_deref().unwrap_or(model)),
        _ => None,
    };
    let s = Setup {
        run,
        base: model,
        reward_model,
        d: run.model.dtype.bytes() as u64,
        cuda: run.model.device == Device::Cuda,
        engine: run.model.device == Device::Cuda
            && run.model.dtype == crate::config::Dtype::F32
            && run.model.quantize == Quantize::Nf4,
    };
    let per_phase: Vec<(Phase, Vec<Item>)> = w
        .phases
        .iter()
        .map(|(ph, passes)| (*ph, phase_items(&s, &w, *ph, passes)))
        .collect();
    assemble(&s, algo, w.notes, per_phase)
}
fn phase_items(s: &Setup, w: &Workload, phase: Phase, passes: &[Pass]) -> Vec<Item> {
    let (run, m, d) = (s.run, s.base, s.d);
    let l = m.num_hidden_layers as u64;
    let cal = &CALIBRATION;
    let mut items = Vec::new();
    if s.cuda {
        items.push(item(
            T_CONTEXT,
            Life::Fixed,
            cal.cuda_context_bytes as u64,
            "CALIBRATION.cuda_context_bytes: CUDA context, cuBLASLt, kernels".into(),
        ));
    }
    // Base weights.
    let lin_params = m.block_linear_params() as u64 * l;
    let (lin_bytes, lin_detail) = match run.model.quantize {
        Quantize::Nf4 => {
            let b = linear_weight_bytes(m, Quantize::Nf4, d);
            (
                b,
                format!(
                    "{l} layers x 7 linears = {} params in nf4+dq ({:.3} bits/param)",
                    count(lin_params),
                    b as f64 * 8.0 / lin_params as f64
                ),
            )
        }
        Quantize::None => (
            linear_weight_bytes(m, Quantize::None, d),
            format!("{} params x {d} B (quantize = none)", count(lin_params)),
        ),
    };
    items.push(item(T_LINEARS, Life::Persistent, lin_bytes, lin_detail));
    let dense = dense_params(m);
    let norms = (2 * l + 1) * m.hidden_size as u64;
    // The engine keeps frozen embedding tables in bf16 on CUDA (`model::ops::dense_at_rest`).
    let dense_bytes = if s.engine {
        (dense - norms) * 2 + norms * 4
    } else {
        dense * d
    };
    items.push(item(
        T_DENSE,
        Life::Persistent,
        dense_bytes,
        format!(
            "{} params x {} B (embeddings{}, {} norms)",
            count(dense),
            if s.engine {
                "2 (4 for norms)".to_string()
            } else {
                d.to_string()
            },
            if m.tie_word_embeddings {
                ", lm_head tied"
            } else {
                " + lm_head"
            },
            2 * l + 1
        ),
    ));
    if phase == Phase::Load && run.model.quantize == Quantize::Nf4 {
        let n = largest_linear(m);
        items.push(item(
            T_STAGING,
            Life::Transient,
            4 * n,
            format!(
                "largest linear {} params x 4 B (f32 while quantized)",
                count(n)
            ),
        ));
    }
    if let Some(rm) = s.reward_model {
        // A sequence-classification model as `model::reward_model` loads it: its linears
        // quantized as the base's, the embedding table (lookup only: bf16 in the CUDA engine),
        // norms and biases, a 1-wide score head; no lm_head.
        let lin = linear_weight_bytes(rm, run.model.quantize, d);
        let (h, l) = (rm.hidden_size as u64, rm.num_hidden_layers as u64);
        let table = rm.vocab_size as u64 * h;
        let lm_head = if rm.tie_word_embeddings { 0 } else { table };
        let rest = dense_params(rm) - table - lm_head + h;
        let table_b = if s.engine { 2 } else { d };
        let storage = match run.model.quantize {
            Quantize::Nf4 => "nf4+dq",
            Quantize::None => "dense",
        };
        items.push(item(
            T_REWARD_MODEL,
            Life::Persistent,
            lin + table * table_b + rest * d,
            format!(
                "separate checkpoint: {} linear params {storage} + {} embeddings x {table_b} B + {} norms/biases/score x {d} B ({l} layers)",
                count(rm.block_linear_params() as u64 * l),
                count(table),
                count(rest)
            ),
        ));
    }
    // Adapters, their gradients and optimizer state.
    let per_adapter = lora_params(m, &run.lora);
    let n_adapters = w.adapters.len() as u64;
    let trainable = w.adapters.iter().filter(|a| a.1).count() as u64;
    let roles: Vec<&str> = w.adapters.iter().map(|a| a.0).collect();
    items.push(item(
        T_ADAPTERS,
        Life::Persistent,
        n_adapters * per_adapter * 4,
        format!(
            "{n_adapters} x {} params x 4 B ({}; r = {})",
            count(per_adapter),
            roles.join(", "),
            run.lora.r
        ),
    ));
    let accumulating = run.train.gradient_accumulation_steps > 1;
    // The engine creates adapter gradients layer by layer in backward while it releases the
    // checkpoints; none exist yet at its measured high points (logits pass, top block).
    let grads_alive = trainable > 0
        && (!s.engine || accumulating)
        && (phase == Phase::TrainStep || (phase != Phase::Load && accumulating));
    if grads_alive {
        items.push(item(
            T_GRADS,
            Life::Persistent,
            trainable * per_adapter * 4,
            format!(
                "{trainable} x {} params x 4 B{}",
                count(per_adapter),
                if accumulating && phase != Phase::TrainStep {
                    " (accumulated across micro-batches)"
                } else {
                    ""
                }
            ),
        ));
    }
    let paged = run.optimizer.paged;
    if trainable > 0 && phase != Phase::Load {
        if !paged {
            items.push(item(
                T_MOMENTS,
                Life::Persistent,
                2 * trainable * per_adapter * 4,
                format!("2 x {trainable} x {} params x 4 B", count(per_adapter)),
            ));
        } else if phase == Phase::TrainStep {
            let group = lora_params_per_layer(m, &run.lora);
            items.push(item(
                T_MOMENTS,
                Life::Transient,
                2 * group * 4,
                format!(
                    "paged: one group (one layer of one adapter) = 2 x {} params x 4 B on the GPU",
                    count(group)
                ),
            ));
        }
    }
    if !w.heads.is_empty() {
        let h = m.hidden_size as u64 + 1;
        let n = w.heads.len() as u64;
        let t = w.heads.iter().filter(|x| x.1).count() as u64;
        let mut copies = n;
        if grads_alive {
            copies += t;
        }
        if phase != Phase::Load && !paged {
            copies += 2 * t;
        }
        let names: Vec<&str> = w.heads.iter().map(|x| x.0).collect();
        items.push(item(
            T_HEADS,
            Life::Persistent,
            copies * h * 4,
            format!(
                "{copies} x {h} x 4 B ({}: params, grads, moments)",
                names.join(", ")
            ),
        ));
    }
    if !passes.is_empty() && run.model.quantize == Quantize::Nf4 && !s.engine {
        let n = largest_linear(m).max(s.reward_model.map_or(0, largest_linear));
        items.push(item(
            T_WORKSPACE,
            Life::Transient,
            n * d,
            format!("largest linear {} params x {d} B", count(n)),
        ));
    }
    if let Some((rows, tokens)) = w.rollout {
        if phase != Phase::Load {
            items.push(item(
                T_ROLLOUT,
                Life::Transient,
                rows * tokens * ROLLOUT_BYTES_PER_TOKEN,
                format!("{rows} rows x {tokens} tokens x {ROLLOUT_BYTES_PER_TOKEN} B"),
            ));
        }
    }
    // Passes run one after the other: keep the one with the largest working set. PPO's
    // policy and value terms are back-propagated one after the other, and its rollout scores
    // without graphs, so its step holds one pass's graph at a time too.
    let heaviest = passes
        .iter()
        .map(|p| pass_items(s, p))
        .max_by_key(|v| v.iter().map(|i| i.bytes).sum::<u64>());
    if let Some(v) = heaviest {
        items.extend(v);
    }
    let sum = |life: Life| {
        items
            .iter()
            .filter(|i| i.life == life)
            .map(|i| i.bytes)
            .sum::<u64>()
    };
    let (pers, trans) = (sum(Life::Persistent), sum(Life::Transient));
    let knee = cal.slack_transient_knee as u64;
    items.push(item(
        T_SLACK,
        Life::Fixed,
        (pers as f64 * cal.slack_persistent
            + trans.min(knee) as f64 * cal.slack_transient
            + trans.saturating_sub(knee) as f64 * cal.slack_transient_beyond) as u64,
        format!(
            "{:.0}% of {:.2} GiB persistent + {:.2} GiB transient at {:.0}% up to {:.0} GiB, {:.0}% beyond",
            cal.slack_persistent * 100.0,
            pers as f64 / GIB,
            trans as f64 / GIB,
            cal.slack_transient * 100.0,
            cal.slack_transient_knee / GIB,
            cal.slack_transient_beyond * 100.0,
        ),
    ));
    items
}
/// The working set of one pass: KV cache and sampling (generation), kept activations, the
/// block being processed, attention scores and logits.
fn pass_items(s: &Setup, p: &Pass) -> Vec<Item> {
    let m = if p.reward_model {
        s.reward_model.unwrap_or(s.base)
    } else {
        s.base
    };
    let d = s.d;
    let cal = &CALIBRATION;
    let lora = p.lora.then_some(&s.run.lora);
    let (l, h, a, v) = (
        m.num_hidden_layers as u64,
        m.hidden_size as u64,
        m.num_attention_heads as u64,
        m.vocab_size as u64,
    );
    let (r, t) = (p.rows, p.tokens);
    let n = r * t;
    let tag = |s: String| format!("{s} [{}]", p.label);
    let mut items = Vec::new();
    let logits = |buffers: f64| {
        let want = r * p.logits_tokens;
        let rows = logits_rows(s.run, want);
        let detail = if rows < want {
            format!(
                "chunk of {rows} of {r} x {} tokens, x {v} x 4 B x {buffers} buffers",
                p.logits_tokens
            )
        } else {
            format!(
                "{r} x {} tokens x {v} x 4 B x {buffers} buffers",
                p.logits_tokens
            )
        };
        (((rows * v * 4) as f64 * buffers) as u64, detail)
    };
    if s.engine {
        if let Some(v) = engine_pass_items(s, m, p) {
            return v;
        }
    }
    match p.kind {
        PassKind::Generate { prompt, completion } => {
            items.push(item(
                T_KV,
                Life::Transient,
                kv_cache_bytes(m, prompt + completion, r, d),
                tag(format!(
                    "2 x {l} layers x {} kv heads x {} x {} tokens x {r} rows x {d} B",
                    m.num_key_value_heads,
                    m.head_dim,
                    prompt + completion
                )),
            ));
            items.push(item(
                T_SAMPLING,
                Life::Transient,
                (r as f64 * v as f64 * 4.0 * cal.sampling_buffers) as u64,
                tag(format!("{} x [{r}, {v}] x 4 B", cal.sampling_buffers)),
            ));
            let per_tok = inference_bytes_per_token(m, lora, d);
            let prefill = per_tok * r * prompt;
            // One decode step: one token per row, attention over the whole cache in f32.
            let decode = r * (per_tok + a * t * 4);
            items.push(item(
                T_BLOCK,
                Life::Transient,
                prefill.max(decode),
                tag(format!(
                    "prefill: {per_tok} B/token x {r} x {prompt} tokens"
                )),
            ));
            items.push(item(
                T_ATTENTION,
                Life::Transient,
                2 * r * a * prompt * prompt * d,
                tag(format!(
                    "prefill: 2 x [{r}, {a}, {prompt}, {prompt}] x {d} B (scores and probabilities, no flash kernel)"
                )),
            ));
        }
        PassKind::Forward { grad: false } => {
            let per_tok = inference_bytes_per_token(m, lora, d);
            items.push(item(
                T_BLOCK,
                Life::Transient,
                per_tok * n,
                tag(format!("{per_tok} B/token x {r} x {t} tokens")),
            ));
            items.push(item(
                T_ATTENTION,
                Life::Transient,
                2 * r * a * t * t * d,
                tag(format!(
                    "2 x [{r}, {a}, {t}, {t}] x {d} B (scores and probabilities, no flash kernel)"
                )),
            ));
            if p.logits_tokens > 0 {
                let (b, detail) = logits(cal.logits_buffers_infer);
                items.push(item(T_LOGITS, Life::Transient, b, tag(detail)));
            }
        }
        PassKind::Forward { grad: true } => {
            let saved = saved_bytes_per_token(m, lora, d);
            let bwd = backward_bytes_per_token(m, lora, d);
            let ak = cal.attention_kept_per_layer;
            let scores = r * a * t * t * d;
            if s.run.train.gradient_checkpointing {
                items.push(item(
                    T_KEPT,
                    Life::Transient,
                    l * h * d * n,
                    tag(format!(
                        "checkpointed: {l} layers x {h} x {d} B x {r} x {t} tokens"
                    )),
                ));
                items.push(item(
                    T_BLOCK,
                    Life::Transient,
                    (saved + bwd) * n,
                    tag(format!(
                        "one block recomputed ({saved} B/token) + backward ({bwd} B/token) x {r} x {t} tokens"
                    )),
                ));
                items.push(item(
                    T_ATTENTION,
                    Life::Transient,
                    ((ak + 2.0) * scores as f64) as u64,
                    tag(format!(
                        "({ak} kept + 2 grads) x [{r}, {a}, {t}, {t}] x {d} B, one layer"
                    )),
                ));
            } else {
                items.push(item(
                    T_KEPT,
                    Life::Transient,
                    l * saved * n,
                    tag(format!("{l} layers x {saved} B/token x {r} x {t} tokens")),
                ));
                items.push(item(
                    T_BLOCK,
                    Life::Transient,
                    bwd * n,
                    tag(format!("backward {bwd} B/token x {r} x {t} tokens")),
                ));
                items.push(item(
                    T_ATTENTION,
                    Life::Transient,
                    ((l as f64 * ak + 2.0) * scores as f64) as u64,
                    tag(format!(
                        "({l} x {ak} kept + 2 grads) x [{r}, {a}, {t}, {t}] x {d} B"
                    )),
                ));
            }
            if p.logits_tokens > 0 {
                let (b, detail) = logits(cal.logits_buffers_train);
                items.push(item(T_LOGITS, Life::Transient, b, tag(detail)));
            }
        }
    }
    items
}
/// [`pass_items`] for the CUDA engine ([`Setup::engine`]): generation (fused decode after an
/// ordinary prefill), checkpointed training passes and passes without gradients, in the
/// engine's layout with the measured `engine_*` constants. `None` for training without
/// checkpointing (the general formulas).
fn engine_pass_items(s: &Setup, m: &LlamaConfig, p: &Pass) -> Option<Vec<Item>> {
    let cal = &CALIBRATION;
    let (l, h, a, v, i) = (
        m.num_hidden_layers as u64,
        m.hidden_size as u64,
        m.num_attention_heads as u64,
        m.vocab_size as u64,
        m.intermediate_size as u64,
    );
    let kv = (m.num_key_value_heads * m.head_dim) as u64;
    let (r, t) = (p.rows, p.tokens);
    let n = r * t;
    let tag = |s: String| format!("{s} [{}]", p.label);
    // The high points of a pass, counted from the allocator's live tensors at each labelled
    // point (`RLHF_TRACE_ALLOCS=1`, H200, 2026-12-02); all f32 (4 B) unless said. `[N, h]` and `[N, kv]` are
    // activations over all N = rows x tokens, `[r, T]` the attention's key bias made once per
    // forward.
    let nh = n * h * 4;
    let nkv = n * kv * 4;
    let mask = r * t * 4;
    // Logits pass: one `[chunk, V]` log-softmax beside the final hidden states shifted by one
    // token and their gradient.
    let chunk = logits_rows(s.run, r * p.logits_tokens);
    let logits = chunk * v * 4 + 2 * nh;
    // Attention of a recomputed block: four `[N, h]` and five `[N, kv]` (the trace's attention
    // side and the gradients in flight, as the allocator listed them), the key bias, and the
    // scores (`cuda::attention`): whole, `[r, a, T, T]` in the forward and held through the
    // backward beside one slice of the score gradient, `[g, a / kv_heads x T, T]` for `g` of
    // the `r x kv_heads` groups (`ops::attention_backward_slice`); or, for long rows, one query
    // block's `[a / kv_heads x tq, T]` in the forward and two in the backward.
    let kv_heads = m.num_key_value_heads as u64;
    let rep = a / kv_heads;
    let block = crate::model::ops::attention_query_block(
        r as usize,
        a as usize,
        kv_heads as usize,
        t as usize,
        t as usize,
    );
    let groups = crate::model::ops::attention_backward_slice((r * kv_heads) as usize) as u64;
    let (scores_fwd, scores_bwd, scores_what) = match block {
        None => (
            r * a * t * t * 4,
            r * a * t * t * 4 + groups * rep * t * t * 4,
            format!("[{r}, {a}, {t}, {t}] + [{groups}, {rep}, {t}, {t}]"),
        ),
        Some(tq) => {
            let one = rep * tq as u64 * t * 4;
            (one, 2 * one, format!("2 x [{rep} x {tq}, {t}]"))
        }
    };
    let attention_fwd = 4 * nh + 5 * nkv + mask + scores_fwd;
    let attention = 4 * nh + 5 * nkv + mask + scores_bwd;
    // The block forward's MLP at its label (`block forward (MLP)`, which the checkpointed
    // training forward passes too): the residual and its norm `[N, h]`, gate and up `[c, i]`
    // for `c` rows at a time (`row_chunks::mlp_forward_rows`) and, when chunked, the chunks'
    // outputs `[N, h]`. The high point of the 0.5b-1.5b runs.
    let dropout = s.run.lora.dropout > 0.0;
    let cf = crate::model::row_chunks::mlp_forward_rows(n as usize, i as usize, dropout) as u64;
    let mlp_fwd = 2 * nh + 2 * cf * i * 4 + if cf < n { nh } else { 0 };
    let mut items = Vec::new();
    match p.kind {
        PassKind::Generate { prompt, completion } => {
            let prefill = 2 * l * kv * prompt * r * 4;
            let decode = 2 * l * kv * (prompt + completion) * r * 2;
            items.push(item(
                T_KV,
                Life::Transient,
                prefill + decode,
                tag(format!(
                    "prefill's f32 cache ({prompt} tokens) + the decode's bf16 copy ({} tokens): 2 x {l} layers x {kv} x {r} rows",
                    prompt + completion
                )),
            ));
            let work = 2 * i * h * 2 + (cal.engine_prefill * (r * prompt * h * 4) as f64) as u64;
            items.push(item(
                T_BLOCK,
                Life::Transient,
                work,
                tag(format!(
                    "decode's gate/up dequant workspace 2 x {i} x {h} x 2 B + {} x [{r} x {prompt}, {h}] x 4 B after the prefill",
                    cal.engine_prefill
                )),
            ));
        }
        PassKind::Forward { grad: true } if s.run.train.gradient_checkpointing => {
            items.push(item(
                T_KEPT,
                Life::Transient,
                l * n * h * 2 + n * h * 4,
                tag(format!(
                    "checkpoints {l} x [{n}, {h}] x 2 B (bf16) + final hidden [{n}, {h}] x 4 B"
                )),
            ));
            // MLP backward of a recomputed block, one row chunk at a time: the block's trace
            // (six `[N, h]`, two `[N, kv]`, the mask bias), the input gradient gathered over all
            // rows `[N, h]`, and the chunk's gate and up `[c, i]` with its input `[c, h]`.
            let c = engine_mlp_rows(n, i, dropout);
            let mlp = 7 * nh + 2 * nkv + mask + 2 * c * i * 4 + c * h * 4;
            let (bytes, what) = [
                (logits, "logits pass"),
                (mlp, "MLP backward"),
                (attention, "attention backward"),
                (mlp_fwd, "MLP forward"),
            ]
            .into_iter()
            .max_by_key(|(b, _)| *b)
            .expect("four candidates");
            items.push(item(
                T_BLOCK,
                Life::Transient,
                bytes,
                tag(format!(
                    "{what}, the largest of: logits ([{chunk}, {v}] + 2 x [{n}, {h}], {:.2} GiB), MLP backward (7 x [{n}, {h}] + 2 x [{n}, {kv}] + [{r}, {t}] + 2 x [{c}, {i}] + [{c}, {h}], {:.2} GiB), attention backward (4 x [{n}, {h}] + 5 x [{n}, {kv}] + [{r}, {t}] + {scores_what}, {:.2} GiB), MLP forward (2 x [{n}, {h}] + 2 x [{cf}, {i}], {:.2} GiB), f32",
                    logits as f64 / GIB,
                    mlp as f64 / GIB,
                    attention as f64 / GIB,
                    mlp_fwd as f64 / GIB
                )),
            ));
        }
        PassKind::Forward { grad: false } => {
            // Not a high point of the calibration runs (they peak in training): the attention
            // as in training, the MLP forward over all rows, no checkpoints.
            let logits = if p.logits_tokens > 0 { logits } else { 0 };
            let mlp = n * 3 * h * 4 + 3 * cf * i * 4 + if cf < n { nh } else { 0 };
            items.push(item(
                T_BLOCK,
                Life::Transient,
                logits.max(attention_fwd).max(mlp),
                tag(format!(
                    "the largest of logits ([{chunk}, {v}] + 2 x [{n}, {h}] f32), one block's attention (as in training) and its MLP (3 x [{n}, {h}] + 3 x [{cf}, {i}] f32), no grads"
                )),
            ));
        }
        _ => return None,
    }
    Some(items)
}
fn assemble(
    s: &Setup,
    algo: Algo,
    mut notes: Vec<String>,
    per_phase: Vec<(Phase, Vec<Item>)>,
) -> Plan {
    let run = s.run;
    let m = s.base;
    let phases: Vec<Phase> = per_phase.iter().map(|(p, _)| *p).collect();
    let totals: Vec<u64> = per_phase
        .iter()
        .map(|(_, items)| items.iter().map(|i| i.bytes).sum())
        .collect();
    let (peak_idx, &peak_bytes) = totals
        .iter()
        .enumerate()
        .max_by_key(|(i, b)| (**b, std::cmp::Reverse(*i)))
        .expect("every algorithm has a load phase");
    let peak_phase = phases[peak_idx];
    let mut terms = Vec::new();
    for name in TERM_ORDER {
        let bytes: Vec<u64> = per_phase
            .iter()
            .map(|(_, items)| items.iter().find(|i| i.name == name).map_or(0, |i| i.bytes))
            .collect();
        if bytes.iter().all(|&b| b == 0) {
            continue;
        }
        // Describe the term where it matters most: the peak phase, else where it is largest.
        let at = if bytes[peak_idx] > 0 {
            peak_idx
        } else {
            (0..bytes.len()).max_by_key(|&i| bytes[i]).unwrap_or(0)
        };
        let detail = per_phase[at]
            .1
            .iter()
            .find(|i| i.name == name)
            .map(|i| i.detail.clone())
            .unwrap_or_default();
        terms.push(Term {
            name,
            detail,
            bytes,
        });
    }
    let tensor_peak_bytes = (0..phases.len())
        .map(|i| phase_tensor_bytes(&terms, &totals, i))
        .max()
        .unwrap_or(0);
    let budget_bytes = (run.plan.budget_gib * GIB) as u64;
    let fits = peak_bytes <= budget_bytes;
    let verdict = if fits {
        format!(
            "fits: peak {:.2} GiB in {peak_phase} <= budget {:.2} GiB ({:.2} GiB headroom)",
            peak_bytes as f64 / GIB,
            run.plan.budget_gib,
            (budget_bytes - peak_bytes) as f64 / GIB
        )
    } else {
        format!(
            "does not fit: peak {:.2} GiB in {peak_phase} > budget {:.2} GiB (over by {:.2} GiB)",
            peak_bytes as f64 / GIB,
            run.plan.budget_gib,
            (peak_bytes - budget_bytes) as f64 / GIB
        )
    };
    if phases.contains(&Phase::TrainStep) {
        if s.cuda {
            notes.push(match run.plan.cache {
                crate::config::CacheBound::Plan => "cuda: the peak is the card: the CUDA context plus what the allocator holds, which the run bounds by this plan (plan.cache = \"plan\": cached pages are given back past it, at a cost in speed where it is reached); within 5% of the card in ten runs from tiny to 20b on an H100 (dpo, rm, grpo; tests/data/calibration)".into(),
                crate::config::CacheBound::Budget => "cuda: the peak is what the card needs (context, tensors and the allocator's slack; within 5% of the card in ten runs from tiny to 20b on an H100: dpo, rm, grpo, held to the plan or without a rollout; tests/data/calibration); the allocator may keep more cached, up to plan.budget_gib: after a rollout it keeps the rollout's freed pages (20b GRPO: 20.8 GiB of card, 17.7 planned; held to the plan with plan.cache = \"plan\": 18.6 GiB at the same speed)".into(),
            });
        }
        notes.push(if run.train.gradient_checkpointing {
            "gradient checkpointing at block level: each layer keeps its input, one block is recomputed in backward (model::checkpoint)".into()
        } else {
            "no gradient checkpointing: every layer keeps its activations until backward".into()
        });
        notes.push(if s.engine {
            "attention: scores whole ([rows, heads, T, T]) up to 4 GiB, query blocks of at most 256 MiB beyond (cuda::attention; no fused flash kernel)".into()
        } else {
            "attention is the decomposed form ([rows, heads, T, T] scores), not a flash kernel".into()
        });
    }
    if !s.cuda {
        notes.push("device = cpu: no CUDA context; the budget is compared with host memory".into());
    }
    if run.model.dtype != crate::config::Dtype::F32 {
        notes.push(format!(
            "model.dtype = {:?} is planned here, but the engine computes in f32 today: training commands check the f32 plan (set model.dtype = \"f32\" to see it)",
            run.model.dtype
        ));
    }
    let quantized_params = match run.model.quantize {
        Quantize::Nf4 => (m.block_linear_params() * m.num_hidden_layers) as u64,
        Quantize::None => 0,
    };
    Plan {
        algo,
        model: ModelSummary {
            params: (m.block_linear_params() * m.num_hidden_layers) as u64 + dense_params(m),
            quantized_params,
            layers: m.num_hidden_layers,
            hidden_size: m.hidden_size,
            vocab_size: m.vocab_size,
            storage: match run.model.quantize {
                Quantize::Nf4 => "nf4+dq",
                Quantize::None => "dense",
            },
            dtype: match run.model.dtype {
                crate::config::Dtype::F32 => "f32",
                crate::config::Dtype::Bf16 => "bf16",
                crate::config::Dtype::F16 => "f16",
            },
            device: if s.cuda { "cuda" } else { "cpu" },
        },
        phases,
        terms,
        totals,
        peak_phase,
        peak_bytes,
        tensor_peak_bytes,
        budget_bytes,
        fits,
        verdict,
        notes,
        suggestions: Vec::new(),
        calibration: CALIBRATION,
    }
}
