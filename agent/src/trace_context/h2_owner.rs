//! In-process parents of HTTP/2 calls: the one request their process was serving.
//!
//! An HTTP/1 call is linked in the kernel to the request open on its thread. An HTTP/2 call
//! has no thread to go by: gRPC libraries read and write on threads of their own (grpc core's
//! pollers, Go's reader and writer goroutines) and event loops serve many streams at once. What
//! holds whatever the runtime is the process's own state: when a process writes a call's
//! HEADERS while exactly one request it serves is open (read, not yet answered), that request
//! is the call's parent. Never a wrong parent from what the agent did not see:
//!
//! - "open" counts every request the process serves, HTTP/1 and HTTP/2, from the parsers' own
//!   state (exact: the tracker reports each connection's count as it changes);
//! - a server connection the agent picked up in its middle (accepted before it attached, or
//!   whose frames it lost track of) may have requests open that nobody saw: its process's calls
//!   get no parent while that connection lives (`blind`);
//! - a process that lost an event (the kernel's ring buffer or the tracker's queue was full)
//!   may have a request open that was never seen: its calls get no parent from then on
//!   (`lost`: the kernel counts losses by process, and every event carries its process's);
//! - the kernel sends events in the order their syscalls returned, so a request read before the
//!   call was written is seen before it.
//!
//! HTTP/1 requests a process serves are named too (their ids are chosen when their head is
//! read), so that a REST front end's gRPC calls link alike.
//!
//! Two or more open: no parent is guessed (`Ambiguous`). What this cannot tell apart: a call
//! the process makes on its own (a timer, a background refresh) while one request is open
//! is given that request as parent, as the thread rule does for an event loop.
//!
//! A server stream's ids are chosen when it opens, so that its calls can name it: from its own
//! `traceparent`, else from its caller's record on this host, else a new trace (`provisional`:
//! a caller's record that comes later still wins; a call made before it gets no parent).
use crate::fast::{HashMap, HashSet};

use agent_common::{WireCtx, LINK_AMBIGUOUS, LINK_PROCESS, WIRE_CARRIED};

use super::h2_stitch::ConnKey;

/// Server streams whose ids are kept at once, over all processes; a stream beyond it parents
/// nothing (counted by the caller).
pub const MAX_STREAMS: usize = 65_536;
/// Processes remembered as having lost events; beyond it, every process is taken to have.
pub const MAX_LOSSY: usize = 65_536;

/// A server stream's ids, chosen when it opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Open {
    /// `WIRE_SERVER`: the server span's trace, span, parent and sampled flag.
    pub ctx: WireCtx,
    /// A new trace, chosen for want of a caller's record: a record that arrives later may
    /// still replace it, until a call takes it.
    pub provisional: bool,
    /// A call took these ids as its parent's: they are final.
    pub committed: bool,
    /// The stream's connection as both its ends name it, and when it began: where a caller's
    /// record that comes later is looked up (`provisional` only).
    pub key: Option<ConnKey>,
    pub start_ns: u64,
}

/// What a call's process is evidence of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// No request open: the call starts a trace.
    None,
    /// Exactly this one: `ctx` is the call's own context (`WIRE_CARRIED`, parent = it).
    Sole(WireCtx),
    /// Several open, or some may be open that were not seen.
    Ambiguous,
}

/// What one connection tells of the requests its process serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Requests open on it, this process being the server.
    pub open: u32,
    /// Requests may be open on it that were not seen.
    pub blind: bool,
}

#[derive(Default)]
struct Proc {
    /// Requests open on every connection (each connection's last report).
    open: u32,
    /// Live server connections picked up in their middle.
    blind: u32,
    streams: HashMap<(u64, u32), Open>,
}

/// The requests each process has open, and the ids of its HTTP/2 server streams.
#[derive(Default)]
pub struct Owners {
    procs: HashMap<u32, Proc>,
    streams: usize,
    /// Processes that lost events (see the module's notes).
    lossy: HashSet<u32>,
    /// More processes lost events than `lossy` holds: every one is taken to have.
    all_lossy: bool,
}

impl Owners {
    /// A connection of `pid` went from reporting `before` to `after`.
    pub fn adjust(&mut self, pid: u32, before: Report, after: Report) {
        if before == after {
            return;
        }
        let p = self.procs.entry(pid).or_default();
        p.open = (p.open + after.open).saturating_sub(before.open);
        p.blind = (p.blind + after.blind as u32).saturating_sub(before.blind as u32);
        if p.open == 0 && p.blind == 0 && p.streams.is_empty() {
            self.procs.remove(&pid);
        }
    }

    /// Server stream `stream` of connection `conn` opened in `pid` with these ids. False when
    /// the table is full (not kept: it parents nothing).
    pub fn opened(&mut self, pid: u32, conn: u64, stream: u32, open: Open) -> bool {
        if self.streams >= MAX_STREAMS {
            return false;
        }
        let p = self.procs.entry(pid).or_default();
        if p.streams.insert((conn, stream), open).is_none() {
            self.streams += 1;
        }
        true
    }

    /// The stream ended: the ids it opened with.
    pub fn ended(&mut self, pid: u32, conn: u64, stream: u32) -> Option<Open> {
        let p = self.procs.get_mut(&pid)?;
        let open = p.streams.remove(&(conn, stream))?;
        self.streams -= 1;
        if p.open == 0 && p.blind == 0 && p.streams.is_empty() {
            self.procs.remove(&pid);
        }
        Some(open)
    }

    /// The connection ended: the ids of its streams go (their counts go with `adjust`).
    pub fn conn_ended(&mut self, pid: u32, conn: u64) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        let before = p.streams.len();
        p.streams.retain(|(c, _), _| *c != conn);
        self.streams -= before - p.streams.len();
        if p.open == 0 && p.blind == 0 && p.streams.is_empty() {
            self.procs.remove(&pid);
        }
    }

    /// Process `pid` lost events (an event of it says so, or one of it was dropped here).
    pub fn lost(&mut self, pid: u32) {
        if self.lossy.len() >= MAX_LOSSY && !self.lossy.contains(&pid) {
            self.all_lossy = true;
        } else {
            self.lossy.insert(pid);
        }
    }

    /// The one request `pid` has open, when its ids are here (one the table had no room for
    /// is counted but not named).
    fn sole(&mut self, pid: u32) -> Option<(&(u64, u32), &mut Open)> {
        let lossy = self.all_lossy || self.lossy.contains(&pid);
        let p = self.procs.get_mut(&pid)?;
        let sole = !lossy && p.blind == 0 && p.open == 1 && p.streams.len() == 1;
        p.streams.iter_mut().next().filter(|_| sole)
    }

    /// The one request `pid` has open, when its ids are still provisional: `(conn, stream,
    /// ids)`, for a caller's record that came since to settle them before a call takes them.
    pub fn provisional_sole(&mut self, pid: u32) -> Option<(u64, u32, Open)> {
        let (&(conn, stream), o) = self.sole(pid)?;
        (o.provisional && !o.committed).then_some((conn, stream, *o))
    }

    /// Its caller's record came: stream `stream` of `conn` takes `ctx` (`WIRE_SERVER`).
    pub fn settle(&mut self, pid: u32, conn: u64, stream: u32, ctx: WireCtx) {
        let o = self
            .procs
            .get_mut(&pid)
            .and_then(|p| p.streams.get_mut(&(conn, stream)));
        if let Some(o) = o.filter(|o| !o.committed) {
            o.ctx = ctx;
            o.provisional = false;
        }
    }

    /// The owner of a call `pid` writes now, with `span_id` the call's own span. The owner's
    /// ids become final.
    pub fn owner(&mut self, pid: u32, span_id: [u8; 8]) -> Owner {
        let lossy = self.all_lossy || self.lossy.contains(&pid);
        let quiet = self
            .procs
            .get(&pid)
            .is_none_or(|p| p.open == 0 && p.blind == 0);
        if quiet && !lossy {
            return Owner::None;
        }
        match self.sole(pid) {
            Some((_, o)) => {
                o.committed = true;
                Owner::Sole(WireCtx {
                    trace_id: o.ctx.trace_id,
                    span_id,
                    parent_id: o.ctx.span_id,
                    kind: WIRE_CARRIED,
                    flags: o.ctx.flags,
                    link: LINK_PROCESS,
                    ..WireCtx::default()
                })
            }
            _ => Owner::Ambiguous,
        }
    }

    pub fn len(&self) -> usize {
        self.streams
    }

    pub fn is_empty(&self) -> bool {
        self.streams == 0
    }
}

/// The key an HTTP/1 request is kept under on its connection, in place of a stream id: from
/// its server span's id, with the top bit set (HTTP/2 stream ids are 31 bits). Two requests
/// open on one connection whose keys collide are one entry while two are counted open: no
/// parent is given then, never a wrong one.
pub fn http1_key(ctx: &WireCtx) -> u32 {
    let s = ctx.span_id;
    u32::from_le_bytes([s[0], s[1], s[2], s[3]]) | 0x8000_0000
}

/// A call's context when its owner is ambiguous: a new trace, no parent, and why.
pub fn ambiguous(ctx: WireCtx) -> WireCtx {
    WireCtx {
        link: LINK_AMBIGUOUS,
        ..ctx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::WIRE_SERVER;

    fn open(trace: u8, span: u8) -> Open {
        Open {
            ctx: WireCtx {
                trace_id: [trace; 16],
                span_id: [span; 8],
                kind: WIRE_SERVER,
                flags: 1,
                ..WireCtx::default()
            },
            provisional: true,
            committed: false,
            key: None,
            start_ns: 1,
        }
    }

    fn r(open: u32, blind: bool) -> Report {
        Report { open, blind }
    }

    #[test]
    fn the_one_open_stream_is_the_parent_and_its_ids_become_final() {
        let mut o = Owners::default();
        assert_eq!(o.owner(7, [5; 8]), Owner::None);
        o.adjust(7, r(0, false), r(1, false));
        assert!(o.opened(7, 100, 1, open(1, 2)));
        let Owner::Sole(c) = o.owner(7, [5; 8]) else {
            panic!("sole owner");
        };
        assert_eq!(
            (c.trace_id, c.span_id, c.parent_id, c.kind, c.link, c.flags),
            ([1; 16], [5; 8], [2; 8], WIRE_CARRIED, LINK_PROCESS, 1)
        );
        // Another process's call has no owner here.
        assert_eq!(o.owner(8, [5; 8]), Owner::None);
        let s = o.ended(7, 100, 1).expect("kept");
        assert!(s.committed);
        o.adjust(7, r(1, false), r(0, false));
        assert!(o.is_empty());
        assert_eq!(o.owner(7, [5; 8]), Owner::None);
    }

    #[test]
    fn provisional_ids_settle_on_a_late_callers_record_until_a_call_takes_them() {
        let mut o = Owners::default();
        o.adjust(7, r(0, false), r(1, false));
        o.opened(7, 100, 1, open(1, 2));
        let (conn, stream, p) = o.provisional_sole(7).expect("provisional");
        assert_eq!((conn, stream, p.ctx.span_id), (100, 1, [2; 8]));
        let caller = WireCtx {
            trace_id: [9; 16],
            span_id: [2; 8],
            parent_id: [8; 8],
            ..p.ctx
        };
        o.settle(7, 100, 1, caller);
        assert_eq!(o.provisional_sole(7), None);
        let Owner::Sole(c) = o.owner(7, [5; 8]) else {
            panic!("sole owner");
        };
        assert_eq!((c.trace_id, c.parent_id), ([9; 16], [2; 8]));
        // Once a call took them, a record that comes later changes nothing.
        o.settle(
            7,
            100,
            1,
            WireCtx {
                trace_id: [3; 16],
                ..caller
            },
        );
        assert_eq!(o.ended(7, 100, 1).map(|e| e.ctx.trace_id), Some([9; 16]));
    }

    #[test]
    fn two_open_requests_or_an_unnamed_one_give_no_parent() {
        let mut o = Owners::default();
        o.adjust(7, r(0, false), r(2, false));
        o.opened(7, 100, 1, open(1, 2));
        o.opened(7, 100, 3, open(3, 4));
        assert_eq!(o.owner(7, [5; 8]), Owner::Ambiguous);
        // One stream ended, but a request that was not named (no room for it) is open beside it.
        o.ended(7, 100, 1);
        o.adjust(7, r(2, false), r(1, false));
        o.adjust(7, r(0, false), r(1, false));
        assert_eq!(o.owner(7, [5; 8]), Owner::Ambiguous);
        o.adjust(7, r(1, false), r(0, false));
        assert!(matches!(o.owner(7, [5; 8]), Owner::Sole(_)));
    }

    #[test]
    fn a_connection_picked_up_in_its_middle_blinds_its_process_while_it_lives() {
        let mut o = Owners::default();
        o.adjust(7, r(0, false), r(1, false));
        o.opened(7, 100, 1, open(1, 2));
        o.adjust(7, r(0, false), r(0, true));
        assert_eq!(o.owner(7, [5; 8]), Owner::Ambiguous);
        o.adjust(7, r(0, true), r(0, false));
        assert!(matches!(o.owner(7, [5; 8]), Owner::Sole(_)));
    }

    #[test]
    fn a_process_that_lost_events_parents_nothing_from_then_on() {
        let mut o = Owners::default();
        o.adjust(7, r(0, false), r(1, false));
        o.opened(7, 100, 1, open(1, 2));
        o.lost(7);
        assert_eq!(o.owner(7, [5; 8]), Owner::Ambiguous);
        o.ended(7, 100, 1);
        o.adjust(7, r(1, false), r(0, false));
        // Nothing seen open, but an unseen request may be: not a root either.
        assert_eq!(o.owner(7, [5; 8]), Owner::Ambiguous);
        // Other processes are not affected.
        o.adjust(8, r(0, false), r(1, false));
        o.opened(8, 100, 1, open(1, 2));
        assert!(matches!(o.owner(8, [5; 8]), Owner::Sole(_)));
    }

    #[test]
    fn a_connection_that_ends_takes_its_streams_ids_with_it() {
        let mut o = Owners::default();
        o.adjust(7, r(0, false), r(2, false));
        o.opened(7, 100, 1, open(1, 2));
        o.opened(7, 200, 1, open(3, 4));
        o.conn_ended(7, 100);
        o.adjust(7, r(2, false), r(1, false));
        assert_eq!(o.len(), 1);
        let Owner::Sole(c) = o.owner(7, [5; 8]) else {
            panic!("sole owner");
        };
        assert_eq!(c.parent_id, [4; 8]);
    }

    #[test]
    fn full_tables_keep_nothing_more_and_never_guess() {
        let mut o = Owners::default();
        for s in 0..MAX_STREAMS as u32 {
            assert!(o.opened(7, 1, 2 * s + 1, open(1, 2)));
        }
        assert!(!o.opened(8, 1, 1, open(1, 2)));
        o.adjust(8, r(0, false), r(1, false));
        assert_eq!(o.owner(8, [5; 8]), Owner::Ambiguous);
        let mut o = Owners::default();
        for p in 0..MAX_LOSSY as u32 {
            o.lost(1000 + p);
        }
        o.adjust(9, r(0, false), r(1, false));
        o.opened(9, 1, 1, open(1, 2));
        assert!(matches!(o.owner(9, [5; 8]), Owner::Sole(_)));
        o.lost(9);
        assert_eq!(o.owner(9, [5; 8]), Owner::Ambiguous);
        assert_eq!(o.owner(10, [5; 8]), Owner::Ambiguous);
    }
}
