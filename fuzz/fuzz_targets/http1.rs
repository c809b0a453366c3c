//! The HTTP/1 stream parser on arbitrary bytes, split into syscalls arbitrarily, in both
//! directions, with capture gaps: it never panics, every exchange it reports has a request
//! head httparse also accepts, and an exchange never ends before it starts.
#![no_main]
use agent::protocol::{
    http1::{Exchange, Http1Conn},
    Dir, Segment,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut conn = Http1Conn::default();
    let mut out: Vec<Exchange> = Vec::new();
    // Control bytes: each piece is <len byte><flags byte><bytes>; flags pick the direction
    // and whether the kernel copied only part of the piece (a gap).
    let mut rest = data;
    let mut ts = 0u64;
    while rest.len() >= 2 {
        let (len, flags) = (rest[0] as usize + 1, rest[1]);
        rest = &rest[2..];
        let take = len.min(rest.len());
        let (piece, tail) = rest.split_at(take);
        rest = tail;
        let dir = if flags & 1 == 0 {
            Dir::Ingress
        } else {
            Dir::Egress
        };
        let gap = if flags & 2 != 0 {
            u64::from(flags >> 2) * 97
        } else {
            0
        };
        ts += 1;
        let seg = Segment {
            data: piece,
            len: piece.len() as u64 + gap,
            start_ns: ts,
            end_ns: ts,
            ctx: None,
        };
        conn.feed(dir, seg, &mut out);
    }
    conn.close(&mut out);
    for e in &out {
        assert!(e.start_ns <= e.end_ns, "{e:?}");
        assert!(!e.request.method.is_empty());
        assert!((100..1000).contains(&e.response.status), "{e:?}");
    }
    let _ = conn.take_stats();
});
