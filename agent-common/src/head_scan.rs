//! The kernel's scan of an HTTP/1.x head, as pure functions over a byte source: is this the
//! start of a request, where its request line and head end, its `Content-Length`, whether it has
//! a `Transfer-Encoding`, and where its `traceparent` is.
//!
//! The kernel runs these over a map value (bytes read through a masked pointer, loops driven by
//! `bpf_loop`); the host runs the very same code over slices, so the fuzzer can check it against
//! httparse and the userspace parser (`fuzz/fuzz_targets/kernel_head.rs`): the two decide where
//! bodies end and which context a request carries, so they must agree.
//!
//! Every function is `#[inline(always)]`, indexes only through `Bytes::at` and bounds every loop
//! with a constant, so the verifier can follow the kernel's copy.

/// Where a scan reads bytes. The kernel's implementation masks every index into its buffer, so
/// reading past `len` returns stale bytes, never faults; host implementations must do the same
/// (return some byte), which the fuzzer uses to check that no decision depends on such bytes.
pub trait Bytes {
    fn at(&self, i: usize) -> u8;
}

/// Bytes of a head looked at. Heads longer than this are not injected into (and counted).
pub const SCAN_MAX: usize = 4096;
/// Length of a version-00 `traceparent` value.
pub const TP_LEN: usize = 55;
/// Longest method token the first-bytes check waits for (`BASELINE-CONTROL` has 16).
const METHOD_MAX: usize = 20;

/// Whether `buf` starts with an uppercase HTTP method token and a space (the methods whose
/// requests the kernel links and injects into).
#[inline(always)]
pub fn starts_with_method<B: Bytes>(buf: &B, len: usize) -> bool {
    let mut i = 0;
    while i < 12 {
        if i >= len {
            return false;
        }
        let c = buf.at(i);
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
pub fn starts_with_status<B: Bytes>(buf: &B, len: usize) -> bool {
    len >= 12
        && buf.at(0) == b'H'
        && buf.at(1) == b'T'
        && buf.at(2) == b'T'
        && buf.at(3) == b'P'
        && buf.at(4) == b'/'
        && buf.at(5) == b'1'
        && buf.at(6) == b'.'
}

/// What the first bytes a client sends on a connection say about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opening {
    /// A token and a space: an HTTP/1.x request line (or the HTTP/2 preface `PRI * ...`, or a
    /// PROXY protocol v1 line, which are followed by HTTP).
    Request,
    /// Anything else (TLS, a database protocol, binary data): the connection is not HTTP/1.x
    /// in plaintext and never becomes it.
    Other,
    /// Too few bytes to tell.
    Undecided,
}

/// RFC 9110 `tchar`: what a method token is made of.
#[inline(always)]
fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// Classifies the first `len` bytes a client sent on a connection. Deliberately wider than the
/// methods httparse accepts: a false `Request` costs only copies, a false `Other` loses spans.
#[inline(always)]
pub fn opening<B: Bytes>(buf: &B, len: usize) -> Opening {
    let mut i = 0;
    while i <= METHOD_MAX {
        if i >= len {
            return Opening::Undecided;
        }
        let c = buf.at(i);
        if c == b' ' {
            return if i >= 1 {
                Opening::Request
            } else {
                Opening::Other
            };
        }
        if !is_tchar(c) {
            return Opening::Other;
        }
        i += 1;
    }
    Opening::Other
}

/// The HTTP/2 client preface.
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a client's first bytes are the HTTP/2 preface, given its three little-endian 8-byte
/// words (three loads and compares: the kernel's largest programs have no room for a loop).
#[inline(always)]
pub fn is_h2_preface_words(words: [u64; 3], len: usize) -> bool {
    len >= H2_PREFACE.len() && words == H2_PREFACE_WORDS
}

const fn word(i: usize) -> u64 {
    let p = H2_PREFACE;
    u64::from_le_bytes([
        p[i],
        p[i + 1],
        p[i + 2],
        p[i + 3],
        p[i + 4],
        p[i + 5],
        p[i + 6],
        p[i + 7],
    ])
}

/// The preface as three little-endian 8-byte words.
pub const H2_PREFACE_WORDS: [u64; 3] = [word(0), word(8), word(16)];

/// Whether a server's first bytes on a connection are an HTTP/2 SETTINGS frame header (type 4,
/// no flags, stream 0, a length that is a multiple of 6): HTTP/2 servers send their settings
/// as soon as they accept, often before the client's preface is read, so the opening is
/// decided by the client's bytes that follow.
#[inline(always)]
pub fn server_settings_first<B: Bytes>(buf: &B, len: usize) -> bool {
    len >= 9
        && buf.at(3) == 4
        && buf.at(4) == 0
        && buf.at(5) == 0
        && buf.at(6) == 0
        && buf.at(7) == 0
        && buf.at(8) == 0
        && ((buf.at(0) as u32) << 16 | (buf.at(1) as u32) << 8 | buf.at(2) as u32).is_multiple_of(6)
}

/// State of the search for the end of the request line (`newline_step`).
#[repr(C)]
pub struct LineWalk {
    pub len: u64,
    /// Offset just past the first `\n`, 0: none.
    pub end: u64,
}

/// One step (byte `index`) of the request-line search; 1 ends the walk.
#[inline(always)]
pub fn newline_step<B: Bytes>(w: &mut LineWalk, buf: &B, index: u64) -> i64 {
    let i = index as usize;
    if i >= w.len as usize {
        return 1;
    }
    if buf.at(i) == b'\n' {
        w.end = index + 1;
        return 1;
    }
    0
}

/// The request line's end found by the walk (`end`, just past its `\n`) when the line reads
/// `METHOD SP target SP HTTP/1.x CRLF`; 0 otherwise.
#[inline(always)]
pub fn request_line_checked<B: Bytes>(buf: &B, end: usize) -> usize {
    if !(16..=SCAN_MAX).contains(&end)
        || buf.at(end - 11) != b' '
        || buf.at(end - 10) != b'H'
        || buf.at(end - 9) != b'T'
        || buf.at(end - 8) != b'T'
        || buf.at(end - 7) != b'P'
        || buf.at(end - 6) != b'/'
        || buf.at(end - 5) != b'1'
        || buf.at(end - 4) != b'.'
        || !buf.at(end - 3).is_ascii_digit()
        || buf.at(end - 2) != b'\r'
    {
        return 0;
    }
    end
}

/// What the header block holds, as far as the kernel cares.
#[repr(C)]
pub struct Head {
    /// Offset just past the first `traceparent:`, 0: none.
    pub traceparent: usize,
    /// Offset just past the empty line that ends the head, 0: not within the bytes at hand
    /// (the head goes on in a later write).
    pub end: usize,
    /// `Content-Length`, when present and well formed.
    pub content_length: Option<u64>,
    /// The body's end cannot be followed from here: a `Transfer-Encoding` header, or a
    /// `Content-Length` that `decimal` cannot read.
    pub body_unknown: bool,
}

/// State of the walk over header lines (`header_step`).
#[repr(C)]
pub struct HeadWalk {
    pub transfer_encoding: u32,
    /// `Content-Length` headers seen: 0, 1, or 2 for more than one.
    pub cl_count: u32,
    pub from: u64,
    pub len: u64,
    /// Offset just past `traceparent:`, 0: none.
    pub traceparent: u64,
    pub end: u64,
    /// Offset just past the last `Content-Length:`.
    pub content_length: u64,
}

impl HeadWalk {
    #[inline(always)]
    pub fn new(from: usize, len: usize) -> HeadWalk {
        HeadWalk {
            transfer_encoding: 0,
            cl_count: 0,
            from: from as u64,
            len: len as u64,
            traceparent: 0,
            end: 0,
            content_length: 0,
        }
    }

    /// The walk over the `Content-Length` value to run next (`decimal_step`), if there is
    /// exactly one such header. Two or more make the body unknown: userspace accepts equal
    /// duplicates, the kernel simply does not follow such a body.
    #[inline(always)]
    pub fn decimal_walk(&self) -> Option<DecWalk> {
        (self.cl_count == 1).then(|| DecWalk::new(self.content_length as usize, self.len as usize))
    }

    /// The result once the walks are over (`dec`: the `decimal_walk` that ran, if any).
    #[inline(always)]
    pub fn head(&self, dec: Option<&DecWalk>) -> Head {
        let content_length = dec.and_then(DecWalk::value);
        Head {
            traceparent: self.traceparent as usize & (SCAN_MAX * 2 - 1),
            end: self.end as usize & (SCAN_MAX * 2 - 1),
            body_unknown: self.transfer_encoding != 0
                || self.cl_count > 1
                || (self.cl_count == 1 && content_length.is_none()),
            content_length,
        }
    }
}

/// One step of the walk over header lines: byte `from + index`, looked at only when it starts a
/// line; 1 ends the walk. It runs as a `bpf_loop` callback in the kernel and keeps only offsets,
/// so the verifier sees its state settle at once; values are read by walks of their own.
#[inline(always)]
pub fn header_step<B: Bytes>(w: &mut HeadWalk, buf: &B, index: u64) -> i64 {
    let i = (w.from + index) as usize;
    let len = w.len as usize;
    if i >= len || i > 2 * SCAN_MAX {
        return 1;
    }
    if index != 0 && buf.at(i - 1) != b'\n' {
        return 0;
    }
    // A bare LF ends the head too, as it does for httparse (found by fuzzing).
    if buf.at(i) == b'\n' {
        w.end = (i + 1) as u64;
        return 1;
    }
    if i + 2 > len {
        return 1;
    }
    if buf.at(i) == b'\r' && buf.at(i + 1) == b'\n' {
        w.end = (i + 2) as u64;
        return 1;
    }
    if w.traceparent == 0 && i + 12 <= len && is_name(buf, i, b"traceparent") {
        w.traceparent = (i + 12) as u64;
    } else if i + 15 <= len && is_name(buf, i, b"content-length") {
        w.content_length = (i + 15) as u64;
        // Saturates at 2 so that the verifier sees the walk's state settle.
        w.cl_count = if w.cl_count == 0 { 1 } else { 2 };
    } else if i + 18 <= len && is_name(buf, i, b"transfer-encoding") {
        w.transfer_encoding = 1;
    }
    0
}

/// State of the reading of a `Content-Length` value (`decimal_step`).
#[repr(C)]
pub struct DecWalk {
    pub start: u64,
    pub len: u64,
    pub n: u64,
    /// A digit was seen. (A flag, not a count: the verifier then sees the loop's state settle
    /// after a step or two instead of once per digit.)
    pub digits: u32,
    /// 1: read, 2: not a number the kernel accepts.
    pub state: u32,
}

/// Characters a `Content-Length` value is looked at: 4 blanks, 18 digits and what ends them.
/// (Longer runs of leading zeros are left unread.)
pub const DEC_WALK: usize = 23;

impl DecWalk {
    #[inline(always)]
    pub fn new(start: usize, len: usize) -> DecWalk {
        DecWalk {
            start: start as u64,
            len: len as u64,
            n: 0,
            digits: 0,
            state: 0,
        }
    }

    #[inline(always)]
    pub fn value(&self) -> Option<u64> {
        (self.state == 1).then_some(self.n)
    }
}

/// One character of a `Content-Length` value: up to four spaces or tabs, digits (a value
/// below 10^18),
/// then the value's end (a blank or the line's end). Anything else (too long, a sign, trailing
/// characters, the bytes at hand ending) leaves it unread: the kernel cannot tell the body's
/// length. 1 ends the walk.
#[inline(always)]
pub fn decimal_step<B: Bytes>(w: &mut DecWalk, buf: &B, index: u64) -> i64 {
    let i = (w.start + index) as usize;
    if i >= w.len as usize || index >= DEC_WALK as u64 {
        w.state = 2;
        return 1;
    }
    let c = buf.at(i);
    if c.is_ascii_digit() {
        if w.n >= 100_000_000_000_000_000 {
            w.state = 2; // more than 18 digits, leading zeros aside
            return 1;
        }
        w.n = w.n * 10 + (c - b'0') as u64;
        w.digits = 1;
        return 0;
    }
    let blank = c == b' ' || c == b'\t';
    if w.digits == 0 && blank && index < 4 {
        return 0;
    }
    w.state = if w.digits > 0 && (blank || c == b'\r' || c == b'\n') {
        1
    } else {
        2
    };
    1
}

/// `<name>:` at `i`, case-insensitive (`name` in lowercase).
#[inline(always)]
pub fn is_name<B: Bytes, const N: usize>(buf: &B, i: usize, name: &[u8; N]) -> bool {
    let mut j = 0;
    while j < N {
        if buf.at(i + j) | 0x20 != name[j] {
            return false;
        }
        j += 1;
    }
    buf.at(i + N) == b':'
}

/// Offset of the CR that ends the header value starting at `v`, looking at most 256 bytes on.
#[inline(always)]
pub fn value_end<B: Bytes>(buf: &B, v: usize, len: usize) -> Option<usize> {
    let mut k = 0;
    while k < 256 {
        let i = v + k;
        if i >= len {
            return None;
        }
        if buf.at(i) == b'\r' {
            return Some(i);
        }
        k += 1;
    }
    None
}

/// State of the check of a `traceparent` value (`traceparent_step`).
#[repr(C)]
pub struct TpWalk {
    /// Offset just past `traceparent:`.
    pub from: u64,
    pub len: u64,
    /// Where the value starts, once `started`.
    pub at: u64,
    /// Flags, so that the verifier sees the loop's state settle at once.
    pub started: u32,
    pub bad: u32,
    /// The line ended where a version-00 value must.
    pub done: u32,
    pub _pad: u32,
}

/// Characters a `traceparent` value is looked at: up to four blanks, its 55, then up to four
/// blanks and the line's end.
pub const TP_WALK: usize = TP_LEN + 9;

impl TpWalk {
    #[inline(always)]
    pub fn new(from: usize, len: usize) -> TpWalk {
        TpWalk {
            from: from as u64,
            len: len as u64,
            at: 0,
            started: 0,
            bad: 0,
            done: 0,
            _pad: 0,
        }
    }

    /// Where the value starts, when it is a version-00 `traceparent`.
    #[inline(always)]
    pub fn value_at(&self) -> Option<usize> {
        (self.bad == 0 && self.done != 0).then_some(self.at as usize)
    }
}

/// One character after `traceparent:`: up to four blanks, then `00-<32 hex>-<16 hex>-<2 hex>` in
/// lowercase hex, exactly 55 characters, and nothing but blanks until the line ends (CR, or a
/// bare LF). 1 ends the walk.
#[inline(always)]
pub fn traceparent_step<B: Bytes>(w: &mut TpWalk, buf: &B, index: u64) -> i64 {
    let i = w.from + index;
    if i >= w.len || index >= TP_WALK as u64 {
        w.bad = 1;
        return 1;
    }
    let c = buf.at(i as usize);
    let blank = c == b' ' || c == b'\t';
    if w.started == 0 {
        if blank && index < 4 {
            return 0;
        }
        w.started = 1;
        w.at = i;
    }
    let k = i.wrapping_sub(w.at);
    let ok = match k {
        0 | 1 => c == b'0',
        2 | 35 | 52 => c == b'-',
        _ if k < TP_LEN as u64 => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        _ => {
            if c == b'\r' || c == b'\n' {
                w.done = 1;
                return 1;
            }
            blank
        }
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
fn hex_byte<B: Bytes>(buf: &B, i: usize) -> u8 {
    nibble(buf.at(i)) << 4 | nibble(buf.at(i + 1))
}

/// A parsed version-00 `traceparent` value.
pub struct TraceParent {
    /// Offset of the value in the head.
    pub at: usize,
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

/// The ids of the value at `v` whose characters were all checked; `None` for the all-zero ids
/// W3C Trace Context forbids.
#[inline(always)]
pub fn traceparent_ids<B: Bytes>(buf: &B, v: usize) -> Option<TraceParent> {
    let mut tp = TraceParent {
        at: v,
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

/// The host's drivers of the walks, with a plain loop where the kernel has `bpf_loop` (which
/// also stops at the first step that returns 1). For tests and the fuzzer.
#[cfg(not(target_arch = "bpf"))]
pub mod host {
    use super::*;

    fn walk<T>(n: usize, state: &mut T, mut step: impl FnMut(&mut T, u64) -> i64) {
        for index in 0..n as u64 {
            if step(state, index) == 1 {
                break;
            }
        }
    }

    /// `request_line_end` of the kernel: offset past the request line's CRLF, 0 if none.
    pub fn request_line_end<B: Bytes>(buf: &B, len: usize) -> usize {
        if !starts_with_method(buf, len) {
            return 0;
        }
        let mut w = LineWalk {
            len: len as u64,
            end: 0,
        };
        walk(SCAN_MAX, &mut w, |w, i| newline_step(w, buf, i));
        request_line_checked(buf, w.end as usize)
    }

    /// `read_head` of the kernel: the header lines that start at `from`.
    pub fn read_head<B: Bytes>(buf: &B, from: usize, len: usize) -> Head {
        let mut w = HeadWalk::new(from, len);
        walk(SCAN_MAX, &mut w, |w, i| header_step(w, buf, i));
        let dec = w.decimal_walk().map(|mut d| {
            walk(DEC_WALK, &mut d, |d, i| decimal_step(d, buf, i));
            d
        });
        w.head(dec.as_ref())
    }

    /// `parse_traceparent` of the kernel: `v` is the offset just past `traceparent:`.
    pub fn parse_traceparent<B: Bytes>(buf: &B, v: usize, len: usize) -> Option<TraceParent> {
        let mut w = TpWalk::new(v, len);
        walk(TP_WALK, &mut w, |w, i| traceparent_step(w, buf, i));
        traceparent_ids(buf, w.value_at()?)
    }

    /// A slice as the kernel sees its buffer: indices masked to `MAX_PAYLOAD`, and `filler`
    /// wherever the slice has no byte (stale map memory in the kernel).
    pub struct Padded<'a> {
        pub bytes: &'a [u8],
        pub filler: u8,
    }

    impl Bytes for Padded<'_> {
        fn at(&self, i: usize) -> u8 {
            *self
                .bytes
                .get(i & (crate::MAX_PAYLOAD - 1))
                .unwrap_or(&self.filler)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::host::*;
    use super::*;

    #[test]
    fn the_http2_preface_is_recognised_whole() {
        let words = |b: &[u8]| {
            let w = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
            [w(0), w(8), w(16)]
        };
        let mut b = H2_PREFACE.to_vec();
        assert!(is_h2_preface_words(words(&b), b.len()));
        assert!(!is_h2_preface_words(words(&b), 23));
        b[22] = b'\n';
        assert!(!is_h2_preface_words(words(&b), b.len()));
        assert!(!is_h2_preface_words(
            words(b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n"),
            24
        ));
    }

    #[test]
    fn an_http2_servers_settings_leave_the_opening_to_the_client() {
        // Node's http2 server: SETTINGS with 3 settings (18 bytes) before reading anything.
        let settings = [0u8, 0, 18, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100];
        assert!(server_settings_first(&padded(&settings), settings.len()));
        // A SETTINGS ACK, a frame on a stream, a length not a multiple of 6, too short, text.
        assert!(!server_settings_first(
            &padded(&[0u8, 0, 0, 4, 1, 0, 0, 0, 0]),
            9
        ));
        assert!(!server_settings_first(
            &padded(&[0u8, 0, 6, 4, 0, 0, 0, 0, 1]),
            9
        ));
        assert!(!server_settings_first(
            &padded(&[0u8, 0, 7, 4, 0, 0, 0, 0, 0]),
            9
        ));
        assert!(!server_settings_first(
            &padded(&[0u8, 0, 6, 4, 0, 0, 0, 0]),
            8
        ));
        assert!(!server_settings_first(
            &padded(&b"220 smtp.example.com"[..]),
            20
        ));
    }

    fn padded(b: &[u8]) -> Padded<'_> {
        Padded {
            bytes: b,
            filler: b'\n',
        }
    }

    #[test]
    fn golden_request_head() {
        let b = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\
traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\nbody";
        let p = padded(b);
        let line = request_line_end(&p, b.len());
        assert_eq!(line, 18);
        let h = read_head(&p, line, b.len());
        assert_eq!(h.end, b.len() - 4);
        assert_eq!(h.content_length, Some(12));
        assert!(!h.body_unknown);
        let tp = parse_traceparent(&p, h.traceparent, b.len()).unwrap();
        assert_eq!(tp.trace_id[0], 0x0a);
        assert_eq!(tp.parent_id[7], 0x31);
        assert_eq!(tp.flags, 1);
    }

    #[test]
    fn openings() {
        let o = |b: &[u8]| opening(&padded(b), b.len());
        assert_eq!(o(b"GET / HTTP/1.1\r\n"), Opening::Request);
        assert_eq!(o(b"PRI * HTTP/2.0\r\n"), Opening::Request);
        assert_eq!(o(b"VERSION-CONTROL /x HTTP/1.1\r\n"), Opening::Request);
        assert_eq!(o(b"GE"), Opening::Undecided);
        assert_eq!(o(b""), Opening::Undecided);
        assert_eq!(o(b"\x16\x03\x01\x02\x00"), Opening::Other);
        assert_eq!(o(b"*1\r\n$4\r\nPING\r\n"), Opening::Other);
        assert_eq!(o(b" GET"), Opening::Other);
        assert_eq!(o(&[b'A'; 40]), Opening::Other);
    }
}
