//! The bytes programs send and receive stay exactly theirs while the agent injects `traceparent`:
//! pipelining, heads split across writes, `sendmsg` with several buffers, large bodies, a body
//! that looks like a request head, a request with its own header, a connection older than the
//! agent, and a large response. The server checks every body against its SHA-256.
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tests::{
    agent::{final_counters, Agent, Export},
    fixture, free_port,
    programs::{python, Proc, Waiting},
    receiver::{RSpan, Receiver},
    require_root, wait_port,
};

/// Runs the integrity client against a threaded Python server, starting the agent (with `args`)
/// after the client's first connection is open. Returns the client's report and the agent's
/// final counters.
fn run_client(rx: &Receiver, args: &[&str]) -> (Value, std::collections::HashMap<String, u64>) {
    let port = free_port();
    let _server =
        Proc::spawn(python("threaded_server.py", &[&port.to_string()]).stdout(Stdio::null()));
    wait_port(port);
    let client = Waiting::spawn(
        Command::new("python3")
            .arg(fixture("integrity_client.py"))
            .arg(port.to_string()),
    );
    let agent = Agent::start(Export::Grpc(rx), args);
    let line = client.release(Duration::from_secs(120), "integrity client");
    let report: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    std::thread::sleep(Duration::from_secs(2));
    let (_, err) = agent.stop();
    (report, final_counters(&err))
}

fn tp_count(r: &Value, case: &str) -> u64 {
    assert_eq!(
        r[case]["status"], 200,
        "{case}: the server saw different bytes: {r}"
    );
    r[case]["tp_count"].as_u64().expect("tp_count")
}

fn tp(r: &Value, case: &str) -> String {
    r[case]["tp"][0].as_str().expect("traceparent").to_owned()
}

/// The client's cases without a `traceparent` of their own (all but "own" and "early2").
const UNTOUCHED_CASES: [&str; 8] = [
    "early",
    "pipe0",
    "pipe1",
    "pipe2",
    "split",
    "writev",
    "large",
    "lookalike",
];

/// The server span of `path` and the client span that sent it.
fn pair<'a>(spans: &'a [RSpan], path: &str) -> (&'a RSpan, &'a RSpan) {
    let find = |kind: &str| {
        spans
            .iter()
            .find(|s| s.kind() == kind && s.attr("url.path") == Some(path))
            .unwrap_or_else(|| panic!("no {kind} span for {path}"))
    };
    (find("client"), find("server"))
}

#[test]
fn default_stitching_changes_no_byte_and_links_exactly() {
    require_root();
    let rx = Receiver::start();
    let (r, counters) = run_client(&rx, &[]);
    println!("report: {r}\ncounters: {counters:?}");
    assert_eq!(r["big_response"]["status"], 200);
    assert_eq!(r["big_response"]["ok"], true, "the large response changed");
    for case in std::iter::once("early2").chain(UNTOUCHED_CASES) {
        assert_eq!(tp_count(&r, case), 0, "{case}: a header was written");
    }
    assert_eq!(
        tp(&r, "own"),
        "00-11111111111111111111111111111111-2222222222222222-01",
        "the program's own header changed"
    );
    for k in [
        "kernel_traceparent_inserted",
        "kernel_traceparent_rewritten",
        "kernel_traceparent_replaced",
        "kernel_sockets_released_large_send",
    ] {
        assert_eq!(counters.get(k).copied().unwrap_or(0), 0, "{k}");
    }
    // Every request whose head starts a send is stitched to its exact caller, including the
    // first one on a connection open before the agent, a 4 MiB upload and `sendmsg` buffers.
    let spans = rx.spans();
    for path in [
        "/early",
        "/early2",
        "/pipe/0",
        "/writev",
        "/large",
        "/lookalike",
        "/own",
    ] {
        let (client, server) = pair(&spans, path);
        assert_eq!(server.trace_id(), client.trace_id(), "{path}");
        assert_eq!(server.parent_id(), client.span_id(), "{path}");
    }
    let (own, _) = pair(&spans, "/own");
    assert_eq!(own.trace_id(), "11111111111111111111111111111111");
    assert_eq!(own.parent_id(), "2222222222222222");
    // Requests that do not start a send (pipelined after the first, a head split over writes)
    // have no stitched caller: never another request's span as parent.
    for path in ["/pipe/1", "/pipe/2", "/split"] {
        let (client, server) = pair(&spans, path);
        let p = server.parent_id();
        assert!(
            p.is_empty() || p == client.span_id(),
            "{path}: wrong parent {p}"
        );
    }
    assert!(counters["kernel_stitch_claimed"] >= 7, "{counters:?}");
}

#[test]
fn header_mode_keeps_bytes_intact() {
    require_root();
    let rx = Receiver::start();
    let (r, counters) = run_client(&rx, &["--inject", "header"]);
    println!("report: {r}\ncounters: {counters:?}");
    assert_eq!(r["big_response"]["status"], 200);
    assert_eq!(r["big_response"]["ok"], true, "the large response changed");
    // A connection open before the agent: its first request after start is left alone (it
    // could have been mid-body), the next one is injected. Untouched: pipelined requests after
    // the first, a head whose first write holds only part of it.
    assert_eq!(tp_count(&r, "early"), 0);
    assert_eq!(tp_count(&r, "early2"), 1);
    assert_eq!(tp_count(&r, "pipe0"), 1);
    assert_eq!(tp_count(&r, "pipe1"), 0);
    assert_eq!(tp_count(&r, "pipe2"), 0);
    assert_eq!(tp_count(&r, "split"), 0);
    // One header each, never two; the body that looks like a request is left alone.
    for case in ["writev", "large", "lookalike", "own"] {
        assert_eq!(tp_count(&r, case), 1, "{case}");
    }
    // The request's own traceparent keeps its trace id; its parent id is now the client span.
    let own = tp(&r, "own");
    assert!(
        own.starts_with("00-11111111111111111111111111111111-"),
        "{own}"
    );
    assert!(
        !own.contains("2222222222222222"),
        "parent id not rewritten: {own}"
    );
    // What went on the wire is the client span the agent reports.
    let spans = rx.spans();
    for (case, path) in [
        ("large", "/large"),
        ("own", "/own"),
        ("writev", "/writev"),
        ("pipe0", "/pipe/0"),
    ] {
        let wire = tp(&r, case);
        let parts: Vec<&str> = wire.split('-').collect();
        let client = spans
            .iter()
            .find(|s| s.kind() == "client" && s.attr("url.path") == Some(path))
            .unwrap_or_else(|| panic!("no client span for {path}"));
        assert_eq!(client.trace_id(), parts[1], "{case}");
        assert_eq!(client.span_id(), parts[2], "{case}");
        let server = spans
            .iter()
            .find(|s| s.kind() == "server" && s.attr("url.path") == Some(path))
            .unwrap_or_else(|| panic!("no server span for {path}"));
        assert_eq!(server.parent_id(), client.span_id(), "{case}");
    }
    let own_client = spans
        .iter()
        .find(|s| s.kind() == "client" && s.attr("url.path") == Some("/own"))
        .unwrap();
    assert_eq!(
        own_client.parent_id(),
        "2222222222222222",
        "the program's own context is the parent"
    );
    assert!(counters["kernel_traceparent_skipped_split_head"] >= 1);
    // The 4 MiB upload took its connection out of the socket map (blocking-recv safety).
    assert!(counters["kernel_sockets_released_large_send"] >= 1);
}

#[test]
fn injection_off_leaves_every_byte_alone() {
    require_root();
    let rx = Receiver::start();
    let (r, counters) = run_client(&rx, &["--inject", "off"]);
    for case in UNTOUCHED_CASES {
        assert_eq!(tp_count(&r, case), 0, "{case}");
    }
    assert_eq!(tp_count(&r, "own"), 1);
    assert_eq!(
        tp(&r, "own"),
        "00-11111111111111111111111111111111-2222222222222222-01"
    );
    assert_eq!(r["big_response"]["ok"], true);
    assert_eq!(
        counters
            .get("kernel_traceparent_inserted")
            .copied()
            .unwrap_or(0),
        0
    );
    // Spans are still reported, and the request's own context is still followed.
    let spans = rx.spans();
    let own = spans
        .iter()
        .find(|s| s.kind() == "server" && s.attr("url.path") == Some("/own"))
        .expect("server span");
    assert_eq!(own.trace_id(), "11111111111111111111111111111111");
    assert_eq!(own.parent_id(), "2222222222222222");
}
