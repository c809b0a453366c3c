//! Go: which request an outgoing `net/http` request is made for, by goroutine.
//!
//! Go moves goroutines between threads and writes each request from its connection's own writer
//! goroutine, so the thread says nothing. Go's register ABI (1.17 and later, x86_64) keeps the
//! running goroutine's `g` in `r14`, in Go code and at every syscall Go makes, so:
//! - a server request head read by goroutine G (net/http reads it in the connection's goroutine,
//!   which then runs the handler) is noted as G's request;
//! - `(*Transport).roundTrip(t, req)` entered by G notes `req` (`rbx`) as made for G's request,
//!   if that one is still open;
//! - `(*Request).write(r, ...)` entered by writer goroutine W (`rax` = r) hands that note to W;
//! - W's next request head sent is made for that request (`LINK_TASK`);
//! - a goroutine G spawns (`go f()`, `runtime.newproc1(fn, callergp=G)`) inherits G's note, so
//!   a handler that fans its calls out to goroutines (or their goroutines) links them too. The
//!   new `g` is `newproc1`'s result, read at each of its return instructions: Go moves goroutine
//!   stacks, so a uretprobe's rewritten return address would crash the process. (`newproc1`
//!   runs on the thread's system stack, which never moves, so entry and return meet by thread.)
//!   A `g` is reused after its goroutine exits: a spawn without a note clears the old one.
//! Every note is consumed once and is trusted only briefly, so a stale one (a request that
//! failed before it was written) cannot name the owner of a later request.
#[allow(unused_imports)]
use crate::maps::lru::*;
use agent_common::{ReqRef, TaskRef};
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::uprobe, programs::ProbeContext};

use super::task::{key, now, take_writing};
use crate::maps::{count, GO_REQ_OWNER, GO_SPAWNING, TASK_REQ, TASK_WRITING};

/// How long a note from `roundTrip` waits for its write (a new connection is dialled in
/// between), and a writer's note for its send (the head is flushed as `write` ends).
const ROUNDTRIP_TO_WRITE_NS: u64 = 5_000_000_000;
const WRITE_TO_SEND_NS: u64 = 1_000_000_000;

#[inline(always)]
fn note<K, V>(map: &aya_ebpf::maps::LruHashMap<K, V>, which: u32, cap: u32, k: &K, v: &V) {
    if lru_insert(map, which, cap, k, v).is_err() {
        count(agent_common::CNT_STATE_MAP_FULL);
    }
}

/// Goroutine `g` of process `tgid` (`IoArgs::g`, taken at `sock:sock_recv_length`) read
/// request `at`. This runs inside the largest kernel programs, whose every branch the verifier
/// walks: one branch and a plain insert, no eviction estimate (userspace watches this map's
/// fill instead, `task_notes_map_full`).
#[inline(always)]
pub fn request_read(tgid: u32, g: u64, at: ReqRef) {
    if g != 0 {
        let _ = TASK_REQ.insert(&key(tgid, g), &TaskRef { at, ts: now() }, 0);
    }
}

/// `net/http.(*Transport).roundTrip(t *Transport, req *Request)`: `rax` = t, `rbx` = req.
#[uprobe]
pub fn go_transport_roundtrip(ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: a uprobe's context is the probed task's user registers.
    let (g, req) = unsafe { ((*ctx.regs).r14, (*ctx.regs).rbx) };
    let req_key = key(tgid, req);
    // SAFETY: copied out of a live map value.
    match TASK_REQ.get_ptr(&key(tgid, g)).map(|r| unsafe { *r }) {
        Some(r) if super::inflight::is_live(&r.at) => note(
            &GO_REQ_OWNER,
            LRU_GO_REQ_OWNER,
            CAP_GO_REQ_OWNER,
            &req_key,
            &TaskRef {
                at: r.at,
                ts: now(),
            },
        ),
        // A request made for nothing open: no older note about this address may survive it.
        _ => lru_remove(&GO_REQ_OWNER, LRU_GO_REQ_OWNER, &req_key),
    }
    0
}

/// `net/http.(*Request).write(r *Request, w io.Writer, ...)`: `rax` = r, in the writer goroutine.
#[uprobe]
pub fn go_request_write(ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: a uprobe's context is the probed task's user registers.
    let (g, r) = unsafe { ((*ctx.regs).r14, (*ctx.regs).rax) };
    let req_key = key(tgid, r);
    let writer = key(tgid, g);
    // SAFETY: copied out of a live map value.
    let owner = GO_REQ_OWNER.get_ptr(&req_key).map(|o| unsafe { *o });
    lru_remove(&GO_REQ_OWNER, LRU_GO_REQ_OWNER, &req_key);
    let t = now();
    match owner {
        Some(o) if t.wrapping_sub(o.ts) < ROUNDTRIP_TO_WRITE_NS => note(
            &TASK_WRITING,
            LRU_TASK_WRITING,
            CAP_TASK_WRITING,
            &writer,
            &TaskRef { at: o.at, ts: t },
        ),
        // This write is for no known request: the writer's older note (if any) is void.
        _ => lru_remove(&TASK_WRITING, LRU_TASK_WRITING, &writer),
    }
    0
}

/// `runtime.newproc1(fn *funcval, callergp *g, ...)` entered: `rbx` = the spawning goroutine.
/// Only a spawner with a live note is remembered.
#[uprobe]
pub fn go_newproc1(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: a uprobe's context is the probed task's user registers.
    let parent = unsafe { (*ctx.regs).rbx };
    // SAFETY: copied out of a live map value.
    let noted = TASK_REQ
        .get_ptr(&key((pid_tgid >> 32) as u32, parent))
        .map(|r| unsafe { *r })
        .is_some_and(|r| super::inflight::is_live(&r.at));
    if noted {
        if GO_SPAWNING.insert(&pid_tgid, &parent, 0).is_err() {
            count(agent_common::CNT_STATE_MAP_FULL);
        }
    } else {
        let _ = GO_SPAWNING.remove(&pid_tgid);
    }
    0
}

/// A return instruction of `runtime.newproc1` reached: `rax` = the new goroutine, which takes
/// its spawner's note, or loses whatever note (or unseen TLS bytes) its reused `g` still had.
#[uprobe]
pub fn go_newproc1_ret(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: a uprobe's context is the probed task's user registers.
    let child = key(tgid, unsafe { (*ctx.regs).rax });
    // SAFETY: copied out of a live map value.
    let parent = GO_SPAWNING.get_ptr(&pid_tgid).map(|p| unsafe { *p });
    let inherited = match parent {
        Some(p) => {
            let _ = GO_SPAWNING.remove(&pid_tgid);
            // SAFETY: copied out of a live map value.
            TASK_REQ.get_ptr(&key(tgid, p)).map(|r| unsafe { *r })
        }
        None => None,
    };
    match inherited {
        Some(r) if super::inflight::is_live(&r.at) => {
            let _ = TASK_REQ.insert(
                &child,
                &TaskRef {
                    at: r.at,
                    ts: now(),
                },
                0,
            );
        }
        _ => {
            let _ = TASK_REQ.remove(&child);
        }
    }
    // Nor does it inherit unseen TLS bytes, or a TLS call whose return was never seen, of the
    // goroutine that had its `g` (`gotls`).
    let _ = crate::maps::GO_TLS_LOST.remove(&child);
    let _ = crate::maps::GO_TLS_CALLS.remove(&child);
    0
}

/// The request the current goroutine is writing an outgoing request for, if `net/http` said so
/// just before; the note is used up.
#[inline(always)]
pub fn writing_for(tgid: u32) -> Option<ReqRef> {
    take_writing(tgid, crate::regs::user_r14()?, WRITE_TO_SEND_NS)
}
