//! HTTP/2 framing (RFC 9113 section 4 and 6): frame headers, the client preface, header-block
//! fragments, and the strict check that recognises HTTP/2 in the middle of a connection.
use super::static_table::LAST_PSEUDO;

/// What a client sends first on every HTTP/2 connection.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADER_LEN: usize = 9;
/// The largest frame length any peer may allow (SETTINGS_MAX_FRAME_SIZE's ceiling).
pub const MAX_FRAME_LEN: u32 = (1 << 24) - 1;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

/// SETTINGS identifier of the HPACK table size the sender decodes with.
pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl FrameHeader {
    pub fn parse(b: &[u8]) -> Option<FrameHeader> {
        let b: &[u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
        Some(FrameHeader {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        })
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Whether this header is one a conforming peer sends (RFC 9113 section 6): a known type,
    /// no undefined flag, the reserved bit clear, the stream and length each type requires.
    /// Receivers must ignore unknown types and flags, but senders do not invent them, so a
    /// header that breaks any rule is taken as not HTTP/2 at all.
    pub fn is_strictly_valid(raw: &[u8]) -> bool {
        let Some(h) = FrameHeader::parse(raw) else {
            return false;
        };
        if raw[5] & 0x80 != 0 {
            return false;
        }
        let (flags, on_stream, len_ok) = match h.kind {
            DATA => (END_STREAM | PADDED, Some(true), true),
            HEADERS => (
                END_STREAM | END_HEADERS | PADDED | PRIORITY_FLAG,
                Some(true),
                true,
            ),
            PRIORITY => (0, Some(true), h.len == 5),
            RST_STREAM => (0, Some(true), h.len == 4),
            SETTINGS => (
                ACK,
                Some(false),
                h.len % 6 == 0 && !(h.has(ACK) && h.len > 0),
            ),
            PUSH_PROMISE => (END_HEADERS | PADDED, Some(true), h.len >= 4),
            PING => (ACK, Some(false), h.len == 8),
            GOAWAY => (0, Some(false), h.len >= 8),
            WINDOW_UPDATE => (0, None, h.len == 4),
            CONTINUATION => (END_HEADERS, Some(true), true),
            _ => return false,
        };
        h.flags & !flags == 0 && len_ok && on_stream.is_none_or(|s| s == (h.stream != 0))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("padding longer than the frame")]
    BadPadding,
    #[error("frame too short for its fields")]
    Short,
}

/// The header-block fragment of a HEADERS frame's payload: without its padding and priority
/// fields.
pub fn headers_fragment(
    h: &FrameHeader,
    payload: &[u8],
) -> Result<std::ops::Range<usize>, FrameError> {
    let mut start = 0;
    let mut end = payload.len();
    if h.has(PADDED) {
        let pad = *payload.first().ok_or(FrameError::Short)? as usize;
        start = 1;
        end = end.checked_sub(pad).ok_or(FrameError::BadPadding)?;
    }
    if h.has(PRIORITY_FLAG) {
        start += 5;
    }
    if start > end {
        return Err(if h.has(PADDED) {
            FrameError::BadPadding
        } else {
            FrameError::Short
        });
    }
    Ok(start..end)
}

/// Whether `buf`, one read or write seen in the middle of a connection, is HTTP/2: it must be
/// whole frames that tile it exactly, each strictly valid, with at least one HEADERS frame, on an
/// odd (client-opened) stream, whose block opens with a pseudo-header. Any binary protocol that
/// is not HTTP/2 fails one of these on nearly every read, so the connection stays undecided
/// rather than misread.
pub fn is_midstream_http2(buf: &[u8]) -> bool {
    let mut pos = 0;
    let mut headers = 0;
    while pos < buf.len() {
        let raw = &buf[pos..];
        if !FrameHeader::is_strictly_valid(raw) {
            return false;
        }
        let Some(h) = FrameHeader::parse(raw) else {
            return false;
        };
        let end = pos + HEADER_LEN + h.len as usize;
        if end > buf.len() {
            return false;
        }
        let payload = &buf[pos + HEADER_LEN..end];
        if h.kind == HEADERS {
            if h.stream % 2 == 0 {
                return false;
            }
            match headers_fragment(&h, payload) {
                Ok(r) if opens_with_pseudo_header(&payload[r.clone()]) => headers += 1,
                _ => return false,
            }
        }
        pos = end;
    }
    headers > 0
}

/// Whether a header block's first fields (after any table size updates) include a static
/// pseudo-header, preceded only by references to the dynamic table (an encoder that indexed
/// `:authority` on the connection's first request refers to it first on later ones).
fn opens_with_pseudo_header(block: &[u8]) -> bool {
    let mut pos = 0;
    // Size updates: 001xxxxx with a 5-bit prefix integer.
    while block.get(pos).is_some_and(|b| b & 0xe0 == 0x20) {
        if !skip_integer(block, &mut pos, 5) {
            return false;
        }
    }
    for _ in 0..4 {
        let Some(&b) = block.get(pos) else {
            return false;
        };
        let (prefix, indexed) = match b {
            _ if b & 0x80 != 0 => (7, true),
            _ if b & 0xc0 == 0x40 => (6, false),
            _ if b & 0xf0 == 0x00 || b & 0xf0 == 0x10 => (4, false),
            _ => return false,
        };
        let mut p = pos;
        let Some(index) = read_integer(block, &mut p, prefix) else {
            return false;
        };
        if (1..=LAST_PSEUDO).contains(&index) {
            return true;
        }
        if !indexed || index <= 61 {
            // A literal, or a static regular header, before any pseudo-header.
            return false;
        }
        pos = p;
    }
    false
}

fn read_integer(block: &[u8], pos: &mut usize, n: u32) -> Option<usize> {
    let mask = (1usize << n) - 1;
    let first = (*block.get(*pos)? as usize) & mask;
    *pos += 1;
    if first < mask {
        return Some(first);
    }
    let mut value = mask;
    for shift in (0..28).step_by(7) {
        let b = *block.get(*pos)?;
        *pos += 1;
        value += ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn skip_integer(block: &[u8], pos: &mut usize, n: u32) -> bool {
    read_integer(block, pos, n).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn parses_a_frame_header() {
        let f = frame(HEADERS, END_HEADERS | END_STREAM, 3, &[0x82]);
        assert_eq!(
            FrameHeader::parse(&f),
            Some(FrameHeader {
                len: 1,
                kind: HEADERS,
                flags: END_HEADERS | END_STREAM,
                stream: 3
            })
        );
        assert_eq!(FrameHeader::parse(&f[..8]), None);
    }

    #[test]
    fn strips_padding_and_priority_from_a_headers_fragment() {
        let h = FrameHeader {
            len: 10,
            kind: HEADERS,
            flags: PADDED | PRIORITY_FLAG | END_HEADERS,
            stream: 1,
        };
        // pad length 2, 5 priority bytes, block 0x82 0x84, 2 bytes of padding.
        let payload = [2, 0, 0, 0, 0, 16, 0x82, 0x84, 0, 0];
        assert_eq!(headers_fragment(&h, &payload), Ok(6..8));
        let bad = [9, 0x82];
        assert_eq!(
            headers_fragment(&FrameHeader { len: 2, ..h }, &bad),
            Err(FrameError::BadPadding)
        );
    }

    #[test]
    fn recognises_http2_in_the_middle_of_a_connection() {
        // A gRPC request: HEADERS (:method POST, :scheme http, :path literal) then DATA.
        let mut read = frame(
            HEADERS,
            END_HEADERS,
            7,
            &[0x83, 0x86, 0x44, 0x02, b'/', b'x'],
        );
        read.extend(frame(DATA, END_STREAM, 7, &[0, 0, 0, 0, 0]));
        assert!(is_midstream_http2(&read));
        // A response opening with :status 200, after a WINDOW_UPDATE on stream 0.
        let mut resp = frame(WINDOW_UPDATE, 0, 0, &[0, 0, 0x10, 0]);
        resp.extend(frame(HEADERS, END_HEADERS, 7, &[0x88]));
        assert!(is_midstream_http2(&resp));
        // An indexed dynamic reference (an :authority indexed earlier) before :method.
        assert!(is_midstream_http2(&frame(
            HEADERS,
            END_HEADERS,
            9,
            &[0xbe, 0x82, 0x87, 0x84]
        )));
    }

    #[test]
    fn rejects_what_only_looks_like_http2() {
        let headers = frame(HEADERS, END_HEADERS, 1, &[0x82, 0x86, 0x84]);
        // Frames that do not tile the read.
        assert!(!is_midstream_http2(&headers[..headers.len() - 1]));
        let mut extra = headers.clone();
        extra.push(0);
        assert!(!is_midstream_http2(&extra));
        // No HEADERS frame: DATA alone proves nothing.
        assert!(!is_midstream_http2(&frame(DATA, 0, 1, b"hello")));
        // HEADERS on an even stream, or opening with a regular header.
        assert!(!is_midstream_http2(&frame(
            HEADERS,
            END_HEADERS,
            2,
            &[0x82]
        )));
        assert!(!is_midstream_http2(&frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0x90, 0x82]
        )));
        // Undefined flags, unknown types, the reserved bit, wrong lengths and streams.
        assert!(!is_midstream_http2(&frame(
            HEADERS,
            0x40 | END_HEADERS,
            1,
            &[0x82]
        )));
        assert!(!is_midstream_http2(&frame(0x0a, 0, 0, b"")));
        let mut reserved = headers.clone();
        reserved[5] |= 0x80;
        assert!(!is_midstream_http2(&reserved));
        let mut ping = frame(PING, 0, 0, &[0; 7]);
        ping.extend(&headers);
        assert!(!is_midstream_http2(&ping));
        let mut settings = frame(SETTINGS, 0, 1, &[]);
        settings.extend(&headers);
        assert!(!is_midstream_http2(&settings));
        // Text protocols and TLS records.
        assert!(!is_midstream_http2(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(!is_midstream_http2(&[
            0x17, 0x03, 0x03, 0x00, 0x20, 1, 2, 3, 4, 5
        ]));
        assert!(!is_midstream_http2(b""));
    }

    #[test]
    fn random_bytes_are_never_taken_for_http2() {
        // A deterministic generator (xorshift): a million random reads of 9 to 64 bytes.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buf = [0u8; 64];
        let mut accepted = 0;
        for _ in 0..1_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = 9 + (x % 56) as usize;
            for b in buf.iter_mut().take(len) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            accepted += is_midstream_http2(&buf[..len]) as u32;
        }
        assert_eq!(accepted, 0);
    }
}
