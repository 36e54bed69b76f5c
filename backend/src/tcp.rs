//! A TCP listener for the lesson on L4 balancing (`tcpPort` in the config).
//!
//! Through the load balancer's TCP mode, `nc localhost 9090` holds one
//! connection to one pod for as long as it stays open, whatever arrives on
//! it: the greeting names the pod, and every line sent comes back.
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

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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
    let (read, mut write) = stream.split();
    write
        .write_all(format!("hello from {pod_name}\n").as_bytes())
        .await?;
    let mut lines = BufReader::new(read);
    let mut line = Vec::new();
    // Lines of any length and bytes of any kind come back as they came.
    while lines.read_until(b'\n', &mut line).await? > 0 {
        write.write_all(&line).await?;
        line.clear();
    }
    write.shutdown().await
}
