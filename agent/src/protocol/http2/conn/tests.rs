//! Oracle tests: a real HTTP/2 client and server (the `h2` crate, hyper's implementation) talk
//! over an in-memory pipe; every write and read of the client is recorded as one syscall would
//! be, then fed to `Http2Conn`. The exchanges must say what the two programs did: from the
//! connection's start, exactly; from its middle or through the kernel's uncopied gaps, exactly
//! or "unknown", never something else.
use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

use super::*;

type Log = Arc<Mutex<Vec<(Dir, Vec<u8>)>>>;

/// The client's end of the pipe, recording each write (egress) and read (ingress).
struct Tee(DuplexStream, Log);

impl AsyncRead for Tee {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.0).poll_read(cx, buf);
        let got = buf.filled()[before..].to_vec();
        if !got.is_empty() {
            self.1.lock().unwrap().push((Dir::Ingress, got));
        }
        r
    }
}

impl AsyncWrite for Tee {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.0).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.1
                .lock()
                .unwrap()
                .push((Dir::Egress, buf[..*n].to_vec()));
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// What the client asked for, per request `i`.
fn path(i: usize) -> String {
    format!("/shop.v1.Catalog/Method{}", i % 3)
}

/// The gRPC status the server answers request `i` with (some failures among the successes).
fn grpc_status(i: usize) -> u32 {
    [0, 0, 0, 5, 0, 14][i % 6]
}

fn message(len: usize) -> Bytes {
    let mut m = vec![0u8, 0, 0, 0, 0];
    m[1..5].copy_from_slice(&(len as u32).to_be_bytes());
    m.extend(std::iter::repeat_n(b'x', len));
    Bytes::from(m)
}

/// Runs `n` gRPC-shaped calls, `concurrent` in flight at a time, with `msgs` request messages
/// of `size` bytes each and two response messages; the server resets every call `i` with
/// `i % 10 == 9` instead of answering. Returns the client's syscalls.
fn record(n: usize, concurrent: usize, msgs: usize, size: usize) -> Vec<(Dir, Vec<u8>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let log: Log = Arc::default();
    let log2 = log.clone();
    rt.block_on(async move {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            while let Some(r) = conn.accept().await {
                let (req, mut respond) = r.unwrap();
                tokio::spawn(async move {
                    let i: usize = req.headers()["x-call"].to_str().unwrap().parse().unwrap();
                    let mut body = req.into_body();
                    while let Some(d) = body.data().await {
                        let d = d.unwrap();
                        let _ = body.flow_control().release_capacity(d.len());
                    }
                    if i % 10 == 9 {
                        respond.send_reset(h2::Reason::CANCEL);
                        return;
                    }
                    let resp = http::Response::builder()
                        .status(200)
                        .header("content-type", "application/grpc")
                        .body(())
                        .unwrap();
                    let mut send = respond.send_response(resp, false).unwrap();
                    send.send_data(message(10), false).unwrap();
                    send.send_data(message(20), false).unwrap();
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", grpc_status(i).to_string().parse().unwrap());
                    send.send_trailers(trailers).unwrap();
                });
            }
        });
        let (client, conn) = h2::client::handshake(Tee(client_io, log2)).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let sem = Arc::new(tokio::sync::Semaphore::new(concurrent));
        let mut calls = Vec::new();
        for i in 0..n {
            let permit = sem.clone().acquire_owned().await.unwrap();
            let mut client = client.clone().ready().await.unwrap();
            calls.push(tokio::spawn(async move {
                let req = http::Request::builder()
                    .method("POST")
                    .uri(format!("http://catalog.internal:50051{}", path(i)))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .header("user-agent", "grpc-test/1.0")
                    .header("x-call", i.to_string())
                    .header(
                        "traceparent",
                        format!("00-{:032x}-{:016x}-01", i + 1, i + 1),
                    )
                    .body(())
                    .unwrap();
                let (resp, mut send) = client.send_request(req, false).unwrap();
                for m in 0..msgs {
                    send.send_data(message(size), m + 1 == msgs).unwrap();
                }
                if let Ok(resp) = resp.await {
                    let mut body = resp.into_body();
                    while let Some(d) = body.data().await {
                        let Ok(d) = d else { break };
                        let _ = body.flow_control().release_capacity(d.len());
                    }
                    let _ = body.trailers().await;
                }
                drop(permit);
            }));
        }
        for c in calls {
            c.await.unwrap();
        }
    });
    let recorded = log.lock().unwrap().clone();
    recorded
}

/// Feeds the recorded syscalls, each cut to its first `limit` bytes (the kernel's copy).
fn replay(conn: &mut Http2Conn, log: &[(Dir, Vec<u8>)], limit: usize) -> Vec<Exchange> {
    let mut out = Vec::new();
    for (t, (dir, bytes)) in log.iter().enumerate() {
        let seg = Segment {
            data: &bytes[..bytes.len().min(limit)],
            len: bytes.len() as u64,
            start_ns: t as u64 * 10,
            end_ns: t as u64 * 10 + 5,
            ctx: None,
        };
        conn.feed(*dir, seg, &mut out);
    }
    conn.close(u64::MAX, &mut out);
    out
}

fn call_of(ex: &Exchange) -> usize {
    let tp = ex.request.traceparent.as_deref().expect("traceparent");
    usize::from_str_radix(&tp[3..35], 16).unwrap() - 1
}

/// What an exchange of call `i` must say wherever it says anything.
fn check(ex: &Exchange, i: usize) {
    let h2 = ex.h2.as_ref().unwrap();
    assert_eq!(ex.side, Side::Client);
    assert!(ex.request.method.is_empty() || ex.request.method == "POST");
    assert!(
        ex.request.target.is_empty() || ex.request.target == path(i),
        "{ex:?}"
    );
    assert!(ex
        .request
        .host
        .as_deref()
        .is_none_or(|h| h == "catalog.internal:50051"));
    assert!(ex
        .request
        .user_agent
        .as_deref()
        .is_none_or(|u| u == "grpc-test/1.0"));
    if i % 10 == 9 {
        assert_eq!(h2.end, StreamEnd::Reset(8), "call {i}");
        return;
    }
    assert_eq!(h2.end, StreamEnd::Complete, "call {i}");
    assert!(ex.response.status == 0 || ex.response.status == 200);
    if let Some(g) = &h2.grpc {
        assert!(
            g.status.is_none_or(|s| s == grpc_status(i)),
            "call {i}: {g:?}"
        );
        assert!(g.responses.is_none_or(|n| n == 2), "call {i}: {g:?}");
    }
}

#[test]
fn from_the_start_every_call_is_exact() {
    let log = record(200, 16, 2, 100);
    let mut conn = Http2Conn::from_preface(Dir::Egress);
    let out = replay(&mut conn, &log, usize::MAX);
    assert_eq!(out.len(), 200, "one exchange per stream");
    let mut seen = std::collections::HashSet::new();
    for ex in &out {
        let i = call_of(ex);
        assert!(seen.insert(i));
        check(ex, i);
        let h2 = ex.h2.as_ref().unwrap();
        assert_eq!(h2.unresolved, 0);
        assert_eq!(ex.request.target, path(i));
        assert_eq!(ex.request.method, "POST");
        assert_eq!(h2.scheme.as_deref(), Some("http"));
        if i % 10 != 9 {
            assert_eq!(ex.response.status, 200);
            let g = h2.grpc.as_ref().unwrap();
            assert_eq!(g.status, Some(grpc_status(i)));
            assert_eq!((g.requests, g.responses), (Some(2), Some(2)));
        }
        assert!(ex.end_ns >= ex.start_ns);
    }
    assert_eq!(conn.take_stats(), H2Stats::default());
    assert_eq!(conn.open_streams(), 0);
    // Every stream was seen open, as this process's calls, with its own `traceparent`.
    assert!(conn.whole());
    let opened = conn.take_opened();
    assert_eq!(opened.len(), 200);
    assert!(opened
        .iter()
        .all(|o| o.side == Side::Client && o.traceparent.is_some()));
}

/// Which call each stream carried, from a decoding of the whole connection.
fn calls_by_stream(log: &[(Dir, Vec<u8>)]) -> std::collections::HashMap<u32, usize> {
    let mut conn = Http2Conn::from_preface(Dir::Egress);
    replay(&mut conn, log, usize::MAX)
        .iter()
        .map(|e| (e.h2.as_ref().unwrap().stream, call_of(e)))
        .collect()
}

#[test]
fn from_the_middle_fields_are_exact_or_unknown_never_wrong() {
    let log = record(200, 16, 1, 50);
    let truth = calls_by_stream(&log);
    // Start at a hundred points of the client's syscalls in turn.
    let (mut starts, mut named) = (0, 0);
    for start in (1..log.len()).step_by((log.len() / 100).max(1)) {
        if !frame::is_midstream_http2(&log[start].1) {
            continue;
        }
        starts += 1;
        let mut conn = Http2Conn::mid_stream();
        let out = replay(&mut conn, &log[start..], usize::MAX);
        for ex in &out {
            check(ex, truth[&ex.h2.as_ref().unwrap().stream]);
        }
        named += out.iter().filter(|e| !e.request.target.is_empty()).count();
    }
    eprintln!("{starts} starting points, {named} calls named");
    assert!(starts >= 10, "{starts} starting points");
    assert!(
        named > 0,
        "later calls decode once their entries have been seen"
    );
}

#[test]
fn kernel_gaps_never_make_a_wrong_field() {
    // Large request messages (16 KiB, 3 per call): the kernel copies 4 KiB of each syscall.
    let log = record(60, 8, 3, 16 << 10);
    let mut conn = Http2Conn::from_preface(Dir::Egress);
    let truth = calls_by_stream(&log);
    let out = replay(&mut conn, &log, 4096);
    for ex in &out {
        check(ex, truth[&ex.h2.as_ref().unwrap().stream]);
    }
    let stats = conn.take_stats();
    let complete = out
        .iter()
        .filter(|e| !e.request.target.is_empty() && e.h2.as_ref().unwrap().end != StreamEnd::Closed)
        .count();
    eprintln!(
        "{} exchanges, {complete} complete with their path, {stats:?}",
        out.len()
    );
    assert!(
        complete >= 54,
        "gaps inside DATA frames keep the frames aligned: {stats:?}"
    );
}

#[test]
fn a_stream_table_bounded_and_counted() {
    // Requests only, never answered: the table keeps the newest MAX_STREAMS.
    let mut conn = Http2Conn::from_preface(Dir::Egress);
    let mut out = Vec::new();
    let mut bytes = frame::PREFACE.to_vec();
    for s in 0..(MAX_STREAMS as u32 + 10) {
        let stream = 2 * s + 1;
        // HEADERS, END_HEADERS: :method GET, :scheme http, :path /
        bytes.extend([0, 0, 3, frame::HEADERS, frame::END_HEADERS]);
        bytes.extend(stream.to_be_bytes());
        bytes.extend([0x82, 0x86, 0x84]);
    }
    conn.feed(Dir::Egress, Segment::whole(&bytes, 1), &mut out);
    assert!(out.is_empty());
    assert_eq!(conn.open_streams(), MAX_STREAMS);
    assert_eq!(conn.take_stats().streams_dropped, 10);
    // Requests it dropped are not counted open any more: its count is not exact.
    assert!(!conn.whole());
}

#[test]
fn garbage_after_the_preface_is_never_a_stream() {
    let mut conn = Http2Conn::from_preface(Dir::Egress);
    let mut out = Vec::new();
    let mut bytes = frame::PREFACE.to_vec();
    bytes.extend(b"this is not a frame at all, just text");
    conn.feed(Dir::Egress, Segment::whole(&bytes, 1), &mut out);
    conn.close(2, &mut out);
    assert!(out.is_empty());
    assert_eq!(conn.take_stats().alignment_lost, 1);
    assert!(!conn.whole());
}

#[test]
fn a_servers_streams_are_open_from_their_request_to_their_answer() {
    // The traced process is the server: it reads the preface and a request, then answers.
    let mut conn = Http2Conn::from_preface(Dir::Ingress);
    let mut out = Vec::new();
    let mut req = frame::PREFACE.to_vec();
    // HEADERS, END_HEADERS | END_STREAM: :method GET, :scheme http, :path /
    req.extend([
        0,
        0,
        3,
        frame::HEADERS,
        frame::END_HEADERS | frame::END_STREAM,
    ]);
    req.extend(1u32.to_be_bytes());
    req.extend([0x82, 0x86, 0x84]);
    conn.feed(Dir::Ingress, Segment::whole(&req, 1), &mut out);
    assert_eq!(conn.open_streams(), 1);
    let opened = conn.take_opened();
    assert_eq!(opened.len(), 1);
    assert_eq!(
        (opened[0].side, opened[0].stream, opened[0].traceparent),
        (Side::Server, 1, None)
    );
    // HEADERS, END_HEADERS | END_STREAM: :status 200
    let mut answer = vec![
        0,
        0,
        1,
        frame::HEADERS,
        frame::END_HEADERS | frame::END_STREAM,
    ];
    answer.extend(1u32.to_be_bytes());
    answer.push(0x88);
    conn.feed(Dir::Egress, Segment::whole(&answer, 2), &mut out);
    assert_eq!(conn.open_streams(), 0);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].side, Side::Server);
    assert!(conn.whole());
}
