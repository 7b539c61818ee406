//! `rlhf` binary: parse arguments, run, and turn the outcome into the exit code. This is the one
//! place that knows the exit codes: 0 done, 2 an error (one line on stderr), 3 the run does not
//! fit the VRAM budget, 4 the GPU ran out of memory (one line, from `oom`'s panic hook), 5 the
//! run diverged (a [`rlhf::finite::Diverged`] error, one line on stderr), 6 another GPU failure
//! (a CUDA driver, cuBLASLt or kernel error; one line, from the same hook).

use clap::Parser;
use rlhf::cli::Outcome;

/// The command did what it was asked.
const EXIT_OK: i32 = 0;
/// An error: configuration, data, files (the message names which).
const EXIT_ERROR: i32 = 2;
/// The run does not fit `plan.budget_gib`.
const EXIT_DOES_NOT_FIT: i32 = 3;
/// A device allocation failed (the last checkpoint is intact).
const EXIT_OUT_OF_MEMORY: i32 = 4;
/// The run diverged: no finite step, too many non-finite steps in a row, or a non-finite
/// adapter (which is not written).
const EXIT_DIVERGED: i32 = 5;
/// Another device failure: a CUDA driver, cuBLASLt or kernel error (the last checkpoint is
/// intact).
const EXIT_DEVICE_FAILURE: i32 = 6;

/// Freed large blocks are kept for reuse (see `rlhf::alloc`).
#[global_allocator]
static ALLOCATOR: rlhf::alloc::BlockCache = rlhf::alloc::BlockCache;

fn main() {
    rlhf::oom::install_hook(EXIT_OUT_OF_MEMORY, EXIT_DEVICE_FAILURE);
    let cli = rlhf::cli::Cli::parse();
    match rlhf::cli::run(cli) {
        Ok(Outcome::Done) => std::process::exit(EXIT_OK),
        Ok(Outcome::DoesNotFit) => std::process::exit(EXIT_DOES_NOT_FIT),
        Ok(Outcome::Reported) => std::process::exit(EXIT_ERROR),
        Err(e) => {
            // `{:#}` prints the whole context chain; some parsers' messages span lines, and the
            // contract is one line per error.
            let msg = format!("{e:#}");
            let one_line: Vec<&str> = msg
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("error: {}", one_line.join(" "));
            std::process::exit(if rlhf::finite::is_diverged(&e) {
                EXIT_DIVERGED
            } else {
                EXIT_ERROR
            });
        }
    }
}
