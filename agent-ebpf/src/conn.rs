//! Connection set-up and teardown: `accept`/`accept4` and `connect` record the socket's role
//! (server or client side); `close` tells userspace a tracked connection ended, unless a TLS
//! call that moved bytes on it is still returning on another thread or goroutine: that call
//! closes it once its plaintext is sent (`tls::settle`).
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
    GO_TLS_CALLS, PROC_RUNTIME, SERVER_REQS, THREAD_REQS, TLS_CALLS, TRACED_PIDS,
};

const EINPROGRESS: i64 = -115;

#[inline(always)]
fn read(ctx: &TracePointContext, off: usize) -> u64 {
    // SAFETY: offsets from the tracepoint format.
    unsafe { ctx.read_at::<u64>(off) }.unwrap_or(0)
}

#[inline(always)]
fn remember(tgid: u32, fd: u32, role: u32) {
    close_pending(tgid, fd);
    let info = ConnInfo {
        sk: 0,
        role,
        verdict: VERDICT_UNKNOWN,
        tuple: ConnTuple::default(),
        opening: 0,
        proto: agent_common::PROTO_HTTP1,
        h2: [agent_common::H2Walk::default(); 2],
        tls_busy: [0; 2],
        closing: 0,
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
    let Some(c) = CONNS.get_ptr_mut(&conn_key(tgid, fd)) else {
        return 0;
    };
    // SAFETY: live map value, used in place.
    let c = unsafe { &mut *c };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if c.closing == 0 && (c.tls_busy[0] | c.tls_busy[1]) != 0 {
        // A TLS call (on another thread or goroutine) whose syscall moved bytes here has not
        // returned: it sends them, then closes (`tls::settle`).
        c.closing = now;
        return 0;
    }
    // Closed a second time (the fd number reused by something else): the connection is over.
    let ts = if c.closing != 0 { c.closing } else { now };
    let (sk, verdict) = (c.sk, c.verdict);
    close(tgid, fd, sk, verdict, ts);
    0
}

/// Connection `fd` of process `tgid` (socket `sk`) ended at `ts`: its state goes, and userspace
/// is told if it was traced. Shared by `close` and the deferred closes (`ConnInfo::closing`).
#[inline(never)]
pub fn close(tgid: u32, fd: u32, sk: u64, verdict: u32, ts: u64) {
    let key = conn_key(tgid, fd);
    lru_remove(&CONNS, LRU_CONNS, &key);
    // Per-connection state of the trace-context code goes with the connection.
    lru_remove(&BODY_LEFT, LRU_BODY_LEFT, &key);
    lru_remove(&CONNECT_REFS, LRU_CONNECT_REFS, &key);
    if sk != 0 {
        // A request still open on this connection no longer counts on its thread.
        crate::propagate::inflight::close(sk);
        lru_remove(&SERVER_REQS, LRU_SERVER_REQS, &sk);
    }
    if verdict != VERDICT_TRACE && verdict != agent_common::VERDICT_TLS {
        return;
    }
    let ev = CloseEvent {
        kind: EVENT_CLOSE,
        pid: tgid,
        fd,
        _pad: 0,
        sk,
        ts,
    };
    if EVENTS
        .output::<CloseEvent>(&ev, crate::maps::ring_flags())
        .is_err()
    {
        count(agent_common::CNT_CLOSE_RINGBUF_FULL);
    }
}

/// A connection on `fd` whose close waits for a TLS call (`ConnInfo::closing`) is closed now:
/// the fd number names a new socket.
#[inline(always)]
pub fn close_pending(tgid: u32, fd: u32) {
    let Some(c) = CONNS.get_ptr(&conn_key(tgid, fd)) else {
        return;
    };
    // SAFETY: fields of a live map value, copied before its removal.
    let (closing, sk, verdict) = unsafe { ((*c).closing, (*c).sk, (*c).verdict) };
    if closing != 0 {
        close(tgid, fd, sk, verdict, closing);
    }
}

/// A task exits: its thread's request list goes, and when the whole process is gone its pid
/// leaves the allow-list, so a process that later reuses the pid is not traced.
/// Format: `bool group_dead` @32.
#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    lru_remove(&THREAD_REQS, LRU_THREAD_REQS, &(pid_tgid as u32));
    tls_calls_cut(pid_tgid);
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

/// The exiting thread's TLS call, if one was under way: an OpenSSL call by thread, a Go call by
/// the goroutine the thread ran (`r14` in its saved user registers). Its note goes (a thread's
/// would otherwise stay until the thread id is reused). A write whose syscalls had sent bytes
/// never reaches its return probe, so its plaintext is never sent: counted
/// (`CNT_TLS_WRITES_CUT_BY_EXIT`). A close that waited for the call (`tls::settle`) happens.
#[inline(always)]
fn tls_calls_cut(pid_tgid: u64) {
    let tgid = (pid_tgid >> 32) as u32;
    let cut = |c: &agent_common::TlsCall| {
        if c.dir == agent_common::DIR_EGRESS && c.ts_io != 0 {
            count(agent_common::CNT_TLS_WRITES_CUT_BY_EXIT);
        }
        if c.state & agent_common::TLS_BUSY != 0 {
            crate::tls::settle(tgid, c.fd, c.sk, c.dir);
        }
    };
    // SAFETY: copied out of a live map value.
    if let Some(c) = TLS_CALLS.get_ptr(&pid_tgid).map(|c| unsafe { *c }) {
        let _ = TLS_CALLS.remove(&pid_tgid);
        cut(&c);
        return;
    }
    if crate::propagate::task::runtime_of(tgid) != Some(agent_common::RUNTIME_GO) {
        return;
    }
    let Some(g) = crate::regs::user_r14() else {
        return;
    };
    let key = crate::tls::ssl_key(tgid, g);
    // SAFETY: copied out of a live map value.
    if let Some(c) = GO_TLS_CALLS.get_ptr(&key).map(|c| unsafe { *c }) {
        let _ = GO_TLS_CALLS.remove(&key);
        cut(&c);
    }
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
