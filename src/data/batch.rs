//! Batches of token rows (padding, DPO pair collation as TRL's collator) and the seeded order in
//! which an epoch visits the rows.

use super::TokenizedPair;

/// A padded batch, row-major: element (r, t) is at `r * width + t`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Padded {
    pub ids: Vec<u32>,
    /// true on real tokens, false on padding (the attention mask).
    pub valid: Vec<bool>,
    pub rows: usize,
    /// Length of the longest row.
    pub width: usize,
}

/// Pads every row at its end to the longest row (training batches).
pub fn pad_right<R: AsRef<[u32]>>(rows: &[R], pad_id: u32) -> Padded {
    pad(rows, pad_id, false)
}

/// Pads every row at its start to the longest row (prompts for generation, so that every row's
/// next token lands in the same column).
pub fn pad_left<R: AsRef<[u32]>>(rows: &[R], pad_id: u32) -> Padded {
    pad(rows, pad_id, true)
}

fn pad<R: AsRef<[u32]>>(rows: &[R], pad_id: u32, left: bool) -> Padded {
    let width = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut valid = Vec::with_capacity(rows.len() * width);
    for row in rows {
        let row = row.as_ref();
        let fill = width - row.len();
        if left {
            ids.extend(std::iter::repeat_n(pad_id, fill));
            valid.extend(std::iter::repeat_n(false, fill));
        }
        ids.extend_from_slice(row);
        valid.extend(std::iter::repeat_n(true, row.len()));
        if !left {
            ids.extend(std::iter::repeat_n(pad_id, fill));
            valid.extend(std::iter::repeat_n(false, fill));
        }
    }
    Padded {
        ids,
        valid,
        rows: rows.len(),
        width,
    }
}

/// A DPO / reward-model batch, as TRL's `DataCollatorForPreference` builds it: rows
/// `0..pairs` are `prompt ++ chosen` of each pair, rows `pairs..2*pairs` are `prompt ++ rejected`,
/// right-padded. Every mask is row-major `[2 * pairs, width]`, like `ids`.
///
/// Log-prob convention: the logits at position t predict the token at t + 1, so
/// `logp[r][t] = log_softmax(logits[r][t])[targets[r][t]]` and a sequence's log-prob is
/// `sum_t logp[r][t] * loss_mask[r][t]`; no shifting is needed by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairBatch {
    pub ids: Vec<u32>,
    /// Attention mask: true on real tokens.
    pub valid: Vec<bool>,
    /// TRL's `completion_mask`: true where `ids` holds a completion token.
    pub completion_mask: Vec<bool>,
    /// `ids` moved one position left (`targets[r][t] = ids[r][t + 1]`), the last column `pad_id`.
    pub targets: Vec<u32>,
    /// `loss_mask[r][t] = completion_mask[r][t + 1]` (false in the last column): true where the
    /// logits at t predict a completion token (TRL's `completion_mask[..., 1:]`).
    pub loss_mask: Vec<bool>,
    /// Real tokens per row (the reward model reads its score at index `lengths[r] - 1`).
    pub lengths: Vec<usize>,
    pub pairs: usize,
    pub width: usize,
}

impl PairBatch {
    pub fn rows(&self) -> usize {
        2 * self.pairs
    }
}

/// Builds the [`PairBatch`] of `pairs` (already truncated by [`tokenize_pair`]).
pub fn collate_pairs(pairs: &[TokenizedPair], pad_id: u32) -> PairBatch {
    let sequences: Vec<(&[u32], &[u32])> = pairs
        .iter()
        .map(|p| (p.prompt.as_slice(), p.chosen.as_slice()))
        .chain(
            pairs
                .iter()
                .map(|p| (p.prompt.as_slice(), p.rejected.as_slice())),
        )
        .collect();
    let full: Vec<Vec<u32>> = sequences.iter().map(|(p, c)| [*p, *c].concat()).collect();
    let padded = pad_right(&full, pad_id);
    let width = padded.width;
    let mut completion_mask = vec![false; padded.ids.len()];
    for (r, (prompt, completion)) in sequences.iter().enumerate() {
        let start = r * width + prompt.len();
        completion_mask[start..start + completion.len()].fill(true);
    }
    let mut targets = vec![pad_id; padded.ids.len()];
    let mut loss_mask = vec![false; padded.ids.len()];
    for r in 0..full.len() {
        let row = r * width;
        for t in 0..width.saturating_sub(1) {
            targets[row + t] = padded.ids[row + t + 1];
            loss_mask[row + t] = completion_mask[row + t + 1];
        }
    }
    PairBatch {
        lengths: full.iter().map(Vec::len).collect(),
        ids: padded.ids,
        valid: padded.valid,
        completion_mask,
        targets,
        loss_mask,
        pairs: pairs.len(),
        width,
    }
}

// ---------------------------------------------------------------------------------------------
// Shuffling
// ---------------------------------------------------------------------------------------------

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny PRNG of our own, so an epoch's order never
/// changes with a crate version (checkpoints resume on the same data position).
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` by multiply-shift (bias below n / 2^64, irrelevant for dataset sizes).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// The order in which epoch `epoch` visits `n` rows: a permutation of `0..n` that depends only on
/// `(n, seed, epoch)` (Fisher-Yates driven by SplitMix64).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let epoch_salt = SplitMix64(epoch).next_u64();
    let mut rng = SplitMix64(seed ^ epoch_salt);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        order.swap(i, j);
    }
    order
}
