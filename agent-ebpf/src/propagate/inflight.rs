//! Which incoming request a thread is handling: opened when a request head is read on a server
//! connection, closed when that connection starts its response. An outgoing request belongs to
//! the newest still-open request its thread read, or, for the first request on a connection, to
//! the one open when the thread called `connect` (event loops connect inside the handler and
//! write later).
#[allow(unused_imports)]
use crate::maps::lru::*;
use agent_common::{ReqRef, ServerReq, ThreadReqs, CNT_STATE_MAP_FULL, THREAD_SLOTS};

use crate::maps::{conn_key, count, CONNECT_REFS, SERVER_REQS, THREAD_REQS};

#[inline(always)]
pub fn open(tid: u32, sk: u64, req: &ServerReq) {
    if lru_insert(&SERVER_REQS, LRU_SERVER_REQS, CAP_SERVER_REQS, &sk, req).is_err() {
        count(CNT_STATE_MAP_FULL);
    }
    let r = ReqRef { sk, seq: req.seq };
    if let Some(t) = THREAD_REQS.get_ptr_mut(&tid) {
        // SAFETY: live map value; only this thread writes its entry.
        let t = unsafe { &mut *t };
        t.refs[(t.next as usize) & (THREAD_SLOTS - 1)] = r;
        t.next = t.next.wrapping_add(1);
    } else {
        let mut t = ThreadReqs::default();
        t.refs[0] = r;
        t.next = 1;
        if lru_insert(&THREAD_REQS, LRU_THREAD_REQS, CAP_THREAD_REQS, &tid, &t).is_err() {
            count(CNT_STATE_MAP_FULL);
        }
    }
}

/// The server connection `sk` started a response: its request no longer takes new calls.
#[inline(always)]
pub fn close(sk: u64) {
    if let Some(r) = SERVER_REQS.get_ptr_mut(&sk) {
        // SAFETY: live map value.
        unsafe { (*r).live = 0 };
    }
}

#[inline(always)]
fn live(r: &ReqRef) -> Option<ServerReq> {
    if r.sk == 0 {
        return None;
    }
    // SAFETY: copied out of a live map value.
    let req = unsafe { *SERVER_REQS.get_ptr(&r.sk)? };
    (req.live != 0 && req.seq == r.seq).then_some(req)
}

#[inline(always)]
fn newest(tid: u32) -> Option<(ReqRef, ServerReq)> {
    // SAFETY: live map value, read in place (a 72-byte copy would crowd the BPF stack).
    let t = unsafe { &*THREAD_REQS.get_ptr(&tid)? };
    let mut best: Option<(ReqRef, ServerReq)> = None;
    let mut i = 0;
    while i < THREAD_SLOTS {
        let r = t.refs[i];
        if let Some(req) = live(&r) {
            if best.is_none_or(|(b, _)| b.seq < r.seq) {
                best = Some((r, req));
            }
        }
        i += 1;
    }
    best
}

/// A `connect` from this thread: remember the request it is handling for that socket.
#[inline(always)]
pub fn on_connect(pid_tgid: u64, fd: u32) {
    if let Some((r, _)) = newest(pid_tgid as u32) {
        if lru_insert(
            &CONNECT_REFS,
            LRU_CONNECT_REFS,
            CAP_CONNECT_REFS,
            &conn_key((pid_tgid >> 32) as u32, fd),
            &r,
        )
        .is_err()
        {
            count(CNT_STATE_MAP_FULL);
        }
    }
}

/// The request an outgoing request on `fd`, sent by this thread now, belongs to.
#[inline(always)]
pub fn owner(pid_tgid: u64, fd: u32) -> Option<ServerReq> {
    let key = conn_key((pid_tgid >> 32) as u32, fd);
    // SAFETY: copied out of a live map value.
    if let Some(r) = CONNECT_REFS.get_ptr(&key).map(|r| unsafe { *r }) {
        lru_remove(&CONNECT_REFS, LRU_CONNECT_REFS, &key);
        if let Some(req) = live(&r) {
            return Some(req);
        }
    }
    newest(pid_tgid as u32).map(|(_, req)| req)
}
