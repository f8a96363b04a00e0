//! `berth`: the command-line client of berthd. Parses arguments, runs the command, maps the
//! result to an exit status (errors on stderr, usage errors exit 2 from clap).
#![allow(clippy::print_stderr)]

use std::process::ExitCode;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = berth::cmd::Cli::parse();
    match berth::cmd::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("berth: {}", error.describe());
            ExitCode::from(error.exit_code())
        }
    }
}
