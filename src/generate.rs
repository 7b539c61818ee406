//! Batched sampling with a KV cache: left-padded prompts, greedy or temperature / top-k / top-p
//! sampling, min/max new tokens, and a per-sequence stop on eos or stop ids. The RNG is seeded by
//! the caller, so a run is reproducible.

#[cfg(feature = "cuda")]
pub mod fused_decode;

use crate::model::lora::Adapter;
use crate::model::{Batch, KvCache, Llama};
use burn::tensor::backend::Backend;
use rand::{Rng, SeedableRng};

pub use rlhf_algorithms::trainer::{Completion, SamplingParams};

/// Picks the next token from one row of logits, following HF's warper order:
/// temperature, top-k, top-p.
pub fn sample_token<R: Rng>(
    logits: &[f32],
    p: &SamplingParams,
    banned: &[u32],
    rng: &mut R,
) -> u32 {
    let no_filter = p.top_k == 0 || p.top_k >= logits.len();
    if p.temperature > 0.0 && no_filter && p.top_p >= 1.0 {
        return sample_plain(logits, p.temperature, banned, rng);
    }
    let mut scores: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            (
                i as u32,
                if banned.contains(&(i as u32)) {
                    f32::NEG_INFINITY
                } else {
                    l
                },
            )
        })
        .collect();
    if p.temperature <= 0.0 {
        // Greedy: first maximum, as torch.argmax.
        let mut best = 0;
        for (i, s) in scores.iter().enumerate() {
            if s.1 > scores[best].1 {
                best = i;
            }
        }
        return scores[best].0;
    }
    for s in &mut scores {
        s.1 /= p.temperature;
    }
    // Order by score only where a filter needs it: a full sort of a 32k-150k vocabulary per token
    // would cost more than the decode step itself.
    if p.top_k > 0 && p.top_k < scores.len() {
        scores.select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
        scores.truncate(p.top_k);
        scores.sort_by(|a, b| b.1.total_cmp(&a.1));
    } else if p.top_p < 1.0 {
        scores.sort_by(|a, b| b.1.total_cmp(&a.1));
    }
    let max = scores.iter().map(|s| s.1).fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<f64> = scores.iter().map(|s| ((s.1 - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    for q in &mut probs {
        *q /= total;
    }
    if p.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, q) in probs.iter().enumerate() {
            cum += q;
            if cum >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        for q in &mut probs {
            *q /= total;
        }
    }
    let mut u: f64 = rng.random();
    for (i, q) in probs.iter().enumerate() {
        if u < *q {
            return scores[i].0;
        }
        u -= q;
    }
    scores[probs.len() - 1].0
}

/// Plain temperature sampling (no top-k / top-p), the common RL case, without building and
/// normalising a scored copy of the vocabulary: the same inverse-CDF draw as [`sample_token`]'s
/// general path (one uniform per token, mass accumulated in f64 from f32 exponentials), scaled by
/// the total instead of dividing every probability by it.
fn sample_plain<R: Rng>(logits: &[f32], temperature: f32, banned: &[u32], rng: &mut R) -> u32 {
    let allowed = |i: usize| !banned.contains(&(i as u32));
    let mut max = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if allowed(i) {
            max = max.max(l / temperature);
        }
    }
    let mut total = 0.0f64;
    for (i, &l) in logits.iter().enumerate() {
        if allowed(i) {
            total += (l / temperature - max).exp() as f64;
        }
    }
    let mut u: f64 = rng.random::<f64>() * total;
    let mut last = 0;
    for (i, &l) in logits.iter().enumerate() {
        if !allowed(i) {
            continue;
        }
        let e = (l / temperature - max).exp() as f64;
        if u < e {
            return i as u32;
        }
        u -= e;
        last = i;
    }
    last as u32
}

/// Samples the next token of every active row, rows in parallel. Each row draws from its own
/// generator, seeded from `rng` in row order, so results depend on the seed only (not on the
/// number of threads). A 32k-150k vocabulary softmax per row costs about as much as a fused
/// decode step at 16 rows, hence the threads.
fn sample_rows<R: Rng>(
    logits: &[f32],
    vocab: usize,
    active: &[bool],
    params: &SamplingParams,
    banned: &[u32],
    rng: &mut R,
) -> Vec<Option<u32>> {
    let seeds: Vec<u64> = active.iter().map(|_| rng.random()).collect();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, active.len().max(1));
    let per = active.len().div_ceil(threads).max(1);
    let mut picks = vec![None; active.len()];
    std::thread::scope(|s| {
        for (c, chunk) in picks.chunks_mut(per).enumerate() {
            let seeds = &seeds;
            s.spawn(move || {
                for (j, slot) in chunk.iter_mut().enumerate() {
                    let i = c * per + j;
                    if active[i] {
                        let mut r = rand::rngs::StdRng::seed_from_u64(seeds[i]);
                        let row = &logits[i * vocab..(i + 1) * vocab];
                        *slot = Some(sample_token(row, params, banned, &mut r));
                    }
                }
            });
        }
    });
    picks
}

/// What one step of [`generate`] produced: the next tokens, drawn on the GPU inside the fused
/// decode step, or `[rows, vocab]` logits to sample from here.
enum StepOut {
    /// Only the CUDA build's fused decode draws tokens itself.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Drawn(Vec<u32>),
    Logits(Vec<f32>),
}

/// Generates a completion for every prompt, all in one batch.
pub fn generate<B: Backend, R: Rng>(
    model: &Llama<B>,
    adapter: Option<&Adapter<B>>,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    rng: &mut R,
) -> anyhow::Result<Vec<Completion>> {
    anyhow::ensure!(!prompts.is_empty(), "no prompts to generate from");
    anyhow::ensure!(
        prompts.iter().all(|p| !p.is_empty()),
        "a prompt has no tokens"
    );
    let b = prompts.len();
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut rows = Vec::with_capacity(b);
    let mut valid = Vec::with_capacity(b);
    for p in prompts {
        let pad = longest - p.len();
        let mut r = vec![params.pad_id; pad];
        r.extend_from_slice(p);
        let mut v = vec![false; pad];
        v.extend(std::iter::repeat_n(true, p.len()));
        rows.push(r);
        valid.push(v);
    }
    let device = model.device.clone();
    let mut cache = KvCache::new(model.cfg.num_hidden_layers, b);
    let mut out: Vec<Completion> = vec![
        Completion {
            tokens: Vec::new(),
            stopped: false
        };
        b
    ];
    let mut batch = Batch::<B>::new(&rows, valid, &device);
    let vocab = model.cfg.vocab_size;
    // After the prompt, steps run fused on CUDA when the model allows it (`generate::fused_decode`).
    #[cfg(feature = "cuda")]
    let mut fused: Option<crate::generate::fused_decode::FusedDecode> = None;
    let mut next: Vec<u32> = Vec::with_capacity(b);
    let mut next_valid: Vec<bool> = Vec::with_capacity(b);
    // `RLHF_TRACE=1` prints where the time went: the model's steps (each ends by reading the
    // logits, which synchronises) and the host-side sampling.
    let trace = crate::switches::switches().trace;
    let mut model_ms: Vec<f64> = Vec::new();
    let mut sample_ms = 0.0;
    // `phase_clock`: the prefill is step 0 until the decode is set up, the decode from there on.
    let mut decode_from: Option<std::time::Instant> = None;
    for step in 0..params.max_new_tokens {
        let tick = std::time::Instant::now();
        let banned: &[u32] = if step < params.min_new_tokens {
            &params.stop_ids
        } else {
            &[]
        };
        #[cfg(feature = "cuda")]
        let fused_out = match fused.as_mut() {
            Some(f) if f.samples() => {
                let seed: u32 = rng.random();
                let picks = f.step_sample(&next, &next_valid, seed, !banned.is_empty())?;
                Some(StepOut::Drawn(picks))
            }
            Some(f) => Some(StepOut::Logits(f.step(&next, &next_valid)?)),
            None => None,
        };
        #[cfg(not(feature = "cuda"))]
        let fused_out: Option<StepOut> = None;
        let step_out = match fused_out {
            Some(o) => o,
            None => {
                let hidden = model.forward_hidden(&batch, adapter, Some(&mut cache));
                let [bb, t, h] = hidden.dims();
                let last = hidden.slice([0..bb, t - 1..t, 0..h]);
                let logits = model
                    .logits(last)
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .map_err(|e| anyhow::anyhow!("reading logits: {e:?}"))?;
                StepOut::Logits(logits)
            }
        };
        #[cfg(feature = "cuda")]
        if step == 0 {
            fused = crate::generate::fused_decode::FusedDecode::try_new(
                model,
                adapter,
                &cache,
                longest + params.max_new_tokens,
                Some(params),
            );
            // The rollout's high point: the prefill's cache and the decode's copy of it.
            crate::devmem::note::<B>(&device, "decode set up");
        }
        if step == 0 {
            crate::phase_clock::add(crate::phase_clock::Part::Prefill, tick);
            decode_from = Some(std::time::Instant::now());
        }
        next.clear();
        next_valid.clear();
        let active: Vec<bool> = out.iter().map(|c| !c.stopped).collect();
        let tick_sample = std::time::Instant::now();
        model_ms.push((tick_sample - tick).as_secs_f64() * 1e3);
        let picks = match step_out {
            StepOut::Drawn(p) => active.iter().zip(p).map(|(&a, t)| a.then_some(t)).collect(),
            StepOut::Logits(l) => sample_rows(&l, vocab, &active, params, banned, rng),
        };
        sample_ms += tick_sample.elapsed().as_secs_f64() * 1e3;
        for (c, pick) in out.iter_mut().zip(picks) {
            let Some(tok) = pick else {
                next.push(params.pad_id);
                next_valid.push(false);
                continue;
            };
            c.tokens.push(tok);
            if params.stop_ids.contains(&tok) {
                c.stopped = true;
            }
            next.push(tok);
            next_valid.push(true);
        }
        if out.iter().all(|c| c.stopped) {
            break;
        }
        #[cfg(feature = "cuda")]
        if fused.is_some() {
            continue;
        }
        let rows: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
        let valid = next_valid.iter().map(|&v| vec![v]).collect();
        batch = Batch::new(&rows, valid, &device);
    }
    if let Some(t) = decode_from {
        // Every decode step ended by reading its tokens or logits on the host: nothing is queued.
        crate::phase_clock::add(crate::phase_clock::Part::Decode, t);
    }
    if trace && !model_ms.is_empty() {
        let first = model_ms[0];
        let mut rest = model_ms[1..].to_vec();
        rest.sort_by(|a, b| a.total_cmp(b));
        let median = rest.get(rest.len() / 2).copied().unwrap_or(0.0);
        eprintln!(
            "generate: {} rows, {} steps: prompt + first token {first:.1} ms, later steps {:.1} ms (median {median:.2}), sampling {sample_ms:.1} ms",
            b,
            model_ms.len(),
            rest.iter().sum::<f64>()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn params(t: f32, k: usize, p: f32) -> SamplingParams {
        SamplingParams {
            max_new_tokens: 1,
            min_new_tokens: 0,
            temperature: t,
            top_k: k,
            top_p: p,
            stop_ids: vec![],
            pad_id: 0,
        }
    }

    #[test]
    fn plain_temperature_sampling_follows_the_softmax_and_skips_banned_tokens() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let l = [0.0f32, 1.0, 2.0, 5.0];
        let t = 2.0;
        let n = 40_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[sample_token(&l, &params(t, 0, 1.0), &[3], &mut rng) as usize] += 1;
        }
        assert_eq!(counts[3], 0, "banned token drawn");
        let e: Vec<f64> = l[..3]
            .iter()
            .map(|&x| (x as f64 / t as f64).exp())
            .collect();
        let z: f64 = e.iter().sum();
        for i in 0..3 {
            let want = e[i] / z;
            let got = counts[i] as f64 / n as f64;
            assert!(
                (got - want).abs() < 0.01,
                "token {i}: {got:.4} vs {want:.4}"
            );
        }
    }

    #[test]
    fn greedy_takes_first_max_and_respects_bans() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let l = [0.1, 2.0, 2.0, -1.0];
        assert_eq!(sample_token(&l, &params(0.0, 0, 1.0), &[], &mut rng), 1);
        assert_eq!(sample_token(&l, &params(0.0, 0, 1.0), &[1], &mut rng), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_cuts_the_tail() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let l = [0.0, 3.0, 1.0, 2.9];
        for _ in 0..50 {
            assert_eq!(sample_token(&l, &params(1.0, 1, 1.0), &[], &mut rng), 1);
            // probs ~ [.02,.48,.07,.43]: top_p 0.5 keeps tokens 1 and 3 only.
            let t = sample_token(&l, &params(1.0, 0, 0.5), &[], &mut rng);
            assert!(t == 1 || t == 3, "{t}");
        }
    }

    #[test]
    fn parallel_row_sampling_is_reproducible_and_skips_stopped_rows() {
        let vocab = 50;
        let logits: Vec<f32> = (0..7 * vocab)
            .map(|i| ((i * 37) % 11) as f32 * 0.3)
            .collect();
        let active = [true, false, true, true, true, false, true];
        let p = params(1.0, 0, 1.0);
        let run = |seed| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            sample_rows(&logits, vocab, &active, &p, &[], &mut rng)
        };
        let (a, b) = (run(5), run(5));
        assert_eq!(a, b);
        for (pick, on) in a.iter().zip(active) {
            assert_eq!(pick.is_some(), on);
        }
        // Over many seeds the rows differ from each other (each row has its own stream).
        let distinct = (0..20)
            .filter(|&s| {
                let r = run(s);
                r[0] != r[2] || r[2] != r[3] || r[3] != r[4]
            })
            .count();
        assert!(distinct > 10, "{distinct}");
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let l = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let n = 4000;
        let ones = (0..n)
            .filter(|_| sample_token(&l, &params(1.0, 0, 1.0), &[], &mut rng) == 1)
            .count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.03, "{frac}");
    }
}
