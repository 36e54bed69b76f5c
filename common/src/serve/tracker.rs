//! Open connections, counted for shutdown, and told when to close.
//!
//! Each connection task holds a [`Ticket`] until it ends. Shutdown tells
//! every ticket holder to finish ([`Ticket::closing`]) and waits until the
//! last ticket is dropped, or a timeout. The HTTP server and TCP mode share
//! this one mechanism (a `tokio::sync::watch` channel: its receivers are the
//! tickets, its receiver count the open connections).

use std::time::Duration;

use tokio::sync::watch;

/// The open connections of one listener.
#[derive(Debug)]
pub struct Tracker(watch::Sender<()>);

/// Held by one connection until it ends.
#[derive(Debug)]
pub struct Ticket(watch::Receiver<()>);

impl Default for Tracker {
    fn default() -> Self {
        Tracker(watch::Sender::new(()))
    }
}

impl Tracker {
    /// A ticket for a new connection.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.0.subscribe())
    }

    /// How many connections are open.
    pub fn open(&self) -> usize {
        self.0.receiver_count()
    }

    /// Tells every connection to close once its work in flight is done, and
    /// waits for all of them, at most `timeout`. Whether they all finished.
    pub async fn close_and_wait(&self, timeout: Option<Duration>) -> bool {
        self.0.send_replace(());
        let all_closed = self.0.closed();
        match timeout {
            Some(timeout) => tokio::time::timeout(timeout, all_closed).await.is_ok(),
            None => {
                all_closed.await;
                true
            }
        }
    }
}

impl Ticket {
    /// Completes once shutdown has asked the connections to close (with an
    /// error when the tracker is gone: closing too). Polled on every wake of
    /// a connection, so it is the channel's own future, not a wrapper.
    pub fn closing(&mut self) -> impl Future<Output = Result<(), watch::error::RecvError>> + '_ {
        self.0.changed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closing_waits_for_every_ticket_and_tells_each_holder() {
        let tracker = Tracker::default();
        let mut ticket = tracker.ticket();
        assert_eq!(tracker.open(), 1);
        let holder = tokio::spawn(async move {
            let _ = ticket.closing().await;
        });
        assert!(tracker.close_and_wait(Some(Duration::from_secs(10))).await);
        assert!(holder.is_finished() || holder.await.is_ok());
        let _kept = tracker.ticket();
        let timed_out = tracker
            .close_and_wait(Some(Duration::from_millis(10)))
            .await;
        assert!(!timed_out, "a ticket still held: not all closed");
    }
}
