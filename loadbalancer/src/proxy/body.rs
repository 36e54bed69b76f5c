//! Bodies in flight, with an idle timeout, and errors that blame the right side.
//!
//! A body streams through the proxy chunk by chunk. Three things can go wrong
//! mid-stream, and each needs an answer:
//!
//! - **It stalls.** A backend that sends its headers and 3 of 100 body
//!   bytes, or a client that starts an upload and stops, would otherwise hold
//!   two connections (and a task) for ever: `requestTimeoutMs` only bounds
//!   the wait for the response *head*. [`Timed`] ends the body after
//!   `bodyIdleTimeoutMs` without data, as nginx's `client_body_timeout` and
//!   `proxy_read_timeout` do.
//! - **It is not taken.** The other side stops reading: a client that never
//!   reads its download, or an h2c backend that never reads an upload. Over
//!   HTTP/1.1 the socket's buffers fill, and the send timeout of the
//!   listener (`common::serve`) or of the backend connection ends it. Over
//!   HTTP/2 the reader instead keeps its flow-control window shut while
//!   answering pings, so no socket ever blocks and nobody asks the body for
//!   more. For those bodies a watchdog checks that the next chunk is asked
//!   for within `bodyIdleTimeoutMs`, and otherwise drops the body's source:
//!   the backend connection (or stream) and what the exchange holds are
//!   freed, as nginx's `send_timeout` does per HTTP/2 stream.
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
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use common::serve::Slot;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use common::sync::lock;

use super::Lease;
use crate::balancer::stats::InFlight;

/// Why a body ended before it was complete.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BodyError {
    #[error("no data for {} ms (bodyIdleTimeoutMs)", .0.as_millis())]
    Stalled(Duration),
    #[error("the other side took nothing for {} ms (bodyIdleTimeoutMs)", .0.as_millis())]
    NotTaken(Duration),
    #[error("{0}")]
    Broken(String),
}

/// How a client's upload is going; shared by the two bodies of one exchange,
/// and only made for requests that have a body.
#[derive(Debug, Default)]
pub struct Upload(AtomicU8);

/// The states of an [`Upload`], as its atomic stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum UploadState {
    Sending = 0,
    Sent = 1,
    Failed = 2,
}

impl Upload {
    fn set(&self, state: UploadState) {
        self.0.store(state as u8, Relaxed);
    }

    fn get(&self) -> UploadState {
        match self.0.load(Relaxed) {
            0 => UploadState::Sending,
            1 => UploadState::Sent,
            _ => UploadState::Failed,
        }
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
    inner: Inner<B>,
    idle: Duration,
    /// Made at the first wait, so a body that is already all there (the
    /// usual small one) never touches the timer.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer is running for the current wait.
    waiting: bool,
    side: Side,
    upload: Option<Arc<Upload>>,
}

/// The body and what it holds: ours alone, or shared with its watchdog.
#[derive(Debug)]
enum Inner<B> {
    Own(B, Option<Held>),
    Watched(Arc<Watched<B>>),
}

/// What a response body holds until it ends: its request's place in the
/// backend's in-flight count (released when the body is finished or
/// dropped, so a long download counts as in flight), the HTTP/1.1
/// connection it came on (given back to the backend's idle connections
/// once the body has been read to the end), and the client's HTTP/2
/// stream slot (the exchange is not over before its body is).
#[derive(Debug)]
pub struct Held {
    pub in_flight: InFlight,
    pub lease: Option<Lease>,
    pub slot: Option<Slot>,
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
            inner: Inner::Own(inner, held),
            idle,
            timer: None,
            waiting: false,
            side,
            upload,
        }
    }

    fn upload_is(&self, state: UploadState) -> bool {
        self.upload
            .as_ref()
            .is_some_and(|upload| upload.get() == state)
    }

    fn finished(&mut self) {
        if let (Side::Client(_), Some(upload)) = (self.side, &self.upload) {
            upload.set(UploadState::Sent);
        }
        let lease = match &mut self.inner {
            Inner::Own(_, held) => held.as_mut().and_then(|held| held.lease.take()),
            Inner::Watched(watched) => lock(&watched.parts)
                .as_mut()
                .and_then(|(_, held)| held.as_mut()?.lease.take()),
        };
        if let Some(lease) = lease {
            lease.give_back();
        }
    }

    fn fail(&self, error: BodyError) -> BodyError {
        match self.side {
            Side::Client(client) => {
                if let Some(upload) = &self.upload {
                    upload.set(UploadState::Failed);
                }
                tracing::info!(%client, %error, "the client's request body failed; ending the exchange");
            }
            Side::Backend(backend) if self.upload_is(UploadState::Failed) => {
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

impl<B: Body + Unpin + Send + 'static> Timed<B> {
    /// Marks the body as read by an HTTP/2 peer (see "It is not taken"):
    /// watched from the start, since a peer whose window is shut from the
    /// start never asks for the first chunk either.
    #[inline]
    pub fn read_over_http2(mut self, http2: bool) -> Timed<B> {
        if http2 && matches!(&self.inner, Inner::Own(body, _) if !body.is_end_stream()) {
            self.start_watching();
        }
        self
    }

    /// Hands the body to a watchdog: from now on, a chunk not asked for
    /// within `idle` ends it.
    fn start_watching(&mut self) {
        let watched = Arc::new(Watched {
            parts: Mutex::new(None),
            since: Instant::now(),
            asked_ms: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
        });
        let own = std::mem::replace(&mut self.inner, Inner::Watched(watched.clone()));
        if let Inner::Own(body, held) = own {
            *lock(&watched.parts) = Some((body, held));
        }
        let upload = self.upload.clone();
        tokio::spawn(watchdog(
            Arc::downgrade(&watched),
            self.idle,
            self.side,
            upload,
        ));
    }

    fn set_waiting(&self, waiting: bool) {
        if let Inner::Watched(watched) = &self.inner {
            watched.waiting.store(waiting, Relaxed);
        }
    }

    /// The next frame of the inner body; `None` once the watchdog took it.
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Option<Polled<B>> {
        match &mut self.inner {
            Inner::Own(body, _) => Some(Pin::new(body).poll_frame(cx)),
            Inner::Watched(watched) => {
                let asked = watched.since.elapsed().as_millis() as u64;
                watched.asked_ms.store(asked, Relaxed);
                let mut parts = lock(&watched.parts);
                let (body, _) = parts.as_mut()?;
                Some(Pin::new(body).poll_frame(cx))
            }
        }
    }
}

/// What polling a body for its next frame gives.
type Polled<B> = Poll<Option<Result<Frame<<B as Body>::Data>, <B as Body>::Error>>>;

/// A body that a watchdog looks after.
#[derive(Debug)]
struct Watched<B> {
    /// Taken (and so dropped) by the watchdog when the body is not asked for.
    parts: Mutex<Option<(B, Option<Held>)>>,
    since: Instant,
    /// When the body was last asked for a frame, in ms since `since`.
    asked_ms: AtomicU64,
    /// Whether it waits for its own source (its own idle timer covers that).
    waiting: AtomicBool,
}

/// Ends `watched` once its next chunk has not been asked for within `idle`.
/// Returns when the body is gone.
async fn watchdog<B>(
    watched: Weak<Watched<B>>,
    idle: Duration,
    side: Side,
    upload: Option<Arc<Upload>>,
) {
    loop {
        let next_check = {
            let Some(watched) = watched.upgrade() else {
                return;
            };
            let asked = watched.since + Duration::from_millis(watched.asked_ms.load(Relaxed));
            if watched.waiting.load(Relaxed) || asked + idle > Instant::now() {
                (asked + idle).max(Instant::now() + idle / 4)
            } else {
                // Dropped outside the lock: a backend connection closes here.
                let parts = lock(&watched.parts).take();
                drop(parts);
                match side {
                    Side::Backend(backend) => {
                        tracing::info!(%backend, idle_ms = idle.as_millis() as u64, "the client took nothing of the answer for bodyIdleTimeoutMs; ended the exchange with the backend")
                    }
                    Side::Client(client) => {
                        if let Some(upload) = &upload {
                            upload.set(UploadState::Failed);
                        }
                        tracing::info!(%client, idle_ms = idle.as_millis() as u64, "the backend took nothing of the upload for bodyIdleTimeoutMs; ended the exchange");
                    }
                }
                return;
            }
        };
        tokio::time::sleep_until(next_check).await;
    }
}

impl<B> Body for Timed<B>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Unpin + Send + 'static,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(polled) = this.poll_inner(cx) else {
            return Poll::Ready(Some(Err(BodyError::NotTaken(this.idle))));
        };
        match polled {
            Poll::Ready(None) => {
                this.finished();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                this.set_waiting(false);
                if this.is_end_stream() {
                    this.finished();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                let error = this.fail(BodyError::Broken(common::errors::chain(&error)));
                Poll::Ready(Some(Err(error)))
            }
            Poll::Pending => {
                this.set_waiting(true);
                this.poll_idle_timer(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Own(body, _) => body.is_end_stream(),
            Inner::Watched(watched) => lock(&watched.parts)
                .as_ref()
                .is_none_or(|(body, _)| body.is_end_stream()),
        }
    }

    // hyper frames the body for the next hop from this: a known length
    // stays a Content-Length.
    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Own(body, _) => body.size_hint(),
            Inner::Watched(watched) => lock(&watched.parts)
                .as_ref()
                .map_or_else(SizeHint::default, |(body, _)| body.size_hint()),
        }
    }
}

impl<B> Timed<B> {
    /// The inner body has nothing yet: runs the idle timer, and ends the
    /// body with [`BodyError::Stalled`] once it fires.
    fn poll_idle_timer(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let deadline = Instant::now() + self.idle;
        let timer = match &mut self.timer {
            Some(timer) if self.waiting => timer,
            Some(timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.waiting = true;
        // A quiet response to a client that is still uploading waits
        // on the client, whose own timer ends the exchange.
        let upload = match self.side {
            Side::Backend(_) => self.upload.as_deref(),
            Side::Client(_) => None,
        };
        loop {
            ready!(timer.as_mut().poll(cx));
            if !upload.is_some_and(|upload| upload.get() == UploadState::Sending) {
                break;
            }
            timer.as_mut().reset(Instant::now() + self.idle);
        }
        let error = self.fail(BodyError::Stalled(self.idle));
        Poll::Ready(Some(Err(error)))
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

        upload.set(UploadState::Sent);
        let started = Instant::now();
        let error = response.frame().await.unwrap().unwrap_err();
        assert!(matches!(error, BodyError::Stalled(_)), "{error}");
        assert!(started.elapsed() <= Duration::from_secs(5));
    }
}
