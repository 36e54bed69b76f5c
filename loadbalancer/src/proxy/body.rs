//! Bodies in flight, with an idle timeout, and errors that blame the right side.
//!
//! A body streams through the proxy chunk by chunk. Two things can go wrong
//! mid-stream, and both need an answer:
//!
//! - **It stalls.** A backend that sends its headers and 3 of 100 body
//!   bytes, or a client that starts an upload and stops, would otherwise hold
//!   two connections (and a task) for ever: `requestTimeoutMs` only bounds
//!   the wait for the response *head*. [`Timed`] ends the body after
//!   `bodyIdleTimeoutMs` without data, as nginx's `client_body_timeout` and
//!   `proxy_read_timeout` do. The timer only runs while we wait for data
//!   that has not come, so a slow *reader* on the other side, which makes us
//!   stop asking, does not count against the body.
//! - **It is malformed** (a bad chunk size, a connection cut early).
//!
//! Whose fault was it? A client's bad upload must be answered 400 (or 408
//! when it stalled) and never count against the backend; a backend's broken
//! answer is logged against that backend. So the error type, [`BodyError`],
//! travels up hyper's error chain, where the proxy finds it again.
//!
//! The two bodies of one exchange share the state of the [`Upload`]. While
//! the client is still sending, a quiet backend is no surprise (an echo
//! service waits for the client), so the response's idle timer only fires
//! once the upload is complete. And when the backend has already answered, a
//! failed upload cuts its response short: that is not blamed on the backend
//! either.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::pool::Lease;
use super::source_chain;
use crate::metrics::InFlight;

/// Why a body ended before it was complete.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BodyError {
    #[error("no data for {} ms (bodyIdleTimeoutMs)", .0.as_millis())]
    Stalled(Duration),
    #[error("{0}")]
    Broken(String),
}

/// How a client's upload is going; shared by the two bodies of one exchange,
/// and only made for requests that have a body.
#[derive(Debug, Default)]
pub struct Upload(AtomicU8);

const SENDING: u8 = 0;
const SENT: u8 = 1;
const FAILED: u8 = 2;

impl Upload {
    fn set(&self, state: u8) {
        self.0.store(state, Relaxed);
    }

    fn is(&self, state: u8) -> bool {
        self.0.load(Relaxed) == state
    }
}

/// Where a body comes from, to name the right side in the log.
#[derive(Debug, Clone, Copy)]
enum Side {
    Client(SocketAddr),
    Backend(SocketAddr),
}

/// A body from one side, ended with a [`BodyError`] after `idle` without data.
#[derive(Debug)]
pub struct Timed<B> {
    inner: B,
    idle: Duration,
    /// Made at the first wait, so a body that is already all there (the
    /// usual small one) never touches the timer.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer is running for the current wait.
    waiting: bool,
    side: Side,
    upload: Option<Arc<Upload>>,
    /// What a response body holds until it ends.
    held: Option<Held>,
}

/// What a response body holds until it ends: its request's place in the
/// backend's in-flight count (released when the body is finished or
/// dropped, so a long download counts as in flight), and the HTTP/1.1
/// connection it came on (given back to the backend's idle connections
/// once the body has been read to the end).
#[derive(Debug)]
pub struct Held {
    pub in_flight: InFlight,
    pub lease: Option<Lease>,
}

impl<B> Timed<B> {
    /// The request body of `client`, reporting into `upload`.
    pub fn from_client(
        inner: B,
        idle: Duration,
        client: SocketAddr,
        upload: Arc<Upload>,
    ) -> Timed<B> {
        Timed::new(inner, idle, Side::Client(client), Some(upload), None)
    }

    /// The response body of `backend`, to a request whose body (if it had
    /// one) is `upload`.
    pub fn from_backend(
        inner: B,
        idle: Duration,
        backend: SocketAddr,
        upload: Option<Arc<Upload>>,
        held: Option<Held>,
    ) -> Timed<B> {
        Timed::new(inner, idle, Side::Backend(backend), upload, held)
    }

    fn new(
        inner: B,
        idle: Duration,
        side: Side,
        upload: Option<Arc<Upload>>,
        held: Option<Held>,
    ) -> Timed<B> {
        Timed {
            inner,
            idle,
            timer: None,
            waiting: false,
            side,
            upload,
            held,
        }
    }

    fn upload_is(&self, state: u8) -> bool {
        self.upload.as_ref().is_some_and(|upload| upload.is(state))
    }

    fn finished(&mut self) {
        if let (Side::Client(_), Some(upload)) = (self.side, &self.upload) {
            upload.set(SENT);
        }
        if let Some(lease) = self.held.as_mut().and_then(|held| held.lease.take()) {
            lease.give_back();
        }
    }

    fn fail(&self, error: BodyError) -> BodyError {
        match self.side {
            Side::Client(client) => {
                if let Some(upload) = &self.upload {
                    upload.set(FAILED);
                }
                tracing::info!(%client, %error, "the client's request body failed; ending the exchange");
            }
            Side::Backend(backend) if self.upload_is(FAILED) => {
                tracing::debug!(%backend, %error, "response cut short by the client's failed upload");
            }
            // The client already has the head; all we can do is close.
            Side::Backend(backend) => {
                tracing::warn!(%backend, %error, "the backend's response body broke off; closing the client's connection");
            }
        }
        error
    }
}

impl<B> Body for Timed<B>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.finished();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                if this.inner.is_end_stream() {
                    this.finished();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                let error = this.fail(BodyError::Broken(source_chain(&error)));
                Poll::Ready(Some(Err(error)))
            }
            Poll::Pending => {
                let deadline = Instant::now() + this.idle;
                let timer = match &mut this.timer {
                    Some(timer) if this.waiting => timer,
                    Some(timer) => {
                        timer.as_mut().reset(deadline);
                        timer
                    }
                    None => this
                        .timer
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                this.waiting = true;
                // A quiet response to a client that is still uploading waits
                // on the client, whose own timer ends the exchange.
                let upload = match this.side {
                    Side::Backend(_) => this.upload.as_deref(),
                    Side::Client(_) => None,
                };
                loop {
                    ready!(timer.as_mut().poll(cx));
                    if !upload.is_some_and(|upload| upload.is(SENDING)) {
                        break;
                    }
                    timer.as_mut().reset(Instant::now() + this.idle);
                }
                let error = this.fail(BodyError::Stalled(this.idle));
                Poll::Ready(Some(Err(error)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    // hyper frames the body for the next hop from this: a known length
    // stays a Content-Length.
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use http_body_util::channel::Channel;

    /// A body whose frames a test feeds by hand, as hyper's `Incoming` would.
    fn fed() -> (
        http_body_util::channel::Sender<Bytes, hyper::Error>,
        Channel<Bytes, hyper::Error>,
    ) {
        Channel::new(1)
    }

    fn client_body<B>(inner: B) -> Timed<B> {
        let client = "127.0.0.1:40000".parse().unwrap();
        Timed::from_client(inner, Duration::from_secs(5), client, Arc::default())
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_sending_ends_after_the_idle_timeout() {
        let (mut sender, inner) = fed();
        let mut body = client_body(inner);
        sender.send_data(Bytes::from_static(b"abc")).await.unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "abc");

        let started = Instant::now();
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(matches!(error, BodyError::Stalled(_)), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        drop(sender);
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timer_starts_again_with_each_chunk() {
        let (mut sender, inner) = fed();
        let mut body = client_body(inner);
        let feeder = tokio::spawn(async move {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                sender.send_data(Bytes::from_static(b"x")).await.unwrap();
            }
        });
        for _ in 0..4 {
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "x");
        }
        feeder.await.unwrap();
        assert!(body.frame().await.is_none(), "complete");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_response_waits_while_the_client_is_still_uploading() {
        let upload = Arc::<Upload>::default();
        let (_sender, inner) = fed();
        let backend = "127.0.0.1:9001".parse().unwrap();
        let mut response = Timed::from_backend(
            inner,
            Duration::from_secs(5),
            backend,
            Some(upload.clone()),
            None,
        );
        let waited = tokio::time::timeout(Duration::from_secs(60), response.frame()).await;
        assert!(waited.is_err(), "still waiting after 60 s of upload");

        upload.set(SENT);
        let started = Instant::now();
        let error = response.frame().await.unwrap().unwrap_err();
        assert!(matches!(error, BodyError::Stalled(_)), "{error}");
        assert!(started.elapsed() <= Duration::from_secs(5));
    }
}
