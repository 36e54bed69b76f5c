//! A TCP listener for the lesson on L4 balancing (`tcpPort` in the config).
//!
//! Through the load balancer's TCP mode, `nc localhost 9090` holds one
//! connection to one pod for as long as it stays open, whatever arrives on
//! it: the greeting names the pod, and every byte sent comes back (so every
//! line does), as it arrives: no line is buffered, however long.
//!
//! ```text
//! $ nc localhost 9090
//! hello from backend-7d9f-x2k4q
//! ping
//! ping
//! ```
//!
//! When the client shuts down its sending side, the rest is echoed and the
//! connection closes: the half-close a TCP proxy must pass on.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Greets and echoes on every connection to `listener`, until the process
/// exits.
pub async fn serve(listener: TcpListener, pod_name: Arc<str>) {
    loop {
        let (stream, peer) = common::serve::accept(&listener).await;
        let pod_name = pod_name.clone();
        tokio::spawn(async move {
            if let Err(error) = echo(stream, &pod_name).await {
                tracing::debug!(%peer, %error, "tcp connection ended with an error");
            }
        });
    }
}

async fn echo(mut stream: TcpStream, pod_name: &str) -> std::io::Result<()> {
    let (mut read, mut write) = stream.split();
    write
        .write_all(format!("hello from {pod_name}\n").as_bytes())
        .await?;
    tokio::io::copy(&mut read, &mut write).await?;
    write.shutdown().await
}
