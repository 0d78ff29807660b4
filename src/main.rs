//! `acrpull`: keeps Azure Container Registry pull secrets fresh for AcrPullBindings.

use std::process::ExitCode;

use clap::Parser;

use acrpull::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();

    match cli.command {
        Some(Command::Crd) => match acrpull::crd::render_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: failed to render the CRDs: {error}");
                ExitCode::FAILURE
            }
        },
        None => match acrpull::controller::run(&cli.controller) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}
