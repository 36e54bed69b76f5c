//! HTTP/2 streams that a client cancels still count until their work ends.
//!
//! HTTP/2 lets a client open a stream and cancel it at once (`RST_STREAM`).
//! hyper then forgets the stream, so it no longer counts against
//! [`MAX_STREAMS`], but the work it started may go on: the load balancer's
//! request to a backend, for one. A client that opens and cancels streams in
//! a loop ("rapid reset", CVE-2023-44487) could so start far more work than
//! the stream limit allows; h2's own defence only catches streams cancelled
//! before they were accepted. Two defences, as HAProxy and Envoy have them:
//!
//! - **A [`Slot`] per stream**, out of [`MAX_STREAMS`] per connection. It
//!   comes with the request (an extension) and the handler may keep it for
//!   as long as the stream's work goes on: the proxy holds it until its
//!   backend exchange has ended, even after the client cancelled. A new
//!   stream waits for a free slot. HAProxy does the same: a stream counts
//!   against the limit until the application has let it go.
//! - **A connection whose streams are mostly cancelled early is closed**:
//!   once more than [`EARLY_RESETS`] of its streams were cancelled before
//!   they were answered, and they are over half of its streams (Envoy's
//!   "premature reset" rule; nginx instead caps new streams per read).
//!   hyper does not let us choose the GOAWAY's error code, so the client
//!   reads `NO_ERROR` rather than `ENHANCE_YOUR_CALM`; then the connection
//!   is closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

use hyper::body::Incoming;
use hyper::service::Service;
use hyper::{Request, Response};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::MAX_STREAMS;

/// How many streams may be cancelled before their answer, on one
/// connection, before the connection is closed (if they are also over half
/// of its streams). A browser cancels a few when the user navigates away; a
/// gRPC client cancels on deadlines; neither cancels most of what it opens.
pub const EARLY_RESETS: u32 = 100;

/// One stream's place among its connection's [`MAX_STREAMS`]: held while
/// the work for the stream goes on, freed when the last clone drops.
#[derive(Debug, Clone)]
pub struct Slot(#[expect(dead_code, reason = "held for its drop")] Arc<OwnedSemaphorePermit>);

/// One HTTP/2 connection's account of its streams.
#[derive(Debug)]
pub(super) struct Streams {
    slots: Arc<Semaphore>,
    started: AtomicU32,
    reset_early: AtomicU32,
    /// Told once the connection has cancelled too much.
    abusive: Notify,
}

impl Streams {
    pub(super) fn new() -> Arc<Streams> {
        Arc::new(Streams {
            slots: Arc::new(Semaphore::new(MAX_STREAMS as usize)),
            started: AtomicU32::new(0),
            reset_early: AtomicU32::new(0),
            abusive: Notify::new(),
        })
    }

    /// Completes once the client has cancelled too many streams early.
    pub(super) async fn abusive(&self) {
        self.abusive.notified().await;
    }

    fn cancelled_early(&self) {
        let resets = self.reset_early.fetch_add(1, Relaxed) + 1;
        if resets > EARLY_RESETS && resets * 2 > self.started.load(Relaxed) {
            // `notify_one` keeps the signal if nobody is waiting yet.
            self.abusive.notify_one();
        }
    }
}

/// Counts a stream as cancelled early unless its answer was ready first.
struct Answering {
    streams: Arc<Streams>,
    answered: bool,
}

impl Drop for Answering {
    fn drop(&mut self) {
        if !self.answered {
            self.streams.cancelled_early();
        }
    }
}

/// A service whose every request first takes a [`Slot`].
#[derive(Debug)]
pub(super) struct Budgeted<S> {
    inner: Arc<S>,
    streams: Arc<Streams>,
}

impl<S> Budgeted<S> {
    pub(super) fn new(inner: S, streams: Arc<Streams>) -> Budgeted<S> {
        Budgeted {
            inner: Arc::new(inner),
            streams,
        }
    }
}

type Answer<B, E> = Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>>;

impl<S, B> Service<Request<Incoming>> for Budgeted<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + Sync + 'static,
    S::Future: Send,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Answer<B, S::Error>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        let (inner, streams) = (self.inner.clone(), self.streams.clone());
        streams.started.fetch_add(1, Relaxed);
        Box::pin(async move {
            let mut answering = Answering {
                streams: streams.clone(),
                answered: false,
            };
            // The semaphore is never closed, so this always gives a permit.
            if let Ok(permit) = streams.slots.clone().acquire_owned().await {
                request.extensions_mut().insert(Slot(Arc::new(permit)));
            }
            let response = inner.call(request).await;
            answering.answered = true;
            response
        })
    }
}
