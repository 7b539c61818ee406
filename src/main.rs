//! `rlhf` binary: parse arguments, run, and turn any error into one line on stderr + exit code 2.

use clap::Parser;

fn main() {
    let cli = rlhf::cli::Cli::parse();
    match rlhf::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // `{:#}` prints the whole context chain on one line.
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}
