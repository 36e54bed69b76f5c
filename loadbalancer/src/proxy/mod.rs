//! The request path: from a client's request to a backend's response.
//!
//! For each request the proxy picks a backend from the current snapshot,
//! rewrites the headers a proxy must rewrite ([`headers`]), and sends the
//! request over a pooled keep-alive connection. Bodies are streamed both
//! ways, never held whole in memory, so a 1 GiB upload costs no more than a
//! small one; each has an idle timeout ([`body`]).
//!
//! The request target is rebuilt from the chosen backend and the path. An
//! absolute-form target (`GET http://other-host/`) only contributes its
//! path: we never connect anywhere but to a backend, so this is not an open
//! proxy. `CONNECT` is refused for the same reason.
//!
//! When a backend cannot be reached (connection refused, connect timeout),
//! nothing was sent, so a request without a body is retried on the next
//! backend, and the failed one is ejected (see [`crate::balancer::health`]).
//! A request with a body is
//! not retried: its body streams straight from the client and cannot be
//! replayed (nginx and Envoy buffer bodies to replay them; we keep memory
//! flat instead). Once a request has been sent, a failure is a 502 and a
//! backend too slow to answer a 504, with one exception: a bodiless GET,
//! HEAD or OPTIONS is idempotent, so sending it again is harmless. That is
//! what saves the requests in flight on a backend that is killed. When every
//! attempt failed, the client hears about the last real failure.
//!
//! Not every failure is the backend's: a client whose upload is malformed
//! gets 400 (408 if it stalls), and the load balancer's own shortage of file
//! descriptors or local ports is a 503 that leaves the backend's health
//! record alone. See [`Failure`].
//!
//! Clients may speak HTTP/1.1 or HTTP/2 (h2c, see [`common::serve`]); with
//! HTTP/2 every request (stream) of one connection is balanced on its own,
//! which a Kubernetes Service, balancing connections, cannot do. Backends are
//! spoken to over HTTP/1.1, or over HTTP/2 with `"backendProtocol": "h2c"`
//! (one multiplexed connection per backend); trailers pass both ways.
//!
//! WebSocket and other `Upgrade` requests are forwarded with their upgrade
//! headers (to HTTP/1.1 backends; h2c ones cannot take them: 501); once the
//! backend answers `101 Switching Protocols`, bytes are copied both ways
//! between the two upgraded connections. A 101 to a request that did not
//! ask to upgrade is a broken backend: 502.

mod body;
mod detach;
pub mod headers;
mod pool;

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use common::telemetry::Throttle;
use http_body_util::{Either, Empty, Full};
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::uri::{PathAndQuery, Scheme};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use nix::errno::Errno;

use crate::balancer::{Backend, Balancer, Outcome};
use crate::config::{BackendProtocol, Settings};
use crate::metrics::InFlight;
use body::{BodyError, Held, Timed, Upload};
use common::serve::Slot;
use detach::Detachable;
pub use headers::{SERVED_BY, X_REQUEST_ID};
use headers::{
    prepare_request_headers, remove_hop_by_hop, request_id, restore_upgrade, upgrade_protocol,
};
pub use pool::Connections;
use pool::{ConnectError, Lease, Timeouts};

/// The body of a response to the client: the backend's, streamed, or our
/// own JSON error.
pub type ProxyBody = Either<Timed<Incoming>, Full<Bytes>>;
/// The body of a request to a backend: the client's, streamed, or none.
pub type UpstreamBody = Either<Timed<Incoming>, Empty<Bytes>>;

/// A client connection's address, with its IP as `X-Forwarded-For` writes
/// it: formatted once per connection, not once per request.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    ip: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        let ip = match addr.ip() {
            // By hand: `Ipv4Addr`'s `Display` costs a thousand instructions,
            // a tenth of what accepting a connection costs us (callgrind).
            IpAddr::V4(v4) => {
                let mut text = String::with_capacity(15);
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push('.');
                    }
                    text.push_str(itoa::Buffer::new().format(octet));
                }
                text
            }
            IpAddr::V6(v6) => v6.to_string(),
        };
        let ip = HeaderValue::try_from(ip).unwrap_or(HeaderValue::from_static("unknown"));
        Peer { addr, ip }
    }
}

/// Sends requests to the backends the [`Balancer`] picks.
#[derive(Debug)]
pub struct Proxy {
    balancer: Arc<Balancer>,
    /// Swapped whole when the config changes; read once per request.
    upstream: ArcSwap<Upstream>,
    /// One `proxied` line per request (`accessLog`).
    access_log: AtomicBool,
}

/// How requests are sent: the limits from the config. The connections
/// themselves are kept per backend ([`Connections`]).
#[derive(Debug)]
struct Upstream {
    /// HTTP/2 to the backends (`backendProtocol: "h2c"`).
    h2c: bool,
    connect_timeout: Duration,
    pool_idle_timeout: Duration,
    request_timeout: Duration,
    body_idle_timeout: Duration,
    retries: u32,
}

/// How one attempt ended badly, and whose fault it was. Each carries the
/// cause, as text.
enum Failure {
    /// No backend to try: discovery has found none. (When all are ejected
    /// the balancer fails open instead.)
    NoBackend,
    /// No connection could be made: nothing was sent. The backend's fault.
    Unreachable(String),
    /// We ran out of file descriptors or local ports: our own fault, never
    /// held against a backend.
    Local(String),
    /// The client's request body was malformed or stalled: the client's fault.
    Client(BodyError),
    /// The request was (maybe partly) sent, but no proper answer came back.
    Failed(String),
    /// No response headers within the request timeout.
    TimedOut,
}

impl Upstream {
    fn timeouts(&self) -> Timeouts {
        Timeouts {
            connect: self.connect_timeout,
            send: self.body_idle_timeout,
        }
    }

    fn new(settings: &Settings) -> Upstream {
        Upstream {
            h2c: settings.backend_protocol == BackendProtocol::H2c,
            connect_timeout: settings.connect_timeout,
            pool_idle_timeout: settings.pool_idle_timeout,
            request_timeout: settings.request_timeout,
            body_idle_timeout: settings.body_idle_timeout,
            retries: settings.retries,
        }
    }
}

impl Proxy {
    pub fn new(balancer: Arc<Balancer>, settings: &Settings) -> Proxy {
        Proxy {
            balancer,
            upstream: ArcSwap::from_pointee(Upstream::new(settings)),
            access_log: AtomicBool::new(settings.access_log),
        }
    }

    /// Applies changed timeouts, retries and `accessLog` to the requests
    /// that start from now on; requests in flight finish as they began.
    pub fn configure(&self, settings: &Settings) {
        self.upstream.store(Arc::new(Upstream::new(settings)));
        self.access_log.store(settings.access_log, Relaxed);
    }

    /// Answers one client request, from a backend or with a JSON error.
    pub async fn handle(&self, mut request: Request<Incoming>, peer: &Peer) -> Response<ProxyBody> {
        let start = Instant::now();
        let upstream = self.upstream.load_full();
        if request.method() == Method::CONNECT {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported: this load balancer only forwards requests to its backends",
            );
        }
        if let Some(problem) = authority_problem(&request) {
            return error(StatusCode::BAD_REQUEST, problem);
        }
        // An HTTP/2 stream's place among its connection's streams, kept
        // until the exchange with the backend has ended.
        let mut slot = request.extensions_mut().remove::<Slot>();
        let upgrade = upgrade_protocol(request.headers());
        if upgrade.is_some() && upstream.h2c {
            return error(
                StatusCode::NOT_IMPLEMENTED,
                "upgrades (WebSocket) need HTTP/1.1 backends; these are reached over h2c",
            );
        }
        let mut client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        // HTTP/2 names the host in `:authority`; HTTP/1.1 backends need `Host`.
        if !parts.headers.contains_key(header::HOST)
            && let Some(authority) = parts.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, host);
        }
        // Read before the hop-by-hop headers go; only h2c backends need it.
        let wants_trailers = upstream.h2c && headers::accepts_trailers(&parts.headers);
        let request_id = request_id(&parts.headers);
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        prepare_request_headers(&mut parts.headers, &peer.ip, upgrade.as_ref());
        parts.headers.insert(X_REQUEST_ID, request_id.clone());
        // gRPC servers want `te: trailers`, the one TE an HTTP/2 hop keeps.
        if wants_trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }

        // A request with no body can be sent again as it was.
        let replayable = body.is_end_stream();
        let idempotent = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        let upload = (!replayable).then(Arc::<Upload>::default);
        let mut body = upload.clone().map(|upload| {
            Timed::from_client(body, upstream.body_idle_timeout, peer.addr, upload)
                .read_over_http2(upstream.h2c)
        });
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last_failure = None;

        let outcome = loop {
            let picked = if tried.is_empty() {
                self.balancer.pick_first().await
            } else {
                self.balancer.pick(&tried)
            };
            let Some(backend) = picked else {
                break Err(match last_failure.take() {
                    Some((backend, failure)) => (Some(backend), failure),
                    None => (None, Failure::NoBackend),
                });
            };
            let may_retry = replayable && (tried.len() as u32) < upstream.retries;
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
                upstream.h2c,
            );

            let in_flight = InFlight::start(backend.clone());
            let exchange = send(
                upstream.clone(),
                backend.clone(),
                outgoing,
                client_upgrade.is_some(),
            );
            let sent = match &slot {
                Some(slot) => Detachable::new(exchange, slot.clone()).await,
                None => exchange.await,
            };
            match sent {
                Ok((response, lease)) => break Ok((backend, response, in_flight, lease)),
                Err(failure) if self.retry_after(&failure, &backend, may_retry, idempotent) => {
                    tried.push(backend.addr);
                    last_failure = Some((backend, failure));
                }
                Err(failure) => break Err((Some(backend), failure)),
            }
        };

        // `counted` is the backend the answer is counted against: the one
        // that answered, or failed to; not one blameless for the failure.
        let (backend, counted, mut response) = match outcome {
            Ok((backend, response, in_flight, lease)) => {
                let outcome = if response.status().is_server_error() {
                    Outcome::ServerError
                } else {
                    Outcome::Success
                };
                self.balancer.record(&backend, outcome);
                let response = relay(
                    response,
                    parts.version,
                    &backend,
                    upstream.body_idle_timeout,
                    client_upgrade.take(),
                    upload,
                    Held {
                        in_flight,
                        lease,
                        slot: slot.take(),
                    },
                );
                (Some(backend.clone()), Some(backend), response)
            }
            Err((backend, failure)) => {
                let blamed = failure.blames_backend().then(|| backend.clone()).flatten();
                let response = failure_response(failure, backend.as_deref(), &upstream);
                (backend, blamed, response)
            }
        };
        let status = response.status();
        match &counted {
            Some(backend) => backend.stats.answered(status.as_u16(), start.elapsed()),
            None => self.balancer.totals.unrouted(status.as_u16()),
        }
        let headers = response.headers_mut();
        if let Some(backend) = &backend {
            headers.insert(SERVED_BY, backend.label.clone());
        }
        headers.insert(X_REQUEST_ID, request_id.clone());
        if self.access_log.load(Relaxed) && tracing::enabled!(tracing::Level::INFO) {
            log(
                &parts,
                backend.as_deref(),
                status,
                start,
                tried.len(),
                &request_id,
            );
        }
        response
    }

    /// Whether to try another backend after `failure` on `backend`; the
    /// failure also goes into the backend's health record here.
    fn retry_after(
        &self,
        failure: &Failure,
        backend: &Backend,
        may_retry: bool,
        idempotent: bool,
    ) -> bool {
        let retry = match failure {
            Failure::Unreachable(cause) => {
                tracing::warn!(backend = %backend.addr, error = cause, "backend unreachable");
                may_retry
            }
            Failure::Failed(cause) if idempotent && may_retry => {
                tracing::warn!(backend = %backend.addr, error = cause, "backend failed before answering; resending the idempotent request");
                true
            }
            _ => false,
        };
        let outcome = match failure {
            Failure::Unreachable(_) => Outcome::ConnectFailure,
            Failure::Failed(_) | Failure::TimedOut => Outcome::ServerError,
            _ => Outcome::Neutral,
        };
        self.balancer.record(backend, outcome);
        if failure.blames_backend() {
            backend.stats.failed(&failure.to_string());
        }
        if retry {
            backend.stats.retried();
        }
        retry
    }
}

/// Sends one attempt and waits for the response head. An HTTP/1.1
/// connection comes back with the response, lent until its body is read.
/// It owns what it uses, so that it can outlive the client ([`Detachable`]).
async fn send(
    upstream: Arc<Upstream>,
    backend: Arc<Backend>,
    request: Request<UpstreamBody>,
    asked_to_upgrade: bool,
) -> Result<(Response<Incoming>, Option<Lease>), Failure> {
    let exchange = async {
        if upstream.h2c {
            send_http2(&upstream, &backend, request)
                .await
                .map(|r| (r, None))
        } else {
            send_http1(&upstream, &backend, request).await
        }
    };
    let (response, lease) = match tokio::time::timeout(upstream.request_timeout, exchange).await {
        Ok(result) => result?,
        Err(_elapsed) => return Err(Failure::TimedOut),
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS && !asked_to_upgrade {
        return Err(Failure::Failed(
            "it answered 101 Switching Protocols to a request that did not ask to upgrade".into(),
        ));
    }
    Ok((response, lease))
}

async fn send_http1(
    upstream: &Upstream,
    backend: &Arc<Backend>,
    mut request: Request<UpstreamBody>,
) -> Result<(Response<Incoming>, Option<Lease>), Failure> {
    loop {
        // An idle connection if the backend has one, else a new one.
        let (mut sender, reused) = match backend.connections.take_idle(upstream.pool_idle_timeout) {
            Some(sender) => (sender, true),
            None => {
                let sender = Connections::connect_http1(backend.addr, upstream.timeouts())
                    .await
                    .map_err(|e| connect_failure(&e))?;
                (sender, false)
            }
        };
        if let Err(error) = sender.ready().await {
            if reused {
                // An idle connection the backend has just closed: take another.
                continue;
            }
            return Err(Failure::Unreachable(source_chain(&error)));
        }
        match sender.try_send_request(request).await {
            Ok(response) => {
                let lease = Lease::new(sender, backend.clone(), upstream.pool_idle_timeout);
                return Ok((response, Some(lease)));
            }
            Err(mut error) => match error.take_message() {
                // Not sent: an idle connection closed under us. Nothing
                // reached the backend, so try a fresh connection.
                Some(unsent) if reused => request = unsent,
                _ => return Err(send_failure(error.error())),
            },
        }
    }
}

async fn send_http2(
    upstream: &Upstream,
    backend: &Backend,
    mut request: Request<UpstreamBody>,
) -> Result<Response<Incoming>, Failure> {
    // A connection that gives a request back unsent (it is going away) is
    // made anew, once.
    let mut made_anew = false;
    loop {
        let mut sender = backend
            .connections
            .http2(backend.addr, upstream.timeouts())
            .await
            .map_err(|e| connect_failure(&e))?;
        match sender.try_send_request(request).await {
            Ok(response) => return Ok(response),
            Err(mut error) => match error.take_message() {
                Some(unsent) if !made_anew => {
                    backend.connections.drop_http2();
                    request = unsent;
                    made_anew = true;
                }
                _ => return Err(send_failure(error.error())),
            },
        }
    }
}

/// The backend's response, made ready for the client: hop-by-hop headers
/// dropped, the body timed, an upgrade tunnelled.
fn relay(
    mut response: Response<Incoming>,
    version: Version,
    backend: &Backend,
    idle: Duration,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    upload: Option<Arc<Upload>>,
    mut held: Held,
) -> Response<ProxyBody> {
    if let Some(client_side) = client_upgrade
        && response.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let backend_side = hyper::upgrade::on(&mut response);
        tokio::spawn(tunnel(client_side, backend_side, backend.addr));
        // The connection is the tunnel's now, never to be pooled again.
        held.lease = None;
        let protocol = upgrade_protocol(response.headers());
        remove_hop_by_hop(response.headers_mut());
        restore_upgrade(response.headers_mut(), protocol.as_ref());
    } else {
        remove_hop_by_hop(response.headers_mut());
    }
    // In the client's version, whatever the backend spoke.
    *response.version_mut() = version;
    // A body with nothing to read (HEAD, 204, 304) ends here.
    if response.body().is_end_stream()
        && let Some(lease) = held.lease.take()
    {
        lease.give_back();
    }
    let http2_client = version == Version::HTTP_2;
    response.map(|body| {
        let body = Timed::from_backend(body, idle, backend.addr, upload, Some(held));
        Either::Left(body.read_over_http2(http2_client))
    })
}

fn failure_response(
    failure: Failure,
    backend: Option<&Backend>,
    upstream: &Upstream,
) -> Response<ProxyBody> {
    let addr = backend.map_or_else(|| "none".to_owned(), |b| b.addr.to_string());
    match failure {
        Failure::NoBackend => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no backend is available: discovery has found none",
        ),
        // Nothing reached any backend: like "no backend available".
        Failure::Unreachable(cause) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("no backend could be reached; the last, {addr}, failed: {cause}"),
        ),
        Failure::Local(cause) => {
            static THROTTLE: Throttle = Throttle::new(Duration::from_secs(1));
            if let Some(held_back) = THROTTLE.allow() {
                tracing::error!(
                    error = cause,
                    held_back,
                    "the load balancer is out of file descriptors or local ports (not the backend's fault); raise the open file limit (ulimit -n) or lower the load"
                );
            }
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "the load balancer is short of its own resources ({cause}); the backend was not at fault, try again"
                ),
            )
        }
        // Logged where it happened, in `body`.
        Failure::Client(BodyError::Stalled(idle)) => error(
            StatusCode::REQUEST_TIMEOUT,
            &format!(
                "the request body stalled: no data for {} ms (bodyIdleTimeoutMs)",
                idle.as_millis()
            ),
        ),
        Failure::Client(BodyError::NotTaken(idle)) => error(
            StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "backend {addr} took nothing of the request body for {} ms (bodyIdleTimeoutMs)",
                idle.as_millis()
            ),
        ),
        Failure::Client(BodyError::Broken(cause)) => error(
            StatusCode::BAD_REQUEST,
            &format!("the request body could not be read: {cause}"),
        ),
        Failure::Failed(cause) => error(
            StatusCode::BAD_GATEWAY,
            &format!("backend {addr} failed: {cause}"),
        ),
        Failure::TimedOut => error(
            StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "backend {addr} did not answer within {} ms",
                upstream.request_timeout.as_millis()
            ),
        ),
    }
}

impl Failure {
    /// Whether the backend tried is the one at fault.
    fn blames_backend(&self) -> bool {
        matches!(
            self,
            Failure::Unreachable(_) | Failure::Failed(_) | Failure::TimedOut
        )
    }
}

impl std::fmt::Display for Failure {
    /// The cause, for `/backends`' `lastError`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NoBackend => write!(f, "no backend available"),
            Failure::Unreachable(cause) => write!(f, "unreachable: {cause}"),
            Failure::Local(cause) => write!(f, "out of local resources: {cause}"),
            Failure::Client(error) => write!(f, "client: {error}"),
            Failure::Failed(cause) => write!(f, "failed: {cause}"),
            Failure::TimedOut => write!(f, "no answer within the request timeout"),
        }
    }
}

/// Out of file descriptors, of kernel buffers or memory, or of local ports
/// to connect from: all local, whichever backend we asked.
fn is_local(error: &(dyn std::error::Error + 'static)) -> bool {
    find_cause::<std::io::Error>(error).is_some_and(is_local_io)
}

/// [`is_local`] for an I/O error itself (TCP mode's connects).
pub fn is_local_io(error: &std::io::Error) -> bool {
    const LOCAL: [Errno; 5] = [
        Errno::EMFILE,
        Errno::ENFILE,
        Errno::ENOBUFS,
        Errno::ENOMEM,
        Errno::EADDRNOTAVAIL,
    ];
    error
        .raw_os_error()
        .is_some_and(|code| LOCAL.contains(&Errno::from_raw(code)))
}

/// No connection to the backend: nothing was sent.
fn connect_failure(error: &ConnectError) -> Failure {
    if is_local(error) {
        Failure::Local(source_chain(error))
    } else {
        Failure::Unreachable(source_chain(error))
    }
}

/// Whose fault a failed exchange was, from hyper's error and its causes.
fn send_failure(error: &hyper::Error) -> Failure {
    if let Some(body) = find_cause::<BodyError>(error) {
        Failure::Client(body.clone())
    } else if is_local(error) {
        Failure::Local(source_chain(error))
    } else {
        Failure::Failed(source_chain(error))
    }
}

/// The first error of type `E` in `error`'s chain of causes.
fn find_cause<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<E>() {
            return Some(found);
        }
        next = current.source();
    }
    None
}

/// Why a request's authority is refused, if it is: userinfo in `Host` or
/// the target (RFC 9110 4.2.4: never forwarded), or an HTTP/2 `host` header
/// that names another host than `:authority` (RFC 9113 8.3.1: malformed).
fn authority_problem<B>(request: &Request<B>) -> Option<&'static str> {
    let host = request
        .headers()
        .get(header::HOST)
        .map(HeaderValue::as_bytes);
    let authority = request.uri().authority().map(|a| a.as_str().as_bytes());
    if host.into_iter().chain(authority).any(|h| h.contains(&b'@')) {
        return Some(
            "the host may not carry a user name or password (user@host); send the host alone",
        );
    }
    if request.version() == Version::HTTP_2
        && let (Some(host), Some(authority)) = (host, authority)
        && !host.eq_ignore_ascii_case(authority)
    {
        return Some(
            "the host header names another host than :authority (RFC 9113 8.3.1); send one, or the same in both",
        );
    }
    None
}

fn build_request(
    method: &Method,
    backend: &Backend,
    path: PathAndQuery,
    headers: HeaderMap,
    body: UpstreamBody,
    h2c: bool,
) -> Request<UpstreamBody> {
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    if h2c {
        // HTTP/2 sends scheme and authority as pseudo-headers.
        let mut uri = hyper::http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(backend.authority.clone());
        uri.path_and_query = Some(path);
        // Scheme, authority and path are all set, so this cannot fail.
        *request.uri_mut() = Uri::from_parts(uri).unwrap_or_default();
        *request.version_mut() = Version::HTTP_2;
    } else {
        // HTTP/1.1 sends the path alone (origin form) and names the host in
        // `Host`; an HTTP/1.0 client may have sent none.
        *request.uri_mut() = Uri::from(path);
        *request.version_mut() = Version::HTTP_11;
    }
    *request.headers_mut() = headers;
    if !h2c && !request.headers().contains_key(header::HOST) {
        request
            .headers_mut()
            .insert(header::HOST, backend.label.clone());
    }
    request
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

/// The access log: one `proxied` line per request.
fn log(
    request: &hyper::http::request::Parts,
    backend: Option<&Backend>,
    status: StatusCode,
    start: Instant,
    retries: usize,
    request_id: &HeaderValue,
) {
    // As `tracing::info!(method = %.., path = .., ...)` would write it,
    // for a third of the cost (see `common::telemetry::line`).
    common::telemetry::line::info(module_path!(), "proxied", |line| {
        line.display("method", request.method.as_str())
            .str("path", request.uri.path())
            .str("backend", backend.map_or("none", Backend::label_str))
            .u64("status", status.as_u16().into())
            .u64("latency_us", start.elapsed().as_micros() as u64)
            .u64("retries", retries as u64)
            .str("request_id", request_id.to_str().unwrap_or(""));
    });
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

    #[test]
    fn a_peer_ip_reads_as_x_forwarded_for_writes_it() {
        for addr in [
            "127.0.0.1:80",
            "0.0.0.0:1",
            "255.255.10.9:8080",
            "[::1]:80",
            "[2001:db8::7]:443",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(Peer::new(addr).ip, addr.ip().to_string(), "{addr}");
        }
    }
}
