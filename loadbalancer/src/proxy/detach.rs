//! An exchange with a backend that outlives a client who gives up on it.
//!
//! When an HTTP/2 client cancels a stream, hyper drops our handler, and with
//! it the exchange: hyper's client closes that backend connection at once.
//! The backend does not notice; it goes on working on the request. A client
//! that cancels in a loop (rapid reset) would so keep far more requests
//! busy on the backends than its stream limit allows, while we count none
//! of them. So an HTTP/2 client's exchange is [`Detachable`]: dropped before
//! the backend answered, it goes on in a task of its own, holding the
//! client's stream [`Slot`] until the backend answers (or `requestTimeoutMs`
//! passes), and then drops the answer. See `common::serve`'s `streams`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use common::serve::Slot;

/// An exchange that finishes on its own task if it is dropped unfinished.
pub struct Detachable<F>
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    exchange: Option<Pin<Box<F>>>,
    slot: Option<Slot>,
}

impl<F> Detachable<F>
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    pub fn new(exchange: F, slot: Slot) -> Detachable<F> {
        Detachable {
            exchange: Some(Box::pin(exchange)),
            slot: Some(slot),
        }
    }
}

impl<F> Future for Detachable<F>
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(exchange) = self.exchange.as_mut() else {
            return Poll::Pending; // polled again after it finished: never happens
        };
        let output = ready!(exchange.as_mut().poll(cx));
        self.exchange = None;
        Poll::Ready(output)
    }
}

impl<F> Drop for Detachable<F>
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    fn drop(&mut self) {
        let Some(exchange) = self.exchange.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // the runtime is gone: so is the process
        };
        let slot = self.slot.take();
        runtime.spawn(async move {
            let _answer = exchange.await;
            drop(slot);
        });
    }
}

impl<F> std::fmt::Debug for Detachable<F>
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detachable")
            .field("finished", &self.exchange.is_none())
            .finish()
    }
}
