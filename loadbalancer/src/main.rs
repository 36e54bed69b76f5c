//! The `loadbalancer` binary: flags, config, bind, then [`loadbalancer::server::run`].

use std::process::ExitCode;

use clap::Parser;
use loadbalancer::config::{Cli, Settings};
use loadbalancer::server::{self, Listeners};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    common::telemetry::init();

    let settings = match Settings::load(&cli) {
        Ok(settings) => settings,
        Err(error) => return fail(&error),
    };
    let listeners = match Listeners::bind(&settings).await {
        Ok(listeners) => listeners,
        Err(error) => return fail(&error),
    };
    match server::run(settings, listeners, common::shutdown::signal_received()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error),
    }
}

/// User errors are one line on stderr and exit code 1, never a panic.
fn fail(error: &dyn std::error::Error) -> ExitCode {
    eprintln!("loadbalancer: {error}");
    ExitCode::FAILURE
}
