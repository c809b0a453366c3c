//! Which incoming request a thread is handling: opened when a request head is read on a server
//! connection, closed when that connection starts its response. An outgoing request belongs to
//! the newest still-open request its thread read, or, for the first request on a connection, to
//! the one open when the thread called `connect` (event loops connect inside the handler and
//! write later).
#[allow(unused_imports)]
use crate::maps::lru::*;
use agent_common::{
    ReqRef, ServerReq, ThreadReqs, CNT_LINK_AMBIGUOUS, CNT_LINK_RUNTIME, CNT_LINK_TASK,
    CNT_LINK_TASK_UNBOUND, CNT_LINK_UNCLASSIFIED, CNT_STATE_MAP_FULL, LINK_AMBIGUOUS, LINK_NONE,
    LINK_RUNTIME, LINK_TASK, LINK_THREAD, LINK_UNCLASSIFIED, RUNTIME_GO, RUNTIME_TASKS,
    RUNTIME_THREADS, RUNTIME_TOKIO, THREAD_SLOTS,
};

use super::task::runtime_of;
use crate::maps::{conn_key, count, CONNECT_REFS, SERVER_REQS, THREAD_REQS};

/// `*p += v` as one atomic instruction (`lock xadd`; `u64::MAX` subtracts one). Core's
/// `AtomicU64::fetch_add` is not offered on the BPF target, the instruction is.
///
/// # Safety
/// `p` points into a live map value, 8-byte aligned.
#[inline(always)]
unsafe fn add(p: *mut u64, v: u64) {
    use core::intrinsics::{atomic_xadd, AtomicOrdering};
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// The in-process owner of an outgoing request, as far as the evidence goes.
#[derive(Clone, Copy)]
pub struct Owner {
    /// Valid when `link` is `LINK_THREAD` or `LINK_TASK` (zeros otherwise, never undefined: the verifier reads
    /// what LLVM computes ahead of a branch).
    pub req: ServerReq,
    /// Where `req` is (its connection and sequence).
    pub at: ReqRef,
    /// `LINK_*`.
    pub link: u8,
}

impl Owner {
    pub const NONE: Owner = Owner {
        req: ServerReq {
            seq: 0,
            trace_id: [0; 16],
            span_id: [0; 8],
            flags: 0,
            live: 0,
            pipelined: 0,
            _pad: 0,
            tid: 0,
        },
        at: ReqRef { sk: 0, seq: 0 },
        link: LINK_NONE,
    };

    #[inline(always)]
    pub fn request(&self) -> Option<&ServerReq> {
        (self.link == LINK_THREAD || self.link == LINK_TASK).then_some(&self.req)
    }
}

/// A request head was read by thread `pid_tgid` (goroutine `g` in a Go process, else 0) on
/// server connection `sk`.
#[inline(always)]
pub fn open(pid_tgid: u64, g: u64, sk: u64, req: &ServerReq) {
    let tid = pid_tgid as u32;
    // The connection's previous request, if its response was never seen, is over now.
    let pipelined = close(sk);
    let mut req = *req;
    req.tid = tid;
    req.live = 1;
    req.pipelined = pipelined as u8;
    if lru_insert(&SERVER_REQS, LRU_SERVER_REQS, CAP_SERVER_REQS, &sk, &req).is_err() {
        count(CNT_STATE_MAP_FULL);
        return;
    }
    let r = ReqRef { sk, seq: req.seq };
    super::goroutine::request_read((pid_tgid >> 32) as u32, g, r);
    if let Some(t) = THREAD_REQS.get_ptr_mut(&tid) {
        // SAFETY: live map value; only this thread writes its slots, `live` is atomic.
        let t = unsafe { &mut *t };
        t.refs[(t.next as usize) & (THREAD_SLOTS - 1)] = r;
        t.next = t.next.wrapping_add(1);
        // SAFETY: an aligned u64 of a live map value.
        unsafe { add(&mut t.live, 1) };
    } else {
        let mut t = ThreadReqs::default();
        t.refs[0] = r;
        t.next = 1;
        t.live = 1;
        if lru_insert(&THREAD_REQS, LRU_THREAD_REQS, CAP_THREAD_REQS, &tid, &t).is_err() {
            count(CNT_STATE_MAP_FULL);
        }
    }
}

/// The server connection `sk` started a response (or closed): its request no longer takes new
/// calls, and its thread has one request fewer open. Whether that request was still open.
#[inline(always)]
pub fn close(sk: u64) -> bool {
    let Some(r) = SERVER_REQS.get_ptr_mut(&sk) else {
        return false;
    };
    // SAFETY: live map value.
    let r = unsafe { &mut *r };
    if r.live == 0 {
        return false;
    }
    r.live = 0;
    if let Some(t) = THREAD_REQS.get_ptr_mut(&r.tid) {
        // SAFETY: an aligned u64 of a live map value. A race that closes twice wraps the count
        // around, which leaves the thread ambiguous (no guessed parent), never wrong.
        unsafe { add(&mut (*t).live, u64::MAX) };
    }
    true
}

/// Whether `r` is still open (read, its response not started).
#[inline(always)]
pub fn is_live(r: &ReqRef) -> bool {
    live(r).is_some()
}

#[inline(always)]
pub fn live(r: &ReqRef) -> Option<ServerReq> {
    if r.sk == 0 {
        return None;
    }
    // SAFETY: copied out of a live map value.
    let req = unsafe { *SERVER_REQS.get_ptr(&r.sk)? };
    (req.live != 0 && req.seq == r.seq).then_some(req)
}

/// `LINK_THREAD` when a thread of process `tgid` is evidence of the request it works for (its
/// runtime runs a request's work on the thread that read it, one at a time); otherwise why not.
#[inline(always)]
fn thread_evidence(tgid: u32) -> u8 {
    evidence_of(runtime_of(tgid))
}

#[inline(always)]
fn evidence_of(runtime: Option<u8>) -> u8 {
    match runtime {
        Some(RUNTIME_THREADS) => LINK_THREAD,
        Some(RUNTIME_TASKS) | Some(RUNTIME_GO) | Some(RUNTIME_TOKIO) => LINK_RUNTIME,
        _ => LINK_UNCLASSIFIED,
    }
}

/// The request thread `tid` is handling, when it has exactly one open: then that one is the
/// newest live request in its slots. With several open (an event loop between requests), there
/// is no evidence which one a call belongs to. Only for processes whose threads are evidence
/// (`thread_evidence`).
#[inline(always)]
fn sole(tid: u32) -> Owner {
    // SAFETY: live map value, read in place (a 72-byte copy would crowd the BPF stack).
    let Some(t) = THREAD_REQS.get_ptr(&tid).map(|t| unsafe { &*t }) else {
        return Owner::NONE;
    };
    let open = t.live;
    if open == 0 {
        return Owner::NONE;
    }
    if open > 1 {
        return Owner {
            link: LINK_AMBIGUOUS,
            ..Owner::NONE
        };
    }
    let mut best = Owner::NONE;
    let mut i = 0;
    while i < THREAD_SLOTS {
        let r = t.refs[i];
        if let Some(req) = live(&r) {
            if best.link == LINK_NONE || best.req.seq < req.seq {
                best = Owner {
                    req,
                    at: r,
                    link: LINK_THREAD,
                };
            }
        }
        i += 1;
    }
    best
}

/// A `connect` from this thread: remember the request it is handling for that socket, when
/// there is exactly one.
#[inline(always)]
pub fn on_connect(pid_tgid: u64, fd: u32) {
    if thread_evidence((pid_tgid >> 32) as u32) != LINK_THREAD {
        return;
    }
    let o = sole(pid_tgid as u32);
    if o.link != LINK_THREAD {
        return;
    }
    if lru_insert(
        &CONNECT_REFS,
        LRU_CONNECT_REFS,
        CAP_CONNECT_REFS,
        &conn_key((pid_tgid >> 32) as u32, fd),
        &o.at,
    )
    .is_err()
    {
        count(CNT_STATE_MAP_FULL);
    }
}

/// The owner of an outgoing request on `fd`, sent by this thread now: the request open when the
/// connection was made (event loops connect inside the handler and write later), else the one
/// request open on this thread. Ambiguity is counted.
#[inline(always)]
pub fn owner(pid_tgid: u64, fd: u32) -> Owner {
    let tgid = (pid_tgid >> 32) as u32;
    let runtime = runtime_of(tgid);
    let evidence = evidence_of(runtime);
    // The runtime's own evidence first: Go's note for the request being written, or the
    // asyncio task running on this thread (whose request, if any, decides alone).
    let task = match runtime {
        Some(RUNTIME_GO) => super::goroutine::writing_for(tgid),
        Some(RUNTIME_TOKIO) => super::tokio::writing_for(pid_tgid),
        _ => super::asyncio::running(pid_tgid),
    };
    if let Some(at) = task {
        if let Some(req) = live(&at) {
            count(CNT_LINK_TASK);
            return Owner {
                req,
                at,
                link: LINK_TASK,
            };
        }
        if evidence == LINK_THREAD {
            count(CNT_LINK_TASK_UNBOUND);
            return Owner::NONE;
        }
    }
    if evidence != LINK_THREAD {
        count(if evidence == LINK_RUNTIME {
            CNT_LINK_RUNTIME
        } else {
            CNT_LINK_UNCLASSIFIED
        });
        return Owner {
            link: evidence,
            ..Owner::NONE
        };
    }
    let key = conn_key((pid_tgid >> 32) as u32, fd);
    // SAFETY: copied out of a live map value.
    if let Some(r) = CONNECT_REFS.get_ptr(&key).map(|r| unsafe { *r }) {
        lru_remove(&CONNECT_REFS, LRU_CONNECT_REFS, &key);
        if let Some(req) = live(&r) {
            return Owner {
                req,
                at: r,
                link: LINK_THREAD,
            };
        }
    }
    let o = sole(pid_tgid as u32);
    if o.link == LINK_AMBIGUOUS {
        count(CNT_LINK_AMBIGUOUS);
    }
    o
}
