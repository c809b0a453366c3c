//! Data syscalls: arguments saved at `sys_enter_*`, payload captured at `sys_exit_*` once the
//! return value says how many bytes moved. Whether the fd is a TCP socket of interest is decided
//! in between by `sock.rs`; everything else (files, pipes, unix sockets) is dropped at exit.
//!
//! Tracepoint layout (`/sys/kernel/tracing/events/syscalls/sys_enter_*/format`): syscall
//! arguments are 8-byte fields from offset 16; `sys_exit_*` has `long ret` at offset 16.
use agent_common::{DIR_EGRESS, DIR_INGRESS};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_ktime_get_boot_ns},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    capture,
    maps::{process_traced, IoArgs, ACTIVE_IO, BUF_IOVEC, BUF_PLAIN},
};

const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const RET: usize = 16;

#[inline(always)]
fn arg(ctx: &TracePointContext, off: usize) -> u64 {
    // SAFETY: offsets come from the syscall tracepoint format.
    unsafe { ctx.read_at::<u64>(off) }.unwrap_or(0)
}

/// The calling thread, when its process may be traced: checked before any argument is read,
/// so a syscall of an unselected process costs one lookup and nothing more.
#[inline(always)]
fn traced_thread() -> Option<u64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    process_traced((pid_tgid >> 32) as u32).then_some(pid_tgid)
}

#[inline(always)]
fn save(pid_tgid: u64, buf: u64, count: u64, fd: u64, buf_kind: u32, direction: u32) {
    let args = IoArgs {
        buf,
        count,
        // SAFETY: helper without preconditions.
        ts_enter: unsafe { bpf_ktime_get_boot_ns() },
        sk: 0,
        fd: fd as u32,
        buf_kind,
        direction,
        verdict: 0,
        wire: agent_common::WireCtx::default(),
        seq: 0,
        state: 0,
        g: 0,
    };
    if ACTIVE_IO.insert(&pid_tgid, &args, 0).is_err() {
        crate::maps::count(agent_common::CNT_ACTIVE_IO_FULL);
    }
}

/// `(fd, buf, count)`: read, write, recvfrom, sendto.
#[inline(always)]
fn enter_plain(ctx: &TracePointContext, direction: u32) -> u32 {
    let Some(pid_tgid) = traced_thread() else {
        return 0;
    };
    save(
        pid_tgid,
        arg(ctx, ARG1),
        arg(ctx, ARG2),
        arg(ctx, ARG0),
        BUF_PLAIN,
        direction,
    );
    0
}

/// `(fd, iov, iovcnt)`: readv, writev.
#[inline(always)]
fn enter_iov(ctx: &TracePointContext, direction: u32) -> u32 {
    let Some(pid_tgid) = traced_thread() else {
        return 0;
    };
    save(
        pid_tgid,
        arg(ctx, ARG1),
        arg(ctx, ARG2),
        arg(ctx, ARG0),
        BUF_IOVEC,
        direction,
    );
    0
}

/// `(fd, struct user_msghdr *msg, flags)`: sendmsg, recvmsg. `msg_iov` is at offset 16 and
/// `msg_iovlen` at 24 of `struct user_msghdr`.
#[inline(always)]
fn enter_msg(ctx: &TracePointContext, direction: u32) -> u32 {
    let Some(pid_tgid) = traced_thread() else {
        return 0;
    };
    let msg = arg(ctx, ARG1);
    // SAFETY: user pointers are read with the fault-tolerant helper.
    let iov = unsafe { bpf_probe_read_user((msg + 16) as *const u64) }.unwrap_or(0);
    let iovlen = unsafe { bpf_probe_read_user((msg + 24) as *const u64) }.unwrap_or(0);
    save(pid_tgid, iov, iovlen, arg(ctx, ARG0), BUF_IOVEC, direction);
    0
}

#[inline(always)]
fn exit<const DIR: u32>(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(args) = ACTIVE_IO.get_ptr(&pid_tgid) else {
        return 0;
    };
    // SAFETY: this thread's live map value, used in place (a copy would not fit the BPF stack)
    // and removed only after the last use.
    let args = unsafe { &*args };
    let ret = arg(ctx, RET) as i64;
    if args.verdict == agent_common::VERDICT_TRACE
        && ret > 0
        && capture::emit_data::<DIR>(args, pid_tgid, ret as u64)
    {
        // HTTP/2: the walker copies the frames and removes the entry; if the tail call fails,
        // nothing of this syscall is copied (and the walk stays where it was).
        // SAFETY: the array holds tracepoint programs of this type.
        let _ = unsafe { crate::maps::H2_WALK.tail_call(ctx, DIR) };
        crate::maps::count(agent_common::CNT_H2_WALK_INCOMPLETE);
    }
    let _ = ACTIVE_IO.remove(&pid_tgid);
    0
}

macro_rules! syscall_pair {
    ($enter:ident, $exit:ident, $kind:ident, $dir:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            $kind(&ctx, $dir)
        }
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            exit::<{ $dir }>(&ctx)
        }
    };
}

syscall_pair!(sys_enter_read, sys_exit_read, enter_plain, DIR_INGRESS);
syscall_pair!(
    sys_enter_recvfrom,
    sys_exit_recvfrom,
    enter_plain,
    DIR_INGRESS
);
syscall_pair!(sys_enter_readv, sys_exit_readv, enter_iov, DIR_INGRESS);
syscall_pair!(sys_enter_recvmsg, sys_exit_recvmsg, enter_msg, DIR_INGRESS);
syscall_pair!(sys_enter_write, sys_exit_write, enter_plain, DIR_EGRESS);
syscall_pair!(sys_enter_sendto, sys_exit_sendto, enter_plain, DIR_EGRESS);
syscall_pair!(sys_enter_writev, sys_exit_writev, enter_iov, DIR_EGRESS);
syscall_pair!(sys_enter_sendmsg, sys_exit_sendmsg, enter_msg, DIR_EGRESS);
