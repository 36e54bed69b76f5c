//! How an attempt failed, whose fault it was, and what the client hears.
//!
//! Each failure names the side at fault, because that decides three things:
//! whether the backend's health record takes it (only the backend's own
//! failures eject it), whether the request is tried again elsewhere
//! ([`retry`], a pure function with a table test), and the status code
//! the client gets.

use std::time::Duration;

use common::errors::{chain, find};
use common::telemetry::Throttle;
use hyper::StatusCode;

use super::body::BodyError;
use crate::balancer::Outcome;
use crate::connections::{ConnectError, is_local_io};

/// How one attempt ended badly, and whose fault it was. Each carries the
/// cause, as text.
#[derive(Debug)]
pub enum Failure {
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

/// What decides whether a request may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// It has no body, so it can be sent again exactly as it was.
    pub replayable: bool,
    /// GET, HEAD or OPTIONS: sending it twice does no harm.
    pub idempotent: bool,
}

/// Whether a failed attempt is tried again on another backend. Only what
/// provably was not sent (no connection), or an idempotent request with no
/// body that may have been: a body streams from the client and cannot be
/// replayed, and a POST may have been acted on.
pub fn retry(failure: &Failure, request: Facts, attempts_left: bool) -> bool {
    let may = request.replayable && attempts_left;
    match failure {
        Failure::Unreachable(_) => may,
        Failure::Failed(_) => may && request.idempotent,
        _ => false,
    }
}

impl Failure {
    /// Whether the backend tried is the one at fault.
    pub fn blames_backend(&self) -> bool {
        matches!(
            self,
            Failure::Unreachable(_) | Failure::Failed(_) | Failure::TimedOut
        )
    }

    /// What the backend's health record takes from it.
    pub fn outcome(&self) -> Outcome {
        match self {
            Failure::Unreachable(_) => Outcome::ConnectFailure,
            Failure::Failed(_) | Failure::TimedOut => Outcome::ServerError,
            _ => Outcome::Neutral,
        }
    }

    /// No connection to the backend: nothing was sent.
    pub fn from_connect(error: &ConnectError) -> Failure {
        if is_local(error) {
            Failure::Local(chain(error))
        } else {
            Failure::Unreachable(chain(error))
        }
    }

    /// Whose fault a failed exchange was, from hyper's error and its causes.
    pub fn from_send(error: &hyper::Error) -> Failure {
        if let Some(body) = find::<BodyError>(error) {
            Failure::Client(body.clone())
        } else if is_local(error) {
            Failure::Local(chain(error))
        } else {
            Failure::Failed(chain(error))
        }
    }

    /// The status and message the client gets; `backend` is the address
    /// tried last (or `none`).
    pub fn answer(self, backend: &str, request_timeout: Duration) -> (StatusCode, String) {
        let idle_ms = |idle: Duration| idle.as_millis();
        match self {
            Failure::NoBackend => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no backend is available: discovery has found none".to_owned(),
            ),
            // Nothing reached any backend: like "no backend available".
            Failure::Unreachable(cause) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no backend could be reached; the last, {backend}, failed: {cause}"),
            ),
            Failure::Local(cause) => {
                say_we_are_short(&cause);
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the load balancer is short of its own resources ({cause}); the backend was not at fault, try again"
                    ),
                )
            }
            // Logged where it happened, in `body`.
            Failure::Client(BodyError::Stalled(idle)) => (
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body stalled: no data for {} ms (bodyIdleTimeoutMs)",
                    idle_ms(idle)
                ),
            ),
            Failure::Client(BodyError::NotTaken(idle)) => (
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "backend {backend} took nothing of the request body for {} ms (bodyIdleTimeoutMs)",
                    idle_ms(idle)
                ),
            ),
            Failure::Client(BodyError::Broken(cause)) => (
                StatusCode::BAD_REQUEST,
                format!("the request body could not be read: {cause}"),
            ),
            Failure::Failed(cause) => (
                StatusCode::BAD_GATEWAY,
                format!("backend {backend} failed: {cause}"),
            ),
            Failure::TimedOut => (
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "backend {backend} did not answer within {} ms",
                    idle_ms(request_timeout)
                ),
            ),
        }
    }
}

/// Our own shortage, said once a second at most: in a flood of them, a
/// line per request would make it worse.
fn say_we_are_short(cause: &str) {
    static THROTTLE: Throttle = Throttle::new(Duration::from_secs(1));
    if let Some(held_back) = THROTTLE.allow() {
        tracing::error!(
            error = cause,
            held_back,
            "the load balancer is out of file descriptors or local ports (not the backend's fault); raise the open file limit (ulimit -n) or lower the load"
        );
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

/// Out of file descriptors, kernel buffers or local ports, anywhere in
/// `error`'s causes.
fn is_local(error: &(dyn std::error::Error + 'static)) -> bool {
    find::<std::io::Error>(error).is_some_and(is_local_io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_tried_again_on_another_backend() {
        let unreachable = || Failure::Unreachable("refused".into());
        let failed = || Failure::Failed("reset".into());
        let facts = |replayable, idempotent| Facts {
            replayable,
            idempotent,
        };
        #[rustfmt::skip]
        let table = [
            // failure,                     replayable, idempotent, attempts left, retried
            (unreachable(),                 true,  false, true,  true),
            (unreachable(),                 true,  false, false, false),
            (unreachable(),                 false, true,  true,  false),
            (failed(),                      true,  true,  true,  true),
            (failed(),                      true,  false, true,  false),
            (failed(),                      false, true,  true,  false),
            (failed(),                      true,  true,  false, false),
            (Failure::TimedOut,             true,  true,  true,  false),
            (Failure::Local("EMFILE".into()), true, true, true,  false),
            (Failure::Client(BodyError::Broken("bad chunk".into())), false, false, true, false),
            (Failure::NoBackend,            true,  true,  true,  false),
        ];
        for (failure, replayable, idempotent, left, expected) in table {
            let decided = retry(&failure, facts(replayable, idempotent), left);
            assert_eq!(
                decided, expected,
                "{failure} replayable={replayable} idempotent={idempotent} left={left}"
            );
        }
    }
}
