//! Reading an HTTP/1.x request head in the kernel, over a copy in a map value: is this the start
//! of a request, where does its request line end, and where is its `traceparent` header.
//!
//! Every loop has a constant bound and every index is masked, so the verifier can follow it.
//! Userspace parses the same bytes fully (httparse); this only finds what injection needs.
use agent_common::{DATA_HEADER_SIZE, MAX_PAYLOAD};
use aya_ebpf::{cty::c_void, helpers::generated::bpf_loop};

use crate::maps::SCRATCH;

/// Bytes of a head looked at. Heads longer than this are not injected into (and counted).
pub const SCAN_MAX: usize = 4096;
const MASK: usize = MAX_PAYLOAD - 1;
/// Length of a version-00 `traceparent` value.
pub const TP_LEN: usize = 55;

/// The byte at `i` of a buffer of at least `2 * MAX_PAYLOAD` bytes.
#[inline(always)]
pub fn at(buf: *const u8, i: usize) -> u8 {
    // SAFETY: callers pass map values of at least 2 * MAX_PAYLOAD bytes; the index is masked.
    unsafe { *buf.add(i & MASK) }
}

/// Whether `buf` starts with an HTTP method token and a space.
#[inline(always)]
pub fn starts_with_method(buf: *const u8, len: usize) -> bool {
    let mut i = 0;
    while i < 12 {
        if i >= len {
            return false;
        }
        let c = at(buf, i);
        if c == b' ' {
            return i >= 3;
        }
        if !c.is_ascii_uppercase() {
            return false;
        }
        i += 1;
    }
    false
}

/// Whether `buf` starts with an HTTP/1.x status line.
#[inline(always)]
pub fn starts_with_status(buf: *const u8, len: usize) -> bool {
    len >= 12
        && at(buf, 0) == b'H'
        && at(buf, 1) == b'T'
        && at(buf, 2) == b'T'
        && at(buf, 3) == b'P'
        && at(buf, 4) == b'/'
        && at(buf, 5) == b'1'
        && at(buf, 6) == b'.'
}

/// State of one `bpf_loop` walk over a head in scratch slot `slot`.
#[repr(C)]
struct Walk {
    slot: u32,
    kind: u32,
    from: u64,
    len: u64,
    at: u64,
}

const WALK_NONE: u32 = 0;
const WALK_HEAD_END: u32 = 1;
const WALK_TRACEPARENT: u32 = 2;
const WALK_NEWLINE: u32 = 3;

/// The payload area of scratch slot `slot`, re-found inside a loop callback.
#[inline(always)]
fn slot_buf(slot: u32) -> Option<*const u8> {
    let s = SCRATCH.get_ptr(slot)?;
    // SAFETY: the payload area lies within the scratch value.
    Some(unsafe { (*s).buf.as_ptr().add(DATA_HEADER_SIZE) })
}

/// Runs `step` for indices `0..SCAN_MAX` until it returns 1. `bpf_loop` has the verifier check
/// the step once, where an open-coded loop over 4 KiB would exceed its limits.
#[inline(always)]
fn walk(w: &mut Walk, step: extern "C" fn(u64, *mut c_void) -> i64) {
    // SAFETY: `w` outlives the call; the callback only touches it and the scratch map.
    unsafe {
        bpf_loop(
            SCAN_MAX as u32,
            step as *mut c_void,
            w as *mut Walk as *mut c_void,
            0,
        )
    };
}

extern "C" fn newline_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Walk` passed to `bpf_loop`.
    let w = unsafe { &mut *(ctx as *mut Walk) };
    let i = index as usize;
    if i >= w.len as usize {
        return 1;
    }
    let Some(buf) = slot_buf(w.slot) else {
        return 1;
    };
    if at(buf, i) == b'\n' {
        w.kind = WALK_NEWLINE;
        w.at = index + 1;
        return 1;
    }
    0
}

/// Offset just past the request line's CRLF when the head in scratch `slot` (also at `buf`)
/// starts with `METHOD SP target SP HTTP/1.x CRLF`; 0 otherwise.
#[inline(always)]
pub fn request_line_end(slot: u32, buf: *const u8, len: usize) -> usize {
    if !starts_with_method(buf, len) {
        return 0;
    }
    let mut w = Walk {
        slot,
        kind: WALK_NONE,
        from: 0,
        len: len as u64,
        at: 0,
    };
    walk(&mut w, newline_step);
    if w.kind != WALK_NEWLINE {
        return 0;
    }
    let end = w.at as usize;
    // "... HTTP/1.x\r\n"
    if end < 16
        || end > SCAN_MAX
        || at(buf, end - 11) != b' '
        || at(buf, end - 10) != b'H'
        || at(buf, end - 9) != b'T'
        || at(buf, end - 8) != b'T'
        || at(buf, end - 7) != b'P'
        || at(buf, end - 6) != b'/'
        || at(buf, end - 5) != b'1'
        || at(buf, end - 4) != b'.'
        || !at(buf, end - 3).is_ascii_digit()
        || at(buf, end - 2) != b'\r'
    {
        return 0;
    }
    end
}

/// What the header block holds, as far as injection cares.
pub enum Found {
    /// A `traceparent` header; the offset of its value (after the colon and spaces).
    Traceparent(usize),
    /// The end of the head (offset just past the empty line) and no `traceparent` before it.
    HeadEnd,
    /// Neither within the bytes at hand: the head continues in a later write.
    Neither,
}

extern "C" fn header_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Walk` passed to `bpf_loop`.
    let w = unsafe { &mut *(ctx as *mut Walk) };
    let i = (w.from + index) as usize;
    let len = w.len as usize;
    if i + 2 > len || i > 2 * SCAN_MAX {
        return 1;
    }
    let Some(buf) = slot_buf(w.slot) else {
        return 1;
    };
    if index != 0 && at(buf, i - 1) != b'\n' {
        return 0;
    }
    if at(buf, i) == b'\r' && at(buf, i + 1) == b'\n' {
        w.kind = WALK_HEAD_END;
        return 1;
    }
    if i + 12 <= len && is_traceparent_name(buf, i) {
        let mut v = i + 12;
        if at(buf, v) == b' ' || at(buf, v) == b'\t' {
            v += 1;
        }
        w.kind = WALK_TRACEPARENT;
        w.at = v as u64;
        return 1;
    }
    0
}

/// Walks the header lines that start at `from` (just past the request line).
#[inline(always)]
pub fn find_traceparent(slot: u32, from: usize, len: usize) -> Found {
    let mut w = Walk {
        slot,
        kind: WALK_NONE,
        from: from as u64,
        len: len as u64,
        at: 0,
    };
    walk(&mut w, header_step);
    match w.kind {
        WALK_HEAD_END => Found::HeadEnd,
        WALK_TRACEPARENT => Found::Traceparent(w.at as usize & (SCAN_MAX * 2 - 1)),
        _ => Found::Neither,
    }
}

/// `traceparent:`, case-insensitive.
#[inline(always)]
fn is_traceparent_name(buf: *const u8, i: usize) -> bool {
    const NAME: &[u8; 11] = b"traceparent";
    let mut j = 0;
    while j < 11 {
        if at(buf, i + j) | 0x20 != NAME[j] {
            return false;
        }
        j += 1;
    }
    at(buf, i + 11) == b':'
}

/// Offset of the CR that ends the header value starting at `v`, looking at most 256 bytes on.
#[inline(always)]
pub fn value_end(buf: *const u8, v: usize, len: usize) -> Option<usize> {
    let mut k = 0;
    while k < 256 {
        let i = v + k;
        if i >= len {
            return None;
        }
        if at(buf, i) == b'\r' {
            return Some(i);
        }
        k += 1;
    }
    None
}

/// A parsed version-00 `traceparent` value.
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

#[inline(always)]
fn unhex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[inline(always)]
fn byte_at(buf: *const u8, i: usize) -> Option<u8> {
    Some(unhex(at(buf, i))? << 4 | unhex(at(buf, i + 1))?)
}

/// Parses the value at `v` as `00-<32 hex>-<16 hex>-<2 hex>` followed by the end of the line
/// (or optional whitespace). All-zero ids are invalid, as W3C Trace Context says.
#[inline(always)]
pub fn parse_traceparent(buf: *const u8, v: usize, len: usize) -> Option<TraceParent> {
    if v + TP_LEN + 1 > len
        || at(buf, v) != b'0'
        || at(buf, v + 1) != b'0'
        || at(buf, v + 2) != b'-'
        || at(buf, v + 35) != b'-'
        || at(buf, v + 52) != b'-'
    {
        return None;
    }
    let after = at(buf, v + TP_LEN);
    if after != b'\r' && after != b' ' && after != b'\t' {
        return None;
    }
    let mut tp = TraceParent {
        trace_id: [0; 16],
        parent_id: [0; 8],
        flags: byte_at(buf, v + 53)?,
    };
    let mut any = 0u8;
    let mut j = 0;
    while j < 16 {
        tp.trace_id[j] = byte_at(buf, v + 3 + 2 * j)?;
        any |= tp.trace_id[j];
        j += 1;
    }
    if any == 0 {
        return None;
    }
    any = 0;
    j = 0;
    while j < 8 {
        tp.parent_id[j] = byte_at(buf, v + 36 + 2 * j)?;
        any |= tp.parent_id[j];
        j += 1;
    }
    if any == 0 {
        return None;
    }
    Some(tp)
}
