//! What the runtime modules (`goroutine`, `tokio`, `asyncio`) share: the clock their notes are
//! aged by, the key of a task within its process, a process's runtime, and the one-use note of
//! the request a task is about to send a request head for (`TASK_WRITING`).
#[allow(unused_imports)]
use crate::maps::lru::*;
use agent_common::{ReqRef, TaskKey};
use aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns;

use crate::maps::{PROC_RUNTIME, TASK_WRITING};

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// A task (goroutine `g`, tokio task header, asyncio task object) of process `tgid`.
#[inline(always)]
pub fn key(tgid: u32, ptr: u64) -> TaskKey {
    TaskKey { ptr, tgid, _pad: 0 }
}

/// Process `tgid`'s `RUNTIME_*`, if classified.
#[inline(always)]
pub fn runtime_of(tgid: u32) -> Option<u8> {
    // SAFETY: copied out of a live map value.
    PROC_RUNTIME.get_ptr(&tgid).map(|r| unsafe { *r })
}

/// The request task `task` of process `tgid` was told it sends its next request head for, if
/// it was told less than `max_age_ns` ago. The note is used up either way.
#[inline(always)]
pub fn take_writing(tgid: u32, task: u64, max_age_ns: u64) -> Option<ReqRef> {
    let k = key(tgid, task);
    // SAFETY: copied out of a live map value.
    let r = unsafe { *TASK_WRITING.get_ptr(&k)? };
    lru_remove(&TASK_WRITING, LRU_TASK_WRITING, &k);
    (now().wrapping_sub(r.ts) < max_age_ns).then_some(r.at)
}
