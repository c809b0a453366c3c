//! The tracker's in-process linking of HTTP/2 calls (`trace_context::h2_owner`), fed kernel
//! events as the ring buffer would carry them: a process serving one request and making a call
//! while it is open; with a loss, or two requests open, the call gets no parent.
use agent_common::{ConnTuple, DataHeader, EVENT_DATA, LAYOUT_PREFIX};
use bytes::Bytes;

use super::*;
use crate::{
    protocol::http2::frame::{END_HEADERS, END_STREAM, HEADERS},
    span::{Kind, Span, Value},
};

/// A pid no process has (above any `pid_max`): nothing is read of it from `/proc`.
const PID: u32 = 4_300_000;
const SERVER_SK: u64 = 1;
const CLIENT_SK: u64 = 2;

fn header(sk: u64, dir: u32, len: usize, lost: u64, ts: u64, server_role: u32) -> DataHeader {
    let mut tuple = ConnTuple {
        family: 2,
        ..ConnTuple::default()
    };
    tuple.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    tuple.peer_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    // The server's socket serves port 50051; the client's calls port 50052.
    let (role, local, peer) = if sk == SERVER_SK {
        (server_role, 50051, 40000)
    } else {
        (ROLE_CLIENT, 40001, 50052)
    };
    tuple.local_port = local;
    tuple.peer_port = peer;
    DataHeader {
        kind: EVENT_DATA,
        direction: dir,
        pid: PID,
        tid: PID,
        fd: sk as u32 + 10,
        captured: len as u32,
        sk,
        len: len as u64,
        ts_enter: ts,
        ts_exit: ts + 1,
        role,
        layout: LAYOUT_PREFIX,
        tuple,
        comm: *b"middle\0\0\0\0\0\0\0\0\0\0",
        wire: Default::default(),
        lost,
    }
}

/// A HEADERS frame of one block, ending its stream.
fn headers(stream: u32, block: &[u8]) -> Vec<u8> {
    let mut f = (block.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([HEADERS, END_HEADERS | END_STREAM]);
    f.extend(stream.to_be_bytes());
    f.extend(block);
    f
}

/// `:method GET`, `:scheme http`, `:path /`.
const GET: [u8; 3] = [0x82, 0x86, 0x84];
/// `:status 200`.
const OK: [u8; 1] = [0x88];

struct Middle {
    /// Server streams read (1, 3, ...) before the call.
    requests: u32,
    /// The loss count the call's event carries.
    lost: u64,
    /// The role the kernel gives the server's socket (`ROLE_UNKNOWN`: open before the agent).
    server_role: u32,
    /// The middle tier serves HTTP/1.1 (a REST front end), not HTTP/2.
    http1: bool,
}

/// A middle tier that lost nothing and whose server socket the kernel saw accepted.
fn served(requests: u32, http1: bool) -> Middle {
    Middle {
        requests,
        lost: 0,
        server_role: ROLE_SERVER,
        http1,
    }
}

fn data(t: &mut Tracker, m: &Middle, sk: u64, (dir, ts): (u32, u64), bytes: Vec<u8>, lost: u64) {
    t.handle(KernelEvent::Data {
        header: header(sk, dir, bytes.len(), lost, ts, m.server_role),
        payload: Bytes::from(bytes),
    });
}

fn with_preface(frames: Vec<u8>) -> Vec<u8> {
    let mut b = frame::PREFACE.to_vec();
    b.extend(frames);
    b
}

/// A tracker whose spans go to the receiver, knowing the network namespace of `pids`.
fn tracker(metrics: Arc<Metrics>, pids: &[u32]) -> (Tracker, crate::export::queue::SpanReceiver) {
    let (tx, rx) = crate::export::queue::bounded(1024, 1 << 20);
    let mut t = Tracker::new(
        metrics,
        tx,
        Snapshot::default(),
        Sampler::from_values(None, None).expect("default sampler"),
        (UrlPolicy::default(), Limits::default()),
    );
    for &pid in pids {
        t.handle(KernelEvent::Netns { pid, netns: 1 });
    }
    (t, rx)
}

/// The spans of every exchange the tracker completed; server streams with no caller seen wait
/// for one (`h2_wait`) and get none.
fn drain(t: &mut Tracker, rx: &mut crate::export::queue::SpanReceiver) -> Vec<Span> {
    t.out.release_held(u64::MAX);
    t.out.spans.flush();
    let mut spans = Vec::new();
    while let Some(batch) = rx.try_recv(1024) {
        spans.extend(batch);
    }
    spans
}

/// Runs the middle tier's events: its requests read, then a call written, answered, then the
/// requests answered. Returns the spans.
fn middle(m: Middle) -> Vec<Span> {
    let (mut t, mut rx) = tracker(Metrics::new(), &[PID]);
    let (mut reqs, mut answers) = (frame::PREFACE.to_vec(), Vec::new());
    for i in 0..m.requests {
        reqs.extend(headers(2 * i + 1, &GET));
        answers.extend(headers(2 * i + 1, &OK));
    }
    if m.http1 {
        let n = m.requests as usize;
        reqs = b"GET /items/42 HTTP/1.1\r\nHost: front\r\n\r\n".repeat(n);
        answers = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".repeat(n);
    }
    let egress = agent_common::DIR_EGRESS;
    data(&mut t, &m, SERVER_SK, (DIR_INGRESS, 100), reqs, 0);
    let call = with_preface(headers(1, &GET));
    data(&mut t, &m, CLIENT_SK, (egress, 200), call, m.lost);
    data(
        &mut t,
        &m,
        CLIENT_SK,
        (DIR_INGRESS, 300),
        headers(1, &OK),
        0,
    );
    data(&mut t, &m, SERVER_SK, (egress, 400), answers, 0);
    drain(&mut t, &mut rx)
}

fn link(s: &Span) -> Option<&str> {
    s.attributes.iter().find_map(|kv| match &kv.value {
        Value::Str(v) if kv.key == "beholder.link.method" => Some(v.as_ref()),
        _ => None,
    })
}

fn split(spans: &[Span]) -> (Vec<&Span>, &Span) {
    let servers: Vec<&Span> = spans.iter().filter(|s| s.kind == Kind::Server).collect();
    let clients: Vec<&Span> = spans.iter().filter(|s| s.kind == Kind::Client).collect();
    assert_eq!(clients.len(), 1, "{spans:?}");
    (servers, clients[0])
}

#[test]
fn a_call_made_while_one_http1_request_is_open_is_its_child() {
    let spans = middle(served(1, true));
    let (servers, client) = split(&spans);
    assert_eq!(servers.len(), 1);
    assert_eq!(client.trace_id, servers[0].trace_id);
    assert_eq!(client.parent_span_id, Some(servers[0].span_id));
    assert_eq!(link(client), Some("process"));
    // Two HTTP/1 requests open (pipelined): no parent.
    let spans = middle(served(2, true));
    let (servers, client) = split(&spans);
    assert_eq!(servers.len(), 2);
    assert_eq!(client.parent_span_id, None);
    assert_eq!(link(client), Some("ambiguous"));
}

/// One HTTP/2 request open whose caller was never seen: its ids are a new trace a caller's
/// record may still replace, so the call gets no parent rather than fixing them.
#[test]
fn a_call_made_while_one_uncalled_request_is_open_gets_no_parent() {
    let spans = middle(served(1, false));
    let (servers, client) = split(&spans);
    assert_eq!(servers.len(), 1);
    let server = servers[0];
    assert_ne!(client.trace_id, server.trace_id);
    assert_eq!(client.parent_span_id, None);
    assert_eq!(link(client), Some("ambiguous"));
    assert_eq!(server.parent_span_id, None);
}

/// No parent where a request other than the one seen may be open: the call's process lost an
/// event, it has two requests open, or its server connection is older than the agent (its
/// requests may have been read before it).
#[test]
fn a_call_gets_no_parent_where_another_request_may_be_open() {
    let cases = [
        ("a lost event", 1, 3, ROLE_SERVER),
        ("two requests open", 2, 0, ROLE_SERVER),
        (
            "a connection older than the agent",
            1,
            0,
            agent_common::ROLE_UNKNOWN,
        ),
    ];
    for (what, requests, lost, server_role) in cases {
        let spans = middle(Middle {
            requests,
            lost,
            server_role,
            http1: false,
        });
        let (servers, client) = split(&spans);
        assert_eq!(servers.len(), requests as usize, "{what}");
        assert!(
            servers.iter().all(|s| s.trace_id != client.trace_id),
            "{what}"
        );
        assert_eq!(client.parent_span_id, None, "{what}");
        assert_eq!(link(client), Some("ambiguous"), "{what}");
    }
}

/// The middle tier's caller runs on this host, and its write of the request is seen only after
/// the middle tier read it and made its call (the two ends' events race on two CPUs). The call
/// gets no parent, so that the request still joins its caller's trace when that record comes;
/// taking the request's provisional ids would have left it a root for good.
#[test]
fn a_call_made_before_its_requests_caller_is_seen_leaves_the_request_to_its_caller() {
    const CALLER: u32 = PID + 1;
    const CALLER_SK: u64 = 3;
    let m = served(1, false);
    let metrics = Metrics::new();
    let (mut t, mut rx) = tracker(metrics.clone(), &[PID, CALLER]);
    // The caller's socket: port 40000 calling the middle tier's 50051.
    let caller = |t: &mut Tracker, dir: u32, ts: u64, bytes: Vec<u8>| {
        let mut header = header(SERVER_SK, dir, bytes.len(), 0, ts, ROLE_CLIENT);
        (header.pid, header.tid, header.sk, header.fd) = (CALLER, CALLER, CALLER_SK, 13);
        (header.tuple.local_port, header.tuple.peer_port) = (40000, 50051);
        t.handle(KernelEvent::Data {
            header,
            payload: Bytes::from(bytes),
        });
    };
    let egress = agent_common::DIR_EGRESS;
    caller(&mut t, egress, 50, frame::PREFACE.to_vec());
    data(
        &mut t,
        &m,
        SERVER_SK,
        (DIR_INGRESS, 100),
        with_preface(headers(1, &GET)),
        0,
    );
    data(
        &mut t,
        &m,
        CLIENT_SK,
        (egress, 200),
        with_preface(headers(1, &GET)),
        0,
    );
    // The caller's write began before the middle tier read it, and is seen only now.
    caller(&mut t, egress, 90, headers(1, &GET));
    data(
        &mut t,
        &m,
        CLIENT_SK,
        (DIR_INGRESS, 300),
        headers(1, &OK),
        0,
    );
    data(&mut t, &m, SERVER_SK, (egress, 400), headers(1, &OK), 0);
    caller(&mut t, DIR_INGRESS, 500, headers(1, &OK));
    let spans = drain(&mut t, &mut rx);
    let servers: Vec<&Span> = spans.iter().filter(|s| s.kind == Kind::Server).collect();
    assert_eq!((spans.len(), servers.len()), (3, 1), "{spans:?}");
    let server = servers[0];
    // The caller's span is the server span's parent, in one trace.
    let (calls, others): (Vec<&Span>, Vec<&Span>) = spans
        .iter()
        .filter(|s| s.kind == Kind::Client)
        .partition(|c| Some(c.span_id) == server.parent_span_id);
    assert_eq!((calls.len(), others.len()), (1, 1), "{spans:?}");
    assert_eq!(server.trace_id, calls[0].trace_id);
    // The middle tier's call: no parent, a trace of its own.
    let call = others[0];
    assert_eq!(call.parent_span_id, None);
    assert_ne!(call.trace_id, server.trace_id);
    assert_eq!(link(call), Some("ambiguous"));
    assert_eq!(metrics.http2_links_unsettled.get(), 1);
    assert_eq!(metrics.http2_links_process.get(), 0);
}
