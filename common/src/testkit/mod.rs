//! Test helpers: start the real binaries on loopback and talk to them.
//!
//! Every process is started with `LOG_FORMAT=json`, its stdout read line by
//! line on a thread, so a test can wait for a log line (such as the one that
//! says which port was bound) instead of sleeping and hoping. Processes are
//! killed when their [`Process`] is dropped, also when a test fails.
//!
//! The waits on a [`Process`] block the calling thread: a test that waits for
//! a log line while a spawned request runs needs
//! `#[tokio::test(flavor = "multi_thread")]`.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a broken assumption fails the test that made it"
)]

pub mod layers;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// How long a test waits for anything before it fails.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// A command for an outside tool a test starts (`prometheus`, `chromium`,
/// `kubectl`, ...). When it is not installed the test fails at once,
/// naming the Debian package that provides it (from
/// `scripts/test-deps.list`, the list `make test` installs from).
pub fn tool(name: &str) -> Command {
    if let Some(problem) = missing_tool(name, std::env::var_os("PATH")) {
        panic!("{problem}");
    }
    Command::new(name)
}

/// What to install, if `name` is not on `path` (a `PATH` value).
pub fn missing_tool(name: &str, path: Option<std::ffi::OsString>) -> Option<String> {
    let found =
        path.is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()));
    if found {
        return None;
    }
    let package = include_str!("../../../scripts/test-deps.list")
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                [tool, package] if tool == name => Some(package),
                _ => None,
            },
        );
    Some(match package {
        Some(package) => format!(
            "this test starts `{name}`, which is not installed: run scripts/test-deps.sh \
             (as root it installs it), or sudo apt-get install {package}"
        ),
        None => format!(
            "this test starts `{name}`, which is not installed (kubectl: 1.27 or newer, \
             https://kubernetes.io/docs/tasks/tools/)"
        ),
    })
}

/// The path of a workspace binary, built first if it is missing or older
/// than its sources.
///
/// Integration tests of one crate may start the binaries of another (the
/// load balancer's tests start real backends). `cargo test --workspace`
/// builds every binary already; building again here with `cargo build` would
/// resolve dev-dependency features differently and recompile half the tree,
/// so it is only done when needed (say after `cargo test -p loadbalancer`
/// following a change to the backend).
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_owned();
    let path = profile_dir.join(name);
    // A failed build panics with the lock held; later callers just retry.
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !built.iter().any(|b| b == name) && is_stale(&path, name) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "--package", name, "--bin", name]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo build");
        assert!(status.success(), "cargo build --bin {name} failed");
    }
    built.push(name.to_owned());
    path
}

/// Whether `binary` is missing or older than any source of the workspace
/// crates it is built from (its own crate and `common`).
fn is_stale(binary: &std::path::Path, name: &str) -> bool {
    let Ok(built_at) = binary.metadata().and_then(|m| m.modified()) else {
        return true;
    };
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let mut dirs = vec![workspace.join(name), workspace.join("common")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                if !path.ends_with("target") {
                    dirs.push(path);
                }
            } else if entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > built_at)
            {
                return true;
            }
        }
    }
    false
}

/// A running child process whose JSON log lines are collected.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    /// Joined once the process has exited, so that all of stderr is in.
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Process {
    /// Starts `command` with JSON logs, capturing stdout and stderr.
    pub fn start(name: &str, mut command: Command) -> Process {
        if !command.get_envs().any(|(name, _)| name == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        command
            .env("LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let lines = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let mut err = child.stderr.take().unwrap();
        let text = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            let mut buf = String::new();
            let _ = err.read_to_string(&mut buf);
            text.lock().unwrap().push_str(&buf);
        });
        Process {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
            stderr_reader: Some(stderr_reader),
        }
    }

    /// The log lines so far that parsed as JSON.
    pub fn logs(&self) -> Vec<Value> {
        let lines = self.stdout.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (bounded) for a log line whose message starts with `message`
    /// and that satisfies `matches`.
    pub fn wait_for_log(&mut self, message: &str, matches: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_log_since(0, message, matches)
    }

    /// How many lines have been logged so far, for [`Process::wait_for_log_since`].
    pub fn mark(&self) -> usize {
        self.stdout.lock().unwrap().len()
    }

    /// Like [`Process::wait_for_log`], but only lines logged after `mark`.
    pub fn wait_for_log_since(
        &mut self,
        mark: usize,
        message: &str,
        matches: impl Fn(&Value) -> bool,
    ) -> Value {
        let found = poll(PATIENCE, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) while waiting for log {message:?}\nstdout:\n{}\nstderr:\n{}",
                    self.name,
                    self.stdout.lock().unwrap().join("\n"),
                    self.stderr()
                );
            }
            let lines = self.stdout.lock().unwrap();
            lines[mark.min(lines.len())..]
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|l| {
                    l["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with(message))
                        && matches(l)
                })
        });
        found.unwrap_or_else(|| {
            panic!(
                "{} did not log {message:?} within {PATIENCE:?}; it logged:\n{}",
                self.name,
                self.stdout.lock().unwrap().join("\n")
            )
        })
    }

    /// Waits for the `listening` log line and returns the address in `field`.
    pub fn listening_on(&mut self, field: &str) -> SocketAddr {
        let line = self.wait_for_log("listening", |l| l[field].is_string());
        line[field].as_str().unwrap().parse().unwrap()
    }

    /// Sends SIGTERM, as Kubernetes does to stop a pod.
    pub fn terminate(&self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        use nix::sys::signal::kill;
        use nix::unistd::Pid;
        kill(Pid::from_raw(self.pid() as i32), signal).unwrap();
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends SIGKILL: the process dies without any cleanup, as on a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (bounded) for the process to exit, and for all it wrote to
    /// stderr to be read.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let status = poll(PATIENCE, || self.child.try_wait().unwrap())
            .unwrap_or_else(|| panic!("{} did not exit within {PATIENCE:?}", self.name));
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        status
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Calls `check` every 10 ms until it returns `Some`, for at most `within`.
pub fn poll<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The async twin of [`poll`], for checks that make requests.
pub async fn poll_async<T, F, Fut>(within: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A whole HTTP response, body collected.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON; panics with the body if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Any request body: [`Full`] for a fixed one, [`streaming_body`] for one
/// sent piece by piece (chunked).
pub type TestBody = BoxBody<Bytes, Infallible>;

/// A request body fed through the returned sender, sent chunked.
pub fn streaming_body() -> (http_body_util::channel::Sender<Bytes>, TestBody) {
    let (sender, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
    (sender, body.boxed())
}

/// A keep-alive HTTP/1.1 client for tests.
#[derive(Debug, Clone)]
pub struct Http {
    client: Client<HttpConnector, TestBody>,
}

impl Default for Http {
    fn default() -> Self {
        Http::new()
    }
}

impl Http {
    pub fn new() -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Sends `request` and collects the whole response.
    pub async fn send<B>(&self, request: Request<B>) -> Result<Reply, String>
    where
        B: hyper::body::Body<Data = Bytes, Error = Infallible> + Send + Sync + 'static,
    {
        let response = self
            .client
            .request(request.map(BodyExt::boxed))
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("reading body: {e}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// `GET url`, panicking on a transport error.
    pub async fn get(&self, url: &str) -> Reply {
        self.try_get(url)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }

    /// `GET url`, returning a transport error as `Err`.
    pub async fn try_get(&self, url: &str) -> Result<Reply, String> {
        let request = Request::get(url).body(Full::default()).unwrap();
        self.send(request).await
    }
}
