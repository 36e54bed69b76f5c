//! The request path: from a client's request to a backend's response.
//!
//! For each request the proxy picks a backend from the current snapshot,
//! rewrites the headers a proxy must rewrite, and sends the request over a
//! pooled keep-alive connection. Bodies are streamed both ways, never held
//! whole in memory, so a 1 GiB upload costs no more than a small one.
//!
//! What gets rewritten, and why:
//! - Hop-by-hop headers (`Connection` and the headers it names,
//!   `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`,
//!   `Upgrade`) describe one TCP connection, not the message, so they are
//!   dropped in both directions (RFC 9110, section 7.6.1). hyper sets its own
//!   framing on each side.
//! - `X-Forwarded-For` gets the client's IP appended, `X-Forwarded-Proto`
//!   and `X-Forwarded-Host` are set, so the backend knows who asked.
//! - `Host` is kept as the client sent it: backends see the name the client
//!   used (as nginx's `proxy_set_header Host $host` does); which backend
//!   served is in `x-served-by` on the response.
//! - The request target is rebuilt from the chosen backend and the path. An
//!   absolute-form target (`GET http://other-host/`) only contributes its
//!   path: we never connect anywhere but to a backend, so this is not an
//!   open proxy. `CONNECT` is refused for the same reason.
//!
//! When a backend cannot be reached (connection refused, connect timeout),
//! nothing was sent, so a request without a body is retried on the next
//! backend, and the failed one sits out a cool-down. A request with a body is
//! not retried: its body streams straight from the client and cannot be
//! replayed (nginx and Envoy buffer bodies to replay them; we keep memory
//! flat instead). Once a request has been sent, a failure is a 502 and a
//! backend too slow to answer a 504, with one exception: a bodiless GET,
//! HEAD or OPTIONS is idempotent, so sending it again is harmless. That is
//! what saves the requests in flight on a backend that is killed.
//!
//! WebSocket and other `Upgrade` requests are forwarded with their upgrade
//! headers; once the backend answers `101 Switching Protocols`, bytes are
//! copied both ways between the two upgraded connections.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Empty, Full};
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{PathAndQuery, Scheme};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::balancer::{Backend, Balancer};
use crate::config::Settings;

/// The body of a response to the client: the backend's, streamed, or our
/// own JSON error.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;
/// The body of a request to a backend: the client's, streamed, or none.
type UpstreamBody = Either<Incoming, Empty<Bytes>>;

/// Names the backend that served, so `curl -i` shows the rotation.
pub const SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that only concern one connection (RFC 9110, section 7.6.1), and
/// the non-standard `Proxy-Connection` that some clients still send.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Sends requests to the backends the [`Balancer`] picks.
#[derive(Debug)]
pub struct Proxy {
    balancer: Arc<Balancer>,
    client: Client<HttpConnector, UpstreamBody>,
    request_timeout: Duration,
    retries: u32,
}

/// How one attempt to reach a backend ended badly.
enum Failure {
    /// No connection could be made: nothing was sent.
    Unreachable(hyper_util::client::legacy::Error),
    /// The request was (maybe partly) sent, but no answer came back.
    Failed(hyper_util::client::legacy::Error),
    /// No response headers within the request timeout.
    TimedOut,
}

impl Proxy {
    pub fn new(balancer: Arc<Balancer>, settings: &Settings) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            // The idle timeout only takes effect with a timer to run it.
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .build(connector);
        Proxy {
            balancer,
            client,
            request_timeout: settings.request_timeout,
            retries: settings.retries,
        }
    }

    /// Answers one client request, from a backend or with a JSON error.
    pub async fn handle(
        &self,
        mut request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        if request.method() == Method::CONNECT {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported: this load balancer only forwards requests to its backends",
            );
        }
        let upgrade = upgrade_protocol(request.headers());
        let mut client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        prepare_request_headers(&mut parts.headers, peer.ip(), upgrade.as_ref());

        // A request with no body can be sent again as it was.
        let replayable = body.is_end_stream();
        let idempotent = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        let mut body = (!replayable).then_some(body);
        let mut tried: Vec<SocketAddr> = Vec::new();

        let (backend, outcome) = loop {
            let Some(backend) = self.balancer.pick(&tried) else {
                let reason = if tried.is_empty() {
                    "no backend is available: none was discovered, or all are cooling down after failures"
                } else {
                    "no backend could be reached: every one tried refused or timed out the connection"
                };
                log(
                    &parts.method,
                    &parts.uri,
                    None,
                    StatusCode::SERVICE_UNAVAILABLE,
                    start,
                    tried.len(),
                );
                return error(StatusCode::SERVICE_UNAVAILABLE, reason);
            };
            let may_retry = replayable && (tried.len() as u32) < self.retries;
            let headers = if may_retry {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            let upstream_body = match body.take() {
                Some(incoming) => Either::Left(incoming),
                None => Either::Right(Empty::new()),
            };
            let outgoing = build_request(
                &parts.method,
                &backend,
                path.clone(),
                headers,
                upstream_body,
            );

            match self.send(outgoing).await {
                Ok(response) => break (backend, Ok(response)),
                Err(Failure::Unreachable(e)) => {
                    let cooldown = self.balancer.failed(&backend);
                    tracing::warn!(backend = %backend.addr, ?cooldown, error = %source_chain(&e), "backend unreachable; cooling it down");
                    if !may_retry {
                        break (backend, Err(Failure::Unreachable(e)));
                    }
                }
                Err(Failure::Failed(e)) if idempotent && may_retry => {
                    tracing::warn!(backend = %backend.addr, error = %source_chain(&e), "backend failed before answering; resending the idempotent request");
                }
                Err(failure) => break (backend, Err(failure)),
            }
            tried.push(backend.addr);
        };

        let mut response = match outcome {
            Ok(mut response) => {
                self.balancer.succeeded(&backend);
                if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client_side) = client_upgrade.take() {
                        let backend_side = hyper::upgrade::on(&mut response);
                        tokio::spawn(tunnel(client_side, backend_side, backend.addr));
                    }
                    let protocol = upgrade_protocol(response.headers());
                    remove_hop_by_hop(response.headers_mut());
                    restore_upgrade(response.headers_mut(), protocol.as_ref());
                } else {
                    remove_hop_by_hop(response.headers_mut());
                }
                response.map(Either::Left)
            }
            Err(failure) => failure_response(failure, &backend, self.request_timeout),
        };
        response
            .headers_mut()
            .insert(SERVED_BY, backend.label.clone());
        log(
            &parts.method,
            &parts.uri,
            Some(backend.addr),
            response.status(),
            start,
            tried.len(),
        );
        response
    }

    async fn send(&self, request: Request<UpstreamBody>) -> Result<Response<Incoming>, Failure> {
        match tokio::time::timeout(self.request_timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) if e.is_connect() => Err(Failure::Unreachable(e)),
            Ok(Err(e)) => Err(Failure::Failed(e)),
            Err(_elapsed) => Err(Failure::TimedOut),
        }
    }
}

fn build_request(
    method: &Method,
    backend: &Backend,
    path: PathAndQuery,
    headers: HeaderMap,
    body: UpstreamBody,
) -> Request<UpstreamBody> {
    let mut uri = hyper::http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(backend.authority.clone());
    uri.path_and_query = Some(path);
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    // Scheme, authority and path are all set, so this cannot fail.
    *request.uri_mut() = Uri::from_parts(uri).unwrap_or_default();
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    request
}

fn failure_response(failure: Failure, backend: &Backend, timeout: Duration) -> Response<ProxyBody> {
    let addr = backend.addr;
    match failure {
        // Nothing reached any backend: like "no backend available".
        Failure::Unreachable(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "no backend could be reached; the last, {addr}, failed: {}",
                source_chain(&e)
            ),
        ),
        Failure::Failed(e) => error(
            StatusCode::BAD_GATEWAY,
            &format!("backend {addr} failed: {}", source_chain(&e)),
        ),
        Failure::TimedOut => error(
            StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "backend {addr} did not answer within {} ms",
                timeout.as_millis()
            ),
        ),
    }
}

/// The error and its causes, `: `-separated; hyper's top-level messages
/// alone ("client error (Connect)") do not say what happened.
fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// A JSON error answer: `{"error": "...", "status": 503}`.
pub fn error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": message, "status": status.as_u16() }).to_string();
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn log(
    method: &Method,
    uri: &Uri,
    backend: Option<SocketAddr>,
    status: StatusCode,
    start: Instant,
    retries: usize,
) {
    tracing::info!(
        %method,
        path = uri.path(),
        backend = backend.map(|b| b.to_string()).unwrap_or_else(|| "none".into()),
        status = status.as_u16(),
        latency = ?start.elapsed(),
        retries,
        "proxied"
    );
}

/// The protocol a request or 101 response asks to switch to, if it does:
/// both `Connection: upgrade` and an `Upgrade` header must be present.
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_says_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    connection_says_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// Drops hop-by-hop headers, including those the `Connection` header names.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Puts back the two headers an upgrade needs after hop-by-hop removal.
fn restore_upgrade(headers: &mut HeaderMap, protocol: Option<&HeaderValue>) {
    if let Some(protocol) = protocol {
        headers.insert(header::UPGRADE, protocol.clone());
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Rewrites a client's request headers for the backend.
fn prepare_request_headers(
    headers: &mut HeaderMap,
    client_ip: IpAddr,
    upgrade: Option<&HeaderValue>,
) {
    remove_hop_by_hop(headers);
    restore_upgrade(headers, upgrade);

    // One X-Forwarded-For header: the client's chain, then the client.
    let mut chain = String::new();
    for prior in headers.get_all(X_FORWARDED_FOR) {
        if let Ok(prior) = prior.to_str() {
            let _ = write!(chain, "{prior}, ");
        }
    }
    let _ = write!(chain, "{client_ip}");
    if let Ok(value) = HeaderValue::try_from(chain) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

/// Copies bytes both ways between an upgraded client and backend connection.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    backend: hyper::upgrade::OnUpgrade,
    addr: SocketAddr,
) {
    match tokio::try_join!(client, backend) {
        Ok((client, backend)) => {
            let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
            match tokio::io::copy_bidirectional(&mut client, &mut backend).await {
                Ok((up, down)) => {
                    tracing::debug!(backend = %addr, up, down, "upgraded connection closed")
                }
                Err(e) => tracing::debug!(backend = %addr, error = %e, "upgraded connection ended"),
            }
        }
        Err(e) => tracing::warn!(backend = %addr, error = %e, "upgrade failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut map = headers(&[
            ("connection", "keep-alive, x-session-secret"),
            ("keep-alive", "timeout=5"),
            ("x-session-secret", "abc"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic Zm9v"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "h2c"),
            ("accept", "application/json"),
        ]);
        remove_hop_by_hop(&mut map);
        assert_eq!(map, headers(&[("accept", "application/json")]));
    }

    #[test]
    fn forwarded_headers_are_appended_and_set() {
        let mut map = headers(&[
            ("host", "shop.example"),
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-for", "198.51.100.2"),
            ("x-forwarded-proto", "https"),
        ]);
        prepare_request_headers(&mut map, "10.0.0.9".parse().unwrap(), None);
        assert_eq!(
            map.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["203.0.113.1, 198.51.100.2, 10.0.0.9"]
        );
        assert_eq!(map["x-forwarded-proto"], "http");
        assert_eq!(map["x-forwarded-host"], "shop.example");
        assert_eq!(map["host"], "shop.example");
    }

    #[test]
    fn an_upgrade_request_keeps_its_upgrade_headers() {
        let mut map = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        let protocol = upgrade_protocol(&map);
        assert_eq!(protocol, Some(HeaderValue::from_static("websocket")));
        prepare_request_headers(&mut map, "127.0.0.1".parse().unwrap(), protocol.as_ref());
        assert_eq!(map["upgrade"], "websocket");
        assert_eq!(map["connection"], "upgrade");
        assert_eq!(
            upgrade_protocol(&headers(&[("upgrade", "websocket")])),
            None
        );
    }
}
