//! One HTTP/2 connection, many requests: the spread over pods, printed.
//!
//! `cargo run -p loadbalancer --example h2_one_connection -- http://127.0.0.1:8080/ 300`
//!
//! Opens a single TCP connection with HTTP/2 prior knowledge (as a gRPC
//! channel does), sends the requests as concurrent streams of it, and counts
//! the answers by `podName`. Through an L4 balancer (a Kubernetes Service,
//! or our TCP mode) they all land on one pod; through an L7 one they spread.

use std::collections::BTreeMap;
use std::process::ExitCode;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(url), n) = (args.next(), args.next()) else {
        eprintln!("usage: h2_one_connection URL [N]");
        return ExitCode::FAILURE;
    };
    let n: usize = n.and_then(|n| n.parse().ok()).unwrap_or(300);
    match spread(&url, n).await {
        Ok(counts) => {
            for (pod, count) in &counts {
                println!(
                    "  {pod:<14} {count:5}   {:5.1}%",
                    100.0 * *count as f64 / n as f64
                );
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("h2_one_connection: {url}: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn spread(url: &str, n: usize) -> Result<BTreeMap<String, usize>, String> {
    let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let host = uri.host().ok_or("no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| e.to_string())?;
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let requests = (0..n).map(|_| {
        let mut sender = sender.clone();
        let request = Request::get(uri.clone())
            .version(Version::HTTP_2)
            .body(Empty::<Bytes>::new());
        async move {
            let response = sender
                .send_request(request.map_err(|e| e.to_string())?)
                .await
                .map_err(|e| e.to_string())?;
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            let answer: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))?;
            Ok::<_, String>(answer["podName"].as_str().unwrap_or("?").to_owned())
        }
    });
    let mut counts = BTreeMap::new();
    for pod in futures_util::future::join_all(requests).await {
        *counts.entry(pod?).or_default() += 1;
    }
    Ok(counts)
}
