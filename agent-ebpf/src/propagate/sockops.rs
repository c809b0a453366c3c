//! `sock_ops` on the cgroup v2 root: every outgoing TCP connection, once established, joins the
//! socket map that `sk_msg` watches. Accepted connections never do: nothing is written into
//! what a server sends.
use agent_common::{CNT_SOCKHASH_FULL, FILTER_PORTS};
use aya_ebpf::{
    bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, helpers::generated::bpf_get_socket_cookie,
    macros::sock_ops, programs::SockOpsContext,
};

use crate::maps::{count, global, FILTER_FLAGS, OUT_SOCKS, TRACED_PORTS};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const BPF_ANY: u64 = 0;

#[sock_ops]
pub fn out_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return 1;
    }
    if global(&FILTER_FLAGS) & FILTER_PORTS != 0 {
        // remote_port is in network order; the kernel places it in the upper half of the word.
        let raw = ctx.remote_port();
        let raw = if raw > 0xffff { raw >> 16 } else { raw };
        let remote = u16::from_be(raw as u16);
        let local = ctx.local_port() as u16;
        // SAFETY: values are only tested for presence.
        let traced = unsafe { TRACED_PORTS.get(&remote).is_some() || TRACED_PORTS.get(&local).is_some() };
        if !traced {
            return 1;
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
    }
    1
}
