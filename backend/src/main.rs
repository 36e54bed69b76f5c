//! The `backend` binary: flags, config, identity, then [`backend::server::run`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use backend::config::{self, Config};
use backend::identity::Identity;
use backend::reload::Live;
use backend::routes::AppState;
use clap::Parser;
use tokio::net::TcpListener;

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
    let (config, text) = match load(&cli) {
        Ok(loaded) => loaded,
        Err(error) => return fail(&error),
    };
    let logging = common::telemetry::init(&config.log_level, config.log_format);
    let (listener, tcp_listener) = match bind(&cli, &config) {
        Ok(bound) => bound,
        Err(error) => return fail(&error),
    };
    let identity = identity(&cli, &config);
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
    let shutdown = common::shutdown::signal_received();
    match backend::server::run(listener, state, header_read_timeout, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&format!("serving failed: {error}")),
    }
}

fn fail(error: &str) -> ExitCode {
    eprintln!("backend: {error}");
    ExitCode::FAILURE
}

/// The config file with the flags over it, and its text (to notice changes).
fn load(cli: &Cli) -> Result<(Config, String), String> {
    let text = common::config::read(&cli.config).map_err(|e| e.to_string())?;
    let mut config = Config::parse(&cli.config, &text).map_err(|e| e.to_string())?;
    if let Some(delay) = cli.response_delay_ms {
        if delay > 60_000 {
            return Err(format!(
                "--response-delay-ms: {delay} is out of range: use 0 to 60000"
            ));
        }
        config.response_delay_ms = delay;
    }
    Ok((config, text))
}

/// The HTTP listener, and the TCP one with `tcpPort`.
fn bind(cli: &Cli, config: &Config) -> Result<(TcpListener, Option<TcpListener>), String> {
    let bind = |port: u16| {
        let addr = SocketAddr::new(cli.host, port);
        common::serve::bind(addr, common::serve::DEFAULT_BACKLOG).map_err(|error| (addr, error))
    };
    let listener = bind(cli.port.unwrap_or(config.port)).map_err(|(addr, error)| {
        format!("cannot listen on {addr}: {error} (choose another with --port)")
    })?;
    let tcp = config
        .tcp_port
        .map(bind)
        .transpose()
        .map_err(|(addr, error)| format!("cannot listen on {addr} (tcpPort): {error}"))?;
    Ok((listener, tcp))
}

/// Who this pod is, said in the log.
fn identity(cli: &Cli, config: &Config) -> Identity {
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
    identity
}
