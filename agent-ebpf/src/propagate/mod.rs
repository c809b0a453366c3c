//! Trace context on the wire without `bpf_probe_write_user`: the kernel decides the context of
//! each request a traced process reads or sends, and `sk_msg` writes it into outgoing requests.
pub mod asyncio;
pub mod goroutine;
pub mod head;
pub mod ids;
pub mod inflight;
mod skmsg;
mod sockops;
pub mod stitch;
pub mod task;
mod tcpopt;
pub mod tokio;

#[allow(unused_imports)]
use crate::maps::lru::*;
use agent_common::{ConnTuple, IoArgs, ServerReq, WireCtx, WIRE_LINKED, WIRE_SERVER};

/// Scratch slots: the syscall capture's, `sk_msg`'s copy of an outgoing head, the copy of a
/// send's start at `tcp_sendmsg_locked`, and the OpenSSL return probes' (`tls`).
pub const CAPTURE_SLOT: u32 = 0;
pub const MSG_SLOT: u32 = 1;
pub const SEND_SLOT: u32 = 2;
pub const TLS_SLOT: u32 = 3;

/// The context of a request head just read on server connection `io.sk` (`buf` holds `len`
/// bytes of it): the server span's ids; its parent and trace from the context its sender on this
/// host recorded (stitching), else from the request's own `traceparent`; the sampling decision.
/// Registered so that the thread's outgoing calls can find it.
#[inline(always)]
pub fn incoming(
    buf: *const u8,
    len: usize,
    pid_tgid: u64,
    io: &IoArgs,
    tuple: &ConnTuple,
    now: u64,
    wire: &mut WireCtx,
) -> bool {
    server_request::<CAPTURE_SLOT>(buf, len, pid_tgid, (io.g, io.sk), now, wire, |w| {
        stitch::claim(io, tuple, w)
    })
}

/// `incoming` for a head in scratch slot `SLOT`, read by task `g` (0: none known) on server
/// socket `sk`; `claim` takes a context recorded for it by its sender on this host, if any.
#[inline(always)]
pub fn server_request<const SLOT: u32>(
    buf: *const u8,
    len: usize,
    pid_tgid: u64,
    (g, sk): (u64, u64),
    now: u64,
    wire: &mut WireCtx,
    claim: impl FnOnce(&mut WireCtx) -> bool,
) -> bool {
    let line_end = head::request_line_end(SLOT, buf, len);
    if line_end == 0 {
        return false;
    }
    wire.kind = WIRE_SERVER;
    wire.span_id = ids::span_id();
    wire.parent_id = [0; 8];
    if claim(wire) {
        wire.flags = ids::sampled(&wire.trace_id, Some(wire.flags));
    } else {
        let h = head::read_head::<false>(SLOT, line_end, len);
        if h.end == 0 {
            // The head goes on in a later read and may still carry a traceparent: deciding a
            // trace now could contradict it. Userspace decides from the whole head instead.
            crate::maps::count(agent_common::CNT_SERVER_HEAD_SPLIT);
            wire.kind = agent_common::WIRE_NONE;
            return false;
        }
        let parent = if h.traceparent != 0 {
            head::parse_traceparent(SLOT, buf, h.traceparent, len)
        } else {
            None
        };
        match parent {
            Some(p) => {
                wire.trace_id = p.trace_id;
                wire.parent_id = p.parent_id;
                wire.flags = ids::sampled(&p.trace_id, Some(p.flags));
            }
            None => {
                wire.trace_id = ids::trace_id();
                wire.flags = ids::sampled(&wire.trace_id, None);
            }
        }
    }
    let req = ServerReq {
        seq: now,
        trace_id: wire.trace_id,
        span_id: wire.span_id,
        flags: wire.flags,
        live: 1,
        pipelined: 0,
        _pad: 0,
        tid: pid_tgid as u32,
    };
    inflight::open(pid_tgid, g, sk, &req);
    true
}

/// The trace, parent and flags of a client span whose request carries no usable `traceparent`:
/// those of the request its thread is handling (`owner`), or a new trace.
#[inline(always)]
pub fn client_ctx(w: &mut WireCtx, owner: &inflight::Owner) {
    w.link = owner.link;
    match owner.request() {
        Some(o) => {
            w.trace_id = o.trace_id;
            w.parent_id = o.span_id;
            w.flags = o.flags & 1;
        }
        None => {
            w.trace_id = ids::trace_id();
            w.flags = ids::sampled(&w.trace_id, None);
        }
    }
}

/// The in-process link of an outgoing request whose context was not decided when it was sent:
/// its owner's ids, or only the news that its thread was ambiguous.
#[inline(always)]
pub fn linked(pid_tgid: u64, fd: u32, wire: &mut WireCtx) {
    let owner = inflight::owner(pid_tgid, fd);
    if owner.link == agent_common::LINK_NONE {
        return;
    }
    wire.kind = WIRE_LINKED;
    wire.link = owner.link;
    if let Some(o) = owner.request() {
        wire.trace_id = o.trace_id;
        wire.parent_id = o.span_id;
        wire.flags = o.flags;
    }
}

/// A response started on an outgoing connection: its request body, whatever its framing, is
/// over, so `sk_msg` may look for request heads again.
#[inline(always)]
pub fn response_read(tgid: u32, fd: u32) {
    let key = crate::maps::conn_key(tgid, fd);
    // SAFETY: copied out of a live map value.
    if crate::maps::BODY_LEFT.get_ptr(&key).map(|v| unsafe { *v })
        == Some(crate::maps::BODY_UNKNOWN)
    {
        lru_remove(&BODY_LEFT, LRU_BODY_LEFT, &key);
    }
}
