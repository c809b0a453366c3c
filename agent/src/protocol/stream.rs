//! What a parser is fed: one syscall's worth of a byte stream.

/// Direction of bytes, seen from the traced process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Read by the process.
    Ingress,
    /// Written by the process.
    Egress,
}

/// One syscall's worth of a byte stream. The kernel copies only a prefix: `data` holds the first
/// `data.len()` of the `len` bytes that moved; the rest is a gap the parser may skip over (inside a
/// body) but never look into.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    pub data: &'a [u8],
    pub len: u64,
    /// When the first byte of this segment counts as sent/received (ns, any clock).
    pub start_ns: u64,
    /// When the syscall that moved it returned.
    pub end_ns: u64,
    /// Trace context the kernel decided for a request that starts in this segment.
    pub ctx: Option<agent_common::WireCtx>,
}

impl<'a> Segment<'a> {
    /// A fully captured segment at one instant (tests, replay).
    pub fn whole(data: &'a [u8], ts: u64) -> Self {
        Segment {
            data,
            len: data.len() as u64,
            start_ns: ts,
            end_ns: ts,
            ctx: None,
        }
    }
}
