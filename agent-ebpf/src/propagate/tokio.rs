//! tokio: which request an outgoing call is made for, by task.
//!
//! tokio moves tasks between worker threads, and a client such as reqwest (through hyper)
//! writes each request from its connection's own task, handed the request over an mpsc
//! channel. The evidence follows both:
//! - `task::raw::poll(header)` runs one poll of one task (every instance of the generic
//!   function, probed at entry and return), so the thread knows which task runs;
//! - a request head read while task T polls is T's request (hyper's server reads it in the
//!   connection's task, which runs the service future);
//! - a message pushed on a channel (`list::Tx<T>::push`) by a task with an open request is
//!   noted on the channel; the task that pops it (`list::Rx<T>::pop`) sends its next request
//!   head for that request (`LINK_TASK`). A channel holding messages sent for different
//!   requests (or some for none) names none of them; every note is used once, briefly.
//! - a task spawned (`OwnedTasks<S>::bind_inner(task)`, run by the spawner) while task T polls
//!   takes T's open request, so a handler that hands its call to a child task (or the child's
//!   child) links it too; a task spawned outside every task (`block_on`, the runtime's own
//!   code) or by a task with no open request starts with none, which also clears whatever
//!   note a reused task address still had.
//! Limits: a message already queued when the agent attached is not counted, so the first pop
//! after attaching may take a later message's note; `spawn_blocking` and `LocalSet` tasks are
//! bound elsewhere and inherit nothing (their calls get no parent).
#[allow(unused_imports)]
use crate::maps::lru::*;
use agent_common::{ChanNote, ReqRef, TaskRef, CNT_STATE_MAP_FULL};
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

use super::{
    inflight::live,
    task::{key, now, take_writing},
};
use crate::maps::{count, TASK_REQ, TASK_WRITING, TOKIO_CHANS, TOKIO_POLLING};

/// How long a popped message's note waits for its request head to be sent.
const POP_TO_SEND_NS: u64 = 1_000_000_000;
const NOWHERE: ReqRef = ReqRef { sk: 0, seq: 0 };

/// The task thread `pid_tgid` is polling, 0 between polls.
#[inline(always)]
pub fn polling(pid_tgid: u64) -> u64 {
    // SAFETY: copied out of a live map value.
    TOKIO_POLLING
        .get_ptr(&pid_tgid)
        .map(|t| unsafe { *t })
        .unwrap_or(0)
}

/// `raw::poll(ptr: NonNull<Header>)`: `rdi` = the task about to be polled.
#[uprobe]
pub fn tokio_poll(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: a uprobe's context is the probed task's user registers.
    let task = unsafe { (*ctx.regs).rdi };
    if TOKIO_POLLING.insert(&pid_tgid, &task, 0).is_err() {
        count(CNT_STATE_MAP_FULL);
    }
    0
}

/// The poll returned: no task runs on this thread (the runtime's own code, or `block_on`'s
/// future, which is no task).
#[uretprobe]
pub fn tokio_poll_ret(_ctx: RetProbeContext) -> u32 {
    let _ = TOKIO_POLLING.remove(&bpf_get_current_pid_tgid());
    0
}

/// The open request task `task` of process `tgid` read last.
#[inline(always)]
fn request_of(tgid: u32, task: u64) -> Option<ReqRef> {
    if task == 0 {
        return None;
    }
    // SAFETY: copied out of a live map value.
    let r = unsafe { *TASK_REQ.get_ptr(&key(tgid, task))? };
    live(&r.at).map(|_| r.at)
}

/// `OwnedTasks<S>::bind_inner(&self, task: Task<S>, notified: Notified<S>)`: `rsi` = the new
/// task's header, which `rdx` repeats (both wrap the same pointer); called by the spawner, so the
/// task polling on this thread (if any) is the parent. Registers that disagree mean another
/// layout than the one probed: the child then inherits nothing.
#[uprobe]
pub fn tokio_spawn(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: a uprobe's context is the probed task's user registers.
    let (child, notified) = unsafe { ((*ctx.regs).rsi, (*ctx.regs).rdx) };
    if child == 0 {
        return 0;
    }
    let k = key(tgid, child);
    let inherited = if child == notified {
        request_of(tgid, polling(pid_tgid))
    } else {
        None
    };
    match inherited {
        Some(at) => {
            if TASK_REQ.insert(&k, &TaskRef { at, ts: now() }, 0).is_err() {
                count(CNT_STATE_MAP_FULL);
            }
        }
        None => {
            let _ = TASK_REQ.remove(&k);
        }
    }
    // A reused address: the task that had it may have popped a message it never sent.
    lru_remove(&TASK_WRITING, LRU_TASK_WRITING, &k);
    0
}

/// `list::Tx<T>::push(&self, value)`: `rdi` = the channel's sending side. Every push is
/// counted, noted or not, so that a pop can tell whose message it takes.
#[uprobe]
pub fn tokio_chan_push(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: a uprobe's context is the probed task's user registers.
    let tx = unsafe { (*ctx.regs).rdi };
    let at = request_of(tgid, polling(pid_tgid)).unwrap_or(NOWHERE);
    let k = key(tgid, tx);
    if let Some(n) = TOKIO_CHANS.get_ptr_mut(&k) {
        // SAFETY: live map value; a race between two senders can only blank the note.
        let n = unsafe { &mut *n };
        if n.waiting == 0 {
            n.at = at;
        } else if n.at.sk != at.sk || n.at.seq != at.seq {
            n.at = NOWHERE;
        }
        n.waiting = n.waiting.wrapping_add(1);
        return 0;
    }
    if TOKIO_CHANS
        .insert(&k, &ChanNote { at, waiting: 1 }, 0)
        .is_err()
    {
        count(CNT_STATE_MAP_FULL);
    }
    0
}

/// `list::Rx<T>::pop(&mut self, tx: &Tx<T>)`: the sending side is `rsi`, or `rdx` when the
/// result is returned through a hidden pointer in `rdi` (large messages). The popping task
/// takes the note of the message it receives.
#[uprobe]
pub fn tokio_chan_pop(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: a uprobe's context is the probed task's user registers.
    let (rsi, rdx) = unsafe { ((*ctx.regs).rsi, (*ctx.regs).rdx) };
    let n = match TOKIO_CHANS.get_ptr_mut(&key(tgid, rdx)) {
        Some(n) => n,
        None => match TOKIO_CHANS.get_ptr_mut(&key(tgid, rsi)) {
            Some(n) => n,
            None => return 0,
        },
    };
    // SAFETY: live map value.
    let n = unsafe { &mut *n };
    if n.waiting == 0 {
        return 0;
    }
    n.waiting -= 1;
    let at = n.at;
    let task = polling(pid_tgid);
    if task == 0 {
        return 0;
    }
    let writer = key(tgid, task);
    if at.sk != 0 && live(&at).is_some() {
        if lru_insert(
            &TASK_WRITING,
            LRU_TASK_WRITING,
            CAP_TASK_WRITING,
            &writer,
            &TaskRef { at, ts: now() },
        )
        .is_err()
        {
            count(CNT_STATE_MAP_FULL);
        }
    } else {
        lru_remove(&TASK_WRITING, LRU_TASK_WRITING, &writer);
    }
    0
}

/// The request the task polling on this thread is about to send a request head for, if it
/// popped one's message just before; the note is used up.
#[inline(always)]
pub fn writing_for(pid_tgid: u64) -> Option<ReqRef> {
    let task = polling(pid_tgid);
    if task == 0 {
        return None;
    }
    take_writing((pid_tgid >> 32) as u32, task, POP_TO_SEND_NS)
}
