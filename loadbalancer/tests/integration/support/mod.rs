//! Starting real backends and a real load balancer on loopback, plus raw
//! sockets for what an HTTP client library would hide or refuse to send.

use std::io::Write;
use std::net::SocketAddr;
use std::process::Command;

use common::testkit::{PATIENCE, Process, binary};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running `backend` process.
pub struct Backend {
    pub process: Process,
    pub addr: SocketAddr,
    pub name: String,
    _config: tempfile::NamedTempFile,
}

/// Starts `n` backends named `backend-1` … `backend-n` on ephemeral ports.
pub fn start_backends(n: usize) -> Vec<Backend> {
    (1..=n)
        .map(|i| start_backend_named(&format!("backend-{i}"), json!({ "port": 0 })))
        .collect()
}

/// Starts one backend with `config` (`"port": 0` for an ephemeral port).
pub fn start_backend_with(config: Value) -> Backend {
    start_backend_named("backend-1", config)
}

/// Starts a backend named `name` with `config`.
pub fn start_backend_named(name: &str, config: Value) -> Backend {
    let config = write_config(&config);
    let mut command = Command::new(binary("backend"));
    command
        .args(["--host", "127.0.0.1", "--config"])
        .arg(config.path())
        .env("POD_NAME", name)
        .env("POD_IP", "127.0.0.1")
        // Debug lines include `work started`, for tests that wait for it.
        .env("RUST_LOG", "debug");
    let mut process = Process::start(name, command);
    let addr = process.listening_on("addr");
    Backend {
        process,
        addr,
        name: name.to_owned(),
        _config: config,
    }
}

/// Backends as pods: each on its own loopback IP `127.0.<net>.<i>`, all on
/// one port, as pods share a container port but not an IP. `net` keeps
/// tests that run at the same time apart. Returns the backends and the port.
pub fn start_pods(net: u8, n: usize) -> (Vec<Backend>, u16) {
    let mut pods: Vec<Backend> = Vec::new();
    let mut port = 0;
    for i in 1..=n {
        let ip = format!("127.0.{net}.{i}");
        let config = write_config(&json!({ "port": port }));
        let name = format!("pod-{net}-{i}");
        let mut command = Command::new(binary("backend"));
        command
            .args(["--host", &ip, "--config"])
            .arg(config.path())
            .env("POD_NAME", &name)
            .env("POD_IP", &ip);
        let mut process = Process::start(&name, command);
        let addr = process.listening_on("addr");
        port = addr.port();
        pods.push(Backend {
            process,
            addr,
            name,
            _config: config,
        });
    }
    (pods, port)
}

/// A running `loadbalancer` process.
pub struct LoadBalancer {
    pub process: Process,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    _config: Option<tempfile::NamedTempFile>,
}

impl LoadBalancer {
    /// Runs `command` (the binary, or a wrapper around it) and waits for
    /// both ports; `config` is kept alive as long as the process.
    pub fn start(command: Command, config: Option<tempfile::NamedTempFile>) -> LoadBalancer {
        let mut process = Process::start("loadbalancer", command);
        let addr = process.listening_on("proxy");
        let admin = process.listening_on("admin");
        LoadBalancer {
            process,
            addr,
            admin,
            _config: config,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
}

/// Starts the load balancer over a static list of `backends`; `extra`
/// config fields are merged over the test defaults.
pub fn start_load_balancer(backends: &[SocketAddr], extra: Value) -> LoadBalancer {
    let mut config = json!({
        "discovery": "static",
        "backends": backends.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
    });
    config
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    start_load_balancer_with(config, &[])
}

/// Starts the load balancer with `config` (over test defaults: ephemeral
/// ports, a short drain) and extra environment variables.
pub fn start_load_balancer_with(config: Value, env: &[(&str, &str)]) -> LoadBalancer {
    let mut full = json!({ "port": 0, "adminPort": 0, "drainDelayMs": 200 });
    full.as_object_mut()
        .unwrap()
        .extend(config.as_object().unwrap().clone());
    let file = write_config(&full);
    let mut command = Command::new(binary("loadbalancer"));
    command
        .args(["--host", "127.0.0.1", "--config"])
        .arg(file.path());
    command.env_remove("NAMESPACE").env_remove("POD_NAMESPACE");
    for (name, value) in env {
        command.env(name, value);
    }
    LoadBalancer::start(command, Some(file))
}

/// A config directory laid out as the kubelet lays out a ConfigMap volume:
/// `config.json -> ..data/config.json`, `..data -> ..<version>/`. Each
/// [`ConfigMapDir::write`] makes a new version directory and swaps the
/// `..data` link to it atomically, as the kubelet does on an update.
pub struct ConfigMapDir {
    dir: tempfile::TempDir,
    versions: usize,
}

impl ConfigMapDir {
    pub fn new(config: &Value) -> ConfigMapDir {
        let mut configmap = ConfigMapDir {
            dir: tempfile::tempdir().unwrap(),
            versions: 0,
        };
        configmap.write(&config.to_string());
        std::os::unix::fs::symlink("..data/config.json", configmap.path()).unwrap();
        configmap
    }

    /// The path a pod reads: `<dir>/config.json`.
    pub fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("config.json")
    }

    /// Publishes `text` as the new content.
    pub fn write(&mut self, text: &str) {
        self.versions += 1;
        let version = format!("..2026_11_22_{}", self.versions);
        std::fs::create_dir(self.dir.path().join(&version)).unwrap();
        std::fs::write(self.dir.path().join(&version).join("config.json"), text).unwrap();
        let staged = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&version, &staged).unwrap();
        std::fs::rename(&staged, self.dir.path().join("..data")).unwrap();
    }
}

/// Starts the load balancer reading its config from `configmap`, with no
/// `RUST_LOG`, so that the file's `logLevel` is in force.
pub fn start_load_balancer_from(configmap: &ConfigMapDir) -> LoadBalancer {
    let mut command = Command::new(binary("loadbalancer"));
    command
        .args(["--host", "127.0.0.1", "--config"])
        .arg(configmap.path())
        .env("RUST_LOG", "");
    LoadBalancer::start(command, None)
}

pub fn write_config(config: &Value) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(config.to_string().as_bytes()).unwrap();
    file
}

/// Writes `request` as raw bytes and reads until the server closes the
/// connection (bounded by [`PATIENCE`]).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("server closes the connection")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// A hand-written upstream that records each request head it reads and
/// answers with a fixed response, to see exactly what the proxy forwards.
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub heads: tokio::sync::mpsc::UnboundedReceiver<String>,
}

/// Starts a [`RawUpstream`]; `response` is written after each request head
/// (or, if `None`, the connection is closed without an answer).
pub async fn raw_upstream(response: Option<&'static str>) -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sender, heads) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let sender = sender.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                    if let Some(end) = find(&buffer, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
                        buffer.drain(..end + 4);
                        let _ = sender.send(head);
                        match response {
                            Some(response) => {
                                if stream.write_all(response.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                            None => return,
                        }
                    }
                }
            });
        }
    });
    RawUpstream { addr, heads }
}

/// An upstream that accepts connections and reads whatever comes, but never
/// answers: a backend that hangs.
pub async fn silent_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = stream.read_to_end(&mut sink).await;
            });
        }
    });
    addr
}

/// A backend that accepts connections and then neither reads nor writes:
/// the kernel's buffers fill and stay full.
pub async fn mute_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

/// Connects to `addr`, sends `bytes` (maybe nothing), and waits (bounded
/// by [`PATIENCE`]) for the server to close the connection. Returns what it
/// sent back, or `None` if it kept the connection open.
pub async fn wait_for_close(addr: SocketAddr, bytes: &[u8]) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => response.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, read_all).await.ok()?;
    Some(String::from_utf8_lossy(&response).into_owned())
}

/// Reads one response from `stream`: its head and, when it has a
/// Content-Length, its body (bounded by [`PATIENCE`]). The connection stays
/// open for the next request.
pub async fn read_response(stream: &mut TcpStream) -> String {
    let mut buffer = Vec::new();
    let read = async {
        loop {
            if let Some(end) = find(&buffer, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buffer[..end + 2]).into_owned();
                let length: usize = raw_header(&head, "content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0);
                if buffer.len() >= end + 4 + length {
                    return;
                }
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("a response within PATIENCE");
    String::from_utf8_lossy(&buffer).into_owned()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The value of header `name` in a raw head, if present (first one).
pub fn raw_header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    raw_headers(head, name).into_iter().next()
}

/// All values of header `name` in a raw head.
pub fn raw_headers<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift), so bodies are not all zeros.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
