//! The TCP-option carrier (`--inject tcp-option`, opt-in): the context that same-host stitching
//! records for a request start also rides, in an experimental TCP option (RFC 6994, kind 254),
//! on the segment that holds the request's first byte, so a receiver on another host running
//! the agent can record it under the same key and claim it exactly as a local one would. No
//! payload byte changes and there is no socket map.
//!
//! - Sender: `BPF_SOCK_OPS_TCP_CONNECT_CB` runs in the connecting task; a selected process's
//!   connection to a non-loopback peer gets `WRITE_HDR_OPT` callbacks. For each segment sent,
//!   `HDR_OPT_LEN_CB` reserves room only when a stitching record exists at the segment's first
//!   sequence number (`snd_nxt` for new data) and the payload plus the option still fits in the
//!   MSS the segment was cut for; otherwise nothing is reserved, so no segment ever grows past
//!   the path MTU and every other segment is unchanged. `WRITE_HDR_OPT_CB` checks the written
//!   header's sequence number against the record, writes the option, and drops the local record
//!   (the option carries it now). A retransmission carries no option.
//! - Receiver: accepted connections get `PARSE_UNKNOWN_HDR_OPT` callbacks, which run only for a
//!   segment with an option the kernel does not know, before its bytes are queued to the
//!   reader. The option becomes a stitching record keyed by the segment's sequence number.
//!
//! Option layout (28 bytes: what remains of the 40 after timestamps): kind 254, length 28, a
//! 16-bit experiment id (one for sampled, one for not sampled), trace id (16), span id (8).
#[allow(unused_imports)]
use crate::maps::lru::*;
use agent_common::{
    FlowSeq, WireCtx, CNT_TCPOPT_NO_ROOM, CNT_TCPOPT_RECEIVED, CNT_TCPOPT_WRITTEN,
    TCPOPT_EXID_SAMPLED, TCPOPT_EXID_UNSAMPLED, TCPOPT_KIND, TCPOPT_LEN, WIRE_CARRIED,
    WIRE_VIA_TCPOPT,
};
use aya_ebpf::{
    bindings::{
        bpf_sock_ops, BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_PARSE_HDR_OPT_CB,
        BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
    },
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_load_hdr_opt, bpf_reserve_hdr_opt, bpf_store_hdr_opt},
    },
    macros::sock_ops,
    programs::SockOpsContext,
};

use crate::maps::{count, global, process_traced, STITCH, TCPOPT_LOOPBACK};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const TCP_SYN: u32 = 0x02;

#[sock_ops]
pub fn tcp_option(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => connecting(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let _ = ctx
                .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => reserve(&ctx),
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB => write(&ctx),
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB => parse(&ctx),
        _ => {}
    }
    1
}

/// An IPv6 address field of the context, read word by word at fixed offsets (the verifier
/// refuses context reads at computed ones).
#[inline(always)]
fn ip6(a: &[u32; 4]) -> [u32; 4] {
    // SAFETY: reads of this call's context fields.
    unsafe {
        [
            core::ptr::read_volatile(&a[0]),
            core::ptr::read_volatile(&a[1]),
            core::ptr::read_volatile(&a[2]),
            core::ptr::read_volatile(&a[3]),
        ]
    }
}

#[inline(always)]
fn v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == u32::from_be(0xffff)
}

/// The connection's addresses as `sock::read_tuple` records them (IPv4 and v4-mapped addresses
/// in the first four bytes), local side first.
#[inline(always)]
fn addrs(o: &bpf_sock_ops) -> Option<([u8; 16], [u8; 16])> {
    let mut local = [0u8; 16];
    let mut remote = [0u8; 16];
    let family = o.family;
    if family == AF_INET {
        local[..4].copy_from_slice(&o.local_ip4.to_ne_bytes());
        remote[..4].copy_from_slice(&o.remote_ip4.to_ne_bytes());
        return Some((local, remote));
    }
    if family != AF_INET6 {
        return None;
    }
    let (l, r) = (ip6(&o.local_ip6), ip6(&o.remote_ip6));
    if v4_mapped(&l) && v4_mapped(&r) {
        local[..4].copy_from_slice(&l[3].to_ne_bytes());
        remote[..4].copy_from_slice(&r[3].to_ne_bytes());
        return Some((local, remote));
    }
    let mut i = 0;
    while i < 4 {
        local[i * 4..i * 4 + 4].copy_from_slice(&l[i].to_ne_bytes());
        remote[i * 4..i * 4 + 4].copy_from_slice(&r[i].to_ne_bytes());
        i += 1;
    }
    Some((local, remote))
}

#[inline(always)]
fn remote_port(o: &bpf_sock_ops) -> u16 {
    // Network order; the kernel places it in the upper half of the word.
    let raw = o.remote_port;
    u16::from_be((if raw > 0xffff { raw >> 16 } else { raw }) as u16)
}

/// The stitching key of a request start at `seq` on this connection, seen from its client
/// (`outgoing`: this socket is the client).
#[inline(always)]
fn key(o: &bpf_sock_ops, outgoing: bool, seq: u32) -> Option<FlowSeq> {
    let (local, remote) = addrs(o)?;
    let (lp, rp) = (o.local_port as u16, remote_port(o));
    Some(if outgoing {
        FlowSeq {
            client_addr: local,
            server_addr: remote,
            client_port: lp,
            server_port: rp,
            seq,
        }
    } else {
        FlowSeq {
            client_addr: remote,
            server_addr: local,
            client_port: rp,
            server_port: lp,
            seq,
        }
    })
}

/// Whether the peer is this host's loopback (127.0.0.0/8, ::1, or v4-mapped 127/8).
#[inline(always)]
fn loopback(o: &bpf_sock_ops) -> bool {
    if o.family == AF_INET {
        return o.remote_ip4.to_ne_bytes()[0] == 127;
    }
    let r = ip6(&o.remote_ip6);
    if v4_mapped(&r) {
        return r[3].to_ne_bytes()[0] == 127;
    }
    r[0] == 0 && r[1] == 0 && r[2] == 0 && r[3] == u32::from_be(1)
}

/// A selected process connects: its requests to a peer on another host may carry the option.
#[inline(always)]
fn connecting(ctx: &SockOpsContext) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !process_traced(tgid) {
        return;
    }
    // SAFETY: fields of this call's `bpf_sock_ops`.
    let o = unsafe { &*ctx.ops };
    if loopback(o) && global(&TCPOPT_LOOPBACK) == 0 {
        return; // same-host stitching covers it, with no option
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
}

/// Room for the option, only on a data segment that starts a recorded request and still fits
/// within the MSS with it.
#[inline(always)]
fn reserve(ctx: &SockOpsContext) {
    // SAFETY: fields of this call's `bpf_sock_ops`.
    let o = unsafe { &*ctx.ops };
    // No skb (the MSS computation), a pure ACK, or a SYN: never.
    if o.skb_len == 0 || o.skb_tcp_flags & TCP_SYN != 0 {
        return;
    }
    let Some(k) = key(o, true, o.snd_nxt) else {
        return;
    };
    // SAFETY: presence test only.
    if unsafe { STITCH.get(&k) }.is_none() {
        return;
    }
    if o.skb_len + TCPOPT_LEN as u32 > o.mss_cache {
        count(CNT_TCPOPT_NO_ROOM);
        return;
    }
    // SAFETY: the sock_ops context this callback was given.
    if unsafe { bpf_reserve_hdr_opt(ctx.ops, TCPOPT_LEN as u32, 0) } != 0 {
        count(CNT_TCPOPT_NO_ROOM);
    }
}

/// The TCP sequence number in the header of the segment this callback is about.
#[inline(always)]
fn header_seq(o: &bpf_sock_ops) -> Option<u32> {
    // SAFETY: the packet pointers of this callback (the TCP header), bounds-checked.
    unsafe {
        let data = o.__bindgen_anon_3.skb_data as usize;
        let end = o.__bindgen_anon_4.skb_data_end as usize;
        if data + 8 > end {
            return None;
        }
        Some(u32::from_be(core::ptr::read_unaligned(
            (data + 4) as *const u32,
        )))
    }
}

#[inline(always)]
fn write(ctx: &SockOpsContext) {
    // SAFETY: fields of this call's `bpf_sock_ops`.
    let o = unsafe { &*ctx.ops };
    if o.skb_tcp_flags & TCP_SYN != 0 {
        return;
    }
    let Some(seq) = header_seq(o) else {
        return;
    };
    let Some(k) = key(o, true, seq) else {
        return;
    };
    let Some(w) = STITCH.get_ptr(&k) else {
        return; // room reserved for a segment that no longer starts the request: NOPs
    };
    let mut opt = [0u8; TCPOPT_LEN];
    opt[0] = TCPOPT_KIND;
    opt[1] = TCPOPT_LEN as u8;
    // SAFETY: live map value, copied out.
    let w = unsafe { &*w };
    let exid = if w.flags & 1 != 0 {
        TCPOPT_EXID_SAMPLED
    } else {
        TCPOPT_EXID_UNSAMPLED
    };
    opt[2..4].copy_from_slice(&exid.to_be_bytes());
    opt[4..20].copy_from_slice(&w.trace_id);
    opt[20..28].copy_from_slice(&w.span_id);
    // SAFETY: the sock_ops context and a stack buffer of the stated length.
    if unsafe { bpf_store_hdr_opt(ctx.ops, opt.as_ptr() as *const _, TCPOPT_LEN as u32, 0) } != 0 {
        count(CNT_TCPOPT_NO_ROOM);
        return;
    }
    count(CNT_TCPOPT_WRITTEN);
    // The option carries the context now; a receiver on this host records it from the option.
    lru_remove(&STITCH, LRU_STITCH, &k);
}

/// Reads our option from a received segment, if it has one, into a stitching record.
#[inline(always)]
fn parse(ctx: &SockOpsContext) {
    // SAFETY: fields of this call's `bpf_sock_ops`.
    let o = unsafe { &*ctx.ops };
    let mut opt = [0u8; TCPOPT_LEN];
    let mut sampled = true;
    if !load(ctx, &mut opt, TCPOPT_EXID_SAMPLED) {
        if !load(ctx, &mut opt, TCPOPT_EXID_UNSAMPLED) {
            return;
        }
        sampled = false;
    }
    let mut w = WireCtx {
        kind: WIRE_CARRIED,
        flags: sampled as u8,
        ..WireCtx::default()
    };
    w.trace_id.copy_from_slice(&opt[4..20]);
    w.span_id.copy_from_slice(&opt[20..28]);
    if w.trace_id == [0; 16] || w.span_id == [0; 8] {
        return;
    }
    w.via = WIRE_VIA_TCPOPT;
    let Some(seq) = header_seq(o) else {
        return;
    };
    let Some(k) = key(o, false, seq) else {
        return;
    };
    if lru_insert(&STITCH, LRU_STITCH, CAP_STITCH, &k, &w).is_ok() {
        count(CNT_TCPOPT_RECEIVED);
    } else {
        count(agent_common::CNT_STITCH_FULL);
    }
}

/// Searches the received header for option kind 254 with experiment id `exid`; true when one of
/// exactly our length was copied into `opt`.
#[inline(always)]
fn load(ctx: &SockOpsContext, opt: &mut [u8; TCPOPT_LEN], exid: u16) -> bool {
    opt[0] = TCPOPT_KIND;
    opt[1] = 4; // search by kind and a 2-byte experiment id
    opt[2..4].copy_from_slice(&exid.to_be_bytes());
    // SAFETY: the sock_ops context and a stack buffer of the stated length.
    let n = unsafe { bpf_load_hdr_opt(ctx.ops, opt.as_mut_ptr() as *mut _, TCPOPT_LEN as u32, 0) };
    n == TCPOPT_LEN as i64 && opt[1] == TCPOPT_LEN as u8
}
