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
//!   `netFD` offsets, through the wrappers servers put around a `net.TCPConn`: `PATHS`), and
//!   checked: an IPv4 or IPv6 stream socket, else nothing of the call is sent
//!   (`CNT_GO_TLS_UNKNOWN_CONN`). It is trusted once a syscall of the call's goroutine on that
//!   socket has bound the `tls.Conn` to it (the handshake's, or a read's or write's); a read
//!   served from the library's buffer then uses that binding.
//! - The call's syscalls (found by the goroutine in `r14` at the syscall, on this socket only:
//!   `tls::call_on`) do what an OpenSSL call's do (`tls::bind`): the connection's ciphertext is
//!   never parsed as plaintext, and same-host stitching works on its records.
//! - From there on a call is what an OpenSSL call is (`tls::finish`): the same events, HTTP/2
//!   frame walk and in-process evidence, by goroutine.
//! - A read that began before the probes were attached returns without a note: Go clients and
//!   servers always have a goroutine blocked in `Read` on each idle connection. Its bytes are
//!   counted for the goroutine (`GO_TLS_LOST`), and its next read, which names the connection,
//!   first tells userspace how many bytes it never saw (`LAYOUT_LOST`, `tls::finish`), so that
//!   a response it missed is never paired with a later request. The count is dropped when a
//!   read of the goroutine fails or ends (its connection is done), and when its `g` is reused
//!   for a new goroutine (`runtime.newproc1`'s return, `propagate::goroutine`).
use agent_common::{
    TaskKey, TlsCall, CNT_GO_TLS_UNKNOWN_CONN, CNT_STATE_MAP_FULL, DIR_EGRESS, DIR_HANDSHAKE,
    DIR_INGRESS, GO_NETFD_FAMILY, GO_NETFD_SYSFD, GO_TLS_CONN_DATA,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_ktime_get_boot_ns},
    macros::uprobe,
    programs::ProbeContext,
};

use crate::maps::{count, process_traced, GO_TLS_CALLS, GO_TLS_LOST, TLS_SOCKS};

const AF_INET: i64 = 2;
const AF_INET6: i64 = 10;
const SOCK_STREAM: i64 = 1;

#[inline(always)]
fn task_key(tgid: u32, ptr: u64) -> TaskKey {
    TaskKey { ptr, tgid, _pad: 0 }
}

/// Where a `net.TCPConn` may sit behind the `net.Conn` a `tls.Conn` wraps: the words to follow
/// from the interface's data pointer, each the first (a struct embedding a pointer, such as
/// etcd's `keepAliveConn{*net.TCPConn}`) or the second (a struct embedding an interface, such
/// as `limitListenerConn{net.Conn, ...}`) word of what the last one points to. `u8::MAX` ends a
/// path; the first path is a bare `*net.TCPConn`.
const PATHS: [[u8; 2]; 7] = [
    [u8::MAX, u8::MAX],
    [0, u8::MAX],
    [1, u8::MAX],
    [0, 0],
    [1, 0],
    [0, 1],
    [1, 1],
];

/// The socket fd of the `*tls.Conn` at `conn`: the first path (`PATHS`) that leads to a
/// `netFD` of an IPv4 or IPv6 stream socket. A wrong guess cannot send data for another
/// connection: a call's bytes are sent only once a syscall of its goroutine on this fd bound
/// it (`tls::finish`).
#[inline(always)]
fn socket_of(conn: u64) -> Option<u32> {
    // SAFETY: user memory through the fault-tolerant helper, at every step.
    let data: u64 = unsafe { bpf_probe_read_user((conn + GO_TLS_CONN_DATA) as *const u64) }.ok()?;
    for path in PATHS {
        let mut p = data;
        for step in path {
            if step == u8::MAX {
                break;
            }
            // SAFETY: as above.
            p = unsafe { bpf_probe_read_user((p + 8 * step as u64) as *const u64) }.unwrap_or(0);
        }
        if p == 0 {
            continue;
        }
        // SAFETY: as above.
        if let Some(fd) = unsafe { netfd_socket(p) } {
            return Some(fd);
        }
    }
    None
}

/// The fd of the `net.TCPConn` at `tcp` (its first word is its `*netFD`), if it is one.
///
/// # Safety
/// Reads user memory only through the fault-tolerant helper.
#[inline(always)]
unsafe fn netfd_socket(tcp: u64) -> Option<u32> {
    let netfd: u64 = bpf_probe_read_user(tcp as *const u64).ok()?;
    let [family, sotype] =
        bpf_probe_read_user((netfd + GO_NETFD_FAMILY) as *const [i64; 2]).ok()?;
    if (family != AF_INET && family != AF_INET6) || sotype != SOCK_STREAM {
        return None;
    }
    let sysfd: i64 = bpf_probe_read_user((netfd + GO_NETFD_SYSFD) as *const i64).ok()?;
    if !(0..=i32::MAX as i64).contains(&sysfd) {
        return None;
    }
    Some(sysfd as u32)
}

#[inline(always)]
fn enter(ctx: &ProbeContext, dir: u32) -> u32 {
    if dir == DIR_HANDSHAKE {
        // SAFETY: as below.
        let (conn, g) = unsafe { ((*ctx.regs).rax, (*ctx.regs).r14) };
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        // Inside a `Read` or `Write` of this `tls.Conn` that runs the handshake: that call
        // binds. A note of the goroutine for another `tls.Conn` is one whose return was never
        // seen (the `g` reused): this handshake replaces it, so that its syscalls bind.
        // SAFETY: copied out of a live map value.
        if GO_TLS_CALLS
            .get_ptr(&task_key(tgid, g))
            .map(|c| unsafe { (*c).ssl })
            == Some(conn)
        {
            return 0;
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
    let [lost, lost_ts] = if dir == DIR_INGRESS {
        // SAFETY: copied out of a live map value.
        GO_TLS_LOST
            .get_ptr(&task_key(tgid, g))
            .map_or([0, 0], |b| unsafe { *b })
    } else {
        [0, 0]
    };
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
        lost,
        lost_ts,
        sk: 0,
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
            let [before, _] = GO_TLS_LOST.get_ptr(&key).map_or([0, 0], |b| unsafe { *b });
            // SAFETY: helper without preconditions.
            let now = unsafe { bpf_ktime_get_boot_ns() };
            if GO_TLS_LOST
                .insert(&key, &[before + n as u64, now], 0)
                .is_err()
            {
                count(CNT_STATE_MAP_FULL);
            }
        }
        return 0;
    };
    // SAFETY: live map value, copied before removal.
    let call = unsafe { *noted };
    let _ = GO_TLS_CALLS.remove(&key);
    if n <= 0 && dir == DIR_INGRESS {
        // The connection failed or ended: unseen bytes of it concern no later read.
        let _ = GO_TLS_LOST.remove(&key);
    }
    let walk = crate::tls::complete(&call, pid_tgid, n.max(0) as u64);
    crate::tls::walk_h2(ctx, walk);
    0
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
