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

/// State of the `bpf_loop` search for the end of the request line in scratch slot `slot`.
#[repr(C)]
struct LineWalk {
    slot: u32,
    len: u64,
    /// Offset just past the first `\n`, 0: none.
    end: u64,
}

/// The payload area of scratch slot `slot`, re-found inside a loop callback.
#[inline(always)]
fn slot_buf(slot: u32) -> Option<*const u8> {
    let s = SCRATCH.get_ptr(slot)?;
    // SAFETY: the payload area lies within the scratch value.
    Some(unsafe { (*s).buf.as_ptr().add(DATA_HEADER_SIZE) })
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

extern "C" fn newline_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `LineWalk` passed to `bpf_loop`.
    let w = unsafe { &mut *(ctx as *mut LineWalk) };
    let i = index as usize;
    if i >= w.len as usize {
        return 1;
    }
    let Some(buf) = slot_buf(w.slot) else {
        return 1;
    };
    if at(buf, i) == b'\n' {
        w.end = index + 1;
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
    let mut w = LineWalk {
        slot,
        len: len as u64,
        end: 0,
    };
    walk(SCAN_MAX, &mut w, newline_step);
    let end = w.end as usize;
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
#[repr(C)]
pub struct Head {
    /// Offset of the first `traceparent` value (after the colon and a space), 0: none.
    pub traceparent: usize,
    /// Offset just past the empty line that ends the head, 0: not within the bytes at hand
    /// (the head goes on in a later write).
    pub end: usize,
    /// `Content-Length`, when present and well formed.
    pub content_length: Option<u64>,
    /// A `Transfer-Encoding` header: the body's end cannot be followed from here.
    pub transfer_encoding: bool,
}

#[repr(C)]
struct HeadWalk {
    slot: u32,
    transfer_encoding: u32,
    from: u64,
    len: u64,
    traceparent: u64,
    end: u64,
    /// Offset of the `Content-Length` value, 0: none.
    content_length: u64,
}

extern "C" fn header_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `HeadWalk` passed to `bpf_loop`.
    let w = unsafe { &mut *(ctx as *mut HeadWalk) };
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
        w.end = (i + 2) as u64;
        return 1;
    }
    if w.traceparent == 0 && i + 12 <= len && is_name(buf, i, b"traceparent") {
        let mut v = i + 12;
        if at(buf, v) == b' ' || at(buf, v) == b'\t' {
            v += 1;
        }
        w.traceparent = v as u64;
    } else if i + 15 <= len && is_name(buf, i, b"content-length") {
        w.content_length = (i + 15) as u64;
    } else if i + 18 <= len && is_name(buf, i, b"transfer-encoding") {
        w.transfer_encoding = 1;
    }
    0
}

/// Walks the header lines that start at `from` (just past the request line).
#[inline(always)]
pub fn read_head(slot: u32, from: usize, len: usize) -> Head {
    let mut w = HeadWalk {
        slot,
        transfer_encoding: 0,
        from: from as u64,
        len: len as u64,
        traceparent: 0,
        end: 0,
        content_length: 0,
    };
    walk(SCAN_MAX, &mut w, header_step);
    Head {
        traceparent: w.traceparent as usize & (SCAN_MAX * 2 - 1),
        end: w.end as usize & (SCAN_MAX * 2 - 1),
        content_length: if w.content_length != 0 {
            decimal(w.slot, w.content_length as usize & (SCAN_MAX * 2 - 1), len)
        } else {
            None
        },
        transfer_encoding: w.transfer_encoding != 0,
    }
}

/// The decimal number at `v` (after optional spaces), up to 15 digits.
#[inline(always)]
fn decimal(slot: u32, v: usize, len: usize) -> Option<u64> {
    let buf = slot_buf(slot)?;
    let mut v = v;
    if at(buf, v) == b' ' {
        v += 1;
    }
    let mut n: u64 = 0;
    let mut digits = 0;
    for k in 0..15 {
        let c = at(buf, v + k);
        if v + k >= len || !c.is_ascii_digit() {
            break;
        }
        n = n * 10 + (c - b'0') as u64;
        digits += 1;
    }
    (digits > 0).then_some(n)
}

/// `<name>:` at `i`, case-insensitive (`name` in lowercase).
#[inline(always)]
fn is_name<const N: usize>(buf: *const u8, i: usize, name: &[u8; N]) -> bool {
    let mut j = 0;
    while j < N {
        if at(buf, i + j) | 0x20 != name[j] {
            return false;
        }
        j += 1;
    }
    at(buf, i + N) == b':'
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

#[repr(C)]
struct ParseWalk {
    slot: u32,
    bad: u32,
    start: u64,
}

/// Checks one character of a version-00 value: `00-<32 hex>-<16 hex>-<2 hex>`, lowercase hex.
/// Only a flag leaves the callback, so the verifier sees its state settle at once.
extern "C" fn traceparent_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `ParseWalk` passed to `bpf_loop`.
    let w = unsafe { &mut *(ctx as *mut ParseWalk) };
    let Some(buf) = slot_buf(w.slot) else {
        w.bad = 1;
        return 1;
    };
    let c = at(buf, (w.start + index) as usize);
    let ok = match index {
        0 | 1 => c == b'0',
        2 | 35 | 52 => c == b'-',
        _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
    };
    if !ok {
        w.bad = 1;
        return 1;
    }
    0
}

/// The value of a lowercase hex digit already checked, without a branch.
#[inline(always)]
fn nibble(c: u8) -> u8 {
    (c & 0xf) + 9 * (c >> 6)
}

#[inline(always)]
fn hex_byte(buf: *const u8, i: usize) -> u8 {
    nibble(at(buf, i)) << 4 | nibble(at(buf, i + 1))
}

/// A parsed version-00 `traceparent` value.
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

/// Parses the value at `v` of the head in scratch `slot` (also at `buf`) as
/// `00-<32 hex>-<16 hex>-<2 hex>` followed by the end of the line or whitespace. All-zero ids
/// are invalid, as W3C Trace Context says.
#[inline(always)]
pub fn parse_traceparent(slot: u32, buf: *const u8, v: usize, len: usize) -> Option<TraceParent> {
    if v + TP_LEN + 1 > len {
        return None;
    }
    let after = at(buf, v + TP_LEN);
    if after != b'\r' && after != b' ' && after != b'\t' {
        return None;
    }
    let mut w = ParseWalk {
        slot,
        bad: 0,
        start: v as u64,
    };
    walk(TP_LEN, &mut w, traceparent_step);
    if w.bad != 0 {
        return None;
    }
    let mut tp = TraceParent {
        trace_id: [0; 16],
        parent_id: [0; 8],
        flags: hex_byte(buf, v + 53),
    };
    let mut any = 0u8;
    for k in 0..16 {
        tp.trace_id[k] = hex_byte(buf, v + 3 + 2 * k);
        any |= tp.trace_id[k];
    }
    if any == 0 {
        return None;
    }
    any = 0;
    for k in 0..8 {
        tp.parent_id[k] = hex_byte(buf, v + 36 + 2 * k);
        any |= tp.parent_id[k];
    }
    if any == 0 {
        return None;
    }
    Some(tp)
}
