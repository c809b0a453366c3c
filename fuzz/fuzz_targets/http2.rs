//! The HTTP/2 connection parser (frames, HPACK, streams) on arbitrary bytes, split into
//! syscalls arbitrarily, in both directions, with capture gaps, from a connection's start and
//! from its middle: it never panics, holds at most `MAX_STREAMS` streams, and every exchange it
//! reports ends no earlier than it starts. The HPACK decoder alone, on the same bytes, never
//! panics and keeps its table within bounds.
#![no_main]
use agent::protocol::{
    http1::Exchange,
    http2::{hpack::Decoder, Http2Conn, MAX_STREAMS},
    Dir, Segment,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let mut conn = if mode & 1 == 0 {
        Http2Conn::from_preface(Dir::Egress)
    } else {
        Http2Conn::mid_stream()
    };
    let mut out: Vec<Exchange> = Vec::new();
    // Each piece is <len byte><flags byte><bytes>: flags pick the direction and a gap after it.
    let mut rest = data;
    let mut ts = 0u64;
    let mut with_preface = mode & 2 != 0;
    while rest.len() >= 2 {
        let (len, flags) = (rest[0] as usize + 1, rest[1]);
        rest = &rest[2..];
        let take = len.min(rest.len());
        let (piece, tail) = rest.split_at(take);
        rest = tail;
        let dir = if flags & 1 == 0 {
            Dir::Egress
        } else {
            Dir::Ingress
        };
        let gap = if flags & 2 != 0 {
            u64::from(flags >> 2) * 131
        } else {
            0
        };
        ts += 1;
        let mut bytes = Vec::new();
        if with_preface && dir == Dir::Egress {
            // A well-formed start lets the fuzzer reach the frames behind it.
            bytes.extend_from_slice(agent::protocol::http2::frame::PREFACE);
            with_preface = false;
        }
        bytes.extend_from_slice(piece);
        let seg = Segment {
            data: &bytes,
            len: bytes.len() as u64 + gap,
            start_ns: ts,
            end_ns: ts,
            ctx: None,
        };
        conn.feed(dir, seg, &mut out);
        assert!(conn.open_streams() <= MAX_STREAMS);
    }
    conn.close(ts + 1, &mut out);
    for ex in &out {
        assert!(ex.end_ns >= ex.start_ns);
        assert!(ex.h2.is_some());
    }
    let mut d = Decoder::mid_stream();
    let mut fields = Vec::new();
    let _ = d.decode(&bytes::Bytes::copy_from_slice(data), &mut fields);
    assert!(fields.len() <= agent::protocol::http2::hpack::MAX_FIELDS);
});
