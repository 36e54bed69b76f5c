//! `fake-apiserver`: the stand-in Kubernetes API as a process, for
//! `make demo` and `make local`. It keeps objects in memory and serves
//! list, watch, get, PUT, merge PATCH and DELETE over the real wire
//! protocol; it writes a kubeconfig that points at it, so the load balancer
//! and kubectl find it exactly as they find a real cluster. With `--local`
//! it also runs the backend Deployment's pods (see `local/`).
//!
//! Watch what a load balancer sees, from another terminal:
//! `curl -N 'http://127.0.0.1:6443/apis/discovery.k8s.io/v1/namespaces/lb-demo/endpointslices?watch=1'`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use fake_apiserver::FakeApiServer;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "A stand-in for the Kubernetes API on loopback, for the demo"
)]
struct Cli {
    /// Where to listen (loopback: this server has no authentication).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// The one namespace whose objects it keeps.
    #[arg(long, default_value = "demo")]
    namespace: String,
    /// Write a kubeconfig pointing at this server here.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// A local cluster: store these manifests (`kubectl kustomize k8s/`)
    /// and run the backend Deployment's pods as processes (`make local`).
    #[arg(long, requires = "backend")]
    local: Option<PathBuf>,
    /// With --local: the `backend` binary the pods run.
    #[arg(long)]
    backend: Option<PathBuf>,
    /// With --local: where pods' config files and logs go.
    #[arg(long, default_value = "target/local")]
    state: PathBuf,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if !cli.listen.ip().is_loopback() {
        eprintln!(
            "fake-apiserver: --listen {} is not a loopback address; this server has no authentication, so it only listens on 127.0.0.0/8 or ::1",
            cli.listen
        );
        return ExitCode::FAILURE;
    }
    let server = match FakeApiServer::start_on(cli.listen, &cli.namespace) {
        Ok(server) => server,
        Err(e) => {
            eprintln!(
                "fake-apiserver: cannot listen on {}: {e}; pick another port with --listen",
                cli.listen
            );
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &cli.kubeconfig
        && let Err(e) = std::fs::write(path, server.kubeconfig_yaml(&cli.namespace))
    {
        eprintln!(
            "fake-apiserver: cannot write the kubeconfig {}: {e}",
            path.display()
        );
        return ExitCode::FAILURE;
    }
    println!(
        "fake-apiserver: serving namespace {} on http://{}",
        cli.namespace, server.addr
    );
    let mut cluster = None;
    if let (Some(manifests), Some(backend)) = (&cli.local, &cli.backend) {
        let local = std::fs::read_to_string(manifests)
            .map_err(|e| format!("cannot read the manifests {}: {e}", manifests.display()))
            .and_then(|manifests| {
                server.run_local(fake_apiserver::Local {
                    manifests,
                    backend: backend.clone(),
                    state: cli.state.clone(),
                    first_ip: std::net::Ipv4Addr::new(127, 0, 0, 11),
                })
            });
        match local {
            Ok(running) => cluster = Some(running),
            Err(error) => {
                eprintln!("fake-apiserver: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    wait_for_a_stop_signal().await;
    if let Some(cluster) = cluster {
        cluster.stop().await;
    }
    ExitCode::SUCCESS
}

async fn wait_for_a_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
