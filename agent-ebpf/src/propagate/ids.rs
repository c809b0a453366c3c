//! New ids and the sampling decision for traces that start here, and their W3C text form.
use aya_ebpf::helpers::generated::bpf_get_prandom_u32;

use crate::maps::{global, global64, SAMPLE_PARENT_BASED, SAMPLE_THRESHOLD};

#[inline(always)]
fn random_u32() -> u32 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_get_prandom_u32() }
}

#[inline(always)]
pub fn trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let r = random_u32().to_ne_bytes();
        id[4 * i] = r[0];
        id[4 * i + 1] = r[1];
        id[4 * i + 2] = r[2];
        id[4 * i + 3] = r[3];
        i += 1;
    }
    if id[15] == 0 {
        id[15] = 1;
    }
    id
}

#[inline(always)]
pub fn span_id() -> [u8; 8] {
    let a = random_u32().to_ne_bytes();
    let b = random_u32().to_ne_bytes();
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3] | 1]
}

/// The sampled flag (0 or 1) for a span of `trace_id`, given the incoming flags if any. Same rule
/// as userspace's `Sampler::sample`, so every hop of a trace decides alike.
#[inline(always)]
pub fn sampled(trace_id: &[u8; 16], parent_flags: Option<u8>) -> u8 {
    if let Some(f) = parent_flags {
        if global(&SAMPLE_PARENT_BASED) != 0 {
            return f & 1;
        }
    }
    let low = u64::from_be_bytes([
        trace_id[8],
        trace_id[9],
        trace_id[10],
        trace_id[11],
        trace_id[12],
        trace_id[13],
        trace_id[14],
        trace_id[15],
    ]) >> 1;
    (low < global64(&SAMPLE_THRESHOLD)) as u8
}

#[inline(always)]
fn hex(n: u8) -> u8 {
    let n = n & 0xf;
    if n < 10 {
        b'0' + n
    } else {
        b'a' + n - 10
    }
}

/// Writes `bytes` as lowercase hex at `out[at..]`.
#[inline(always)]
pub fn put_hex<const N: usize>(out: &mut [u8], at: usize, bytes: &[u8; N]) {
    let mut i = 0;
    while i < N {
        out[at + 2 * i] = hex(bytes[i] >> 4);
        out[at + 2 * i + 1] = hex(bytes[i]);
        i += 1;
    }
}

/// `00-<trace>-<span>-<flags>` into `out[at..at + 55]`.
#[inline(always)]
pub fn put_traceparent(out: &mut [u8], at: usize, trace: &[u8; 16], span: &[u8; 8], flags: u8) {
    out[at] = b'0';
    out[at + 1] = b'0';
    out[at + 2] = b'-';
    put_hex(out, at + 3, trace);
    out[at + 35] = b'-';
    put_hex(out, at + 36, span);
    out[at + 52] = b'-';
    put_hex(out, at + 53, &[flags]);
}
