//! Golden tests: raw bytes in, a compact dump of the exchanges out.
use super::*;

/// One exchange per line: `side method target -> status [start..end]`.
fn dump(out: &[Exchange]) -> String {
    out.iter()
        .map(|e| {
            format!(
                "{:?} {} {} 1.{} tp={} -> {} [{}..{}]",
                e.side,
                e.request.method,
                e.request.target,
                e.request.minor_version,
                e.request.traceparent.as_deref().unwrap_or("-"),
                e.response.status,
                e.start_ns,
                e.end_ns
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Feeds `(dir, bytes)` pieces, timestamp = piece index.
fn run(pieces: &[(Dir, &[u8])]) -> (String, Stats) {
    let mut conn = Http1Conn::default();
    let mut out = Vec::new();
    for (i, (dir, bytes)) in pieces.iter().enumerate() {
        conn.feed(*dir, Segment::whole(bytes, i as u64), &mut out);
    }
    conn.close(&mut out);
    (dump(&out), conn.take_stats())
}

const GET: &[u8] =
    b"GET /users/42?x=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/7.88\r\n\r\n";
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
use Dir::{Egress as E, Ingress as I};

#[test]
fn server_simple() {
    let (d, s) = run(&[(I, GET), (E, OK)]);
    assert_eq!(d, "Server GET /users/42?x=1 1.1 tp=- -> 200 [0..1]");
    assert_eq!(s, Stats::default());
}

#[test]
fn client_simple() {
    let (d, _) = run(&[(E, GET), (I, OK)]);
    assert_eq!(d, "Client GET /users/42?x=1 1.1 tp=- -> 200 [0..1]");
}

#[test]
fn keepalive_and_pipelining() {
    let two = [GET, GET].concat();
    let two_ok = [OK, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"].concat();
    let (d, _) = run(&[(I, &two), (E, &two_ok), (I, GET), (E, OK)]);
    assert_eq!(
        d,
        "Server GET /users/42?x=1 1.1 tp=- -> 200 [0..1]\n\
         Server GET /users/42?x=1 1.1 tp=- -> 404 [0..1]\n\
         Server GET /users/42?x=1 1.1 tp=- -> 200 [2..3]"
    );
}

/// Every split of a request/response pair into two pieces gives the same result as no split.
#[test]
fn split_at_every_byte_boundary() {
    let req = b"POST /submit HTTP/1.1\r\nHost: h\r\nTraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nContent-Length: 11\r\n\r\nhello world";
    let resp = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
    let want =
        "Server POST /submit 1.1 tp=00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 -> 201";
    for cut in 1..req.len() {
        let (d, s) = run(&[(I, &req[..cut]), (I, &req[cut..]), (E, resp)]);
        assert_eq!(d, format!("{want} [0..2]"), "request split at {cut}");
        assert_eq!(s, Stats::default(), "request split at {cut}");
    }
    for cut in 1..resp.len() {
        let (d, s) = run(&[(I, req), (E, &resp[..cut]), (E, &resp[cut..])]);
        assert_eq!(d, format!("{want} [0..2]"), "response split at {cut}");
        assert_eq!(s, Stats::default(), "response split at {cut}");
    }
}

#[test]
fn one_byte_at_a_time() {
    let mut pieces: Vec<(Dir, &[u8])> = GET.chunks(1).map(|c| (I, c)).collect();
    pieces.extend(OK.chunks(1).map(|c| (E, c)));
    let (d, _) = run(&pieces);
    let last = pieces.len() - 1;
    assert_eq!(
        d,
        format!("Server GET /users/42?x=1 1.1 tp=- -> 200 [0..{last}]")
    );
}

#[test]
fn http10_until_close() {
    let req = b"GET / HTTP/1.0\r\n\r\n";
    let resp = b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6\r\n\r\n";
    let (d, _) = run(&[(E, req), (I, resp), (I, b"<html>body</html>"), (I, b"more")]);
    assert_eq!(d, "Client GET / 1.0 tp=- -> 200 [0..3]");
}

#[test]
fn head_has_no_body() {
    let req = b"HEAD /big HTTP/1.1\r\nHost: h\r\n\r\n";
    let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n";
    let (d, _) = run(&[(I, req), (E, resp), (I, GET), (E, OK)]);
    assert_eq!(
        d,
        "Server HEAD /big 1.1 tp=- -> 200 [0..1]\nServer GET /users/42?x=1 1.1 tp=- -> 200 [2..3]"
    );
}

#[test]
fn informational_then_final() {
    let req = b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
    let (d, _) = run(&[
        (E, req),
        (I, b"HTTP/1.1 100 Continue\r\n\r\n"),
        (E, b"abc"),
        (I, b"HTTP/1.1 204 No Content\r\n\r\n"),
    ]);
    assert_eq!(d, "Client PUT /x 1.1 tp=- -> 204 [0..3]");
}

#[test]
fn large_body_with_capture_gap() {
    // The kernel captured 10 of 100_010 bytes: the parser skips the rest of the body.
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n";
    let mut conn = Http1Conn::default();
    let mut out = Vec::new();
    conn.feed(I, Segment::whole(GET, 1), &mut out);
    conn.feed(
        E,
        Segment {
            data: head,
            len: head.len() as u64 + 60_000,
            start_ns: 2,
            end_ns: 3,
            ctx: None,
        },
        &mut out,
    );
    conn.feed(
        E,
        Segment {
            data: b"0123456789",
            len: 40_000,
            start_ns: 4,
            end_ns: 5,
            ctx: None,
        },
        &mut out,
    );
    assert_eq!(
        dump(&out),
        "Server GET /users/42?x=1 1.1 tp=- -> 200 [1..5]"
    );
    conn.feed(I, Segment::whole(GET, 6), &mut out);
    conn.feed(E, Segment::whole(OK, 7), &mut out);
    assert_eq!(out.len(), 2);
}

#[test]
fn lost_chunk_framing_ends_at_next_request() {
    let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000\r\n";
    let mut conn = Http1Conn::default();
    let mut out = Vec::new();
    conn.feed(I, Segment::whole(GET, 1), &mut out);
    // 0x10000 bytes of chunk data, then "\r\n0\r\n\r\n", captured only in part.
    conn.feed(
        E,
        Segment {
            data: head,
            len: head.len() as u64 + 70_000,
            start_ns: 2,
            end_ns: 3,
            ctx: None,
        },
        &mut out,
    );
    assert!(out.is_empty());
    conn.feed(I, Segment::whole(GET, 4), &mut out);
    conn.feed(E, Segment::whole(OK, 5), &mut out);
    assert_eq!(
        dump(&out),
        "Server GET /users/42?x=1 1.1 tp=- -> 200 [1..3]\nServer GET /users/42?x=1 1.1 tp=- -> 200 [4..5]"
    );
}

#[test]
fn starts_mid_message() {
    // Agent started while a response body was in flight: skip it, then follow the next exchange.
    let (d, s) = run(&[(E, b"lo world, rest of a body"), (I, GET), (E, OK)]);
    assert_eq!(d, "Server GET /users/42?x=1 1.1 tp=- -> 200 [1..2]");
    assert_eq!(s.skipped_bytes, 24);
}

#[test]
fn starts_mid_exchange_orphan_response() {
    let (d, s) = run(&[(E, OK), (I, GET), (E, OK)]);
    assert_eq!(d, "Server GET /users/42?x=1 1.1 tp=- -> 200 [1..2]");
    assert_eq!(s.orphan_responses, 1);
}

#[test]
fn garbage_is_skipped() {
    let junk: &[&[u8]] = &[
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GET\x00\x01 nonsense\r\n\r\n",
        b"HTTP/1.1 abc\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"",
    ];
    for j in junk {
        let (d, _) = run(&[(I, j), (E, j)]);
        assert_eq!(d, "", "junk {j:?}");
        let (d, _) = run(&[(I, j), (E, OK), (I, GET), (E, OK)]);
        assert_eq!(
            d, "Server GET /users/42?x=1 1.1 tp=- -> 200 [2..3]",
            "junk {j:?}"
        );
    }
}

#[test]
fn random_bytes_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..2000 {
        let mut conn = Http1Conn::default();
        let mut out = Vec::new();
        for _ in 0..8 {
            let n = rng.random_range(0..64);
            let mut b: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            if rng.random_bool(0.3) {
                b.splice(
                    0..0,
                    GET.iter().copied().take(rng.random_range(0..GET.len())),
                );
            }
            let dir = if rng.random_bool(0.5) { I } else { E };
            let extra = if rng.random_bool(0.2) {
                rng.random_range(0..100_000)
            } else {
                0
            };
            conn.feed(
                dir,
                Segment {
                    data: &b,
                    len: b.len() as u64 + extra,
                    start_ns: 0,
                    end_ns: 0,
                    ctx: None,
                },
                &mut out,
            );
        }
        conn.close(&mut out);
    }
}

#[test]
fn head_too_large_resyncs() {
    let mut big = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..2000 {
        big.extend_from_slice(format!("X-H{i}: value\r\n").as_bytes());
    }
    let (d, s) = run(&[
        (I, &big[..8000]),
        (I, &big[8000..]),
        (I, b"\r\n"),
        (I, GET),
        (E, OK),
    ]);
    assert_eq!(d, "Server GET /users/42?x=1 1.1 tp=- -> 200 [3..4]");
    assert!(s.skipped_bytes > 0);
}

#[test]
fn traceparent_after_long_headers() {
    let mut req = b"GET /t HTTP/1.1\r\n".to_vec();
    req.extend_from_slice(format!("X-Padding: {}\r\n", "a".repeat(1600)).as_bytes());
    req.extend_from_slice(
        b"traceparent: 00-11111111111111111111111111111111-2222222222222222-01\r\n\r\n",
    );
    let (d, _) = run(&[(I, &req), (E, OK)]);
    assert!(
        d.contains("tp=00-11111111111111111111111111111111-2222222222222222-01"),
        "{d}"
    );
}

#[test]
fn connect_tunnel_stops_parsing() {
    let (d, _) = run(&[
        (E, b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n"),
        (I, b"HTTP/1.1 200 Connection established\r\n\r\n"),
        (E, GET),
        (I, OK),
    ]);
    assert_eq!(d, "Client CONNECT h:443 1.1 tp=- -> 200 [0..1]");
}

#[test]
fn bare_lf_head_in_single_bytes() {
    // A blank line of bare LFs also ends a head that arrives byte by byte.
    let req = b"GET /lf HTTP/1.1\nHost: x\n\n";
    let mut pieces: Vec<(Dir, &[u8])> = req.chunks(1).map(|c| (I, c)).collect();
    pieces.push((E, b"HTTP/1.1 204 No Content\r\n\r\n"));
    let (got, _) = run(&pieces);
    assert!(got.starts_with("Server GET /lf 1.1"), "{got}");
}

#[test]
fn incomplete_heads_share_one_budget() {
    let budget = HeadBudget::new(1000);
    let head = |n: usize| {
        let mut h = b"GET /slow HTTP/1.1\r\nX-Pad: ".to_vec();
        h.resize(n, b'a');
        h
    };
    let mut a = Http1Conn::with_budget(budget.clone());
    let mut b = Http1Conn::with_budget(budget.clone());
    let mut out = Vec::new();
    // a holds 600 bytes of an unterminated head, in two pieces.
    let h = head(600);
    a.feed(I, Segment::whole(&h[..300], 1), &mut out);
    a.feed(I, Segment::whole(&h[300..], 2), &mut out);
    assert!(budget.used() >= 600);
    // b's 600 bytes do not fit next to them: its head is given up and counted.
    let h2 = head(600);
    b.feed(I, Segment::whole(&h2[..300], 3), &mut out);
    b.feed(I, Segment::whole(&h2[300..], 4), &mut out);
    assert_eq!(b.take_stats().head_budget_drops, 1);
    // a completes: its bytes go back, and so do b's when it is dropped.
    a.feed(I, Segment::whole(b"\r\n\r\n", 5), &mut out);
    a.feed(E, Segment::whole(OK, 6), &mut out);
    assert_eq!(dump(&out), "Server GET /slow 1.1 tp=- -> 200 [1..6]");
    drop(b);
    drop(a);
    assert_eq!(budget.used(), 0);
}

#[test]
fn response_older_than_the_request_is_not_its_answer() {
    // Found by fuzzing: an until-close response opened before a request arrived was paired
    // with it at close, giving a span that ends before it starts.
    let mut conn = Http1Conn::default();
    let mut out = Vec::new();
    conn.feed(I, Segment::whole(b"GET /a HTTP/1.0\r\n\r\n", 1), &mut out);
    conn.feed(
        E,
        Segment::whole(b"HTTP/1.0 200 OK\r\n\r\npartial", 2),
        &mut out,
    );
    conn.feed(I, Segment::whole(b"GET /b HTTP/1.0\r\n\r\n", 8), &mut out);
    conn.close(&mut out);
    for e in &out {
        assert!(e.start_ns <= e.end_ns, "{e:?}");
    }
}

#[test]
fn status_below_100_is_not_a_response() {
    let (got, stats) = run(&[(I, GET), (E, b"HTTP/1.1 000 Zero\r\n\r\n"), (E, OK)]);
    assert!(!got.contains("-> 0 "), "{got}");
    assert!(stats.skipped_bytes > 0);
}

/// A Go client's response read that began before the probes (`Http1Conn::lost`): the request it
/// answered gets no span, and the next response pairs with the next request, never with it.
#[test]
fn a_response_never_seen_drops_its_request_not_the_next_one() {
    let mut conn = Http1Conn::default();
    let mut out = Vec::new();
    let other = b"GET /other HTTP/1.1\r\nHost: b\r\n\r\n";
    conn.feed(E, Segment::whole(GET, 0), &mut out);
    conn.lost(I, OK.len() as u64, 1, &mut out);
    conn.feed(E, Segment::whole(other, 2), &mut out);
    conn.feed(I, Segment::whole(OK, 3), &mut out);
    conn.close(&mut out);
    assert_eq!(dump(&out), "Client GET /other 1.1 tp=- -> 200 [2..3]");
    let s = conn.take_stats();
    assert_eq!((s.responses_unseen, s.unanswered_requests), (1, 0));

    // Lost inside a response (its head seen): a gap in its body, nothing dropped.
    let mut conn = Http1Conn::default();
    let mut out = Vec::new();
    let big = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello";
    conn.feed(E, Segment::whole(GET, 0), &mut out);
    conn.feed(I, Segment::whole(big, 1), &mut out);
    conn.lost(I, 5, 2, &mut out);
    conn.feed(E, Segment::whole(other, 3), &mut out);
    conn.feed(I, Segment::whole(OK, 4), &mut out);
    conn.close(&mut out);
    assert_eq!(
        dump(&out),
        "Client GET /users/42?x=1 1.1 tp=- -> 200 [0..2]\nClient GET /other 1.1 tp=- -> 200 [3..4]"
    );
    assert_eq!(conn.take_stats().responses_unseen, 0);

    // Lost before the request was sent: not its response.
    let mut conn = Http1Conn::default();
    let mut out = Vec::new();
    conn.feed(E, Segment::whole(GET, 5), &mut out);
    conn.lost(I, 10, 4, &mut out);
    conn.feed(I, Segment::whole(OK, 6), &mut out);
    conn.close(&mut out);
    assert_eq!(
        dump(&out),
        "Client GET /users/42?x=1 1.1 tp=- -> 200 [5..6]"
    );
    assert_eq!(conn.take_stats().responses_unseen, 0);
}

/// A client's request event that comes after its response (the writer preempted between its
/// send and the probe that reports it): paired by time, never with the next response.
#[test]
fn a_response_read_before_its_request_event_is_paired_with_it() {
    let mut conn = Http1Conn::default();
    let mut out = Vec::new();
    let other = b"GET /other HTTP/1.1\r\nHost: b\r\n\r\n";
    conn.feed(I, Segment::whole(OK, 5), &mut out);
    conn.feed(E, Segment::whole(GET, 3), &mut out);
    conn.feed(E, Segment::whole(other, 6), &mut out);
    conn.feed(I, Segment::whole(OK, 7), &mut out);
    conn.close(&mut out);
    assert_eq!(
        dump(&out),
        "Client GET /users/42?x=1 1.1 tp=- -> 200 [3..5]\nClient GET /other 1.1 tp=- -> 200 [6..7]"
    );
    assert_eq!(conn.take_stats().orphan_responses, 0);
    // A response that ended before the request was sent answers something else.
    let (d, s) = run(&[(I, OK), (E, GET), (I, OK)]);
    assert_eq!(d, "Client GET /users/42?x=1 1.1 tp=- -> 200 [1..2]");
    assert_eq!(s.orphan_responses, 1);
}
