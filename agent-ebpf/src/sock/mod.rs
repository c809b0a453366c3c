//! `sock:sock_send_length` / `sock:sock_recv_length` fire inside `sock_sendmsg`/`sock_recvmsg`, in
//! the task that made the data syscall, with the socket, its family and protocol. That tells us,
//! with no kprobe, whether the syscall in flight is on a TCP socket, including sockets opened
//! before the agent started.
//!
//! Format: `void *sk` @8, `__u16 family` @16, `__u16 protocol` @18, `int ret` @20, `int flags` @24.
//! Addresses come from `struct sock_common`: `skc_daddr` @0, `skc_rcv_saddr` @4, `skc_dport` @12
//! (big endian), `skc_num` @14 (host order), `skc_v6_daddr` @56, `skc_v6_rcv_saddr` @72. These
//! offsets have been stable across 5.x and 6.x kernels; `agent check` compares them with BTF.
#[allow(unused_imports)]
use crate::maps::lru::*;
use agent_common::{
    head_scan, ConnTuple, EndpointKey, H2Walk, IoArgs, ANY_ADDR, BUF_IOVEC, DIR_EGRESS,
    DIR_INGRESS, FILTER_PORTS, H2_PREFACE_LEN, PROTO_H2, PROTO_HTTP1, ROLE_SERVER, ROLE_UNKNOWN,
    VERDICT_IGNORE, VERDICT_TRACE,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_kernel_buf,
        bpf_probe_read_user,
    },
    macros::tracepoint,
    programs::TracePointContext,
};

mod late;

use crate::maps::{
    conn_key, count, global, ACTIVE_IO, CONNS, EXCLUDED_ENDPOINTS, FILTER_FLAGS, TRACED_PORTS,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;

#[tracepoint]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    on_syscall(&ctx, true);
    0
}

#[tracepoint]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    on_syscall(&ctx, false);
    0
}

#[inline(always)]
fn on_syscall(ctx: &TracePointContext, send: bool) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let io = match ACTIVE_IO.get_ptr_mut(&pid_tgid) {
        Some(io) => io,
        None => {
            // A syscall that began before the agent attached (a thread blocked in read on a
            // keep-alive connection): recover its arguments from the saved user registers.
            if !crate::maps::process_traced((pid_tgid >> 32) as u32) {
                return;
            }
            let Some(args) = late::args(send) else { return };
            if ACTIVE_IO.insert(&pid_tgid, &args, 0).is_err() {
                count(agent_common::CNT_ACTIVE_IO_FULL);
                return;
            }
            let Some(io) = ACTIVE_IO.get_ptr_mut(&pid_tgid) else {
                return;
            };
            io
        }
    };
    // SAFETY: tracepoint fields at offsets from the format file; `io` is a live map value.
    let (sk, family, protocol, ret, flags) = unsafe {
        (
            ctx.read_at::<u64>(8).unwrap_or(0),
            ctx.read_at::<u16>(16).unwrap_or(0),
            ctx.read_at::<u16>(18).unwrap_or(0),
            ctx.read_at::<i32>(20).unwrap_or(0),
            ctx.read_at::<u32>(24).unwrap_or(0),
        )
    };
    let io = unsafe { &mut *io };
    classify(io, pid_tgid, sk, family, protocol);
    if protocol == IPPROTO_TCP && (family == AF_INET || family == AF_INET6) {
        // Inside an OpenSSL call: this socket carries its records.
        crate::tls::bind(io, pid_tgid, sk, ret, flags);
    }
    if io.verdict == VERDICT_TRACE && ret > 0 {
        h2_opening(io, pid_tgid, send, ret as u64);
    }
    if !send && io.verdict == VERDICT_TRACE {
        crate::propagate::stitch::received(io, sk, ret, flags);
        if io.g == 0 {
            // The task reading: Go's goroutine, or the tokio task being polled.
            match crate::propagate::task::runtime_of((pid_tgid >> 32) as u32) {
                Some(agent_common::RUNTIME_GO) => io.g = crate::regs::user_r14().unwrap_or(0),
                Some(agent_common::RUNTIME_TOKIO) => {
                    io.g = crate::propagate::tokio::polling(pid_tgid)
                }
                _ => {}
            }
        }
    }
}

/// `skc_family` of a socket (`struct sock_common` @16).
#[inline(always)]
pub fn family(sk: u64) -> u16 {
    // SAFETY: fault-tolerant kernel read.
    unsafe { bpf_probe_read_kernel((sk + 16) as *const u16) }.unwrap_or(0)
}

/// Decides once per syscall whether the socket `sk` it is on is traced (`io.verdict`), keeping
/// the answer per connection in `CONNS`. A subprogram of its own: inlined, its locals and the
/// spills they cause took the syscall exits past the 512-byte stack their callees share.
#[inline(never)]
pub fn classify(io: &mut IoArgs, pid_tgid: u64, sk: u64, family: u16, protocol: u16) {
    if io.sk != 0 || sk == 0 {
        return;
    }
    io.sk = sk;
    let tgid = (pid_tgid >> 32) as u32;
    let key = conn_key(tgid, io.fd);
    let mut role = ROLE_UNKNOWN;
    if let Some(c) = CONNS.get_ptr(&key) {
        // SAFETY: live map value, read in place (a copy would cost this program's stack, which
        // the callees it shares the 512-byte budget with need).
        let c = unsafe { &*c };
        if c.sk == sk {
            io.verdict = c.verdict;
            return;
        }
        if c.sk == 0 {
            role = c.role; // set by accept/connect, first data on this socket
        }
        if c.closing != 0 {
            crate::conn::close_pending(tgid, io.fd);
        }
    }
    let Some(info) = crate::maps::CONN_NEW.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot, filled field by field and inserted before return.
    let info = unsafe { &mut *info };
    info.sk = sk;
    info.role = role;
    info.verdict = VERDICT_IGNORE;
    info.tuple = ConnTuple::default();
    info.opening = 0;
    info.proto = agent_common::PROTO_HTTP1;
    info.h2 = [agent_common::H2Walk::default(); 2];
    info.tls_busy = [0; 2];
    info.closing = 0;
    if (family == AF_INET || family == AF_INET6) && protocol == IPPROTO_TCP {
        if read_tuple(sk, family, &mut info.tuple).is_ok() && wanted(&info.tuple) {
            info.verdict = VERDICT_TRACE;
            // Seen from accept or connect: its first bytes decide whether it is HTTP.
            info.opening = (role != ROLE_UNKNOWN) as u32;
        }
    }
    io.verdict = info.verdict;
    if lru_insert(&CONNS, LRU_CONNS, CAP_CONNS, &key, info).is_err() {
        count(agent_common::CNT_CONNS_FULL);
    }
}

/// A subprogram of its own, beside `classify`'s frame. Addresses are read straight into `t`
/// (a map value) and unmapped in place: copies through the stack cost the frame its budget.
#[inline(never)]
fn read_tuple(sk: u64, family: u16, t: &mut ConnTuple) -> Result<(), i64> {
    // SAFETY: kernel reads through the fault-tolerant helper.
    unsafe {
        let ports = bpf_probe_read_kernel((sk + 12) as *const u32).map_err(|e| e as i64)?;
        t.peer_port = u16::from_be((ports & 0xffff) as u16);
        t.local_port = (ports >> 16) as u16;
        t.family = family;
        if family == AF_INET {
            bpf_probe_read_kernel_buf(sk as *const u8, &mut t.peer_addr[..4])?;
            bpf_probe_read_kernel_buf((sk + 4) as *const u8, &mut t.local_addr[..4])?;
        } else {
            bpf_probe_read_kernel_buf((sk + 56) as *const u8, &mut t.peer_addr)?;
            bpf_probe_read_kernel_buf((sk + 72) as *const u8, &mut t.local_addr)?;
            // A dual-stack socket speaking IPv4 (`::ffff:a.b.c.d` on both ends) is recorded as
            // IPv4, once per connection, so both ends of a connection name it alike.
            if v4_mapped(&t.peer_addr) && v4_mapped(&t.local_addr) {
                t.family = AF_INET;
                unmap(&mut t.peer_addr);
                unmap(&mut t.local_addr);
            }
        }
    }
    Ok(())
}

#[inline(always)]
fn v4_mapped(a: &[u8; 16]) -> bool {
    a[..10].iter().all(|&b| b == 0) && a[10] == 0xff && a[11] == 0xff
}

/// `::ffff:a.b.c.d` becomes `a.b.c.d` followed by zeros.
#[inline(always)]
fn unmap(a: &mut [u8; 16]) {
    a.copy_within(12..16, 0);
    a[4..].fill(0);
}

/// Port filter and the excluded OTLP endpoints, checked once per connection.
#[inline(always)]
pub fn wanted(t: &ConnTuple) -> bool {
    if global(&FILTER_FLAGS) & FILTER_PORTS != 0 {
        // SAFETY: presence tests only.
        let hit = unsafe {
            TRACED_PORTS.get(&t.local_port).is_some() || TRACED_PORTS.get(&t.peer_port).is_some()
        };
        if !hit {
            return false;
        }
    }
    !(excluded(t.peer_addr, t.peer_port) || excluded(t.local_addr, t.local_port))
}

#[inline(always)]
fn excluded(addr: [u8; 16], port: u16) -> bool {
    let exact = EndpointKey {
        addr,
        port,
        _pad: [0; 6],
    };
    let any = EndpointKey {
        addr: ANY_ADDR,
        port,
        _pad: [0; 6],
    };
    // SAFETY: presence tests only.
    unsafe { EXCLUDED_ENDPOINTS.get(&exact).is_some() || EXCLUDED_ENDPOINTS.get(&any).is_some() }
}

/// A connection seen from its start whose client opens with the HTTP/2 preface: from this
/// syscall on, the kernel walks its frames (`h2walk`) instead of copying prefixes. Looked at
/// here, where the bytes are already in the buffer (after a receive, before a send returns),
/// because the data-syscall exits have no verifier budget left for it.
#[inline(always)]
fn h2_opening(io: &IoArgs, pid_tgid: u64, send: bool, moved: u64) {
    let Some(c) = CONNS.get_ptr_mut(&conn_key((pid_tgid >> 32) as u32, io.fd)) else {
        return;
    };
    // SAFETY: live map value, used in place.
    let c = unsafe { &mut *c };
    if c.opening == 0 || c.proto != PROTO_HTTP1 || c.sk != io.sk || moved < 24 {
        return;
    }
    // The client's bytes: a server receiving, a client sending.
    if (c.role == ROLE_SERVER) == send {
        return;
    }
    let base = if io.buf_kind == BUF_IOVEC {
        // SAFETY: the first struct iovec, read from user memory.
        match unsafe { bpf_probe_read_user(io.buf as *const [u64; 2]) } {
            Ok(v) if v[1] >= 24 => v[0],
            _ => return,
        }
    } else {
        io.buf
    };
    // SAFETY: user memory through the fault-tolerant helper.
    let Ok(words) = (unsafe { bpf_probe_read_user(base as *const [u64; 3]) }) else {
        return;
    };
    if head_scan::is_h2_preface_words(words, moved as usize) {
        c.proto = PROTO_H2;
        c.opening = 0;
        c.h2 = [H2Walk::default(); 2];
        let client = if send { DIR_EGRESS } else { DIR_INGRESS };
        c.h2[(client & 1) as usize].keep = H2_PREFACE_LEN;
    }
}
