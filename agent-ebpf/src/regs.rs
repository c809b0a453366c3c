//! The current task's saved user registers (x86_64): the syscall a blocked task sits in, and the
//! goroutine a Go thread runs.
use aya_ebpf::helpers::{
    bpf_probe_read_kernel,
    generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
};

/// x86_64 `struct pt_regs` (arch/x86/include/asm/ptrace.h), a stable user-visible layout.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PtRegs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub bp: u64,
    pub bx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub ax: u64,
    pub cx: u64,
    pub dx: u64,
    pub si: u64,
    pub di: u64,
    pub orig_ax: u64,
    pub ip: u64,
    pub cs: u64,
    pub flags: u64,
    pub sp: u64,
    pub ss: u64,
}

/// The registers the current task had in user space when it entered the kernel.
#[inline(always)]
pub fn user_regs() -> Option<PtRegs> {
    // SAFETY: helpers return the current task and its saved registers; read fault-tolerantly.
    unsafe {
        let task = bpf_get_current_task_btf();
        let regs = bpf_task_pt_regs(task) as *const PtRegs;
        bpf_probe_read_kernel(regs).ok()
    }
}

/// One saved user register, read alone (a whole `PtRegs` copy costs 168 bytes of BPF stack).
#[inline(always)]
pub fn user_r14() -> Option<u64> {
    // SAFETY: as `user_regs`.
    unsafe {
        let task = bpf_get_current_task_btf();
        let regs = bpf_task_pt_regs(task) as *const PtRegs;
        bpf_probe_read_kernel(core::ptr::addr_of!((*regs).r14)).ok()
    }
}
