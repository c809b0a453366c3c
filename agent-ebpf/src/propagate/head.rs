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

use crate::maps::{WalkState, SCRATCH, WALKS};

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

/// Runs `step` over the walk state `init` for indices `0..n` until it returns 1, and returns
/// the state. `bpf_loop` has the verifier check the step as a loop body, where an open-coded
/// loop over 4 KiB would exceed its limits; the state lives in `WALKS` (see there) and the
/// callback gets only the slot.
#[inline(always)]
fn walk<W>(
    slot: u32,
    n: usize,
    init: W,
    step: extern "C" fn(u64, *mut c_void) -> i64,
) -> Option<W> {
    const { assert!(core::mem::size_of::<W>() <= core::mem::size_of::<WalkState>()) };
    let state = WALKS.get_ptr_mut(slot)? as *mut W;
    // SAFETY: this CPU's map value, large and aligned enough for `W` (asserted above); no other
    // program uses this slot's state while this one runs (as for `SCRATCH`).
    unsafe { core::ptr::write(state, init) };
    let mut ctx = slot;
    // SAFETY: `ctx` outlives the call; the callback only touches the maps of its slot.
    unsafe {
        bpf_loop(
            n as u32,
            step as *mut c_void,
            &mut ctx as *mut u32 as *mut c_void,
            0,
        )
    };
    // SAFETY: as above; the walk is over.
    Some(unsafe { core::ptr::read(state) })
}

/// A callback's slot, walk state and bytes.
///
/// # Safety
/// `ctx` is the slot `walk` passed to `bpf_loop`, whose state holds a `W`.
#[inline(always)]
unsafe fn step_state<'a, W>(ctx: *mut c_void) -> Option<(&'a mut W, Option<Masked>)> {
    // SAFETY: per the contract.
    let slot = unsafe { *(ctx as *const u32) };
    let w = WALKS.get_ptr_mut(slot)? as *mut W;
    // SAFETY: this CPU's map value holding the walk's `W`.
    Some((unsafe { &mut *w }, slot_buf(slot)))
}

extern "C" fn newline_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `walk` of a `LineWalk` passes its slot.
    let Some((w, Some(buf))) = (unsafe { step_state::<LineWalk>(ctx) }) else {
        return 1;
    };
    head_scan::newline_step(w, &buf, index)
}

/// Offset just past the request line's CRLF when the head in scratch `slot` (also at `buf`)
/// starts with `METHOD SP target SP HTTP/1.x CRLF`; 0 otherwise.
#[inline(always)]
pub fn request_line_end(slot: u32, buf: *const u8, len: usize) -> usize {
    if !starts_with_method(buf, len) {
        return 0;
    }
    let init = LineWalk {
        len: len as u64,
        end: 0,
    };
    let Some(w) = walk(slot, SCAN_MAX, init, newline_step) else {
        return 0;
    };
    head_scan::request_line_checked(&Masked(buf), w.end as usize)
}

extern "C" fn header_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `walk` of a `HeadWalk` passes its slot.
    let Some((w, Some(buf))) = (unsafe { step_state::<HeadWalk>(ctx) }) else {
        return 1;
    };
    head_scan::header_step(w, &buf, index)
}

/// Walks the header lines that start at `from` (just past the request line). With `BODY`, also
/// reads the `Content-Length` value (only the injector follows bodies; the readers need not pay).
#[inline(always)]
pub fn read_head<const BODY: bool>(slot: u32, from: usize, len: usize) -> Head {
    let Some(w) = walk(slot, SCAN_MAX, HeadWalk::new(from, len), header_step) else {
        return HeadWalk::new(from, 0).head(None);
    };
    if !BODY {
        return w.head(None);
    }
    let Some(dec) = w.decimal_walk() else {
        return w.head(None);
    };
    match walk(slot, DEC_WALK, dec, decimal_step) {
        Some(d) => w.head(Some(&d)),
        None => w.head(None),
    }
}

extern "C" fn decimal_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `walk` of a `DecWalk` passes its slot.
    match unsafe { step_state::<DecWalk>(ctx) } {
        Some((w, Some(buf))) => head_scan::decimal_step(w, &buf, index),
        Some((w, None)) => {
            w.state = 2;
            1
        }
        None => 1,
    }
}

/// Offset of the CR that ends the header value starting at `v`, looking at most 256 bytes on.
#[inline(always)]
pub fn value_end(buf: *const u8, v: usize, len: usize) -> Option<usize> {
    head_scan::value_end(&Masked(buf), v, len)
}

extern "C" fn traceparent_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `walk` of a `TpWalk` passes its slot.
    match unsafe { step_state::<TpWalk>(ctx) } {
        Some((w, Some(buf))) => head_scan::traceparent_step(w, &buf, index),
        Some((w, None)) => {
            w.bad = 1;
            1
        }
        None => 1,
    }
}

/// Parses the `traceparent` value after offset `v` (just past the colon) of the head in scratch
/// `slot` (also at `buf`) as a version-00 value (`head_scan::traceparent_step`). All-zero ids
/// are invalid, as W3C Trace Context says.
#[inline(always)]
pub fn parse_traceparent(slot: u32, buf: *const u8, v: usize, len: usize) -> Option<TraceParent> {
    let w = walk(slot, TP_WALK, TpWalk::new(v, len), traceparent_step)?;
    head_scan::traceparent_ids(&Masked(buf), w.value_at()? & (2 * SCAN_MAX - 1))
}
