//! The stand-in speaks the API the way `make demo` and a learner's `curl`
//! use it: PUT and DELETE an EndpointSlice, watch without a version.
#![expect(
    clippy::unwrap_used,
    reason = "a test crate: a failed unwrap is a failed test"
)]

use std::time::Duration;

use fake_apiserver::FakeApiServer;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/demo/endpointslices";

fn slice(name: &str, ip: &str) -> Value {
    json!({
        "metadata": { "name": name, "labels": { "kubernetes.io/service-name": "backend" } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080 }],
        "endpoints": [{ "addresses": [ip], "conditions": { "ready": true } }],
    })
}

/// One HTTP/1.1 request on its own connection: the status and the body.
async fn call(
    server: &FakeApiServer,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: fake\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer[9..12].parse().unwrap();
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn put_and_delete_reach_lists_and_a_watch_without_a_version() {
    let server = FakeApiServer::start("demo").await;
    let (status, stored) = call(
        &server,
        "PUT",
        &format!("{SLICES}/one"),
        Some(slice("one", "127.0.0.11")),
    )
    .await;
    assert_eq!(status, 200, "{stored}");
    assert_eq!(stored["kind"], "EndpointSlice");

    // A watch with no resourceVersion starts with the objects there are.
    let mut watch = TcpStream::connect(server.addr).await.unwrap();
    watch
        .write_all(format!("GET {SLICES}?watch=1 HTTP/1.1\r\nhost: fake\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut events = BufReader::new(watch);
    let mut next_event = async || loop {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(10), events.read_line(&mut line))
            .await
            .expect("a watch event within 10 s")
            .unwrap();
        // Skip the response head and the chunk sizes (some parse as numbers).
        if let Ok(event @ Value::Object(_)) = serde_json::from_str::<Value>(line.trim()) {
            return event;
        }
    };
    let first = next_event().await;
    assert_eq!(first["type"], "ADDED");
    assert_eq!(first["object"]["metadata"]["name"], "one");

    let (status, _) = call(
        &server,
        "PUT",
        &format!("{SLICES}/one"),
        Some(slice("one", "127.0.0.12")),
    )
    .await;
    assert_eq!(status, 200);
    let modified = next_event().await;
    assert_eq!(modified["type"], "MODIFIED");
    assert_eq!(
        modified["object"]["endpoints"][0]["addresses"][0],
        "127.0.0.12"
    );

    let (status, _) = call(&server, "DELETE", &format!("{SLICES}/one"), None).await;
    assert_eq!(status, 200);
    assert_eq!(next_event().await["type"], "DELETED");
    let (_, list) = call(&server, "GET", SLICES, None).await;
    assert_eq!(list["items"], json!([]));
}

#[tokio::test]
async fn a_bad_object_is_refused_with_what_is_wrong() {
    let server = FakeApiServer::start("demo").await;
    let (status, answer) = call(
        &server,
        "PUT",
        &format!("{SLICES}/two"),
        Some(slice("one", "127.0.0.11")),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("does not match the name on the URL"),
        "{answer}"
    );

    let mut wrong_port = slice("one", "127.0.0.11");
    wrong_port["ports"][0]["port"] = json!("eighty");
    let (status, answer) = call(&server, "PUT", &format!("{SLICES}/one"), Some(wrong_port)).await;
    assert_eq!(status, 400);
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("ports[0].port"),
        "{answer}"
    );

    let (status, answer) = call(&server, "DELETE", &format!("{SLICES}/absent"), None).await;
    assert_eq!(status, 404);
    assert_eq!(answer["reason"], "NotFound");
}

/// `kubectl ARGS` against `kubeconfig`: whether it succeeded, and its
/// output and errors. `None` when no kubectl is installed at all.
fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> Option<(bool, String)> {
    let output = std::process::Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output();
    match output {
        Ok(output) => {
            let text = String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr);
            Some((output.status.success(), text))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => panic!("running kubectl: {error}"),
    }
}

/// The real client finds the resources through the discovery documents,
/// then lists, gets and watches them as it would on a cluster.
#[tokio::test(flavor = "multi_thread")]
async fn the_real_kubectl_lists_gets_and_watches_endpointslices() {
    let server = FakeApiServer::start("demo").await;
    let kubeconfig = server.kubeconfig("demo");
    let path = kubeconfig.path();
    let Some((_, version)) = kubectl(path, &["version", "--client"]) else {
        eprintln!(
            "skipped: no kubectl installed (CI has one; https://kubernetes.io/docs/tasks/tools/)"
        );
        return;
    };
    assert!(version.contains("Client Version"), "{version}");
    call(
        &server,
        "PUT",
        &format!("{SLICES}/backend-a"),
        Some(slice("backend-a", "10.0.0.1")),
    )
    .await;

    let (ok, listed) = kubectl(path, &["get", "endpointslices", "-o", "name"]).unwrap();
    assert!(
        ok && listed.contains("endpointslice.discovery.k8s.io/backend-a"),
        "{listed}"
    );
    let jsonpath = "-o=jsonpath={.endpoints[0].addresses[0]}";
    let (ok, address) = kubectl(path, &["get", "endpointslice", "backend-a", jsonpath]).unwrap();
    assert!(ok && address == "10.0.0.1", "{address}");
    let (ok, missing) = kubectl(path, &["get", "endpointslice", "nope"]).unwrap();
    assert!(
        !ok && missing.contains(r#"endpointslices.discovery.k8s.io "nope" not found"#),
        "{missing}"
    );

    let mut watch = std::process::Command::new("kubectl")
        .args(["get", "endpointslices", "-w", "--output-watch-events"])
        .env("KUBECONFIG", path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map(Stopped)
        .unwrap();
    let (lines, seen) = std::sync::mpsc::channel();
    let stdout = watch.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines.send(line);
        }
    });
    let next = |wanted: &str| loop {
        match seen.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line.contains(wanted) => return line,
            Ok(_) => continue,
            Err(_) => panic!("kubectl -w never showed {wanted}"),
        }
    };
    next("ADDED");
    call(
        &server,
        "PUT",
        &format!("{SLICES}/backend-a"),
        Some(slice("backend-a", "10.0.0.2")),
    )
    .await;
    assert!(next("MODIFIED").contains("backend-a"));
}

/// A child process stopped (by PID) when dropped, also when a test fails.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `kubectl scale` goes through the Deployment's scale subresource, and
/// `kubectl patch --type merge` through a JSON merge patch; a strategic
/// merge patch is refused with what to use instead.
#[tokio::test(flavor = "multi_thread")]
async fn the_real_kubectl_scales_a_deployment_and_patches_a_configmap() {
    let server = FakeApiServer::start("demo").await;
    let kubeconfig = server.kubeconfig("demo");
    let path = kubeconfig.path();
    if kubectl(path, &["version", "--client"]).is_none() {
        eprintln!(
            "skipped: no kubectl installed (CI has one; https://kubernetes.io/docs/tasks/tools/)"
        );
        return;
    }
    let deployment = json!({
        "metadata": { "name": "backend" },
        "spec": {
            "replicas": 3,
            "selector": { "matchLabels": { "app": "backend" } },
            "template": {
                "metadata": { "labels": { "app": "backend" } },
                "spec": { "containers": [{ "name": "backend", "image": "lb-demo/backend:0.1.0" }] },
            },
        },
    });
    let config =
        json!({ "metadata": { "name": "backend-config" }, "data": { "config.json": "{}" } });
    let (created, _) = call(
        &server,
        "PUT",
        "/apis/apps/v1/namespaces/demo/deployments/backend",
        Some(deployment),
    )
    .await;
    assert_eq!(created, 200);
    let (created, _) = call(
        &server,
        "PUT",
        "/api/v1/namespaces/demo/configmaps/backend-config",
        Some(config),
    )
    .await;
    assert_eq!(created, 200);

    let (ok, said) = kubectl(path, &["scale", "deployment/backend", "--replicas=5"]).unwrap();
    assert!(ok && said.contains("scaled"), "{said}");
    let replicas = "-o=jsonpath={.spec.replicas}";
    let (_, now) = kubectl(path, &["get", "deploy", "backend", replicas]).unwrap();
    assert_eq!(now, "5");

    let patch = r#"{"data":{"config.json":"{\"serviceName\":\"catalog\"}"}}"#;
    let (ok, said) = kubectl(
        path,
        &[
            "patch",
            "configmap",
            "backend-config",
            "--type",
            "merge",
            "-p",
            patch,
        ],
    )
    .unwrap();
    assert!(ok, "{said}");
    let (_, data) = kubectl(
        path,
        &[
            "get",
            "cm",
            "backend-config",
            r"-o=jsonpath={.data.config\.json}",
        ],
    )
    .unwrap();
    assert_eq!(data, r#"{"serviceName":"catalog"}"#);
    let (ok, refused) =
        kubectl(path, &["patch", "configmap", "backend-config", "-p", patch]).unwrap();
    assert!(
        !ok && refused.contains("--type merge") && refused.contains("use kind"),
        "{refused}"
    );
    let created = ["create", "configmap", "other", "--from-literal=a=b"];
    let (ok, refused) = kubectl(path, &created).unwrap();
    assert!(!ok && refused.contains("use kind"), "{refused}");
}
