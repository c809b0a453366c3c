//! `sk_msg` on outgoing connections: puts the agent's client-span context into HTTP/1.x requests.
//!
//! The rule for a request head that is whole in the message (one write, as curl, nginx, Python,
//! Node and Go all send them):
//! - no `traceparent`: one is inserted after the request line, with the trace of the request the
//!   thread is handling (or a new trace), and the span id of the client span the agent reports;
//! - a valid `traceparent` (the program propagates, or a proxy forwards): only its parent id is
//!   rewritten, in place, to the client span's id, so the callee becomes that span's child; the
//!   flags follow the sampler (unchanged under the default parent-based one);
//! - an invalid one: its value is replaced by a valid one, as if there had been none.
//!
//! The edit runs in a second program, `out_msg_edit`, reached by a tail call with a per-CPU
//! plan: it grows or shrinks the message, writes the text, and if the write fails takes the
//! grown bytes out again, so an uninitialised byte is never sent. (Split in two because the
//! verifier's instruction budget does not cover head parsing and every edit path in one.)
//!
//! A head that is not whole in the first message is left alone and counted. So is anything that
//! is not the start of an HTTP/1.x request (bodies, TLS, other protocols). The syscall still
//! returns what the program wrote; only the bytes on the wire grow.
#[allow(unused_imports)]
use crate::maps::lru::*;
use agent_common::{
    WireCtx, CNT_TP_FAILED, CNT_TP_INSERTED, CNT_TP_REPLACED, CNT_TP_REWRITTEN,
    CNT_TP_SKIPPED_HEAD, DATA_HEADER_SIZE, WIRE_INSERTED, WIRE_NONE, WIRE_REPLACED, WIRE_REWRITTEN,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_msg_pull_data, bpf_probe_read_kernel},
    },
    macros::sk_msg,
    programs::SkMsgContext,
};

use super::{
    head::{self, SCAN_MAX, TP_LEN},
    ids, inflight, MSG_SLOT,
};
use crate::maps::{
    conn_key, count, process_traced, scratch, SockKey, ACTIVE_IO, BODY_LEFT, BODY_UNKNOWN, EDIT,
    EDIT_INSERT, EDIT_REPLACE, EDIT_REWRITE, EDIT_TEXT, LARGE_SENDS, MSG_EDIT,
};

const SK_PASS: u32 = 1;
/// `traceparent: ` + value + CRLF.
const HEADER_LEN: usize = 13 + TP_LEN + 2;

/// Sends (or announced bodies) from this size on take the connection out of the socket map.
const LARGE: u64 = 32 * 1024;

#[sk_msg]
pub fn out_msg(ctx: SkMsgContext) -> u32 {
    inject(&ctx);
    SK_PASS
}

/// Marks this connection for release from the socket map (see `sockops.rs`).
#[inline(always)]
fn mark_large(ctx: &SkMsgContext) {
    // SAFETY: fields of this call's `sk_msg_md`.
    let m = unsafe { &*ctx.msg };
    let rp = m.remote_port;
    let key = SockKey {
        local_port: m.local_port,
        remote_port: if rp > 0xffff { rp >> 16 } else { rp },
        remote_ip4: m.remote_ip4,
        remote_ip6_last: m.remote_ip6[3],
    };
    let _ = lru_insert(&LARGE_SENDS, LRU_LARGE_SENDS, CAP_LARGE_SENDS, &key, &1);
}

#[inline(always)]
fn inject(ctx: &SkMsgContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !process_traced((pid_tgid >> 32) as u32) {
        return;
    }
    // The data syscall in flight: its fd names the connection, and the decision is left in it
    // for the syscall's exit, which reports it with the captured bytes.
    let Some(io) = ACTIVE_IO.get_ptr_mut(&pid_tgid) else {
        return;
    };
    // SAFETY: live map value of this thread.
    let io = unsafe { &mut *io };
    let size = ctx.size() as usize;
    if size as u64 >= LARGE {
        mark_large(ctx);
    }
    let key = conn_key((pid_tgid >> 32) as u32, io.fd);
    if let Some(left) = BODY_LEFT.get_ptr_mut(&key) {
        // SAFETY: live map value of this connection.
        let l = unsafe { *left };
        if l != 0 {
            if l != BODY_UNKNOWN {
                // SAFETY: as above.
                unsafe { *left = l.saturating_sub(size as u64) };
            }
            return; // body bytes (or, past its end, not at the start of a message)
        }
    }
    if io.wire.kind != WIRE_NONE {
        return; // a later piece of the same write
    }
    if size < 16 {
        return;
    }
    let want = if size < SCAN_MAX { size } else { SCAN_MAX };
    // SAFETY: the message of this call; makes the first `want` bytes contiguous.
    if unsafe { bpf_msg_pull_data(ctx.msg, 0, want as u32, 0) } != 0 {
        count(CNT_TP_FAILED);
        return;
    }
    let Some(scratch) = scratch(MSG_SLOT) else {
        return;
    };
    // SAFETY: the payload area of our slot.
    let buf = unsafe { scratch.buf().as_mut_ptr().add(DATA_HEADER_SIZE) };
    let mut n = ctx.data_end() - ctx.data();
    if n > SCAN_MAX {
        n = SCAN_MAX;
    }
    if n < 16 {
        return;
    }
    // SAFETY: `n` bytes of the linear message into a buffer of 2 * MAX_PAYLOAD bytes.
    if unsafe { bpf_probe_read_kernel(buf as *mut _, n as u32, ctx.data() as *const _) } != 0 {
        return;
    }
    let line_end = head::request_line_end(MSG_SLOT, buf, n);
    if line_end == 0 {
        return;
    }
    let h = head::read_head::<true>(MSG_SLOT, line_end, n);
    // What of the body is still to come after this message.
    let after = if h.end == 0 || h.body_unknown {
        BODY_UNKNOWN
    } else {
        match h.content_length {
            Some(cl) => cl.saturating_sub((size - h.end) as u64),
            None => 0,
        }
    };
    let _ = lru_insert(&BODY_LEFT, LRU_BODY_LEFT, CAP_BODY_LEFT, &key, &after);
    if after != BODY_UNKNOWN && after >= LARGE {
        mark_large(ctx);
    }
    let owner = inflight::owner(pid_tgid, io.fd);
    let Some(plan) = EDIT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's plan slot; `pid_tgid` tells the edit program whether it is still ours.
    let plan = unsafe { &mut *plan };
    plan.pid_tgid = pid_tgid;
    plan.n = n as u32;
    if h.traceparent != 0 {
        let v = h.traceparent;
        if let Some(tp) = head::parse_traceparent(MSG_SLOT, buf, v, n) {
            let mut w = WireCtx {
                kind: WIRE_REWRITTEN,
                trace_id: tp.trace_id,
                span_id: ids::span_id(),
                flags: ids::sampled(&tp.trace_id, Some(tp.flags)),
                ..WireCtx::default()
            };
            w.link = owner.link;
            if owner.request().is_some() && owner.req.trace_id == tp.trace_id {
                w.parent_id = owner.req.span_id;
            }
            // "<16 hex span>-<2 hex flags>" over the old parent id and flags.
            ids::put_hex(&mut plan.text, 0, &w.span_id);
            plan.text[16] = b'-';
            ids::put_hex(&mut plan.text, 17, &[w.flags]);
            plan.op = EDIT_REWRITE;
            plan.at = (tp.at + 36) as u32;
            plan.wire = w;
        } else {
            let Some(end) = head::value_end(buf, v, n) else {
                count(CNT_TP_SKIPPED_HEAD);
                return;
            };
            let mut w = WireCtx {
                span_id: ids::span_id(),
                ..WireCtx::default()
            };
            super::client_ctx(&mut w, &owner);
            w.kind = WIRE_REPLACED;
            ids::put_traceparent(&mut plan.text, 0, &w.trace_id, &w.span_id, w.flags);
            plan.op = EDIT_REPLACE;
            plan.at = v as u32;
            plan.old_len = (end - v) as u32;
            plan.wire = w;
        }
    } else if h.end != 0 {
        let mut w = WireCtx {
            span_id: ids::span_id(),
            ..WireCtx::default()
        };
        super::client_ctx(&mut w, &owner);
        w.kind = WIRE_INSERTED;
        plan.text[..13].copy_from_slice(b"traceparent: ");
        ids::put_traceparent(&mut plan.text, 13, &w.trace_id, &w.span_id, w.flags);
        plan.text[HEADER_LEN - 2] = b'\r';
        plan.text[HEADER_LEN - 1] = b'\n';
        plan.op = EDIT_INSERT;
        plan.at = line_end as u32;
        plan.wire = w;
    } else {
        count(CNT_TP_SKIPPED_HEAD);
        return;
    }
    // The scratch slot is released before the tail call, which does not come back.
    drop(scratch);
    // SAFETY: a tail call into the edit program of this message; on failure it returns here
    // and nothing was changed.
    unsafe { MSG_EDIT.tail_call(ctx, 0) };
    plan.op = 0;
    count(CNT_TP_FAILED);
}

/// The second half of `out_msg` (see the module comment): carries out this CPU's plan on the
/// message, if the plan is this thread's.
#[sk_msg]
pub fn out_msg_edit(ctx: SkMsgContext) -> u32 {
    edit(&ctx);
    SK_PASS
}

#[inline(always)]
fn edit(ctx: &SkMsgContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(plan) = EDIT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's plan slot.
    let plan = unsafe { &mut *plan };
    let op = plan.op;
    plan.op = 0;
    if plan.pid_tgid != pid_tgid || op == 0 {
        count(CNT_TP_FAILED); // another task's send on this CPU took the slot in between
        return;
    }
    let Some(io) = ACTIVE_IO.get_ptr_mut(&pid_tgid) else {
        return;
    };
    let at = plan.at as usize;
    let n = plan.n as usize;
    let done = match op {
        EDIT_REWRITE => {
            let ok = write_at::<19>(ctx, at, &plan.text);
            if ok {
                count(CNT_TP_REWRITTEN);
            }
            ok
        }
        EDIT_INSERT => {
            if ctx.push_data(at as u32, HEADER_LEN as u32, 0).is_err() {
                count(CNT_TP_FAILED);
                return;
            }
            let ok = write_at::<HEADER_LEN>(ctx, at, &plan.text);
            if ok {
                count(CNT_TP_INSERTED);
            } else {
                // The pushed bytes were never written: take them out again.
                let _ = ctx.pop_data(at as u32, HEADER_LEN as u32, 0);
            }
            rejoin(ctx, n + HEADER_LEN);
            ok
        }
        _ => {
            let old = plan.old_len as usize;
            let end = at + old;
            let resized = if old < TP_LEN {
                ctx.push_data(end as u32, (TP_LEN - old) as u32, 0).is_ok()
            } else if old > TP_LEN {
                ctx.pop_data((at + TP_LEN) as u32, (old - TP_LEN) as u32, 0)
                    .is_ok()
            } else {
                true
            };
            if !resized {
                count(CNT_TP_FAILED);
                return;
            }
            let ok = write_at::<TP_LEN>(ctx, at, &plan.text);
            if ok {
                count(CNT_TP_REPLACED);
            } else if old < TP_LEN {
                // The grown bytes were never written: take them out again.
                let _ = ctx.pop_data(end as u32, (TP_LEN - old) as u32, 0);
            }
            rejoin(ctx, n + TP_LEN);
            ok
        }
    };
    if done {
        // SAFETY: live map value of this thread.
        unsafe { (*io).wire = plan.wire };
    }
}

/// Makes the first `n` bytes one contiguous piece again after the message grew or shrank, so
/// the head leaves in one piece and the server reads it whole, as the program sent it.
#[inline(always)]
fn rejoin(ctx: &SkMsgContext, n: usize) {
    let size = ctx.size() as usize;
    let n = if n < size { n } else { size };
    // SAFETY: the message of this call.
    unsafe { bpf_msg_pull_data(ctx.msg, 0, n as u32, 0) };
}

/// Overwrites message bytes `[at, at + N)` with `text`.
#[inline(always)]
fn write_at<const N: usize>(ctx: &SkMsgContext, at: usize, text: &[u8; EDIT_TEXT]) -> bool {
    // SAFETY: makes the range linear and points `data` at `at`.
    if unsafe { bpf_msg_pull_data(ctx.msg, at as u32, (at + N) as u32, 0) } != 0 {
        count(CNT_TP_FAILED);
        return false;
    }
    let data = ctx.data();
    if data + N > ctx.data_end() {
        count(CNT_TP_FAILED);
        return false;
    }
    let mut i = 0;
    while i < N {
        // SAFETY: within [data, data_end), checked above.
        unsafe { *((data + i) as *mut u8) = text[i] };
        i += 1;
    }
    true
}
