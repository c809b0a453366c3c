//! `sock_ops` on the cgroup v2 root (header mode only, opt-in): every outgoing TCP connection of
//! a selected process, once established, joins the socket map that `sk_msg` watches. Accepted connections never do: nothing is written into
//! what a server sends.
//!
//! A socket in a socket map reads through the kernel's `tcp_bpf_recvmsg`, which on this kernel
//! returns a spurious EAGAIN to a *blocking* `recv` woken by send-buffer space (measured: a
//! Python client that sends 4 MB and then blocks in `recv` fails every time). Only a sender that
//! filled its send buffer gets such wakeups, so `sk_msg` marks a connection that sends or
//! announces a large body, and its next acknowledgement takes it out of the map, while its sender
//! is still sending, before it can block in `recv`. That connection gets no more injection
//! (counted); its bytes and its program are never disturbed.
#[allow(unused_imports)]
use crate::maps::lru::*;
use agent_common::{CNT_SOCKHASH_FULL, CNT_SOCK_RELEASED, FILTER_PORTS};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_socket_cookie, bpf_map_delete_elem},
    },
    macros::sock_ops,
    programs::SockOpsContext,
};

use crate::maps::{
    count, global, process_traced, SockKey, CONNECTING, FILTER_FLAGS, LARGE_SENDS, OUT_SOCKS,
    TRACED_PORTS,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const BPF_ANY: u64 = 0;
#[sock_ops]
pub fn out_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => connecting(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(&ctx),
        BPF_SOCK_OPS_RTT_CB => acked(&ctx),
        _ => {}
    }
    1
}

/// The key `sk_msg` marks a connection under (see `skmsg::mark_large`).
#[inline(always)]
fn key(ctx: &SockOpsContext) -> SockKey {
    // SAFETY: fields of this call's `bpf_sock_ops`.
    let o = unsafe { &*ctx.ops };
    let rp = o.remote_port;
    SockKey {
        local_port: o.local_port,
        remote_port: if rp > 0xffff { rp >> 16 } else { rp },
        remote_ip4: o.remote_ip4,
        remote_ip6_last: o.remote_ip6[3],
    }
}

#[inline(always)]
fn acked(ctx: &SockOpsContext) {
    let key = key(ctx);
    // SAFETY: presence test only.
    if unsafe { LARGE_SENDS.get(&key) }.is_none() {
        return;
    }
    lru_remove(&LARGE_SENDS, LRU_LARGE_SENDS, &key);
    // SAFETY: the context is the sock_ops argument the helper expects.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
    // SAFETY: deleting by key from our own map; allowed in sock_ops.
    let r = unsafe {
        bpf_map_delete_elem(
            core::ptr::addr_of!(OUT_SOCKS) as *mut _,
            &cookie as *const u64 as *const _,
        )
    };
    let _ = ctx.set_cb_flags(0);
    if r == 0 {
        count(CNT_SOCK_RELEASED);
    }
}

/// `connect` runs in the connecting task: only connections of selected processes are
/// remembered, and only those join the socket map once established (which runs in softirq,
/// where the process is unknown). Nothing of an unselected process ever goes through `tcp_bpf`.
#[inline(always)]
fn connecting(ctx: &SockOpsContext) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !process_traced(tgid) {
        return;
    }
    // SAFETY: the context is the sock_ops argument the helper expects.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
    if lru_insert(&CONNECTING, LRU_CONNECTING, CAP_CONNECTING, &cookie, &1).is_err() {
        count(agent_common::CNT_STATE_MAP_FULL);
    }
}

#[inline(always)]
fn established(ctx: &SockOpsContext) {
    {
        // SAFETY: the context is the sock_ops argument the helper expects.
        let selected = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
        // SAFETY: presence test only.
        if unsafe { CONNECTING.get(&selected) }.is_none() {
            return;
        }
        lru_remove(&CONNECTING, LRU_CONNECTING, &selected);
        let family = ctx.family();
        if family != AF_INET && family != AF_INET6 {
            return;
        }
        if global(&FILTER_FLAGS) & FILTER_PORTS != 0 {
            // remote_port is in network order; the kernel places it in the upper half of the word.
            let raw = ctx.remote_port();
            let raw = if raw > 0xffff { raw >> 16 } else { raw };
            let remote = u16::from_be(raw as u16);
            let local = ctx.local_port() as u16;
            // SAFETY: values are only tested for presence.
            let traced = unsafe {
                TRACED_PORTS.get(&remote).is_some() || TRACED_PORTS.get(&local).is_some()
            };
            if !traced {
                return;
            }
        }
        // SAFETY: the context is the sock_ops argument the helper expects.
        let mut cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
        // SAFETY: `ctx.ops` is the live `bpf_sock_ops` of this call.
        if OUT_SOCKS
            .update(&mut cookie, unsafe { &mut *ctx.ops }, BPF_ANY)
            .is_err()
        {
            count(CNT_SOCKHASH_FULL);
            return;
        }
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_RTT_CB_FLAG as i32);
    }
}
