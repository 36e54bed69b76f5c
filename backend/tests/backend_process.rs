//! The real `backend` binary, started as Kubernetes would start it: a config
//! file, Downward API variables, and SIGTERM to stop it.

#![expect(
    clippy::unwrap_used,
    reason = "a test crate: a failed unwrap is a failed test"
)]

use std::io::Write;
use std::process::Command;

use common::testkit::{Http, Process};

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

fn backend(config: &tempfile::NamedTempFile) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_backend"));
    command
        .args(["--host", "127.0.0.1", "--config"])
        .arg(config.path());
    command
}

#[tokio::test]
async fn answers_with_the_downward_api_identity_and_the_configured_service() {
    let config = config_file(r#"{"port": 0, "serviceName": "greeter"}"#);
    let mut command = backend(&config);
    command
        .env("POD_NAME", "backend-x")
        .env("POD_IP", "10.0.0.7")
        .env("POD_NAMESPACE", "lb-demo")
        .env("NODE_NAME", "kind-worker");
    let mut process = Process::start("backend", command);
    let addr = process.listening_on("addr");

    let reply = Http::new().get(&format!("http://{addr}/")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let json = reply.json();
    assert_eq!(json["podName"], "backend-x");
    assert_eq!(json["podIP"], "10.0.0.7");
    assert_eq!(json["namespace"], "lb-demo");
    assert_eq!(json["nodeName"], "kind-worker");
    assert_eq!(json["serviceName"], "greeter");
    assert!(json["timestamp"].is_string());

    let logged = process.wait_for_log("request", |l| l["path"] == "/");
    assert_eq!(logged["method"], "GET");
    assert_eq!(logged["status"], 200);
}

// multi_thread: the test blocks on log lines while the request runs.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_zero() {
    let config = config_file(r#"{"port": 0}"#);
    let mut command = backend(&config);
    command.env("RUST_LOG", "debug");
    let mut process = Process::start("backend", command);
    let addr = process.listening_on("addr");

    let slow = tokio::spawn(async move {
        Http::new()
            .try_get(&format!("http://{addr}/work?ms=1500"))
            .await
    });
    process.wait_for_log("work started", |_| true);
    process.terminate();
    process.wait_for_log("no longer ready; finishing in-flight requests", |_| true);

    let reply = slow
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["workedMs"], 1500);
    assert!(process.wait_exit().success(), "exit status 0 after SIGTERM");
}

#[test]
fn a_typo_in_the_config_exits_non_zero_naming_the_field() {
    let config = config_file("{\n  \"prot\": 80\n}\n");
    let mut process = Process::start("backend", backend(&config));
    let status = process.wait_exit();
    assert_eq!(status.code(), Some(1));
    let stderr = process.stderr();
    assert!(
        stderr.contains(&config.path().display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("unknown field `prot`"), "{stderr}");
    assert!(stderr.contains("line 2, column 8"), "{stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line, no backtrace: {stderr}"
    );
}
