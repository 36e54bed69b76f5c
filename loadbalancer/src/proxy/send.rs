//! One attempt on one backend: build the request, send it, relay the answer.
//!
//! An attempt owns what it uses (its backend, its connections, the limits),
//! so that it can outlive the client that asked ([`super::detach`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Either;
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap};
use hyper::http::uri::{PathAndQuery, Scheme};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;

use super::body::{Held, Timed, Upload};
use super::failure::Failure;
use super::headers::{remove_hop_by_hop, restore_upgrade, upgrade_protocol};
use super::{Conns, Lease, ProxyBody, Upstream, UpstreamBody};

/// Sends one attempt and waits for the response head. An HTTP/1.1
/// connection comes back with the response, lent until its body is read.
pub async fn send(
    upstream: Arc<Upstream>,
    connections: Arc<Conns>,
    addr: SocketAddr,
    request: Request<UpstreamBody>,
    asked_to_upgrade: bool,
) -> Result<(Response<Incoming>, Option<Lease>), Failure> {
    let exchange = async {
        if upstream.h2c {
            send_http2(&upstream, &connections, addr, request)
                .await
                .map(|r| (r, None))
        } else {
            send_http1(&upstream, &connections, addr, request).await
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
    connections: &Arc<Conns>,
    addr: SocketAddr,
    mut request: Request<UpstreamBody>,
) -> Result<(Response<Incoming>, Option<Lease>), Failure> {
    loop {
        // An idle connection if the backend has one, else a new one.
        let (mut sender, reused) = match connections.take_idle(upstream.pool_idle_timeout) {
            Some(sender) => (sender, true),
            None => {
                let sender = Conns::connect_http1(addr, upstream.timeouts())
                    .await
                    .map_err(|e| Failure::from_connect(&e))?;
                (sender, false)
            }
        };
        if let Err(error) = sender.ready().await {
            if reused {
                // An idle connection the backend has just closed: take another.
                continue;
            }
            return Err(Failure::Unreachable(common::errors::chain(&error)));
        }
        match sender.try_send_request(request).await {
            Ok(response) => {
                let lease = Lease::new(sender, connections.clone(), upstream.pool_idle_timeout);
                return Ok((response, Some(lease)));
            }
            Err(mut error) => match error.take_message() {
                // Not sent: an idle connection closed under us. Nothing
                // reached the backend, so try a fresh connection.
                Some(unsent) if reused => request = unsent,
                _ => return Err(Failure::from_send(error.error())),
            },
        }
    }
}

async fn send_http2(
    upstream: &Upstream,
    connections: &Conns,
    addr: SocketAddr,
    mut request: Request<UpstreamBody>,
) -> Result<Response<Incoming>, Failure> {
    // A connection that gives a request back unsent (it is going away) is
    // made anew, once.
    let mut made_anew = false;
    loop {
        let mut sender = connections
            .http2(addr, upstream.timeouts())
            .await
            .map_err(|e| Failure::from_connect(&e))?;
        match sender.try_send_request(request).await {
            Ok(response) => return Ok(response),
            Err(mut error) => match error.take_message() {
                Some(unsent) if !made_anew => {
                    connections.drop_http2();
                    request = unsent;
                    made_anew = true;
                }
                _ => return Err(Failure::from_send(error.error())),
            },
        }
    }
}

/// The request as the backend gets it: the path alone over HTTP/1.1,
/// scheme and authority too over HTTP/2.
pub fn build_request(
    method: &Method,
    connections: &Conns,
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
        uri.authority = Some(connections.authority.clone());
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
            .insert(header::HOST, connections.host.clone());
    }
    request
}

/// The backend's response, made ready for the client: hop-by-hop headers
/// dropped, the body timed, an upgrade tunnelled.
#[inline(always)] // a Response is large: moved, not copied
pub fn relay(
    mut response: Response<Incoming>,
    version: Version,
    addr: SocketAddr,
    idle: Duration,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    upload: Option<Arc<Upload>>,
    mut held: Held,
) -> Response<ProxyBody> {
    if let Some(client_side) = client_upgrade
        && response.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let backend_side = hyper::upgrade::on(&mut response);
        tokio::spawn(tunnel(client_side, backend_side, addr));
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
        let body = Timed::from_backend(body, idle, addr, upload, Some(held));
        Either::Left(body.read_over_http2(http2_client))
    })
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
