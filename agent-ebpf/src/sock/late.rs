//! Arguments of a data syscall that was already in flight when the agent attached, read from the
//! task's saved user registers (x86_64 `struct pt_regs`: the syscall number in `orig_ax`, the
//! arguments in `di`, `si`, `dx`). Without this, the first request on every connection whose
//! server thread sat blocked in `read` at start-up would be lost.
use agent_common::{IoArgs, BUF_IOVEC, BUF_PLAIN, DIR_EGRESS, DIR_INGRESS};
use aya_ebpf::helpers::{bpf_probe_read_user, generated::bpf_ktime_get_boot_ns};

use crate::regs::user_regs;

const SYS_READ: u64 = 0;
const SYS_WRITE: u64 = 1;
const SYS_READV: u64 = 19;
const SYS_WRITEV: u64 = 20;
const SYS_SENDTO: u64 = 44;
const SYS_RECVFROM: u64 = 45;
const SYS_SENDMSG: u64 = 46;
const SYS_RECVMSG: u64 = 47;

#[inline(always)]
pub fn args(send: bool) -> Option<IoArgs> {
    let regs = user_regs()?;
    let (direction, buf_kind, msg) = match regs.orig_ax {
        SYS_READ | SYS_RECVFROM => (DIR_INGRESS, BUF_PLAIN, false),
        SYS_WRITE | SYS_SENDTO => (DIR_EGRESS, BUF_PLAIN, false),
        SYS_READV => (DIR_INGRESS, BUF_IOVEC, false),
        SYS_WRITEV => (DIR_EGRESS, BUF_IOVEC, false),
        SYS_RECVMSG => (DIR_INGRESS, BUF_IOVEC, true),
        SYS_SENDMSG => (DIR_EGRESS, BUF_IOVEC, true),
        _ => return None,
    };
    if (direction == DIR_EGRESS) != send {
        return None;
    }
    let (buf, count) = if msg {
        // struct user_msghdr: msg_iov @16, msg_iovlen @24.
        unsafe {
            (
                bpf_probe_read_user((regs.si + 16) as *const u64).ok()?,
                bpf_probe_read_user((regs.si + 24) as *const u64).ok()?,
            )
        }
    } else {
        (regs.si, regs.dx)
    };
    Some(IoArgs {
        buf,
        count,
        // SAFETY: helper without preconditions.
        ts_enter: unsafe { bpf_ktime_get_boot_ns() },
        sk: 0,
        fd: regs.di as u32,
        buf_kind,
        direction,
        verdict: 0,
        wire: agent_common::WireCtx::default(),
        seq: 0,
        state: 0,
        g: 0,
    })
}
