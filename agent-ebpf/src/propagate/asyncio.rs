//! Python asyncio: which request an outgoing call is made for, by task.
//!
//! One event-loop thread interleaves many requests, so the thread says nothing once two are
//! open. The loop reads sockets in plain callbacks and runs each task's steps in others; the
//! evidence of which request a task works for comes from what caused it:
//! - every callback runs inside `Context.run` (`context_run`, probed at entry and return), so a
//!   request read while it runs was read by that callback (`PyThread::start`);
//! - a task created by that callback (`Task.__init__`, as uvicorn does per request) is created
//!   for that request; a task created by another task's step inherits that task's request (the
//!   per-request task aiohttp creates from its connection task, `asyncio.gather` children);
//! - a task that callback wakes (`Future.set_result` on the future the task awaits: aiohttp's
//!   connection task waiting for the next request) works for that request from then on;
//! - `enter_task(loop, task)` starts each step of a task, so the thread knows the task running
//!   when it sends.
//!
//! A task the evidence does not tie to a request (a background task, one created before the
//! agent attached) gets no parent, however many requests its thread has open. A callback that
//! read several requests, or a pipelined one (a read that may hold its predecessor's bytes),
//! causes nothing. Tasks are objects that CPython frees and reuses: creating one overwrites
//! whatever its address noted before, so a reused address never names an old request.
//!
//! CPython 3.9 to 3.11 (the `_asyncio` C module): `enter_task(loop, task)` has the task in
//! `rsi`; a `Future`'s first done-callback is at offset 24 (`fut_callback0`, after the object
//! header and `fut_loop`), and a task's wake-up callback is a builtin method object whose
//! `m_ml` (offset 16) is `TaskWakeupDef` and whose `m_self` (offset 24) is the task.
#[allow(unused_imports)]
use crate::maps::lru::*;
use agent_common::{PyThread, ReqRef, TaskRef, CNT_STATE_MAP_FULL, THREAD_SLOTS};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_get_attach_cookie},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

use super::{inflight::live, task::key};
use crate::maps::{count, PY_TASKS, PY_THREADS, THREAD_REQS};

/// `FutureObj::fut_callback0`, `PyCFunctionObject::m_ml` and `::m_self` (CPython 3.9 to 3.11).
const FUT_CALLBACK0: u64 = 24;
const CFUNC_ML: u64 = 16;
const CFUNC_SELF: u64 = 24;

/// How many requests thread `tid` has read (`ThreadReqs::next`), 0 before its first.
#[inline(always)]
fn reqs_read(tid: u32) -> u32 {
    // SAFETY: a field copied out of a live map value.
    THREAD_REQS
        .get_ptr(&tid)
        .map(|t| unsafe { (*t).next })
        .unwrap_or(0)
}

/// The request the callback running on thread `tid` (begun when the thread had read `start`
/// requests) read, if it read exactly one, that one is still open and was not pipelined.
#[inline(always)]
fn cause(tid: u32, start: u32) -> Option<ReqRef> {
    // SAFETY: live map value, read in place.
    let t = unsafe { &*THREAD_REQS.get_ptr(&tid)? };
    let next = t.next;
    if next.wrapping_sub(start) != 1 {
        return None;
    }
    let at = t.refs[(next.wrapping_sub(1) as usize) & (THREAD_SLOTS - 1)];
    let req = live(&at)?;
    (req.pipelined == 0).then_some(at)
}

/// The request task `task` of process `tgid` works for, if it is still open.
#[inline(always)]
fn task_request(tgid: u32, task: u64) -> Option<ReqRef> {
    // SAFETY: copied out of a live map value.
    let r = unsafe { *PY_TASKS.get_ptr(&key(tgid, task))? };
    live(&r.at).map(|_| r.at)
}

#[inline(always)]
fn bind(tgid: u32, task: u64, at: Option<ReqRef>) {
    let k = key(tgid, task);
    match at {
        Some(at) => {
            let ts = super::task::now();
            // A plain insert: an evicted note only costs that task's link (userspace reports
            // when the map is full, `py_task_notes_map_full`).
            if PY_TASKS.insert(&k, &TaskRef { at, ts }, 0).is_err() {
                count(CNT_STATE_MAP_FULL);
            }
        }
        None => {
            let _ = PY_TASKS.remove(&k);
        }
    }
}

/// A thread at the edge of its outermost callback (`depth` 1 as it begins, 0 as it ends): no
/// task runs, and the requests it reads from `start` on are the next callback's.
#[inline(always)]
fn between_callbacks(start: u32, depth: u32) -> PyThread {
    PyThread {
        task: 0,
        at: ReqRef { sk: 0, seq: 0 },
        start,
        depth,
    }
}

/// `Context.run` entered: a callback (or a task's step) begins, unless one is already running.
#[uprobe]
pub fn py_context_run(_ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let start = reqs_read(pid_tgid as u32);
    if let Some(t) = PY_THREADS.get_ptr_mut(&pid_tgid) {
        // SAFETY: live map value, written only by its own thread.
        let t = unsafe { &mut *t };
        t.depth = t.depth.wrapping_add(1);
        if t.depth == 1 {
            *t = between_callbacks(start, 1);
        }
    } else if PY_THREADS
        .insert(&pid_tgid, &between_callbacks(start, 1), 0)
        .is_err()
    {
        count(CNT_STATE_MAP_FULL);
    }
    0
}

/// `Context.run` returned: outside every callback, no task runs.
#[uretprobe]
pub fn py_context_run_ret(_ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let start = reqs_read(pid_tgid as u32);
    if let Some(t) = PY_THREADS.get_ptr_mut(&pid_tgid) {
        // SAFETY: live map value, written only by its own thread.
        let t = unsafe { &mut *t };
        // Attached while a callback ran: its return has no entry.
        t.depth = t.depth.saturating_sub(1);
        if t.depth == 0 {
            *t = between_callbacks(start, 0);
        }
    }
    0
}

/// `enter_task(loop, task)`: `rsi` = the task whose step begins on this thread, and with it the
/// request it works for (no callback runs during a step, so that cannot change before it ends).
#[uprobe]
pub fn py_enter_task(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: a uprobe's context is the probed task's user registers.
    let task = unsafe { (*ctx.regs).rsi };
    let Some(t) = PY_THREADS.get_ptr_mut(&pid_tgid) else {
        return 0;
    };
    // SAFETY: a field copied out of a live map value.
    let at = PY_TASKS
        .get_ptr(&key((pid_tgid >> 32) as u32, task))
        .map(|r| unsafe { (*r).at })
        .unwrap_or(ReqRef { sk: 0, seq: 0 });
    // SAFETY: live map value, written only by its own thread.
    unsafe {
        (*t).task = task;
        (*t).at = at;
    }
    0
}

/// `Task.__init__(self, ...)`: `rdi` = the new task, created for its creator's request.
#[uprobe]
pub fn py_task_init(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: a uprobe's context is the probed task's user registers.
    let task = unsafe { (*ctx.regs).rdi };
    // SAFETY: copied out of a live map value.
    let at = match PY_THREADS.get_ptr(&pid_tgid).map(|t| unsafe { *t }) {
        Some(t) if t.task != 0 => task_request(tgid, t.task),
        Some(t) => cause(pid_tgid as u32, t.start),
        None => None,
    };
    bind(tgid, task, at);
    0
}

/// `Future.set_result(self, result)` called by a callback that read one request: the task
/// awaiting this future (its first done-callback is that task's wake-up) works for that request.
/// The attach cookie is the distance from this function to `TaskWakeupDef` in `_asyncio`.
#[uprobe]
pub fn py_future_set_result(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: copied out of a live map value.
    let Some(t) = PY_THREADS.get_ptr(&pid_tgid).map(|t| unsafe { *t }) else {
        return 0;
    };
    if t.task != 0 {
        // A task waking another (a lock, a queue) is no evidence of the woken one's request.
        return 0;
    }
    let Some(at) = cause(pid_tgid as u32, t.start) else {
        return 0;
    };
    // SAFETY: a uprobe's context is the probed task's user registers; the cookie is a helper
    // without preconditions; user memory is read fault-tolerantly.
    let (fut, ip, delta) = unsafe {
        (
            (*ctx.regs).rdi,
            (*ctx.regs).rip,
            bpf_get_attach_cookie(ctx.regs as *mut _),
        )
    };
    let wakeup_def = ip.wrapping_add(delta);
    // SAFETY: as above.
    let task = unsafe {
        let Ok(cb) = bpf_probe_read_user((fut + FUT_CALLBACK0) as *const u64) else {
            return 0;
        };
        if cb == 0 {
            return 0;
        }
        match bpf_probe_read_user((cb + CFUNC_ML) as *const u64) {
            Ok(ml) if ml == wakeup_def => {}
            _ => return 0,
        }
        match bpf_probe_read_user((cb + CFUNC_SELF) as *const u64) {
            Ok(task) => task,
            Err(_) => return 0,
        }
    };
    bind((pid_tgid >> 32) as u32, task, Some(at));
    0
}

/// When an asyncio task is running on this thread: the request it works for (`sk` 0 for none),
/// which alone decides the owner of what it sends. `None` outside tasks (the thread rule
/// applies there).
#[inline(always)]
pub fn running(pid_tgid: u64) -> Option<ReqRef> {
    // SAFETY: live map value, read in place.
    let t = unsafe { &*PY_THREADS.get_ptr(&pid_tgid)? };
    (t.task != 0).then_some(t.at)
}
