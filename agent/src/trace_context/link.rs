//! Which trace a span belongs to and who its parent is.
//!
//! The kernel decides the context of every request it sees start (`agent_common::WireCtx`): the
//! server span's ids when a request is read, and for an outgoing request the client span's ids
//! it wrote on the wire plus the server request the thread was handling. Spans use exactly those
//! ids, so what a callee receives and what the agent reports always agree. The rules:
//!
//! - SERVER span: the kernel's trace and span id; parent = the incoming `traceparent`'s parent id.
//! - CLIENT span, header inserted or invalid one replaced: the injected trace and span id; parent
//!   = the server span its thread was handling (none: the trace starts here).
//! - CLIENT span, the request's own `traceparent` had its parent id rewritten: the injected ids;
//!   parent = the server span of this process that received that same context (a proxy
//!   forwarding headers links exactly, whatever its concurrency); else the in-thread owner; else
//!   the header's own parent (the program's own context).
//! - CLIENT span, request not modified (injection off, connection older than the agent, head split
//!   across writes): a `traceparent` the program sent is followed as above with a new span id;
//!   otherwise the in-thread owner's trace; otherwise a new trace.
//! - CLIENT span, HTTP/2 call with no `traceparent` of its own: the ids chosen when its HEADERS
//!   were written; parent = the one request its process had open then (`h2_owner`), else none.
//!
//! The sampled flag decided at the root travels in the ids; a span whose flag is clear is
//! dropped here, before any attribute is built.
use std::collections::VecDeque;

use crate::fast::HashMap;

use agent_common::{
    WireCtx, LINK_AMBIGUOUS, LINK_PROCESS, LINK_RUNTIME, LINK_TASK, LINK_THREAD, LINK_UNCLASSIFIED,
    WIRE_CARRIED, WIRE_CARRIED_FWD, WIRE_INSERTED, WIRE_LINKED, WIRE_REPLACED, WIRE_REWRITTEN,
    WIRE_SERVER,
};
use rand::Rng;

use super::TraceParent;
use crate::{
    protocol::http1::{Exchange, RequestHead, Side},
    sampling::Sampler,
};

/// How a span's parent was found: the span attribute `beholder.link.method`, so that users (and
/// tests) can see what evidence each link rests on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkMethod {
    /// CLIENT: the one request open on the sending thread (or on the thread that connected).
    Thread,
    /// CLIENT: the runtime's own task identity: the goroutine that read the request made the
    /// call that is being written (Go, uprobes on `net/http`).
    Task,
    /// CLIENT (HTTP/2): the one request its process had open when it wrote the call's HEADERS
    /// (`h2_owner`).
    Process,
    /// CLIENT: the request carried a context this process received with a request it served.
    Forwarded,
    /// SERVER: the request's `traceparent`; CLIENT: the program's own `traceparent`.
    Header,
    /// SERVER: the context its sender on this host (or across hosts, in a TCP option) recorded.
    Stitch,
    /// CLIENT: several requests were open on the sending thread (an event loop); no parent is
    /// guessed, the span starts its own trace.
    Ambiguous,
    /// CLIENT: the process's runtime moves work between threads (Go, tokio's multi-thread
    /// scheduler, .NET): its threads are no evidence, no parent is guessed.
    Runtime,
    /// CLIENT: the process's runtime was not classified yet (it exec'd a moment ago): no
    /// parent is guessed.
    Unclassified,
    /// No evidence of a parent: the span starts its trace.
    None,
}

impl LinkMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkMethod::Thread => "thread",
            LinkMethod::Task => "task",
            LinkMethod::Process => "process",
            LinkMethod::Forwarded => "forwarded",
            LinkMethod::Header => "header",
            LinkMethod::Stitch => "stitch",
            LinkMethod::Ambiguous => "ambiguous",
            LinkMethod::Runtime => "runtime",
            LinkMethod::Unclassified => "unclassified",
            LinkMethod::None => "none",
        }
    }

    /// A method that says why a span has no parent (rather than how it got one).
    fn is_why_unlinked(self) -> bool {
        matches!(
            self,
            LinkMethod::Ambiguous | LinkMethod::Runtime | LinkMethod::Unclassified
        )
    }

    /// A CLIENT span's method from the kernel's owner decision (`WireCtx::link`).
    fn of_owner(w: &WireCtx) -> LinkMethod {
        match w.link {
            LINK_THREAD if w.parent_id != [0; 8] => LinkMethod::Thread,
            LINK_TASK if w.parent_id != [0; 8] => LinkMethod::Task,
            LINK_PROCESS if w.parent_id != [0; 8] => LinkMethod::Process,
            LINK_AMBIGUOUS => LinkMethod::Ambiguous,
            LINK_RUNTIME => LinkMethod::Runtime,
            LINK_UNCLASSIFIED => LinkMethod::Unclassified,
            _ => LinkMethod::None,
        }
    }
}

/// The ids a span is built with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ids {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub flags: u8,
    pub trace_state: String,
    pub link: LinkMethod,
}

pub enum Decision {
    Sampled(Ids),
    Unsampled,
}

/// Server requests seen start, by the context they arrived with: `(pid, trace id, incoming
/// parent id)` -> server span id. Bounded; the oldest entries go first.
pub struct Registry {
    map: HashMap<(u32, [u8; 16], [u8; 8]), [u8; 8]>,
    order: VecDeque<(u32, [u8; 16], [u8; 8])>,
    cap: usize,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::with_capacity(65_536)
    }
}

impl Registry {
    pub fn with_capacity(cap: usize) -> Self {
        Registry {
            map: HashMap::default(),
            order: VecDeque::new(),
            cap,
        }
    }

    /// A request was read by `pid` with the kernel context `wire` (`WIRE_SERVER`) and, in its
    /// head, the `traceparent` `header`. Both name this server span to a call that forwards the
    /// context it received: the caller's span (stitched, or the header's parent) and the header
    /// as the program saw it (what a proxy copies into its upstream request).
    pub fn server_started(&mut self, pid: u32, wire: &WireCtx, header: Option<&TraceParent>) {
        if wire.kind != WIRE_SERVER {
            return;
        }
        if wire.parent_id != [0; 8] {
            self.insert((pid, wire.trace_id, wire.parent_id), wire.span_id);
        }
        if let Some(h) = header.filter(|h| h.trace_id == wire.trace_id) {
            self.insert((pid, h.trace_id, h.parent_id), wire.span_id);
        }
    }

    fn insert(&mut self, key: (u32, [u8; 16], [u8; 8]), span: [u8; 8]) {
        if self.map.insert(key, span).is_none() {
            self.order.push_back(key);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    fn server_with(&self, pid: u32, tp: &TraceParent) -> Option<[u8; 8]> {
        self.map.get(&(pid, tp.trace_id, tp.parent_id)).copied()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The context of a server request the kernel sent none for, from its parsed head: the same
/// decisions the kernel makes (`agent-ebpf/src/propagate/mod.rs`).
pub fn server_ctx(head: &RequestHead, sampler: &Sampler) -> WireCtx {
    let mut rng = rand::rng();
    let header = head.traceparent.as_deref().and_then(TraceParent::parse);
    let (trace_id, parent_id, incoming) = match header {
        Some(h) => (h.trace_id, h.parent_id, Some(h.sampled())),
        None => (rng.random::<[u8; 16]>(), [0; 8], None),
    };
    WireCtx {
        trace_id,
        span_id: random_span_id(&mut rng),
        parent_id,
        kind: WIRE_SERVER,
        flags: sampler.sample(&trace_id, incoming) as u8,
        ..WireCtx::default()
    }
}

fn nonzero(id: [u8; 8]) -> Option<[u8; 8]> {
    (id != [0; 8]).then_some(id)
}

pub fn random_span_id(rng: &mut impl Rng) -> [u8; 8] {
    let mut id: [u8; 8] = rng.random();
    if id == [0; 8] {
        id[7] = 1;
    }
    id
}

fn from_wire(
    w: &WireCtx,
    parent: Option<[u8; 8]>,
    trace_state: String,
    link: LinkMethod,
) -> Decision {
    if w.flags & 1 == 0 {
        return Decision::Unsampled;
    }
    Decision::Sampled(Ids {
        trace_id: w.trace_id,
        span_id: w.span_id,
        parent_span_id: parent,
        flags: 1,
        trace_state,
        link: if parent.is_some() || link.is_why_unlinked() {
            link
        } else {
            LinkMethod::None
        },
    })
}

/// The ids of `ex`'s span, seen in process `pid`.
pub fn decide(ex: &Exchange, pid: u32, reg: &Registry, sampler: &Sampler) -> Decision {
    let req = &ex.request;
    let header = req.traceparent.as_deref().and_then(TraceParent::parse);
    // `tracestate` goes with a valid `traceparent`, and only when it is valid itself (W3C: at
    // most 32 members and 512 characters); otherwise it is dropped whole.
    let state = |h: &Option<TraceParent>| match (h, req.tracestate.as_deref()) {
        (Some(_), Some(ts)) if super::w3c::valid_tracestate(ts) => ts.to_owned(),
        _ => String::new(),
    };
    let wire = ex.ctx.filter(|w| w.kind != 0);
    let mut rng = rand::rng();
    match (ex.side, wire) {
        (Side::Server, Some(w)) if w.kind == WIRE_SERVER => {
            // The kernel read the same header; its parent id is the one to use.
            let parent = nonzero(w.parent_id);
            let trace_state = if parent.is_some() {
                state(&header)
            } else {
                String::new()
            };
            // The parent came from the header when the header names it; else from a record.
            let link = if header.as_ref().is_some_and(|h| Some(h.parent_id) == parent) {
                LinkMethod::Header
            } else {
                LinkMethod::Stitch
            };
            from_wire(&w, parent, trace_state, link)
        }
        (Side::Client, Some(w))
            if w.kind == WIRE_INSERTED || w.kind == WIRE_REPLACED || w.kind == WIRE_CARRIED =>
        {
            from_wire(
                &w,
                nonzero(w.parent_id),
                String::new(),
                LinkMethod::of_owner(&w),
            )
        }
        (Side::Client, Some(w)) if w.kind == WIRE_REWRITTEN || w.kind == WIRE_CARRIED_FWD => {
            let forwarded = header.as_ref().and_then(|h| reg.server_with(pid, h));
            if forwarded.is_none() {
                tracing::debug!(
                    pid,
                    ?header,
                    ?w,
                    "forwarded context matches no server request"
                );
            }
            let (parent, link) = match (forwarded, nonzero(w.parent_id)) {
                (Some(f), _) => (Some(f), LinkMethod::Forwarded),
                (None, Some(p)) => (Some(p), LinkMethod::of_owner(&w)),
                (None, None) => (header.as_ref().map(|h| h.parent_id), LinkMethod::Header),
            };
            from_wire(&w, parent, state(&header), link)
        }
        (side, wire) => {
            // Nothing written on the wire by the agent: follow the program's own header, else
            // the in-thread owner, else start a trace.
            let (trace_id, parent, incoming, link) = match (&header, wire) {
                (Some(h), _) => {
                    let (parent, link) = match side {
                        Side::Client => match reg.server_with(pid, h) {
                            Some(s) => (s, LinkMethod::Forwarded),
                            None => (h.parent_id, LinkMethod::Header),
                        },
                        Side::Server => (h.parent_id, LinkMethod::Header),
                    };
                    (h.trace_id, Some(parent), Some(h.sampled()), link)
                }
                (None, Some(w))
                    if w.kind == WIRE_LINKED && (w.link == LINK_THREAD || w.link == LINK_TASK) =>
                {
                    (
                        w.trace_id,
                        nonzero(w.parent_id),
                        Some(w.flags & 1 != 0),
                        LinkMethod::of_owner(&w),
                    )
                }
                (None, Some(w))
                    if matches!(w.link, LINK_AMBIGUOUS | LINK_RUNTIME | LINK_UNCLASSIFIED) =>
                {
                    (
                        rng.random::<[u8; 16]>(),
                        None,
                        None,
                        LinkMethod::of_owner(&w),
                    )
                }
                (None, _) => (rng.random::<[u8; 16]>(), None, None, LinkMethod::None),
            };
            if !sampler.sample(&trace_id, incoming) {
                return Decision::Unsampled;
            }
            Decision::Sampled(Ids {
                trace_id,
                span_id: random_span_id(&mut rng),
                parent_span_id: parent,
                flags: 1,
                trace_state: state(&header),
                link,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::http1::{Framing, RequestHead, ResponseHead};

    const T: [u8; 16] = [0x4b; 16];
    const P: [u8; 8] = [0x11; 8];
    const S: [u8; 8] = [0x22; 8];
    const C: [u8; 8] = [0x33; 8];

    fn tp_header(trace: [u8; 16], parent: [u8; 8], flags: u8) -> String {
        TraceParent {
            trace_id: trace,
            parent_id: parent,
            flags,
        }
        .format()
    }

    fn ex(side: Side, tp: Option<String>, ctx: Option<WireCtx>) -> Exchange {
        Exchange {
            side,
            request: RequestHead {
                method: "GET".into(),
                target: "/".into(),
                minor_version: 1,
                host: None,
                user_agent: None,
                traceparent: tp,
                tracestate: Some("k=v".into()),
                framing: Framing::None,
            },
            response: ResponseHead {
                status: 200,
                minor_version: 1,
                framing: Framing::None,
            },
            start_ns: 1,
            end_ns: 2,
            ctx,
            h2: None,
        }
    }

    fn wire(kind: u8, span: [u8; 8], parent: [u8; 8], flags: u8) -> WireCtx {
        WireCtx {
            trace_id: T,
            span_id: span,
            parent_id: parent,
            kind,
            flags,
            link: if parent == [0; 8] { 0 } else { LINK_THREAD },
            ..WireCtx::default()
        }
    }

    fn ids(d: Decision) -> Ids {
        match d {
            Decision::Sampled(i) => i,
            Decision::Unsampled => panic!("unsampled"),
        }
    }

    #[test]
    fn server_span_takes_the_kernel_ids() {
        let e = ex(
            Side::Server,
            Some(tp_header(T, P, 1)),
            Some(wire(WIRE_SERVER, S, P, 1)),
        );
        let i = ids(decide(&e, 7, &Registry::default(), &Sampler::default()));
        assert_eq!((i.trace_id, i.span_id, i.parent_span_id), (T, S, Some(P)));
        assert_eq!(i.trace_state, "k=v");
        let unsampled = ex(Side::Server, None, Some(wire(WIRE_SERVER, S, [0; 8], 0)));
        assert!(matches!(
            decide(&unsampled, 7, &Registry::default(), &Sampler::default()),
            Decision::Unsampled
        ));
    }

    #[test]
    fn inserted_client_span_is_child_of_the_thread_owner() {
        let e = ex(Side::Client, None, Some(wire(WIRE_INSERTED, C, S, 1)));
        let i = ids(decide(&e, 7, &Registry::default(), &Sampler::default()));
        assert_eq!((i.trace_id, i.span_id, i.parent_span_id), (T, C, Some(S)));
        let root = ex(Side::Client, None, Some(wire(WIRE_INSERTED, C, [0; 8], 1)));
        let i = ids(decide(&root, 7, &Registry::default(), &Sampler::default()));
        assert_eq!(
            i.parent_span_id, None,
            "a call outside any request starts the trace"
        );
    }

    #[test]
    fn forwarded_context_links_to_the_server_that_received_it() {
        let mut reg = Registry::default();
        reg.server_started(7, &wire(WIRE_SERVER, S, P, 1), None);
        // The proxy forwards T-P; the kernel rewrote the parent to C and found no owner.
        let e = ex(
            Side::Client,
            Some(tp_header(T, P, 1)),
            Some(wire(WIRE_REWRITTEN, C, [0; 8], 1)),
        );
        let i = ids(decide(&e, 7, &reg, &Sampler::default()));
        assert_eq!((i.trace_id, i.span_id, i.parent_span_id), (T, C, Some(S)));
        // Another process never matches; then the program's own context is the parent.
        let i = ids(decide(&e, 8, &reg, &Sampler::default()));
        assert_eq!(i.parent_span_id, Some(P));
    }

    #[test]
    fn unmodified_requests_follow_header_then_owner_then_new_trace() {
        let mut reg = Registry::default();
        reg.server_started(7, &wire(WIRE_SERVER, S, P, 1), None);
        let own = ex(Side::Client, Some(tp_header(T, P, 1)), None);
        let i = ids(decide(&own, 7, &reg, &Sampler::default()));
        assert_eq!((i.trace_id, i.parent_span_id), (T, Some(S)));
        assert_ne!(i.span_id, C);
        let linked = ex(Side::Client, None, Some(wire(WIRE_LINKED, [0; 8], S, 1)));
        let i = ids(decide(&linked, 7, &reg, &Sampler::default()));
        assert_eq!((i.trace_id, i.parent_span_id), (T, Some(S)));
        let none = ex(Side::Client, None, None);
        let i = ids(decide(&none, 7, &reg, &Sampler::default()));
        assert_eq!(i.parent_span_id, None);
        assert_ne!(i.trace_id, T);
    }

    #[test]
    fn every_span_says_how_it_was_linked() {
        let method =
            |e: &Exchange, reg: &Registry| ids(decide(e, 7, reg, &Sampler::default())).link;
        let mut reg = Registry::default();
        // Server: parent named by the request's header, or by a record only.
        let header = ex(
            Side::Server,
            Some(tp_header(T, P, 1)),
            Some(wire(WIRE_SERVER, S, P, 1)),
        );
        assert_eq!(method(&header, &reg), LinkMethod::Header);
        let stitched = ex(Side::Server, None, Some(wire(WIRE_SERVER, S, C, 1)));
        assert_eq!(method(&stitched, &reg), LinkMethod::Stitch);
        let root = ex(Side::Server, None, Some(wire(WIRE_SERVER, S, [0; 8], 1)));
        assert_eq!(method(&root, &reg), LinkMethod::None);
        // Client: the thread's one open request, a forwarded context, or nothing.
        let thread = ex(Side::Client, None, Some(wire(WIRE_CARRIED, C, S, 1)));
        assert_eq!(method(&thread, &reg), LinkMethod::Thread);
        reg.server_started(7, &wire(WIRE_SERVER, S, P, 1), None);
        let fwd = ex(
            Side::Client,
            Some(tp_header(T, P, 1)),
            Some(wire(WIRE_CARRIED_FWD, C, [0; 8], 1)),
        );
        assert_eq!(method(&fwd, &reg), LinkMethod::Forwarded);
    }

    #[test]
    fn an_ambiguous_thread_gives_no_parent() {
        // The kernel saw several requests open on the sending thread: it decided a new trace
        // (stitch mode) or nothing (no injection); either way there is no guessed parent.
        let mut carried = wire(WIRE_CARRIED, C, [0; 8], 1);
        carried.link = LINK_AMBIGUOUS;
        let i = ids(decide(
            &ex(Side::Client, None, Some(carried)),
            7,
            &Registry::default(),
            &Sampler::default(),
        ));
        assert_eq!((i.parent_span_id, i.link), (None, LinkMethod::Ambiguous));
        let linked = WireCtx {
            kind: WIRE_LINKED,
            link: LINK_AMBIGUOUS,
            ..WireCtx::default()
        };
        let i = ids(decide(
            &ex(Side::Client, None, Some(linked)),
            7,
            &Registry::default(),
            &Sampler::default(),
        ));
        assert_eq!((i.parent_span_id, i.link), (None, LinkMethod::Ambiguous));
        assert_ne!(
            i.trace_id, [0; 16],
            "a trace of its own, never the zero trace"
        );
    }

    #[test]
    fn a_runtime_that_moves_work_gives_no_parent_and_says_why() {
        for (link, method) in [
            (LINK_RUNTIME, LinkMethod::Runtime),
            (LINK_UNCLASSIFIED, LinkMethod::Unclassified),
        ] {
            let mut carried = wire(WIRE_CARRIED, C, [0; 8], 1);
            carried.link = link;
            let linked = WireCtx {
                kind: WIRE_LINKED,
                link,
                ..WireCtx::default()
            };
            for w in [carried, linked] {
                let i = ids(decide(
                    &ex(Side::Client, None, Some(w)),
                    7,
                    &Registry::default(),
                    &Sampler::default(),
                ));
                assert_eq!((i.parent_span_id, i.link), (None, method));
                assert_eq!(
                    i.link.as_str(),
                    if link == LINK_RUNTIME {
                        "runtime"
                    } else {
                        "unclassified"
                    }
                );
            }
        }
    }

    #[test]
    fn registry_is_bounded() {
        let mut reg = Registry::with_capacity(3);
        for n in 1..=5u8 {
            reg.server_started(1, &wire(WIRE_SERVER, S, [n; 8], 1), None);
        }
        assert_eq!(reg.len(), 3);
        let first = TraceParent {
            trace_id: T,
            parent_id: [1; 8],
            flags: 1,
        };
        assert_eq!(reg.server_with(1, &first), None, "oldest entries go first");
    }

    #[test]
    fn server_context_from_a_parsed_head_follows_the_sampler() {
        let head = ex(Side::Server, Some(tp_header(T, P, 0)), None).request;
        let w = server_ctx(&head, &Sampler::default());
        assert_eq!((w.trace_id, w.parent_id, w.flags), (T, P, 0));
        let off = Sampler::from_values(Some("always_off".into()), None).unwrap();
        let root = ex(Side::Server, None, None).request;
        assert_eq!(server_ctx(&root, &off).flags, 0);
        assert_eq!(server_ctx(&root, &Sampler::default()).flags, 1);
    }
}
