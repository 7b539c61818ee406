//! `rlhf` binary: parse arguments, run, and turn any error into one line on stderr + exit code 2
//! (out of device memory: one line + exit code 4, from `oom`'s panic hook).

use clap::Parser;

fn main() {
    rlhf::oom::install_hook();
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
            std::process::exit(2);
        }
    }
}
