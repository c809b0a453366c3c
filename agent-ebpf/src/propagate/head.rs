//! Reading an HTTP/1.x request head in the kernel, over a copy in a map value: is this the start
//! of a request, where does its request line end, and where is its `traceparent` header.
//!
//! The scan itself is `agent_common::head_scan`, pure code the host fuzzes against httparse;
//! this module gives it bytes (a masked pointer into a scratch slot) and drives its walks with
//! `bpf_loop`. Userspace parses the same bytes fully (httparse); this only finds what the kernel
//! needs.
use agent_common::{
    head_scan::{self, Bytes, DecWalk, HeadWalk, LineWalk, TpWalk, DEC_WALK, TP_WALK},
    DATA_HEADER_SIZE, MAX_PAYLOAD,
};
use aya_ebpf::{cty::c_void, helpers::generated::bpf_loop};

pub use agent_common::head_scan::{Head, TraceParent, SCAN_MAX, TP_LEN};

use crate::maps::SCRATCH;

const MASK: usize = MAX_PAYLOAD - 1;

/// A buffer of at least `2 * MAX_PAYLOAD` bytes (a scratch slot's payload area), read through
/// masked indices.
#[derive(Clone, Copy)]
pub struct Masked(pub *const u8);

impl Bytes for Masked {
    #[inline(always)]
    fn at(&self, i: usize) -> u8 {
        // SAFETY: callers pass map values of at least 2 * MAX_PAYLOAD bytes; the index is masked.
        unsafe { *self.0.add(i & MASK) }
    }
}

/// Whether `buf` starts with an HTTP method token and a space.
#[inline(always)]
pub fn starts_with_method(buf: *const u8, len: usize) -> bool {
    head_scan::starts_with_method(&Masked(buf), len)
}

/// Whether `buf` starts with an HTTP/1.x status line.
#[inline(always)]
pub fn starts_with_status(buf: *const u8, len: usize) -> bool {
    head_scan::starts_with_status(&Masked(buf), len)
}

/// The payload area of scratch slot `slot`, re-found inside a loop callback.
#[inline(always)]
fn slot_buf(slot: u32) -> Option<Masked> {
    let s = SCRATCH.get_ptr(slot)?;
    // SAFETY: the payload area lies within the scratch value.
    Some(Masked(unsafe { (*s).buf.as_ptr().add(DATA_HEADER_SIZE) }))
}

/// Runs `step` on `state` for indices `0..n` until it returns 1. `bpf_loop` has the verifier
/// check the step once, where an open-coded loop over 4 KiB would exceed its limits.
#[inline(always)]
fn walk<T>(n: usize, state: &mut T, step: extern "C" fn(u64, *mut c_void) -> i64) {
    // SAFETY: `state` outlives the call; the callback only touches it and the scratch map.
    unsafe {
        bpf_loop(
            n as u32,
            step as *mut c_void,
            state as *mut T as *mut c_void,
            0,
        )
    };
}

/// A walk's state with the scratch slot its callback reads.
#[repr(C)]
struct InSlot<W> {
    slot: u32,
    w: W,
}

extern "C" fn newline_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `InSlot<LineWalk>` passed to `bpf_loop`.
    let s = unsafe { &mut *(ctx as *mut InSlot<LineWalk>) };
    let Some(buf) = slot_buf(s.slot) else {
        return 1;
    };
    head_scan::newline_step(&mut s.w, &buf, index)
}

/// Offset just past the request line's CRLF when the head in scratch `slot` (also at `buf`)
/// starts with `METHOD SP target SP HTTP/1.x CRLF`; 0 otherwise.
#[inline(always)]
pub fn request_line_end(slot: u32, buf: *const u8, len: usize) -> usize {
    if !starts_with_method(buf, len) {
        return 0;
    }
    let mut s = InSlot {
        slot,
        w: LineWalk {
            len: len as u64,
            end: 0,
        },
    };
    walk(SCAN_MAX, &mut s, newline_step);
    head_scan::request_line_checked(&Masked(buf), s.w.end as usize)
}

extern "C" fn header_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `InSlot<HeadWalk>` passed to `bpf_loop`.
    let s = unsafe { &mut *(ctx as *mut InSlot<HeadWalk>) };
    let Some(buf) = slot_buf(s.slot) else {
        return 1;
    };
    head_scan::header_step(&mut s.w, &buf, index)
}

/// Walks the header lines that start at `from` (just past the request line). With `BODY`, also
/// reads the `Content-Length` value (only the injector follows bodies; the readers need not pay).
#[inline(always)]
pub fn read_head<const BODY: bool>(slot: u32, from: usize, len: usize) -> Head {
    let mut s = InSlot {
        slot,
        w: HeadWalk::new(from, len),
    };
    walk(SCAN_MAX, &mut s, header_step);
    if !BODY {
        return s.w.head(None);
    }
    let Some(dec) = s.w.decimal_walk() else {
        return s.w.head(None);
    };
    let mut d = InSlot { slot, w: dec };
    walk(DEC_WALK, &mut d, decimal_step);
    s.w.head(Some(&d.w))
}

extern "C" fn decimal_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `InSlot<DecWalk>` passed to `bpf_loop`.
    let s = unsafe { &mut *(ctx as *mut InSlot<DecWalk>) };
    let Some(buf) = slot_buf(s.slot) else {
        s.w.state = 2;
        return 1;
    };
    head_scan::decimal_step(&mut s.w, &buf, index)
}

/// Offset of the CR that ends the header value starting at `v`, looking at most 256 bytes on.
#[inline(always)]
pub fn value_end(buf: *const u8, v: usize, len: usize) -> Option<usize> {
    head_scan::value_end(&Masked(buf), v, len)
}

extern "C" fn traceparent_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `InSlot<TpWalk>` passed to `bpf_loop`.
    let s = unsafe { &mut *(ctx as *mut InSlot<TpWalk>) };
    let Some(buf) = slot_buf(s.slot) else {
        s.w.bad = 1;
        return 1;
    };
    head_scan::traceparent_step(&mut s.w, &buf, index)
}

/// Parses the `traceparent` value after offset `v` (just past the colon) of the head in scratch
/// `slot` (also at `buf`) as a version-00 value (`head_scan::traceparent_step`). All-zero ids
/// are invalid, as W3C Trace Context says.
#[inline(always)]
pub fn parse_traceparent(slot: u32, buf: *const u8, v: usize, len: usize) -> Option<TraceParent> {
    let mut s = InSlot {
        slot,
        w: TpWalk::new(v, len),
    };
    walk(TP_WALK, &mut s, traceparent_step);
    head_scan::traceparent_ids(&Masked(buf), s.w.value_at()? & (2 * SCAN_MAX - 1))
}
