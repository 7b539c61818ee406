//! Where a training step's forward phase goes, for `rlhf bench --phase-times`: the rollout's
//! prefill (the prompt's forward and the decode's set-up) and decode (every later token), and
//! the passes that score without a graph (the reference, a rollout's old log-probs, values and
//! rewards). Off unless a caller turns it on: a timed scoring pass waits for the device at its
//! end, so that its seconds are its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// A part of the forward phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Prefill = 0,
    Decode = 1,
    Scoring = 2,
}

static ON: AtomicBool = AtomicBool::new(false);
static SECS: Mutex<[f64; 3]> = Mutex::new([0.0; 3]);

/// Turns the clock on or off (process-wide).
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Whether parts are being timed.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Adds the seconds since `since` to `part` (nothing when the clock is off).
pub fn add(part: Part, since: Instant) {
    if enabled() {
        let mut s = SECS.lock().unwrap_or_else(|e| e.into_inner());
        s[part as usize] += since.elapsed().as_secs_f64();
    }
}

/// The seconds of each part since the last call (`[prefill, decode, scoring]`), reset to zero.
pub fn take() -> [f64; 3] {
    let mut s = SECS.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_add_up_only_while_on_and_reset_when_taken() {
        // The clock is process-wide: other tests may time parts while it is on, so only what
        // this test adds is asserted (at least), and what is added while it is off (nothing).
        let t = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        enable(true);
        add(Part::Prefill, t);
        add(Part::Prefill, t);
        enable(false);
        assert!(take()[0] >= 0.004);
        add(Part::Decode, t);
        assert_eq!(take(), [0.0; 3]);
    }
}
