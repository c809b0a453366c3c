//! Same-host stitching for HTTP/2: a callee's SERVER span takes the caller's CLIENT span as its
//! parent when the agent sees both ends of the connection, without a byte on the wire changed.
//!
//! HTTP/1 requests are stitched in the kernel, by the TCP sequence number a request head starts
//! at. An HTTP/2 request is a stream, and both ends of one connection name it by the same
//! stream id, so userspace can match them instead: when the client process writes a request's
//! HEADERS (and it carries no `traceparent` of its own), the CLIENT span's ids are chosen and
//! recorded under (connection, stream); when the server process's stream on the same
//! connection ends, its span takes that trace and that parent, and when the client's stream
//! ends, its span takes the recorded ids.
//!
//! A connection is named by its client and server endpoints, and, on loopback (where every
//! network namespace has the same addresses), by the network namespace too. Never a wrong
//! parent: a record is made only for a stream the client was seen opening, is taken only by a
//! server stream that began after it (within `MAX_AGE_NS`), and every record of a connection
//! is dropped when the client's side of it ends, so a later connection on the same endpoints
//! starts clean. The table is bounded; a stream that finds it full is counted and not stitched.
use std::{collections::HashMap, net::IpAddr};

use agent_common::{WireCtx, LINK_NONE, WIRE_CARRIED, WIRE_SERVER};

/// Records kept at once (streams opened and not yet ended, on every client connection).
pub const MAX_RECORDS: usize = 65_536;
/// How long after the client opened a stream its server side may still take the record.
const MAX_AGE_NS: u64 = 60_000_000_000;

/// One TCP connection as both its ends see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The network namespace's inode on loopback, 0 otherwise.
    pub netns: u64,
    pub client: (IpAddr, u16),
    pub server: (IpAddr, u16),
}

impl ConnKey {
    /// The connection between `local` and `peer`, seen from the `client` end or the server's,
    /// in network namespace `netns` (needed on loopback only; `None` there: no key).
    pub fn new(
        client: bool,
        local: (IpAddr, u16),
        peer: (IpAddr, u16),
        netns: Option<u64>,
    ) -> Option<ConnKey> {
        let (c, s) = if client { (local, peer) } else { (peer, local) };
        let netns = if c.0.is_loopback() || s.0.is_loopback() {
            netns?
        } else {
            0
        };
        Some(ConnKey {
            netns,
            client: c,
            server: s,
        })
    }
}

#[derive(Clone, Copy, Debug)]
struct Record {
    /// The CLIENT span's context (`WIRE_CARRIED`).
    ctx: WireCtx,
    opened_ns: u64,
}

/// The records, by connection and stream.
#[derive(Default)]
pub struct H2Stitch {
    conns: HashMap<ConnKey, HashMap<u32, Record>>,
    len: usize,
}

impl H2Stitch {
    /// The client opened `stream` at `opened_ns` with no context of its own: its span's ids are
    /// `ctx` (`WIRE_CARRIED`). False when the table is full (not recorded).
    pub fn opened(&mut self, conn: ConnKey, stream: u32, opened_ns: u64, ctx: WireCtx) -> bool {
        if self.len >= MAX_RECORDS {
            return false;
        }
        let streams = self.conns.entry(conn).or_default();
        if streams.insert(stream, Record { ctx, opened_ns }).is_none() {
            self.len += 1;
        }
        true
    }

    /// The client's stream ended: the ids its span was given when it opened (used up).
    pub fn client_ended(&mut self, conn: &ConnKey, stream: u32) -> Option<WireCtx> {
        let streams = self.conns.get_mut(conn)?;
        let r = streams.remove(&stream)?;
        self.len -= 1;
        if streams.is_empty() {
            self.conns.remove(conn);
        }
        Some(r.ctx)
    }

    /// The context of a server stream that began at `start_ns` on `conn`: the caller's trace,
    /// with its CLIENT span as parent (`span_id` is the server span's own, `new_span`).
    pub fn server_ctx(
        &self,
        conn: &ConnKey,
        stream: u32,
        start_ns: u64,
        new_span: [u8; 8],
    ) -> Option<WireCtx> {
        let r = self.conns.get(conn)?.get(&stream)?;
        if start_ns < r.opened_ns || start_ns - r.opened_ns > MAX_AGE_NS {
            return None;
        }
        Some(WireCtx {
            kind: WIRE_SERVER,
            span_id: new_span,
            parent_id: r.ctx.span_id,
            ..r.ctx
        })
    }

    /// The client's side of `conn` ended: none of its records can be taken any more.
    pub fn conn_ended(&mut self, conn: &ConnKey) {
        if let Some(streams) = self.conns.remove(conn) {
            self.len -= streams.len();
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The CLIENT span's context of a stream opened with no context of its own: a new trace whose
/// root it is, sampled as `sampled` says; no in-process parent (HTTP/2 calls are not linked
/// to the request their process serves yet).
pub fn client_ctx(trace_id: [u8; 16], span_id: [u8; 8], sampled: bool) -> WireCtx {
    WireCtx {
        trace_id,
        span_id,
        parent_id: [0; 8],
        kind: WIRE_CARRIED,
        flags: sampled as u8,
        link: LINK_NONE,
        ..WireCtx::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const POD: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5));

    fn key(ns: u64) -> ConnKey {
        ConnKey::new(true, (LO, 40_000), (LO, 50_051), Some(ns)).unwrap()
    }

    #[test]
    fn both_ends_name_one_connection_alike() {
        let c = ConnKey::new(true, (LO, 40_000), (LO, 50_051), Some(7));
        let s = ConnKey::new(false, (LO, 50_051), (LO, 40_000), Some(7));
        assert_eq!(c, s);
        assert_ne!(c, ConnKey::new(false, (LO, 50_051), (LO, 40_000), Some(8)));
        // Loopback needs the namespace; other addresses do not use it.
        assert_eq!(ConnKey::new(true, (LO, 1), (LO, 2), None), None);
        let a = ConnKey::new(true, (POD, 1), (POD, 2), Some(3));
        assert_eq!(a, ConnKey::new(false, (POD, 2), (POD, 1), None));
    }

    #[test]
    fn the_server_stream_takes_the_client_span_as_parent() {
        let mut t = H2Stitch::default();
        let ctx = client_ctx([1; 16], [2; 8], true);
        assert!(t.opened(key(1), 3, 100, ctx));
        let s = t.server_ctx(&key(1), 3, 150, [9; 8]).expect("stitched");
        assert_eq!(
            (s.kind, s.trace_id, s.parent_id, s.span_id, s.flags),
            (WIRE_SERVER, [1; 16], [2; 8], [9; 8], 1)
        );
        // Another stream, another namespace, or a stream begun before the client opened it.
        assert!(t.server_ctx(&key(1), 5, 150, [9; 8]).is_none());
        assert!(t.server_ctx(&key(2), 3, 150, [9; 8]).is_none());
        assert!(t.server_ctx(&key(1), 3, 50, [9; 8]).is_none());
        assert!(t
            .server_ctx(&key(1), 3, 100 + MAX_AGE_NS + 1, [9; 8])
            .is_none());
        assert_eq!(t.client_ended(&key(1), 3), Some(ctx));
        assert!(t.is_empty());
        assert!(t.server_ctx(&key(1), 3, 150, [9; 8]).is_none());
    }

    #[test]
    fn a_connection_that_ends_leaves_nothing_for_the_next_one() {
        let mut t = H2Stitch::default();
        for s in [1, 3, 5] {
            t.opened(key(1), s, 10, client_ctx([1; 16], [2; 8], true));
        }
        assert_eq!(t.len(), 3);
        t.conn_ended(&key(1));
        assert!(t.is_empty());
        assert!(t.server_ctx(&key(1), 1, 20, [9; 8]).is_none());
    }

    #[test]
    fn a_full_table_records_nothing_more() {
        let mut t = H2Stitch::default();
        for s in 0..MAX_RECORDS as u32 {
            assert!(t.opened(key(1), 2 * s + 1, 10, client_ctx([1; 16], [2; 8], true)));
        }
        assert!(!t.opened(key(2), 1, 10, client_ctx([1; 16], [2; 8], true)));
        assert_eq!(t.len(), MAX_RECORDS);
    }
}
