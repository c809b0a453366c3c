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
//! parent: a record is made only for a stream the client was seen opening, and is taken once,
//! only by a server stream of the same connection and stream id that began while the client's
//! stream was open (a later connection on the same endpoints reuses stream ids, but its streams
//! begin after the old ones ended). The two ends' events race (the server's last write and the
//! client's read of it return on two CPUs at once), so a record outlives its client stream by
//! `GRACE_NS` for a server end still on its way; untaken records then go, oldest first, and
//! those of a connection whose streams never ended go with it. The table is bounded; a stream
//! that finds it full is counted and not stitched.
use std::{collections::VecDeque, net::IpAddr};

use agent_common::{WireCtx, LINK_NONE, WIRE_CARRIED, WIRE_SERVER};

use crate::fast::HashMap;

/// Records kept at once (streams opened and not yet ended, on every client connection, and
/// those ended less than `GRACE_NS` ago).
pub const MAX_RECORDS: usize = 65_536;
/// How long after the client opened a stream its server side may still take the record.
const MAX_AGE_NS: u64 = 60_000_000_000;
/// How long a record waits for its server end after the client's stream ended.
const GRACE_NS: u64 = 1_000_000_000;

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
    /// When the client's stream ended.
    closed_ns: Option<u64>,
    /// A server stream took it.
    taken: bool,
}

/// The records, by connection and stream.
#[derive(Default)]
pub struct H2Stitch {
    conns: HashMap<ConnKey, HashMap<u32, Record>>,
    len: usize,
    /// Records whose client stream ended, in the order they did.
    ended: VecDeque<(u64, ConnKey, u32)>,
}

impl H2Stitch {
    /// The client opened `stream` at `opened_ns` with no context of its own: its span's ids are
    /// `ctx` (`WIRE_CARRIED`). False when the table is full (not recorded).
    pub fn opened(&mut self, conn: ConnKey, stream: u32, opened_ns: u64, ctx: WireCtx) -> bool {
        self.expire(opened_ns);
        if self.len >= MAX_RECORDS {
            return false;
        }
        let r = Record {
            ctx,
            opened_ns,
            closed_ns: None,
            taken: false,
        };
        if self
            .conns
            .entry(conn)
            .or_default()
            .insert(stream, r)
            .is_none()
        {
            self.len += 1;
        }
        true
    }

    /// The client's stream ended at `end_ns`: the ids its span was given when it opened. The
    /// record waits `GRACE_NS` more for the server's end of the stream.
    pub fn client_ended(&mut self, conn: &ConnKey, stream: u32, end_ns: u64) -> Option<WireCtx> {
        self.expire(end_ns);
        let r = self.conns.get_mut(conn)?.get_mut(&stream)?;
        let ctx = r.ctx;
        if r.taken {
            self.remove(conn, stream);
        } else if r.closed_ns.is_none() {
            r.closed_ns = Some(end_ns);
            self.ended.push_back((end_ns, *conn, stream));
        }
        Some(ctx)
    }

    /// The context of a server stream that began at `start_ns` on `conn`: the caller's trace,
    /// with its CLIENT span as parent (`span_id` is the server span's own, `new_span`). Taken
    /// once.
    pub fn server_ctx(
        &mut self,
        conn: &ConnKey,
        stream: u32,
        start_ns: u64,
        new_span: [u8; 8],
    ) -> Option<WireCtx> {
        let r = self.conns.get_mut(conn)?.get_mut(&stream)?;
        let began_while_open = r.opened_ns <= start_ns
            && start_ns - r.opened_ns <= MAX_AGE_NS
            && r.closed_ns.is_none_or(|c| start_ns <= c);
        if r.taken || !began_while_open {
            return None;
        }
        r.taken = true;
        let r = *r;
        if r.closed_ns.is_some() {
            // The client's end came first: nothing waits for this record any more.
            self.remove(conn, stream);
        }
        Some(WireCtx {
            kind: WIRE_SERVER,
            span_id: new_span,
            parent_id: r.ctx.span_id,
            ..r.ctx
        })
    }

    /// The client's side of `conn` ended: records of streams that never ended go with it (the
    /// others wait out their grace).
    pub fn conn_ended(&mut self, conn: &ConnKey) {
        if let Some(streams) = self.conns.get_mut(conn) {
            let before = streams.len();
            streams.retain(|_, r| r.closed_ns.is_some());
            self.len -= before - streams.len();
            if streams.is_empty() {
                self.conns.remove(conn);
            }
        }
    }

    /// Drops the records whose client stream ended more than `GRACE_NS` before `now_ns`.
    fn expire(&mut self, now_ns: u64) {
        while let Some(&(ended, conn, stream)) = self.ended.front() {
            if now_ns.saturating_sub(ended) <= GRACE_NS {
                break;
            }
            self.ended.pop_front();
            let same = self
                .conns
                .get(&conn)
                .and_then(|s| s.get(&stream))
                .is_some_and(|r| r.closed_ns == Some(ended));
            if same {
                self.remove(&conn, stream);
            }
        }
    }

    fn remove(&mut self, conn: &ConnKey, stream: u32) {
        if let Some(streams) = self.conns.get_mut(conn) {
            if streams.remove(&stream).is_some() {
                self.len -= 1;
            }
            if streams.is_empty() {
                self.conns.remove(conn);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The CLIENT span's context of a stream opened with no context of its own and no owner in
/// its process (`h2_owner`): a new trace whose root it is, sampled as `sampled` says.
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
        // Another stream, another namespace, or a stream begun before the client opened it.
        assert!(t.server_ctx(&key(1), 5, 150, [9; 8]).is_none());
        assert!(t.server_ctx(&key(2), 3, 150, [9; 8]).is_none());
        assert!(t.server_ctx(&key(1), 3, 50, [9; 8]).is_none());
        assert!(t
            .server_ctx(&key(1), 3, 100 + MAX_AGE_NS + 1, [9; 8])
            .is_none());
        let s = t.server_ctx(&key(1), 3, 150, [9; 8]).expect("stitched");
        assert_eq!(
            (s.kind, s.trace_id, s.parent_id, s.span_id, s.flags),
            (WIRE_SERVER, [1; 16], [2; 8], [9; 8], 1)
        );
        // Taken once; the client still finds its ids (it ends after the server's end).
        assert!(t.server_ctx(&key(1), 3, 150, [9; 8]).is_none());
        assert_eq!(t.client_ended(&key(1), 3, 200), Some(ctx));
        assert!(t.is_empty());
    }

    #[test]
    fn a_server_end_that_arrives_after_the_clients_still_finds_its_caller() {
        let mut t = H2Stitch::default();
        let ctx = client_ctx([1; 16], [2; 8], true);
        t.opened(key(1), 1, 100, ctx);
        assert_eq!(t.client_ended(&key(1), 1, 300), Some(ctx));
        let s = t
            .server_ctx(&key(1), 1, 150, [9; 8])
            .expect("within the grace");
        assert_eq!(s.parent_id, [2; 8]);
        assert!(t.is_empty());
        // Unclaimed, a record goes once its grace is over.
        t.opened(key(1), 3, 400, ctx);
        t.client_ended(&key(1), 3, 500);
        t.opened(key(1), 5, 500 + GRACE_NS + 1, ctx);
        assert_eq!(t.len(), 1);
        assert!(t.server_ctx(&key(1), 3, 450, [9; 8]).is_none());
    }

    #[test]
    fn a_later_connection_on_the_same_endpoints_takes_nothing_of_the_old_one() {
        let mut t = H2Stitch::default();
        t.opened(key(1), 1, 100, client_ctx([1; 16], [2; 8], true));
        t.client_ended(&key(1), 1, 200);
        t.conn_ended(&key(1));
        // A new connection's stream 1 begins after the old stream 1 ended.
        assert!(t.server_ctx(&key(1), 1, 250, [9; 8]).is_none());
    }

    #[test]
    fn a_connection_that_ends_drops_its_streams_that_never_ended() {
        let mut t = H2Stitch::default();
        for s in [1, 3, 5] {
            t.opened(key(1), s, 10, client_ctx([1; 16], [2; 8], true));
        }
        t.client_ended(&key(1), 5, 20);
        assert_eq!(t.len(), 3);
        t.conn_ended(&key(1));
        assert_eq!(t.len(), 1, "the ended stream waits out its grace");
        assert!(t.server_ctx(&key(1), 1, 15, [9; 8]).is_none());
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
