//! The bench's floor (`agent --bench-floor`, `cargo xtask bench`): the agent's tracepoints with
//! programs that do nothing but its process filter. What the agent costs beyond the
//! tracepoints themselves is measured against these. Never attached otherwise.
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};

use crate::maps::process_traced;

/// The process filter and nothing else; its verdict is the return value (which the kernel
/// ignores), so the compiler keeps the lookup.
#[inline(always)]
fn filter() -> u32 {
    process_traced((bpf_get_current_pid_tgid() >> 32) as u32) as u32
}

/// Attached to every tracepoint the agent's own programs use (`agent::loader::PROGRAMS`).
#[tracepoint]
pub fn floor_tracepoint(_ctx: TracePointContext) -> u32 {
    filter()
}

/// Attached where the agent's same-host stitching program is (`tcp_sendmsg_locked`).
#[raw_tracepoint(tracepoint = "tcp_sendmsg_locked")]
pub fn floor_raw_tracepoint(_ctx: RawTracePointContext) -> i32 {
    filter() as i32
}
