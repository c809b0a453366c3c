//! Same-host stitching: trace context between two traced processes on this host with no byte
//! changed on the wire and no socket map.
//!
//! `tcp:tcp_sendmsg_locked` fires inside `tcp_sendmsg_locked` in the sending task, with the
//! socket locked and before any byte of the send is queued: `tp->write_seq` is then the TCP
//! sequence number of the send's first byte. When a traced process starts sending an HTTP/1.x
//! request head there, the kernel decides its client span's context (as `sk_msg` would for the
//! header it writes) and records it under the connection and that sequence number. When a traced
//! process on this host reads a request head, the sequence number of the first byte it read
//! (`tp->copied_seq - bytes read`, at `sock:sock_recv_length`) names the same request exactly:
//! its server span becomes the client span's child. The record exists before the bytes do, so a
//! reader on another CPU cannot overtake it; pipelined requests each have their own number.
#[allow(unused_imports)]
use crate::maps::lru::*;
use agent_common::{
    ConnTuple, FlowSeq, IoArgs, TlsCall, WireCtx, BUF_PLAIN, CNT_STITCH_CLAIMED, CNT_STITCH_FULL,
    CNT_STITCH_MARKED, CNT_TCPOPT_CLAIMED, DIR_EGRESS, INJECT_OFF, IO_SEND_SEEN, IO_SEQ, TLS_SENT,
    VERDICT_TRACE, WIRE_CARRIED, WIRE_CARRIED_FWD, WIRE_NONE, WIRE_VIA_TCPOPT,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};

use super::{head, ids, inflight, SEND_SLOT};
use crate::maps::{
    conn_key, count, global, scratch, ACTIVE_IO, BUF_IOVEC, CONNS, INJECT_MODE, OFF_COPIED_SEQ,
    OFF_WRITE_SEQ, STITCH,
};

const IPPROTO_TCP: u16 = 6;
const MSG_PEEK: u32 = 2;

/// Whether stitching runs at all: a mode that carries context, and `tcp_sock` offsets from BTF.
#[inline(always)]
fn enabled() -> bool {
    global(&INJECT_MODE) != INJECT_OFF && global(&OFF_WRITE_SEQ) != 0
}

/// `struct tcp_sock` field at `off` of socket `sk`.
#[inline(always)]
fn tcp_u32(sk: u64, off: u32) -> Option<u32> {
    // SAFETY: fault-tolerant kernel read of a live socket's field (offset from BTF).
    unsafe { bpf_probe_read_kernel((sk + off as u64) as *const u32) }.ok()
}

/// Connection tuples are recorded with IPv4-mapped addresses already unmapped
/// (`sock::read_tuple`), so both ends of a connection build the same key.
#[inline(always)]
fn key(
    client: &[u8; 16],
    client_port: u16,
    server: &[u8; 16],
    server_port: u16,
    seq: u32,
) -> FlowSeq {
    FlowSeq {
        client_addr: *client,
        server_addr: *server,
        client_port,
        server_port,
        seq,
    }
}

#[raw_tracepoint(tracepoint = "tcp_sendmsg_locked")]
pub fn tcp_sendmsg_locked(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(const struct sock *sk, const struct msghdr *msg, const struct sk_buff *skb, int size_goal)
    let sk: u64 = ctx.arg(0);
    if enabled() {
        sending(sk);
    }
    0
}

/// The first `tcp_sendmsg_locked` of a traced process's send: record the context of the request
/// that starts there, if one does.
#[inline(always)]
fn sending(sk: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // Entries exist only for selected processes (`data.rs`).
    let Some(io) = ACTIVE_IO.get_ptr_mut(&pid_tgid) else {
        return;
    };
    // SAFETY: live map value of this thread.
    let io = unsafe { &mut *io };
    if let Some(call) = crate::tls::call_on(pid_tgid, io.fd) {
        tls_sending(io, call, sk, pid_tgid);
        return;
    }
    if io.direction != DIR_EGRESS || io.state & IO_SEND_SEEN != 0 {
        return; // a later piece of the same send
    }
    io.state |= IO_SEND_SEEN;
    // `sock:sock_send_length` classifies only after the send; do it now.
    crate::sock::classify(io, pid_tgid, sk, crate::sock::family(sk), IPPROTO_TCP);
    if io.verdict != VERDICT_TRACE {
        return;
    }
    let Some(conn) = CONNS.get_ptr(&conn_key((pid_tgid >> 32) as u32, io.fd)) else {
        return;
    };
    let Some(seq) = tcp_u32(sk, global(&OFF_WRITE_SEQ)) else {
        return;
    };
    io.seq = seq;
    io.state |= IO_SEQ;
    if io.wire.kind == WIRE_NONE {
        let src = Src {
            buf: io.buf,
            count: io.count,
            kind: io.buf_kind,
        };
        if !decide(&src, io.fd, pid_tgid, &mut io.wire) {
            return;
        }
    }
    // SAFETY: live map value, read in place.
    mark(unsafe { &(*conn).tuple }, seq, &io.wire);
}

#[inline(always)]
fn mark(t: &ConnTuple, seq: u32, w: &WireCtx) {
    let k = key(&t.local_addr, t.local_port, &t.peer_addr, t.peer_port, seq);
    if lru_insert(&STITCH, LRU_STITCH, CAP_STITCH, &k, w).is_ok() {
        count(CNT_STITCH_MARKED);
    } else {
        count(CNT_STITCH_FULL);
    }
}

/// The first send of an OpenSSL write (`tls`): when its plaintext starts a request head, the
/// client span's context is decided from the plaintext and recorded under the sequence number
/// of the first ciphertext byte, where the server's first read of that request starts.
#[inline(always)]
fn tls_sending(io: &mut IoArgs, call: &mut TlsCall, sk: u64, pid_tgid: u64) {
    if call.dir != DIR_EGRESS || call.state & TLS_SENT != 0 {
        return;
    }
    call.state |= TLS_SENT;
    crate::sock::classify(io, pid_tgid, sk, crate::sock::family(sk), IPPROTO_TCP);
    let Some(conn) = CONNS.get_ptr(&conn_key((pid_tgid >> 32) as u32, io.fd)) else {
        return;
    };
    // SAFETY: live map value, copied (the tuple only).
    let t = unsafe { (*conn).tuple };
    if t.family == 0 || !crate::sock::wanted(&t) {
        return;
    }
    let Some(seq) = tcp_u32(sk, global(&OFF_WRITE_SEQ)) else {
        return;
    };
    let src = Src {
        buf: call.buf,
        count: call.len,
        kind: BUF_PLAIN,
    };
    if decide(&src, io.fd, pid_tgid, &mut call.wire) {
        mark(&t, seq, &call.wire);
    }
}

/// Where a send's bytes are: a buffer of `count` bytes, or `count` iovecs.
struct Src {
    buf: u64,
    count: u64,
    kind: u32,
}

/// Decides `w`, the client span's context, for a request head at the start of `src`, sent on
/// `fd`; false when the send does not start one (or starts one too long to read whole, whose
/// `traceparent` may come later: userspace decides those from the whole head).
#[inline(always)]
fn decide(src: &Src, fd: u32, pid_tgid: u64, w: &mut WireCtx) -> bool {
    let Some(g) = scratch(SEND_SLOT) else {
        return false;
    };
    // SAFETY: the payload area of our slot.
    let buf = unsafe { g.buf().as_mut_ptr().add(agent_common::DATA_HEADER_SIZE) };
    let first = copy(buf, src, 16);
    if !head::starts_with_method(buf, first) {
        return false;
    }
    let n = copy(buf, src, head::SCAN_MAX);
    let line_end = head::request_line_end(SEND_SLOT, buf, n);
    if line_end == 0 {
        return false;
    }
    let h = head::read_head::<false>(SEND_SLOT, line_end, n);
    let tp = if h.traceparent != 0 {
        head::parse_traceparent(SEND_SLOT, buf, h.traceparent, n)
    } else {
        None
    };
    if tp.is_none() && h.end == 0 {
        return false;
    }
    let owner = inflight::owner(pid_tgid, fd);
    w.span_id = ids::span_id();
    w.parent_id = [0; 8];
    match tp {
        Some(tp) => {
            w.kind = WIRE_CARRIED_FWD;
            w.trace_id = tp.trace_id;
            w.flags = ids::sampled(&tp.trace_id, Some(tp.flags));
            w.link = owner.link;
            if owner.request().is_some() && owner.req.trace_id == tp.trace_id {
                w.parent_id = owner.req.span_id;
            }
        }
        None => {
            w.kind = WIRE_CARRIED;
            super::client_ctx(w, &owner);
        }
    }
    true
}

/// Copies up to `want` bytes of the send's buffer into `buf`; returns how many.
#[inline(always)]
fn copy(buf: *mut u8, src: &Src, want: usize) -> usize {
    if src.kind == BUF_IOVEC {
        crate::capture::copy_iovecs(buf, src.buf, src.count, want)
    } else {
        let want = if (src.count as usize) < want {
            src.count as usize
        } else {
            want
        };
        crate::capture::copy_plain(buf, src.buf, want)
    }
}

/// At `sock:sock_recv_length`: the sequence number of the first byte this read returned.
#[inline(always)]
pub fn received(io: &mut IoArgs, sk: u64, ret: i32, flags: u32) {
    if let Some(seq) = first_read(sk, ret, flags) {
        io.seq = seq;
        io.state |= IO_SEQ;
    }
}

/// The sequence number of the first byte a read of `ret` bytes on `sk` returned.
#[inline(always)]
pub fn first_read(sk: u64, ret: i32, flags: u32) -> Option<u32> {
    if ret <= 0 || !enabled() {
        return None;
    }
    let copied = tcp_u32(sk, global(&OFF_COPIED_SEQ))?;
    Some(if flags & MSG_PEEK != 0 {
        copied
    } else {
        copied.wrapping_sub(ret as u32)
    })
}

/// Fills `out`'s trace id, parent (the caller's client span) and flags from the context a
/// sender on this host recorded for the request whose head starts this read.
#[inline(always)]
pub fn claim(io: &IoArgs, t: &ConnTuple, out: &mut WireCtx) -> bool {
    io.state & IO_SEQ != 0 && claim_at(io.seq, t, out)
}

/// `claim` for a read whose first byte is sequence number `seq`.
#[inline(always)]
pub fn claim_at(seq: u32, t: &ConnTuple, out: &mut WireCtx) -> bool {
    if !enabled() {
        return false;
    }
    let k = key(&t.peer_addr, t.peer_port, &t.local_addr, t.local_port, seq);
    let Some(w) = STITCH.get_ptr(&k) else {
        return false;
    };
    // SAFETY: live map value, read before it is removed.
    unsafe {
        out.trace_id = (*w).trace_id;
        out.parent_id = (*w).span_id;
        out.flags = (*w).flags;
    }
    // SAFETY: as above.
    if unsafe { (*w).via } == WIRE_VIA_TCPOPT {
        count(CNT_TCPOPT_CLAIMED);
    }
    lru_remove(&STITCH, LRU_STITCH, &k);
    count(CNT_STITCH_CLAIMED);
    true
}
