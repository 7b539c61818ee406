//! `rlhf` binary: parse arguments, run, and turn any error into one line on stderr + exit code 2
//! (5 for a run that diverged).

use clap::Parser;

fn main() {
    let cli = rlhf::cli::Cli::parse();
    match rlhf::cli::run(cli) {
        Ok(code) => std::process::exit(code),
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
                rlhf::finite::EXIT_DIVERGED
            } else {
                2
            });
        }
    }
}
