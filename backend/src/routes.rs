//! The backend's HTTP routes.
//!
//! `GET /` is the lesson: it answers with the pod's identity, so repeated
//! requests through a load balancer show the rotation. The other routes are
//! tools for later lessons: probes for Kubernetes, slow and large answers to
//! create load, and echoes to check what a proxy forwards.
//!
//! | route | what it does |
//! |---|---|
//! | `GET /` | identity, timestamp, this pod's request count, `X-Forwarded-For` (after `responseDelayMs`) |
//! | `GET /healthz` | liveness: 200 while the process runs |
//! | `GET /readyz` | readiness: 503 once shutdown has started |
//! | `GET /work?ms=N` | holds the request N ms (at most 60 s), then answers like `/` |
//! | `POST /echo` | streams the request body back |
//! | `GET /bytes?n=N` | streams N bytes (at most 1 GiB) |
//! | `GET /status/{code}` | answers with that status |
//! | `GET /headers` | the request headers as JSON |
//! | `GET /ws` | WebSocket echo |
//! | `GET /metrics` | Prometheus metrics |
//! | `POST /admin/unready`, `/admin/ready` | turn `/readyz` 503, or back (lesson tool: active health checks) |
//! | `POST /admin/fail`, `/admin/recover` | make `GET /` answer 500 while staying ready, or stop (lesson tool: outlier ejection) |

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::identity::Identity;
use crate::metrics::Metrics;

/// The longest `/work` may hold a request.
pub const MAX_WORK_MS: u64 = 60_000;
/// The most `/bytes` will send.
pub const MAX_BYTES: u64 = 1 << 30;
const CHUNK: u64 = 64 * 1024;

/// What every handler can see: who we are, whether we are ready, a counter.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    /// Swapped whole when `serviceName` changes in the config.
    identity: ArcSwap<Identity>,
    ready: AtomicBool,
    requests: AtomicU64,
    metrics: Metrics,
    access_log: AtomicBool,
    /// `responseDelayMs`: how long `GET /` waits before answering.
    response_delay_ms: AtomicU64,
    /// Set by `POST /admin/unready`: `/readyz` fails without shutting down.
    made_unready: AtomicBool,
    /// Set by `POST /admin/fail`: `GET /` answers 500.
    failing: AtomicBool,
}

impl AppState {
    pub fn new(identity: Identity) -> AppState {
        AppState(Arc::new(Shared {
            identity: ArcSwap::from_pointee(identity),
            ready: AtomicBool::new(true),
            requests: AtomicU64::new(0),
            metrics: Metrics::default(),
            access_log: AtomicBool::new(true),
            response_delay_ms: AtomicU64::new(0),
            made_unready: AtomicBool::new(false),
            failing: AtomicBool::new(false),
        }))
    }

    /// Answers as `service_name` from now on.
    pub fn set_service_name(&self, service_name: &str) {
        let mut identity = Identity::clone(&self.0.identity.load());
        identity.service_name = service_name.to_owned();
        self.0.identity.store(Arc::new(identity));
    }

    /// Makes every `GET /` wait `delay` first (a slow replica, for the
    /// lessons on balancing algorithms).
    pub fn set_response_delay(&self, delay: Duration) {
        self.0
            .response_delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Turns the per-request log line on or off.
    pub fn set_access_log(&self, on: bool) {
        self.0.access_log.store(on, Ordering::Relaxed);
    }

    /// From now on `/readyz` answers 503, so Kubernetes stops sending traffic.
    pub fn stop_being_ready(&self) {
        self.0.ready.store(false, Ordering::Relaxed);
    }
}

/// All routes, with one log line per request.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(whoami))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/work", get(work))
        .route("/echo", post(echo).put(echo))
        .route("/bytes", get(bytes))
        .route("/status/{code}", any(status))
        .route("/headers", get(headers))
        .route("/ws", get(websocket))
        .route("/metrics", get(metrics))
        .route("/admin/{switch}", post(admin))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), log_request))
        .with_state(state)
}

/// The answer to `GET /`: which pod served this request.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct WhoAmI<'a> {
    #[serde(flatten)]
    identity: &'a Identity,
    /// RFC 3339, UTC.
    timestamp: String,
    /// How many requests this pod has answered at `/` and `/work`.
    request_count: u64,
    /// The client chain a proxy reported, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    forwarded_for: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    worked_ms: Option<u64>,
}

impl AppState {
    fn whoami(&self, headers: &HeaderMap, worked_ms: Option<u64>) -> Response {
        let identity = self.0.identity.load();
        Json(WhoAmI {
            identity: &identity,
            timestamp: jiff::Timestamp::now().to_string(),
            request_count: self.0.requests.fetch_add(1, Ordering::Relaxed) + 1,
            forwarded_for: headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()),
            worked_ms,
        })
        .into_response()
    }
}

async fn whoami(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if state.0.failing.load(Ordering::Relaxed) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "failing on purpose (POST /admin/recover to stop)".into(),
        );
    }
    let delay = state.0.response_delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    state.whoami(&headers, None)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let unavailable = |why: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": why })),
        )
    };
    if !state.0.ready.load(Ordering::Relaxed) {
        unavailable("shutting down")
    } else if state.0.made_unready.load(Ordering::Relaxed) {
        unavailable("made unready by POST /admin/unready")
    } else {
        (StatusCode::OK, Json(json!({ "status": "ready" })))
    }
}

/// The lesson switches: `unready`/`ready` flip `/readyz`, `fail`/`recover`
/// flip whether `GET /` answers 500.
async fn admin(State(state): State<AppState>, Path(switch): Path<String>) -> Response {
    let (flag, on) = match switch.as_str() {
        "unready" => (&state.0.made_unready, true),
        "ready" => (&state.0.made_unready, false),
        "fail" => (&state.0.failing, true),
        "recover" => (&state.0.failing, false),
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no switch {switch:?}: use unready, ready, fail or recover"),
            );
        }
    };
    flag.store(on, Ordering::Relaxed);
    tracing::info!(switch, "admin switch set");
    Json(json!({ "switch": switch })).into_response()
}

#[derive(Debug, Deserialize)]
struct WorkParams {
    ms: u64,
}

async fn work(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<WorkParams>, QueryRejection>,
) -> Response {
    let ms = match params {
        Ok(Query(WorkParams { ms })) if ms <= MAX_WORK_MS => ms,
        Ok(_) => return bad_request(format!("ms must be at most {MAX_WORK_MS}")),
        Err(rejection) => return bad_request(format!("expected ?ms=N: {}", rejection.body_text())),
    };
    tracing::debug!(ms, "work started");
    tokio::time::sleep(Duration::from_millis(ms)).await;
    state.whoami(&headers, Some(ms))
}

async fn echo(headers: HeaderMap, body: Body) -> Response {
    let mut response = Response::new(body);
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type.clone());
    }
    response
}

#[derive(Debug, Deserialize)]
struct BytesParams {
    n: u64,
}

/// Streams `n` bytes of a fixed pattern (byte `i` is `i % 251`), so a client
/// can check what it received without the server holding it all in memory.
async fn bytes(params: Result<Query<BytesParams>, QueryRejection>) -> Response {
    let n = match params {
        Ok(Query(BytesParams { n })) if n <= MAX_BYTES => n,
        Ok(_) => return bad_request(format!("n must be at most {MAX_BYTES}")),
        Err(rejection) => return bad_request(format!("expected ?n=N: {}", rejection.body_text())),
    };
    let chunks = (0..n).step_by(CHUNK as usize).map(move |offset| {
        let chunk: Vec<u8> = (offset..n.min(offset + CHUNK))
            .map(|i| (i % 251) as u8)
            .collect();
        Ok::<_, Infallible>(Bytes::from(chunk))
    });
    let mut response = Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    response
}

async fn status(Path(code): Path<String>) -> Response {
    match code
        .parse::<u16>()
        .ok()
        .filter(|c| (100..=599).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok())
    {
        Some(code) if code.is_informational() => {
            bad_request("1xx codes cannot be a final answer".into())
        }
        Some(code) if code == StatusCode::NO_CONTENT || code == StatusCode::NOT_MODIFIED => {
            code.into_response()
        }
        Some(code) => (code, Json(json!({ "status": code.as_u16() }))).into_response(),
        None => bad_request(format!("{code:?} is not a status code (100-599)")),
    }
}

/// Every request header, each name with all its values in order.
async fn headers(headers: HeaderMap) -> Json<BTreeMap<String, Vec<String>>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &headers {
        map.entry(name.to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    Json(map)
}

async fn websocket(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(echo_messages)
}

async fn echo_messages(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        let reply = match message {
            Message::Text(_) | Message::Binary(_) => message,
            Message::Close(_) => break,
            // axum answers pings itself.
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}

async fn not_found(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

fn bad_request(message: String) -> Response {
    error(StatusCode::BAD_REQUEST, message)
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    common::exposition::respond(&headers, state.0.metrics.encode())
}

/// One log line and one metrics update per request. Probes are logged at
/// debug: the kubelet sends them every few seconds and they would drown the
/// lesson.
async fn log_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr);
    let forwarded_for = request
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let latency = start.elapsed();
    state
        .0
        .metrics
        .record(&route, status, latency.as_secs_f64());
    if path == "/healthz" || path == "/readyz" || !state.0.access_log.load(Ordering::Relaxed) {
        tracing::debug!(%method, path, status, ?latency, ?peer, "request");
    } else {
        tracing::info!(%method, path, status, ?latency, ?peer, ?forwarded_for, request_id, "request");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn state() -> AppState {
        AppState::new(Identity {
            pod_name: "backend-abc".into(),
            pod_ip: "10.244.0.9".into(),
            namespace: "lb-demo".into(),
            node_name: None,
            service_name: "backend".into(),
        })
    }

    async fn call(
        state: &AppState,
        method: &str,
        uri: &str,
        body: Body,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .body(body)
            .unwrap();
        let response = app(state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, headers, body)
    }

    async fn get(state: &AppState, uri: &str) -> (StatusCode, serde_json::Value) {
        let (status, headers, body) = call(state, "GET", uri, Body::empty()).await;
        assert_eq!(headers[header::CONTENT_TYPE], "application/json", "{uri}");
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn root_names_the_pod_and_counts_requests() {
        let state = state();
        let (status, first) = get(&state, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(first["podName"], "backend-abc");
        assert_eq!(first["podIP"], "10.244.0.9");
        assert_eq!(first["namespace"], "lb-demo");
        assert_eq!(first["serviceName"], "backend");
        assert_eq!(first["requestCount"], 1);
        let timestamp: jiff::Timestamp = first["timestamp"].as_str().unwrap().parse().unwrap();
        assert!(
            first["timestamp"].as_str().unwrap().ends_with('Z'),
            "UTC: {first}"
        );
        assert!((jiff::Timestamp::now() - timestamp).get_seconds().abs() < 60);
        let (_, second) = get(&state, "/").await;
        assert_eq!(second["requestCount"], 2);
        assert!(second.get("forwardedFor").is_none());
    }

    #[tokio::test]
    async fn root_shows_the_forwarded_for_chain() {
        let request = Request::get("/")
            .header("x-forwarded-for", "203.0.113.7, 10.0.0.1")
            .body(Body::empty())
            .unwrap();
        let response = app(state()).oneshot(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["forwardedFor"], "203.0.113.7, 10.0.0.1");
    }

    #[tokio::test]
    async fn readiness_fails_once_shutdown_starts_but_liveness_does_not() {
        let state = state();
        assert_eq!(get(&state, "/readyz").await.0, StatusCode::OK);
        state.stop_being_ready();
        let (status, body) = get(&state, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "shutting down");
        assert_eq!(get(&state, "/healthz").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn unknown_routes_and_wrong_methods_get_json_errors() {
        let state = state();
        let (status, body) = get(&state, "/nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "no route for GET /nope");

        let (status, headers, body) = call(&state, "DELETE", "/healthz", Body::empty()).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "DELETE is not allowed on /healthz");
    }

    #[tokio::test(start_paused = true)]
    async fn work_holds_the_request_for_the_asked_time() {
        let started = tokio::time::Instant::now();
        let (status, body) = get(&state(), "/work?ms=1500").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["workedMs"], 1500);
        assert!(started.elapsed() >= Duration::from_millis(1500));
    }

    #[tokio::test]
    async fn work_rejects_bad_and_excessive_durations() {
        let state = state();
        let (status, body) = get(&state, "/work?ms=soon").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .starts_with("expected ?ms=N"),
            "{body}"
        );
        let (status, body) = get(&state, "/work?ms=60001").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "ms must be at most 60000");
    }

    #[tokio::test]
    async fn echo_returns_the_body_and_its_content_type() {
        let request = Request::post("/echo")
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from("hello, pod"))
            .unwrap();
        let response = app(state()).oneshot(request).await.unwrap();
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/plain");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello, pod");
    }

    #[tokio::test]
    async fn bytes_streams_the_pattern() {
        let (status, _, body) = call(&state(), "GET", "/bytes?n=70000", Body::empty()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.len(), 70_000);
        assert!(body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        let (status, _) = get(&state(), "/bytes?n=1073741825").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn the_admin_switches_flip_readiness_and_failure() {
        let state = state();
        let post = |path: &'static str| call(&state, "POST", path, Body::empty());
        assert_eq!(post("/admin/unready").await.0, StatusCode::OK);
        assert_eq!(
            get(&state, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        post("/admin/ready").await;
        assert_eq!(get(&state, "/readyz").await.0, StatusCode::OK);
        post("/admin/fail").await;
        assert_eq!(get(&state, "/").await.0, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            get(&state, "/readyz").await.0,
            StatusCode::OK,
            "still ready"
        );
        post("/admin/recover").await;
        assert_eq!(get(&state, "/").await.0, StatusCode::OK);
        assert_eq!(post("/admin/explode").await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn status_answers_with_the_asked_code() {
        let state = state();
        let (status, body) = get(&state, "/status/503").await;
        assert_eq!(
            (status, body["status"].as_u64()),
            (StatusCode::SERVICE_UNAVAILABLE, Some(503))
        );
        let (status, _, body) = call(&state, "GET", "/status/204", Body::empty()).await;
        assert_eq!((status, body.len()), (StatusCode::NO_CONTENT, 0));
        assert_eq!(
            get(&state, "/status/teapot").await.0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(get(&state, "/status/101").await.0, StatusCode::BAD_REQUEST);
        assert_eq!(get(&state, "/status/599").await.0.as_u16(), 599);
        for beyond in ["/status/600", "/status/999"] {
            let (status, body) = get(&state, beyond).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{beyond}");
            assert!(
                body["error"]
                    .as_str()
                    .unwrap()
                    .ends_with("is not a status code (100-599)"),
                "{body}"
            );
        }
    }

    #[tokio::test]
    async fn headers_lists_every_value() {
        let request = Request::get("/headers")
            .header("x-forwarded-for", "1.2.3.4")
            .header("x-forwarded-for", "5.6.7.8")
            .body(Body::empty())
            .unwrap();
        let response = app(state()).oneshot(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json["x-forwarded-for"],
            serde_json::json!(["1.2.3.4", "5.6.7.8"])
        );
    }
}
