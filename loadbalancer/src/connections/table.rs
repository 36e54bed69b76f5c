//! Every backend's connections, found by address.
//!
//! Read on every request, written when a backend is first used or leaves:
//! so the table is an immutable map swapped whole (`arc-swap`, as the
//! balancer's snapshot is), and a request finds its backend's connections
//! with one atomic load and one lookup, never a lock. The map hashes with
//! foldhash: the standard library's SipHash guards against keys an attacker
//! chooses, and these keys are the backends' addresses, which discovery
//! chooses; at a few hundred instructions a request, that guard was a
//! percent of the request path.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use foldhash::HashMap;

use common::sync::lock;

use super::Connections;

/// The connections of every backend in use, by address.
#[derive(Debug)]
pub struct Table<B> {
    by_addr: ArcSwap<HashMap<SocketAddr, Arc<Connections<B>>>>,
    /// Held by writers only, so that two of them do not lose an entry.
    writing: Mutex<()>,
}

impl<B> Default for Table<B> {
    fn default() -> Self {
        Table {
            by_addr: ArcSwap::default(),
            writing: Mutex::new(()),
        }
    }
}

impl<B> Table<B> {
    /// The connections to `addr`, and whether they were just added (the
    /// caller then arranges for them to be forgotten).
    pub fn get(&self, addr: SocketAddr) -> (Arc<Connections<B>>, bool) {
        if let Some(found) = self.by_addr.load().get(&addr) {
            return (found.clone(), false);
        }
        let _writing = lock(&self.writing);
        let current = self.by_addr.load_full();
        if let Some(found) = current.get(&addr) {
            return (found.clone(), false);
        }
        let added = Arc::new(Connections::new(addr));
        let mut next = HashMap::clone(&current);
        next.insert(addr, added.clone());
        self.by_addr.store(Arc::new(next));
        (added, true)
    }

    /// Drops `connections` from the table, if they are still the ones for
    /// `addr`: idle ones close; lent ones close when their exchange ends.
    pub fn forget(&self, addr: SocketAddr, connections: &Arc<Connections<B>>) {
        let _writing = lock(&self.writing);
        let current = self.by_addr.load_full();
        if current
            .get(&addr)
            .is_some_and(|c| Arc::ptr_eq(c, connections))
        {
            let mut next = HashMap::clone(&current);
            next.remove(&addr);
            self.by_addr.store(Arc::new(next));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;

    #[test]
    fn connections_are_kept_per_address_until_forgotten() {
        let table: Table<Empty<bytes::Bytes>> = Table::default();
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let (first, added) = table.get(a);
        assert!(added);
        let (again, added) = table.get(a);
        assert!(!added && Arc::ptr_eq(&first, &again));
        let (other, _) = table.get(b);
        assert!(!Arc::ptr_eq(&first, &other), "one set per address");
        let stale = Arc::new(Connections::new(a));
        table.forget(a, &stale);
        assert!(!table.get(a).1, "only the entry it was given is forgotten");
        table.forget(a, &first);
        assert!(table.get(a).1, "a new set of connections after");
        assert!(!table.get(b).1, "the other address kept its own");
    }
}
