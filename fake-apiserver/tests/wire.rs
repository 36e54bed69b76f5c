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
