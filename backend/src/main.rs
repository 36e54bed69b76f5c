//! The `backend` binary: flags, config, identity, then [`backend::server::run`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use backend::config::{self, Config};
use backend::identity::Identity;
use backend::reload::Live;
use backend::routes::AppState;
use clap::Parser;

/// An HTTP service that answers with the name of the pod that served the request.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The JSON config file (the mounted ConfigMap in Kubernetes).
    #[arg(long, env = "BACKEND_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Listen on this port instead of the config's `port`.
    #[arg(long)]
    port: Option<u16>,
    /// The address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    host: IpAddr,
    /// Wait this long before answering each `GET /` (the config's
    /// `responseDelayMs`; the flag wins).
    #[arg(long)]
    response_delay_ms: Option<u64>,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::shutdown::survive_hangups();
    let cli = Cli::parse();
    let loaded = common::config::read(&cli.config)
        .and_then(|text| Config::parse(&cli.config, &text).map(|config| (config, text)));
    let (mut config, text) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("backend: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(delay) = cli.response_delay_ms {
        if delay > 60_000 {
            eprintln!("backend: --response-delay-ms: {delay} is out of range: use 0 to 60000");
            return ExitCode::FAILURE;
        }
        config.response_delay_ms = delay;
    }
    let logging = common::telemetry::init(&config.log_level, config.log_format);
    let addr = SocketAddr::new(cli.host, cli.port.unwrap_or(config.port));
    let listener = match common::serve::bind(addr, common::serve::DEFAULT_BACKLOG) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("backend: cannot listen on {addr}: {error} (choose another with --port)");
            return ExitCode::FAILURE;
        }
    };

    let tcp_listener = match config.tcp_port {
        Some(port) => {
            let addr = SocketAddr::new(cli.host, port);
            match common::serve::bind(addr, common::serve::DEFAULT_BACKLOG) {
                Ok(listener) => Some(listener),
                Err(error) => {
                    eprintln!("backend: cannot listen on {addr} (tcpPort): {error}");
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };

    let (identity, missing) = Identity::from_env(
        |name| std::env::var(name).ok(),
        &config.service_name,
        cli.host,
    );
    if !missing.is_empty() {
        tracing::info!(
            ?missing,
            pod_name = identity.pod_name,
            pod_ip = identity.pod_ip,
            "Downward API variables unset (not in Kubernetes?): using the hostname and listen address instead"
        );
    }
    tracing::info!(config = %cli.config.display(), ?identity, "starting");

    if let Some(listener) = tcp_listener {
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!(tcp = addr, "listening");
        tokio::spawn(backend::tcp::serve(
            listener,
            identity.pod_name.as_str().into(),
        ));
    }
    let state = AppState::new(identity);
    state.set_access_log(config.access_log);
    state.set_response_delay(std::time::Duration::from_millis(config.response_delay_ms));
    let header_read_timeout = config.header_read_timeout();
    let mut live = Live {
        path: cli.config.clone(),
        config,
        state: state.clone(),
        logging,
        response_delay_flag: cli.response_delay_ms,
    };
    tokio::spawn(common::reload::watch(cli.config, text, move |text| {
        live.apply(text)
    }));

    match backend::server::run(
        listener,
        state,
        header_read_timeout,
        common::shutdown::signal_received(),
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("backend: serving failed: {error}");
            ExitCode::FAILURE
        }
    }
}
