//! HTTP/2 server streams on this host waiting a moment for their caller's record
//! (`h2_stitch`).
//!
//! Both ends of a loopback connection are seen by the agent, but not always in order: a client
//! preempted after its write returns (and before its return probe runs, for a TLS library's
//! write) reaches userspace after the server has read, answered and ended the stream. Such a
//! server stream is held until its caller's stream is seen opening (`take`), or until events
//! the kernel sent `WAIT_NS` after the stream ended have been handled (`due`): every event
//! sent before then is behind us, and the stream has no caller on this host. Bounded: a stream
//! that finds the table full is not held (and gets no parent).
use std::collections::VecDeque;

use crate::fast::HashMap;

use super::h2_stitch::ConnKey;

/// How long after a server stream ended its caller's record may still arrive.
pub const WAIT_NS: u64 = 50_000_000;
/// Streams held at once.
pub const MAX_HELD: usize = 4096;

pub struct H2Wait<T> {
    held: HashMap<(ConnKey, u32), (u64, T)>,
    /// (due, connection, stream), in the order streams were held (their ends' order).
    order: VecDeque<(u64, ConnKey, u32)>,
}

impl<T> Default for H2Wait<T> {
    fn default() -> Self {
        H2Wait {
            held: HashMap::default(),
            order: VecDeque::new(),
        }
    }
}

impl<T> H2Wait<T> {
    /// Holds `item`, the server stream `stream` of `conn` that ended at `end_ns`. Gives it back
    /// when the table is full, or a stream of that id is already held there.
    pub fn hold(&mut self, conn: ConnKey, stream: u32, end_ns: u64, item: T) -> Result<(), T> {
        if self.held.len() >= MAX_HELD || self.held.contains_key(&(conn, stream)) {
            return Err(item);
        }
        let due = end_ns.saturating_add(WAIT_NS);
        self.held.insert((conn, stream), (due, item));
        self.order.push_back((due, conn, stream));
        Ok(())
    }

    /// The held server stream whose caller just opened `stream` on `conn`.
    pub fn take(&mut self, conn: &ConnKey, stream: u32) -> Option<T> {
        self.held.remove(&(*conn, stream)).map(|(_, item)| item)
    }

    /// The held streams whose wait ended by `now_ns`, oldest first.
    pub fn due(&mut self, now_ns: u64) -> Vec<T> {
        let mut out = Vec::new();
        while let Some(&(due, conn, stream)) = self.order.front() {
            if due > now_ns {
                break;
            }
            self.order.pop_front();
            // Taken already, or held again later under the same key (then not yet due).
            if self
                .held
                .get(&(conn, stream))
                .is_some_and(|(d, _)| *d == due)
            {
                if let Some((_, item)) = self.held.remove(&(conn, stream)) {
                    out.push(item);
                }
            }
        }
        if self.held.is_empty() {
            self.order.clear();
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> ConnKey {
        let lo = std::net::IpAddr::from([127, 0, 0, 1]);
        ConnKey {
            netns: 1,
            client: (lo, port),
            server: (lo, 443),
        }
    }

    #[test]
    fn a_caller_seen_late_takes_its_stream_back() {
        let mut w = H2Wait::default();
        w.hold(key(1), 1, 1_000, "s1").unwrap();
        w.hold(key(1), 3, 2_000, "s3").unwrap();
        assert_eq!(w.take(&key(1), 3), Some("s3"));
        assert_eq!(w.take(&key(1), 3), None, "taken once");
        assert_eq!(w.take(&key(2), 1), None, "another connection's stream 1");
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn streams_leave_when_their_wait_ends_oldest_first() {
        let mut w = H2Wait::default();
        w.hold(key(1), 1, 1_000, "a").unwrap();
        w.hold(key(1), 3, 5_000, "b").unwrap();
        w.hold(key(2), 1, 9_000, "c").unwrap();
        assert!(w.due(1_000 + WAIT_NS - 1).is_empty());
        assert_eq!(w.due(5_000 + WAIT_NS), vec!["a", "b"]);
        assert_eq!(w.take(&key(2), 1), Some("c"));
        assert!(w.due(u64::MAX).is_empty());
        assert!(w.is_empty());
    }

    #[test]
    fn a_stream_taken_and_held_again_leaves_at_its_own_time() {
        let mut w = H2Wait::default();
        w.hold(key(1), 1, 1_000, "old").unwrap();
        assert_eq!(w.take(&key(1), 1), Some("old"));
        w.hold(key(1), 1, 10 * WAIT_NS, "new").unwrap();
        assert!(w.due(2 * WAIT_NS).is_empty(), "the old entry's time");
        assert_eq!(w.due(11 * WAIT_NS), vec!["new"]);
    }

    #[test]
    fn a_full_table_gives_the_stream_back() {
        let mut w = H2Wait::default();
        for i in 0..MAX_HELD as u32 {
            w.hold(key(1), 2 * i + 1, 0, i).unwrap();
        }
        assert_eq!(w.hold(key(2), 1, 0, 7), Err(7));
        assert_eq!(w.hold(key(1), 1, 0, 8), Err(8), "already held");
        assert_eq!(w.due(WAIT_NS).len(), MAX_HELD);
    }
}
