//! The `loadbalancer` binary: flags, config, bind, then [`loadbalancer::server::run`].

use std::process::ExitCode;

use clap::Parser;
use loadbalancer::config::{Cli, Settings};
use loadbalancer::server::{self, Listeners};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(&cli) {
        Ok(settings) => settings,
        Err(error) => return fail(&error),
    };
    let logging = common::telemetry::init(&settings.log_level, settings.log_format);
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(error) => return fail(&error),
    };
    raise_file_limit();
    runtime.block_on(async {
        common::shutdown::survive_hangups();
        let listeners = match Listeners::bind(&settings) {
            Ok(listeners) => listeners,
            Err(error) => return fail(&error),
        };
        // Spawned, so the accept loop runs on a worker beside the connections
        // instead of handing each new connection to another thread.
        let serving = tokio::spawn(server::run(
            settings,
            cli,
            logging,
            listeners,
            common::shutdown::signal_received(),
        ));
        match serving.await {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(error)) => fail(&error),
            Err(error) => fail(&error),
        }
    })
}

/// One worker thread per CPU we may run on (a container's CPU limit or
/// `taskset` included). On one CPU, a single-threaded runtime does the same
/// work without handing tasks between threads.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()
}

/// Every client connection and every backend connection is a file
/// descriptor. The soft limit is often 1024, far below the hard limit that
/// the system allows, so raise it to the hard limit at startup, as nginx
/// (`worker_rlimit_nofile`) and HAProxy do.
fn raise_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open file limit"),
            Err(error) => tracing::warn!(soft, hard, %error, "cannot raise the open file limit"),
        },
        Ok((soft, _)) => tracing::info!(limit = soft, "open file limit"),
        Err(error) => tracing::warn!(%error, "cannot read the open file limit"),
    }
}

/// User errors are one line on stderr and exit code 1, never a panic.
fn fail(error: &dyn std::error::Error) -> ExitCode {
    eprintln!("loadbalancer: {error}");
    ExitCode::FAILURE
}
