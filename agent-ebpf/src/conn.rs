//! Connection set-up and teardown: `accept`/`accept4` and `connect` record the socket's role
//! (server or client side); `close` tells userspace a tracked connection ended.
//!
//! Formats: `sys_exit_accept{,4}`: `long ret` @16. `sys_enter_connect`: `int fd` @16,
//! `struct sockaddr *uservaddr` @24. `sys_enter_close`: `unsigned int fd` @16.
#[allow(unused_imports)]
use crate::maps::lru::*;
use agent_common::{
    CloseEvent, ConnInfo, ConnTuple, EVENT_CLOSE, ROLE_CLIENT, ROLE_SERVER, VERDICT_TRACE,
    VERDICT_UNKNOWN,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_ktime_get_boot_ns},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::maps::{
    conn_key, count, process_traced, ACTIVE_CONNECT, BODY_LEFT, CONNECT_REFS, CONNS, EVENTS,
    PROC_RUNTIME, SERVER_REQS, THREAD_REQS, TRACED_PIDS,
};

const EINPROGRESS: i64 = -115;

#[inline(always)]
fn read(ctx: &TracePointContext, off: usize) -> u64 {
    // SAFETY: offsets from the tracepoint format.
    unsafe { ctx.read_at::<u64>(off) }.unwrap_or(0)
}

#[inline(always)]
fn remember(tgid: u32, fd: u32, role: u32) {
    let info = ConnInfo {
        sk: 0,
        role,
        verdict: VERDICT_UNKNOWN,
        tuple: ConnTuple::default(),
        opening: 0,
        proto: agent_common::PROTO_HTTP1,
        h2: [agent_common::H2Walk::default(); 2],
    };
    if lru_insert(&CONNS, LRU_CONNS, CAP_CONNS, &conn_key(tgid, fd), &info).is_err() {
        count(agent_common::CNT_CONNS_FULL);
    }
}

#[inline(always)]
fn accepted(ctx: &TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let ret = read(ctx, 16) as i64;
    if ret >= 0 && process_traced(tgid) {
        remember(tgid, ret as u32, ROLE_SERVER);
    }
    0
}

#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    accepted(&ctx)
}

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    accepted(&ctx)
}

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !process_traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let fd = read(&ctx, 16);
    let addr = read(&ctx, 24);
    // SAFETY: user memory through the fault-tolerant helper.
    let family = unsafe { bpf_probe_read_user(addr as *const u16) }.unwrap_or(0);
    if family == 2 || family == 10 {
        if ACTIVE_CONNECT.insert(&pid_tgid, &fd, 0).is_err() {
            count(agent_common::CNT_STATE_MAP_FULL);
        }
        crate::propagate::inflight::on_connect(pid_tgid, fd as u32);
    }
    0
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(fd) = ACTIVE_CONNECT.get_ptr(&pid_tgid) else {
        return 0;
    };
    // SAFETY: live map value copied before removal.
    let fd = unsafe { *fd };
    let _ = ACTIVE_CONNECT.remove(&pid_tgid);
    let ret = read(&ctx, 16) as i64;
    if ret == 0 || ret == EINPROGRESS {
        remember((pid_tgid >> 32) as u32, fd as u32, ROLE_CLIENT);
    }
    0
}

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !process_traced(tgid) {
        return 0;
    }
    let fd = read(&ctx, 16) as u32;
    let key = conn_key(tgid, fd);
    let Some(info) = CONNS.get_ptr(&key) else {
        return 0;
    };
    // SAFETY: live map value copied before removal.
    let info = unsafe { *info };
    lru_remove(&CONNS, LRU_CONNS, &key);
    // Per-connection state of the trace-context code goes with the connection.
    lru_remove(&BODY_LEFT, LRU_BODY_LEFT, &key);
    lru_remove(&CONNECT_REFS, LRU_CONNECT_REFS, &key);
    if info.sk != 0 {
        // A request still open on this connection no longer counts on its thread.
        crate::propagate::inflight::close(info.sk);
        lru_remove(&SERVER_REQS, LRU_SERVER_REQS, &info.sk);
    }
    if info.verdict != VERDICT_TRACE && info.verdict != agent_common::VERDICT_TLS {
        return 0;
    }
    let ev = CloseEvent {
        kind: EVENT_CLOSE,
        pid: tgid,
        fd,
        _pad: 0,
        sk: info.sk,
        // SAFETY: helper without preconditions.
        ts: unsafe { bpf_ktime_get_boot_ns() },
    };
    if EVENTS
        .output::<CloseEvent>(&ev, crate::maps::ring_flags())
        .is_err()
    {
        count(agent_common::CNT_CLOSE_RINGBUF_FULL);
    }
    0
}

/// A task exits: its thread's request list goes, and when the whole process is gone its pid
/// leaves the allow-list, so a process that later reuses the pid is not traced.
/// Format: `bool group_dead` @32.
#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    lru_remove(&THREAD_REQS, LRU_THREAD_REQS, &(pid_tgid as u32));
    // SAFETY: offset from the tracepoint format.
    let group_dead = unsafe { ctx.read_at::<u8>(32) }.unwrap_or(0) != 0;
    let tgid = (pid_tgid >> 32) as u32;
    if group_dead {
        let _ = PROC_RUNTIME.remove(&tgid);
        if TRACED_PIDS.remove(&tgid).is_ok() {
            count(agent_common::CNT_PID_EXITED);
        }
    }
    0
}

/// A process replaced its program: what its threads were evidence of no longer holds (a shell
/// that execs a Go binary keeps its pid). Until userspace has looked at the new executable, its
/// calls get no in-thread link.
#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !process_traced(tgid) {
        return 0;
    }
    if PROC_RUNTIME
        .insert(&tgid, &agent_common::RUNTIME_PENDING, 0)
        .is_err()
    {
        count(agent_common::CNT_STATE_MAP_FULL);
    }
    // Woken at once: a new server's first requests should find it classified.
    let ev = agent_common::ExecEvent {
        kind: agent_common::EVENT_EXEC,
        pid: tgid,
    };
    if EVENTS.output::<agent_common::ExecEvent>(&ev, 2).is_err() {
        count(agent_common::CNT_EXEC_RINGBUF_FULL);
    }
    0
}
