//! Go `crypto/tls`: the plaintext of a Go program's TLS connections, from `(*Conn).Read` and
//! `(*Conn).Write`.
//!
//! - Go's register ABI (1.17 and later, x86-64): the receiver is in `rax`, the `[]byte`
//!   argument in `rbx` (pointer) and `rcx` (length), the `int` result in `rax` at return, and
//!   the running goroutine's `g` in `r14` throughout.
//! - The return is probed at each of the function's return instructions, never with a
//!   uretprobe: Go moves goroutine stacks, and a rewritten return address would crash the
//!   program. A goroutine can move between threads inside the call (it parks when its socket has
//!   nothing to read), so the call is noted by goroutine (`GO_TLS_CALLS`) and found again by
//!   the `g` at return.
//! - The socket is read from the `tls.Conn` at entry (`agent_common::GO_TLS_CONN_DATA` and the
//!   `netFD` offsets), and checked: an IPv4 or IPv6 stream socket, else nothing of the call is
//!   sent (`CNT_GO_TLS_UNKNOWN_CONN`). No syscall has to bind the call, so a read served from
//!   the library's buffer is found as well as one that reads.
//! - The call's syscalls (found by the goroutine in `r14` at the syscall, on this socket only:
//!   `tls::call_on`) do what an OpenSSL call's do (`tls::bind`): the connection's ciphertext is
//!   never parsed as plaintext, and same-host stitching works on its records.
//! - From there on a call is what an OpenSSL call is (`tls::finish`): the same events, HTTP/2
//!   frame walk and in-process evidence, by goroutine.
//! - A read that began before the probes were attached returns without a note: Go clients and
//!   servers always have a goroutine blocked in `Read` on each idle connection. Its bytes are
//!   counted for the goroutine (`GO_TLS_LOST`), and its next read, which names the connection,
//!   first tells userspace how many bytes it never saw (`LAYOUT_LOST`), so that a response it
//!   missed is never paired with a later request.
use agent_common::{
    DataHeader, TaskKey, TlsCall, CNT_GO_TLS_UNKNOWN_CONN, CNT_RINGBUF_FULL, CNT_STATE_MAP_FULL,
    DATA_HEADER_SIZE, DIR_EGRESS, DIR_HANDSHAKE, DIR_INGRESS, EVENT_TLS_DATA, GO_NETFD_FAMILY,
    GO_NETFD_SYSFD, GO_TLS_CONN_DATA, LAYOUT_LOST, VERDICT_TLS,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_user,
        generated::{bpf_ktime_get_boot_ns, bpf_ringbuf_output},
    },
    macros::uprobe,
    programs::ProbeContext,
};

use crate::maps::{
    conn_key, count, process_traced, CONNS, EVENTS, GO_TLS_CALLS, GO_TLS_LOST, TLS_SOCKS,
};

const AF_INET: i64 = 2;
const AF_INET6: i64 = 10;
const SOCK_STREAM: i64 = 1;

#[inline(always)]
fn task_key(tgid: u32, ptr: u64) -> TaskKey {
    TaskKey { ptr, tgid, _pad: 0 }
}

/// The socket fd of the `*tls.Conn` at `conn`, if its `net.Conn` is a TCP socket's `netFD`.
#[inline(always)]
fn socket_of(conn: u64) -> Option<u32> {
    // SAFETY: user memory through the fault-tolerant helper, at every step.
    unsafe {
        let data: u64 = bpf_probe_read_user((conn + GO_TLS_CONN_DATA) as *const u64).ok()?;
        let netfd: u64 = bpf_probe_read_user(data as *const u64).ok()?;
        let sysfd: i64 = bpf_probe_read_user((netfd + GO_NETFD_SYSFD) as *const i64).ok()?;
        let [family, sotype] =
            bpf_probe_read_user((netfd + GO_NETFD_FAMILY) as *const [i64; 2]).ok()?;
        if (family != AF_INET && family != AF_INET6) || sotype != SOCK_STREAM {
            return None;
        }
        if !(0..=i32::MAX as i64).contains(&sysfd) {
            return None;
        }
        Some(sysfd as u32)
    }
}

#[inline(always)]
fn enter(ctx: &ProbeContext, dir: u32) -> u32 {
    if dir == DIR_HANDSHAKE {
        // SAFETY: as below.
        let g = unsafe { (*ctx.regs).r14 };
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if GO_TLS_CALLS.get_ptr(&task_key(tgid, g)).is_some() {
            return 0; // inside a `Read` or `Write` that runs the handshake: that call binds
        }
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !process_traced(tgid) {
        return 0;
    }
    // SAFETY: a uprobe's context is the probed task's user registers (Go's register ABI).
    let (conn, buf, len, g) = unsafe {
        let r = &*ctx.regs;
        (r.rax, r.rbx, r.rcx, r.r14)
    };
    if g == 0 || (len == 0 && dir != DIR_HANDSHAKE) {
        return 0;
    }
    let Some(fd) = socket_of(conn) else {
        count(CNT_GO_TLS_UNKNOWN_CONN);
        return 0;
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if dir == DIR_INGRESS {
        // SAFETY: copied out of a live map value.
        if let Some(bytes) = GO_TLS_LOST
            .get_ptr(&task_key(tgid, g))
            .map(|b| unsafe { *b })
        {
            let _ = GO_TLS_LOST.remove(&task_key(tgid, g));
            lost(pid_tgid, fd, bytes, now);
        }
    }
    let call = TlsCall {
        ssl: conn,
        buf,
        out: 0,
        len,
        state: 0,
        _pad: 0,
        wire: agent_common::WireCtx::default(),
        ts_enter: now,
        fd,
        dir,
        ts_io: 0,
        g,
    };
    if GO_TLS_CALLS.insert(&task_key(tgid, g), &call, 0).is_err() {
        count(CNT_STATE_MAP_FULL);
    }
    0
}

/// `(*Conn).Read(c, b []byte) (int, error)` entered.
#[uprobe]
pub fn go_tls_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_INGRESS)
}

/// `(*Conn).Write(c, b []byte) (int, error)` entered.
#[uprobe]
pub fn go_tls_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_EGRESS)
}

/// `(*Conn).handshakeContext(c, ctx)` entered: its syscalls bind the connection before any
/// plaintext moves (a server's first request may arrive with the client's last handshake
/// record, and its `Read` then makes no syscall).
#[uprobe]
pub fn go_tls_handshake(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_HANDSHAKE)
}

/// A return instruction of `handshakeContext` reached.
#[uprobe]
pub fn go_tls_handshake_ret(ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: as in `enter`.
    let key = task_key(tgid, unsafe { (*ctx.regs).r14 });
    // SAFETY: copied out of a live map value.
    if GO_TLS_CALLS.get_ptr(&key).map(|c| unsafe { (*c).dir }) == Some(DIR_HANDSHAKE) {
        let _ = GO_TLS_CALLS.remove(&key);
    }
    0
}

/// A return instruction of `Read` reached: `rax` holds the bytes moved.
#[uprobe]
pub fn go_tls_read_ret(ctx: ProbeContext) -> u32 {
    leave(&ctx, DIR_INGRESS)
}

/// A return instruction of `Write` reached.
#[uprobe]
pub fn go_tls_write_ret(ctx: ProbeContext) -> u32 {
    leave(&ctx, DIR_EGRESS)
}

#[inline(always)]
fn leave(ctx: &ProbeContext, dir: u32) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: as in `enter`.
    let (n, g) = unsafe { ((*ctx.regs).rax as i64, (*ctx.regs).r14) };
    let key = task_key(tgid, g);
    let Some(noted) = GO_TLS_CALLS.get_ptr(&key) else {
        // Begun before the probes: what a read brought is owed to its connection's stream.
        if dir == DIR_INGRESS && n > 0 && process_traced(tgid) {
            // SAFETY: copied out of a live map value.
            let before = GO_TLS_LOST.get_ptr(&key).map_or(0, |b| unsafe { *b });
            if GO_TLS_LOST.insert(&key, &(before + n as u64), 0).is_err() {
                count(CNT_STATE_MAP_FULL);
            }
        }
        return 0;
    };
    // SAFETY: live map value, copied before removal.
    let call = unsafe { *noted };
    let _ = GO_TLS_CALLS.remove(&key);
    if n <= 0 {
        return 0;
    }
    let walk = crate::tls::finish(&call, pid_tgid, n as u64);
    crate::tls::walk_h2(ctx, walk);
    0
}

/// Tells userspace that `bytes` were read on socket `fd` of this process without being seen
/// (`LAYOUT_LOST`), if the connection is one whose plaintext is traced.
#[inline(always)]
fn lost(pid_tgid: u64, fd: u32, bytes: u64, now: u64) {
    let Some(c) = CONNS.get_ptr_mut(&conn_key((pid_tgid >> 32) as u32, fd)) else {
        return;
    };
    // SAFETY: live map value, used in place.
    let c = unsafe { &mut *c };
    if c.verdict != VERDICT_TLS && c.sk != 0 {
        crate::tls::adopt(c);
    }
    if c.verdict != VERDICT_TLS {
        return;
    }
    let header = DataHeader {
        kind: EVENT_TLS_DATA,
        direction: DIR_INGRESS,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        fd,
        captured: 0,
        sk: c.sk,
        len: bytes,
        ts_enter: now,
        ts_exit: now,
        role: c.role,
        layout: LAYOUT_LOST,
        tuple: c.tuple,
        comm: bpf_get_current_comm().unwrap_or_default(),
        wire: agent_common::WireCtx::default(),
    };
    // SAFETY: the header is on this program's stack; the map pointer is the ring buffer.
    let ret = unsafe {
        bpf_ringbuf_output(
            core::ptr::addr_of!(EVENTS) as *mut _,
            &header as *const DataHeader as *mut _,
            DATA_HEADER_SIZE as u64,
            crate::maps::ring_flags(),
        )
    };
    if ret < 0 {
        count(CNT_RINGBUF_FULL);
    }
}

/// `(*Conn).Close(c)` entered: the address may hold another connection's `tls.Conn` next.
#[uprobe]
pub fn go_tls_close(ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: as in `enter`.
    let conn = unsafe { (*ctx.regs).rax };
    let _ = TLS_SOCKS.remove(&task_key(tgid, conn));
    0
}
