//! The request path: from a client's request to a backend's response.
//!
//! For each request the proxy picks a backend from the current snapshot,
//! rewrites the headers a proxy must rewrite ([`headers`]), and sends the
//! request over a pooled keep-alive connection ([`crate::connections`]).
//! Bodies are streamed both
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
//! A request with a body is not retried: its body streams straight from the client and cannot be
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
//! record alone. See [`failure`].
//!
//! [`Proxy::handle`] reads in three steps: [`Prepared::new`] checks and
//! rewrites the request, [`Proxy::attempts`] picks backends and tries them
//! ([`send`]), and [`Proxy::finish`] counts and logs what came of it.
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
mod failure;
pub mod headers;
mod send;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use common::serve::Slot;
use http_body_util::{Either, Empty, Full};
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, Response, StatusCode, Version};

use crate::balancer::stats::InFlight;
use crate::balancer::{Backend, Balancer, Outcome};
use crate::config::{BackendProtocol, Settings};
use crate::connections::{self, Table, Timeouts};
use body::{Held, Timed, Upload};
use detach::Detachable;
use failure::{Facts, Failure};
pub use headers::{SERVED_BY, X_REQUEST_ID};
use headers::{prepare_request_headers, request_id, upgrade_protocol};

/// The body of a response to the client: the backend's, streamed, or our
/// own JSON error.
pub type ProxyBody = Either<Timed<Incoming>, Full<Bytes>>;
/// The body of a request to a backend: the client's, streamed, or none.
pub type UpstreamBody = Either<Timed<Incoming>, Empty<Bytes>>;
/// One backend's connections, as the HTTP path keeps them.
type Conns = connections::Connections<UpstreamBody>;
/// An HTTP/1.1 connection lent to one exchange.
type Lease = connections::Lease<UpstreamBody>;

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
    /// Every backend's connections, forgotten when the backend leaves.
    connections: Arc<Table<UpstreamBody>>,
    /// Swapped whole when the config changes; read once per request.
    upstream: ArcSwap<Upstream>,
    /// One `proxied` line per request (`accessLog`).
    access_log: AtomicBool,
}

/// How requests are sent: the limits from the config.
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

/// A client's request, checked and rewritten for the backends, with what
/// the attempts need to know about it.
struct Prepared {
    parts: Parts,
    path: PathAndQuery,
    request_id: HeaderValue,
    /// The streamed upload, until an attempt takes it.
    body: Option<Timed<Incoming>>,
    /// How the upload is going; `None` for a request without a body.
    upload: Option<Arc<Upload>>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// An HTTP/2 stream's place among its connection's streams, kept
    /// until the exchange with the backend has ended.
    slot: Option<Slot>,
    facts: Facts,
    /// The backends tried and failed, in order.
    tried: Vec<SocketAddr>,
}

/// How a request's attempts ended: an answer, or the last failure and the
/// backend tried last, if any was.
type Ended = Result<Answer, (Option<Arc<Backend>>, Failure)>;

/// A backend's response head, and what its body will hold on to.
struct Answer {
    backend: Arc<Backend>,
    connections: Arc<Conns>,
    response: Response<Incoming>,
    in_flight: InFlight,
    lease: Option<Lease>,
}

// === impl Proxy ===

impl Proxy {
    pub fn new(balancer: Arc<Balancer>, settings: &Settings) -> Proxy {
        Proxy {
            balancer,
            connections: Arc::default(),
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
    pub async fn handle(&self, request: Request<Incoming>, peer: &Peer) -> Response<ProxyBody> {
        let start = Instant::now();
        let upstream = self.upstream.load_full();
        let upgrade = upgrade_protocol(request.headers());
        if let Some((status, refused)) = refusal(&request, upgrade.is_some(), upstream.h2c) {
            return error(status, refused);
        }
        let mut request = Prepared::new(request, upgrade, peer, &upstream);
        let ended = self.attempts(&mut request, &upstream).await;
        self.finish(ended, &mut request, &upstream, start)
    }

    /// Picks backends and tries them, until one answers or no retry is left.
    async fn attempts(&self, request: &mut Prepared, upstream: &Arc<Upstream>) -> Ended {
        let mut last_failure = None;
        loop {
            let picked = if request.tried.is_empty() {
                self.balancer.pick_first().await
            } else {
                self.balancer.pick(&request.tried)
            };
            let Some(backend) = picked else {
                let (backend, failure) = match last_failure {
                    Some((backend, failure)) => (Some(backend), failure),
                    None => (None, Failure::NoBackend),
                };
                return Err((backend, failure));
            };
            let attempts_left = (request.tried.len() as u32) < upstream.retries;
            let failure = match self
                .attempt(request, &backend, upstream, attempts_left)
                .await
            {
                Ok(answer) => return Ok(answer),
                Err(failure) => failure,
            };
            let again = failure::retry(&failure, request.facts, attempts_left);
            self.count_failure(&failure, &backend, again);
            if !again {
                return Err((Some(backend), failure));
            }
            request.tried.push(backend.addr);
            last_failure = Some((backend, failure));
        }
    }

    /// One attempt on `backend`. The headers are copied only when a retry
    /// may need them again.
    async fn attempt(
        &self,
        request: &mut Prepared,
        backend: &Arc<Backend>,
        upstream: &Arc<Upstream>,
        attempts_left: bool,
    ) -> Result<Answer, Failure> {
        let headers = if request.facts.replayable && attempts_left {
            request.parts.headers.clone()
        } else {
            std::mem::take(&mut request.parts.headers)
        };
        let body = match request.body.take() {
            Some(incoming) => Either::Left(incoming),
            None => Either::Right(Empty::new()),
        };
        let connections = self.connections_of(backend);
        let outgoing = send::build_request(
            &request.parts.method,
            &connections,
            request.path.clone(),
            headers,
            body,
            upstream.h2c,
        );
        let in_flight = InFlight::start(backend.clone());
        let upgrade = request.client_upgrade.is_some();
        let exchange = send::send(
            upstream.clone(),
            connections.clone(),
            backend.addr,
            outgoing,
            upgrade,
        );
        let (response, lease) = match &request.slot {
            Some(slot) => Detachable::new(exchange, slot.clone()).await,
            None => exchange.await,
        }?;
        Ok(Answer {
            backend: backend.clone(),
            connections,
            response,
            in_flight,
            lease,
        })
    }

    /// `backend`'s connections; new ones are forgotten when it leaves.
    #[inline]
    fn connections_of(&self, backend: &Arc<Backend>) -> Arc<Conns> {
        let (connections, added) = self.connections.get(backend.addr);
        if added {
            let (table, backend, kept) = (
                self.connections.clone(),
                backend.clone(),
                connections.clone(),
            );
            tokio::spawn(async move {
                backend.departed().await;
                table.forget(backend.addr, &kept);
            });
        }
        connections
    }

    /// A failed attempt goes into the backend's health record and numbers.
    fn count_failure(&self, failure: &Failure, backend: &Backend, retried: bool) {
        match failure {
            Failure::Unreachable(cause) => {
                tracing::warn!(backend = %backend.addr, error = cause, "backend unreachable")
            }
            Failure::Failed(cause) if retried => {
                tracing::warn!(backend = %backend.addr, error = cause, "backend failed before answering; resending the idempotent request")
            }
            _ => {}
        }
        self.balancer.record(backend, failure.outcome());
        if failure.blames_backend() {
            backend.stats.failed(&failure.to_string());
        }
        if retried {
            backend.stats.retried();
        }
    }

    /// A backend's answer, relayed: its `x-served-by`, the backend to count
    /// it against, and the response.
    #[inline(always)]
    fn relay(
        &self,
        answer: Answer,
        request: &mut Prepared,
        upstream: &Upstream,
    ) -> (
        Option<HeaderValue>,
        Option<Arc<Backend>>,
        Response<ProxyBody>,
    ) {
        let Answer {
            backend,
            connections,
            response,
            in_flight,
            lease,
        } = answer;
        let outcome = match response.status().is_server_error() {
            true => Outcome::ServerError,
            false => Outcome::Success,
        };
        self.balancer.record(&backend, outcome);
        let held = Held {
            in_flight,
            lease,
            slot: request.slot.take(),
        };
        let response = send::relay(
            response,
            request.parts.version,
            backend.addr,
            upstream.body_idle_timeout,
            request.client_upgrade.take(),
            request.upload.take(),
            held,
        );
        (Some(connections.host.clone()), Some(backend), response)
    }

    /// The client's answer: the backend's response relayed, or our error;
    /// counted against the backend at fault (if one was), and logged.
    // Inlined, as `relay` is: the answer and the request are large, and
    // each call that takes them by value copies them (callgrind: a few
    // hundred instructions a request).
    #[inline(always)]
    fn finish(
        &self,
        ended: Ended,
        request: &mut Prepared,
        upstream: &Upstream,
        start: Instant,
    ) -> Response<ProxyBody> {
        // `counted`: the backend the answer is counted against, the one
        // that answered or failed to; not one blameless for the failure.
        let (served_by, counted, mut response) = match ended {
            Ok(answer) => self.relay(answer, request, upstream),
            Err((backend, failure)) => {
                let blamed = failure.blames_backend().then(|| backend.clone()).flatten();
                let addr = backend.as_deref().map_or("none", Backend::label_str);
                let (status, message) = failure.answer(addr, upstream.request_timeout);
                let served_by = backend.map(|b| HeaderValue::from_str(b.label_str()));
                (
                    served_by.and_then(Result::ok),
                    blamed,
                    error(status, &message),
                )
            }
        };
        let status = response.status().as_u16();
        match &counted {
            Some(backend) => backend.stats.answered(status, start.elapsed()),
            None => self.balancer.totals.unrouted(status),
        }
        let headers = response.headers_mut();
        if let Some(served_by) = served_by {
            headers.insert(SERVED_BY, served_by);
        }
        headers.insert(X_REQUEST_ID, request.request_id.clone());
        if self.access_log.load(Relaxed) && tracing::enabled!(tracing::Level::INFO) {
            log(request, &response, start);
        }
        response
    }
}

// === impl Prepared ===

impl Prepared {
    /// The request, rewritten for the backends; `upgrade` is the protocol
    /// it asks to upgrade to, if any. (Inlined into `handle`, so that the
    /// request is built where it stays rather than copied there.)
    #[inline(always)]
    fn new(
        mut request: Request<Incoming>,
        upgrade: Option<HeaderValue>,
        peer: &Peer,
        upstream: &Upstream,
    ) -> Prepared {
        let slot = request.extensions_mut().remove::<Slot>();
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
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
        let path = parts.uri.path_and_query().cloned();
        prepare_request_headers(&mut parts.headers, &peer.ip, upgrade.as_ref());
        parts.headers.insert(X_REQUEST_ID, request_id.clone());
        // gRPC servers want `te: trailers`, the one TE an HTTP/2 hop keeps.
        if wants_trailers {
            let trailers = HeaderValue::from_static("trailers");
            parts.headers.insert(header::TE, trailers);
        }
        // A request with no body can be sent again as it was.
        let facts = Facts {
            replayable: body.is_end_stream(),
            idempotent: matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS),
        };
        let upload = (!facts.replayable).then(Arc::<Upload>::default);
        let body = upload.clone().map(|upload| {
            Timed::from_client(body, upstream.body_idle_timeout, peer.addr, upload)
                .read_over_http2(upstream.h2c)
        });
        Prepared {
            parts,
            path: path.unwrap_or_else(|| PathAndQuery::from_static("/")),
            request_id,
            body,
            upload,
            client_upgrade,
            slot,
            facts,
            tried: Vec::new(),
        }
    }
}

/// Why a request is refused before any backend is asked, if it is.
fn refusal<B>(
    request: &Request<B>,
    upgrade: bool,
    h2c: bool,
) -> Option<(StatusCode, &'static str)> {
    if request.method() == Method::CONNECT {
        return Some((
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported: this load balancer only forwards requests to its backends",
        ));
    }
    if let Some(problem) = authority_problem(request) {
        return Some((StatusCode::BAD_REQUEST, problem));
    }
    if upgrade && h2c {
        return Some((
            StatusCode::NOT_IMPLEMENTED,
            "upgrades (WebSocket) need HTTP/1.1 backends; these are reached over h2c",
        ));
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
fn log(request: &Prepared, response: &Response<ProxyBody>, start: Instant) {
    let served_by = response.headers().get(SERVED_BY);
    let backend = served_by.and_then(|b| b.to_str().ok()).unwrap_or("none");
    let status = response.status();
    // As `tracing::info!(method = %.., path = .., ...)` would write it,
    // for a third of the cost (see `common::telemetry::line`).
    common::telemetry::line::info(module_path!(), "proxied", |line| {
        line.display("method", request.parts.method.as_str())
            .str("path", request.parts.uri.path())
            .str("backend", backend)
            .u64("status", status.as_u16().into())
            .u64("latency_us", start.elapsed().as_micros() as u64)
            .u64("retries", request.tried.len() as u64)
            .str("request_id", request.request_id.to_str().unwrap_or(""));
    });
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
