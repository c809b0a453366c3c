//! HTTP/2 and gRPC over cleartext (h2c) from unmodified programs: Node's http2 server, curl,
//! h2load and Node's http2 client, traced by the agent and received at a real OTLP endpoint.
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use tests::{
    agent::{final_counters, Agent, Export},
    fixture, free_port,
    links::{callers, in_process},
    programs::{run, Etcd, Proc},
    receiver::{RSpan, Receiver},
    wait_port,
};

fn h2_server(port: u16) -> Proc {
    let p = Proc::spawn(
        Command::new("node")
            .arg(fixture("h2_server.js"))
            .arg(port.to_string())
            .env("OTEL_SERVICE_NAME", "h2-api")
            .stdout(Stdio::null()),
    );
    wait_port(port);
    p
}

/// `curl --http2-prior-knowledge` with its own connection, bounded in time.
fn curl(args: &[&str]) -> String {
    let out = run(Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "--max-time", "20"])
        .args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits (at most 20 s) until `rx` holds `n` spans and a moment more for any beyond them, then
/// stops the agent either way, so that a shortfall shows with its counters: its stderr.
fn stop_after(agent: Agent, rx: &Receiver, n: usize) -> String {
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while rx.spans().len() < n && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(800));
    agent.stop().1
}

/// Runs one of the raw-socket HTTP/2 client fixtures (within 60 s), which reports "ok N" once
/// every one of its `n` streams ended.
fn raw_client(script: &str, args: &[String], n: usize) {
    let out = run(Command::new("timeout")
        .args(["60", "python3"])
        .arg(fixture(script))
        .args(args));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ok {n}")
    );
}

fn one<'a>(spans: &'a [RSpan], kind: &str, f: impl Fn(&RSpan) -> bool) -> Vec<&'a RSpan> {
    spans.iter().filter(|s| s.kind() == kind && f(s)).collect()
}

/// Plain HTTP/2 and gRPC-shaped calls, each on its own connection seen from its start: one
/// SERVER span (Node) and one CLIENT span (curl) per stream, named and attributed per the HTTP
/// and RPC conventions, with a 1 MiB response and a traceparent that the server span honours.
#[test]
fn h2c_requests_and_grpc_calls_from_node_and_curl() {
    let rx = Receiver::start();
    let port = free_port();
    let _server = h2_server(port);
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &port.to_string()]);
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..3 {
        assert_eq!(curl(&[&format!("{base}/hello")]), "hello h2\n");
    }
    curl(&["-o", "/dev/null", &format!("{base}/missing")]);
    let big = curl(&[&format!("{base}/big")]);
    assert_eq!(big.len(), 1 << 20);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    curl(&[
        "-H",
        &format!("traceparent: {tp}"),
        &format!("{base}/hello"),
    ]);
    // One gRPC message: uncompressed, 3 bytes.
    let body = std::env::temp_dir().join(format!("grpc-body-{port}"));
    std::fs::write(&body, [0u8, 0, 0, 0, 3, 1, 2, 3]).unwrap();
    let data = format!("@{}", body.display());
    let grpc = |method: &str| {
        curl(&[
            "-o",
            "/dev/null",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
            &data,
            &format!("{base}/shop.v1.Catalog/{method}"),
        ])
    };
    grpc("List");
    grpc("List");
    grpc("Fail");
    let _ = std::fs::remove_file(&body);
    let servers = rx.wait_for(9, Duration::from_secs(20), "server spans", |s| {
        s.kind() == "server"
    });
    rx.wait_for(9, Duration::from_secs(20), "client spans", |s| {
        s.kind() == "client"
    });
    std::thread::sleep(Duration::from_millis(800));
    let (_, err) = agent.stop();
    let spans = rx.spans();
    assert_eq!(spans.len(), 18, "one server and one client span per stream");
    let counters = final_counters(&err);
    assert_eq!(counters.get("http2_connections"), Some(&18), "{counters:?}");
    assert!(servers
        .iter()
        .all(|s| s.res("service.name") == Some("h2-api")));
    for s in &spans {
        assert_eq!(s.attr("network.protocol.version"), Some("2"), "{s:?}");
        assert!(s.duration() < Duration::from_secs(20));
    }
    // Plain HTTP/2.
    let hello = one(&spans, "server", |s| s.attr("url.path") == Some("/hello"));
    assert_eq!(hello.len(), 4);
    for s in &hello {
        assert_eq!(s.span.name, "GET");
        assert_eq!(s.attr("http.request.method"), Some("GET"));
        assert_eq!(s.attr("http.response.status_code"), Some("200"));
        assert_eq!(s.attr("url.scheme"), Some("http"));
        assert_eq!(s.attr("server.port"), Some(port.to_string().as_str()));
        assert_eq!(
            s.attr("user_agent.original")
                .map(|u| u.starts_with("curl/")),
            Some(true)
        );
        assert_eq!(s.status_code(), 0);
    }
    let honoured = hello
        .iter()
        .filter(|s| s.trace_id() == "4bf92f3577b34da6a3ce929d0e0e4736")
        .collect::<Vec<_>>();
    assert_eq!(honoured.len(), 1, "the incoming traceparent is honoured");
    assert_eq!(honoured[0].parent_id(), "00f067aa0ba902b7");
    let missing = one(&spans, "client", |s| s.attr("url.path") == Some("/missing"));
    assert_eq!(missing.len(), 1);
    assert_eq!(missing[0].attr("http.response.status_code"), Some("404"));
    assert_eq!(missing[0].status_code(), 2, "a 4xx is the client's error");
    assert_eq!(missing[0].attr("error.type"), Some("404"));
    let big = one(&spans, "server", |s| s.attr("url.path") == Some("/big"));
    assert_eq!(big.len(), 1);
    assert_eq!(big[0].attr("http.response.status_code"), Some("200"));
    // gRPC: RPC conventions, status from the trailers, error rules per side.
    let calls = one(&spans, "server", |s| {
        s.attr("rpc.system.name") == Some("grpc")
    });
    assert_eq!(calls.len(), 3);
    for kind in ["server", "client"] {
        let list = one(&spans, kind, |s| s.span.name == "shop.v1.Catalog/List");
        assert_eq!(list.len(), 2, "{kind}");
        for s in list {
            assert_eq!(s.attr("rpc.method"), Some("shop.v1.Catalog/List"));
            assert_eq!(s.attr("rpc.response.status_code"), Some("OK"));
            assert_eq!(s.attr("http.request.method"), None, "RPC spans, not HTTP");
            assert_eq!(s.status_code(), 0);
        }
        let fail = one(&spans, kind, |s| s.span.name == "shop.v1.Catalog/Fail");
        assert_eq!(fail.len(), 1);
        assert_eq!(fail[0].attr("rpc.response.status_code"), Some("NOT_FOUND"));
        let client = kind == "client";
        assert_eq!(
            fail[0].status_code() == 2,
            client,
            "NOT_FOUND fails the client only"
        );
        assert_eq!(fail[0].attr("error.type").is_some(), client);
        assert_eq!(fail[0].attr("beholder.rpc.messages_received"), Some("1"));
        assert_eq!(fail[0].attr("beholder.rpc.messages_sent"), Some("1"));
    }
}

/// h2load: 4 connections with 100 streams in flight each, 4,000 requests. Every stream served
/// becomes a span, or is counted where it was lost.
/// A raw-socket client writing each request's HEADERS frame in two writes that cut the 9-byte
/// frame header after 1 to 8 bytes in turn (the Node server reads the pieces apart too): the
/// kernel's frame walk holds the cut bytes across syscalls on both sides. Every stream gives a
/// span on each side and no direction loses its frame alignment (a cut after 8 bytes once made
/// the walk take the next syscall's first bytes for a header).
#[test]
fn frame_headers_cut_at_every_byte_keep_the_walk_aligned() {
    let port = free_port();
    let _server = h2_server(port);
    let rx = Receiver::start();
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &port.to_string()]);
    let n = 40;
    raw_client("h2_split_client.py", &[port.to_string(), n.to_string()], n);
    let err = stop_after(agent, &rx, 2 * n);
    let counters = final_counters(&err);
    let spans = rx.spans();
    for kind in ["server", "client"] {
        for i in 0..n {
            let path = format!("/r/split-{i}");
            let got = one(&spans, kind, |s| s.attr("url.path") == Some(path.as_str()));
            assert_eq!(got.len(), 1, "{kind} {path}; counters {counters:?}");
            assert_eq!(got[0].attr("http.response.status_code"), Some("200"));
            assert_eq!(got[0].attr("network.protocol.version"), Some("2"));
        }
    }
    assert_eq!(spans.len(), 2 * n, "counters {counters:?}");
    assert_eq!(counters.get("http2_alignment_lost"), None, "{counters:?}");
}

/// A raw-socket client writing 250 gRPC calls (500 frames) in one write, then 20 more in one
/// `sendmsg` whose DATA payloads come as 40 iovecs each, against Node's http2 server: what the
/// kernel keeps of one syscall outgrows one event (it goes out as several, split at frame
/// boundaries), and the walk follows frames hundreds of vectors into a call. Every call gives
/// a span on each side, named, with its gRPC status; no frame header is left out and no
/// direction loses its alignment (before the split, the first 8 KiB of kept records ended
/// the event and the rest of the syscall was passed over).
#[test]
fn hundreds_of_frames_in_one_syscall_keep_every_stream() {
    let port = free_port();
    let _server = h2_server(port);
    let rx = Receiver::start();
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &port.to_string()]);
    let (burst, vectored) = (250, 20);
    let n = burst + vectored;
    raw_client(
        "h2_burst_client.py",
        &[port.to_string(), burst.to_string(), vectored.to_string()],
        n,
    );
    let err = stop_after(agent, &rx, 2 * n);
    let counters = final_counters(&err);
    let spans = rx.spans();
    for kind in ["server", "client"] {
        for i in 0..n {
            let name = format!("burst.Svc/Call{i}");
            let got = one(&spans, kind, |s| s.span.name == name);
            assert_eq!(got.len(), 1, "{kind} {name}; counters {counters:?}");
            assert_eq!(got[0].attr("rpc.system.name"), Some("grpc"), "{name}");
            assert_eq!(
                got[0].attr("rpc.response.status_code"),
                Some("OK"),
                "{name}"
            );
        }
    }
    assert_eq!(spans.len(), 2 * n, "counters {counters:?}");
    for lost in [
        "http2_alignment_lost",
        "kernel_h2_chunks_full",
        "kernel_h2_walk_incomplete",
    ] {
        assert_eq!(counters.get(lost), None, "{counters:?}");
    }
}

#[test]
fn h2load_thousands_of_interleaved_streams_each_give_a_span() {
    let rx = Receiver::start();
    let port = free_port();
    let server = h2_server(port);
    let agent = Agent::start(Export::Grpc(&rx), &["--pid", &server.pid().to_string()]);
    let n = 4000;
    let out = run(Command::new("timeout")
        .args(["60", "h2load", "-n", &n.to_string(), "-c", "4", "-m", "100"])
        .arg(format!("http://127.0.0.1:{port}/hello")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{n} succeeded")), "h2load: {text}");
    let got = rx
        .wait_for(n, Duration::from_secs(30), "server spans", |s| {
            s.kind() == "server"
        })
        .len();
    std::thread::sleep(Duration::from_millis(800));
    let (_, err) = agent.stop();
    let c = final_counters(&err);
    let lost = [
        "http2_streams_dropped",
        "http2_ends_unseen",
        "kernel_ringbuf_full_events",
        "events_channel_full",
        "events_bytes_full",
        "spans_queue_full",
    ]
    .iter()
    .map(|k| c.get(*k).copied().unwrap_or(0))
    .sum::<u64>();
    eprintln!("h2load: {got} spans of {n} streams, counters {c:?}");
    assert_eq!(rx.spans().len(), got, "no other spans");
    assert_eq!(got, n, "every stream a span (lost and counted: {lost})");
    assert!(rx
        .spans()
        .iter()
        .all(|s| s.attr("url.path") == Some("/hello")
            && s.attr("http.response.status_code") == Some("200")));
}

/// A session opened before the agent started: the header table entries it indexed then are
/// unknown to the agent, so fields that refer to them stay unknown (counted), while every
/// request made after the start is still a span, and no field is ever wrong.
#[test]
fn a_connection_opened_before_the_agent_is_decoded_from_its_middle() {
    let rx = Receiver::start();
    let port = free_port();
    let server = h2_server(port);
    let go = std::env::temp_dir().join(format!("h2-go-{port}"));
    let _ = std::fs::remove_file(&go);
    let n = 50;
    let client = Proc::spawn(
        Command::new("node")
            .arg(fixture("h2_session_client.js"))
            .args([port.to_string(), n.to_string(), go.display().to_string()])
            .stdout(Stdio::null()),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let agent = Agent::start(Export::Grpc(&rx), &["--pid", &server.pid().to_string()]);
    std::fs::write(&go, b"go").unwrap();
    let servers = rx.wait_for(n, Duration::from_secs(30), "server spans", |s| {
        s.kind() == "server"
    });
    drop(client);
    std::thread::sleep(Duration::from_millis(800));
    let (_, err) = agent.stop();
    let _ = std::fs::remove_file(&go);
    let c = final_counters(&err);
    eprintln!("mid-connection: {} spans, counters {c:?}", servers.len());
    assert_eq!(
        rx.spans().len(),
        n,
        "exactly the requests made after the start"
    );
    let mut paths: Vec<String> = servers
        .iter()
        .map(|s| s.attr("url.path").unwrap_or("").to_owned())
        .collect();
    paths.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("/after/{i}")).collect();
    want.sort();
    assert_eq!(
        paths, want,
        "each path decoded (they are new literals), none wrong"
    );
    for s in &servers {
        assert_eq!(s.attr("http.response.status_code"), Some("200"));
        assert_eq!(s.attr("http.request.method"), Some("GET"));
    }
    assert!(
        c.get("http2_unresolved_fields").copied().unwrap_or(0) >= n as u64,
        "the :authority and x-tenant entries indexed before the start are unknown: {c:?}"
    );
}

/// grpcio (gRPC's C core under Python) as server and client, unary and all three streaming
/// kinds, over one channel from 4 threads: one span per call on each side, named
/// `package.Service/Method`, with the status from the trailers, the span status by the gRPC
/// rules of each side, and the messages each way.
#[test]
fn grpcio_unary_and_streaming_calls() {
    let rx = Receiver::start();
    let port = free_port();
    let _server = Proc::spawn(
        tests::programs::python("grpc_service.py", &["serve", &port.to_string()])
            .env("OTEL_SERVICE_NAME", "catalog")
            .stdout(Stdio::null()),
    );
    wait_port(port);
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &port.to_string()]);
    let rounds = 20;
    let out = run(Command::new("timeout")
        .args(["60", "python3"])
        .arg(fixture("grpc_service.py"))
        .args(["call", &port.to_string(), &rounds.to_string()]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ok {rounds}")
    );
    let calls = 6 * rounds;
    rx.wait_for(
        2 * calls,
        Duration::from_secs(30),
        "server and client spans",
        |_| true,
    );
    std::thread::sleep(Duration::from_millis(800));
    let (_, err) = agent.stop();
    let spans = rx.spans();
    eprintln!("grpcio: counters {:?}", final_counters(&err));
    assert_eq!(spans.len(), 2 * calls, "one span per call on each side");
    // Both ends are on this host: every server span is the child of the call that made it,
    // and each client span the root of its trace.
    assert_eq!(
        callers(&spans),
        (calls, 0),
        "server spans stitched to their calls"
    );
    assert!(spans
        .iter()
        .filter(|s| s.kind() == "client")
        .all(|s| s.parent_id().is_empty() && s.attr("beholder.link.method") == Some("none")));
    assert_catalog_calls(&spans, rounds);
}

/// gRPC through a proxy: grpcio's client calls nginx (`listen ... http2`, `grpc_pass`), which
/// calls grpcio's server over HTTP/2 of its own. Unary and streaming calls, then replies of
/// 1 MiB and 16 MiB checked byte for byte, all bounded in time: the proxy must pass everything
/// unchanged while both of its sides are traced. Each call gives four spans: the client's, the
/// proxy's SERVER and CLIENT spans, and the server's, each named `package.Service/Method` with
/// its status.
#[test]
fn grpc_through_nginx_grpc_pass() {
    let rx = Receiver::start();
    let upstream = free_port();
    let _server = Proc::spawn(
        tests::programs::python("grpc_service.py", &["serve", &upstream.to_string()])
            .env("OTEL_SERVICE_NAME", "catalog")
            .stdout(Stdio::null()),
    );
    wait_port(upstream);
    let port = free_port();
    let _nginx = tests::programs::Nginx::start_h2c(
        port,
        &format!(
            "    location / {{ grpc_pass grpc://127.0.0.1:{upstream}; \
             grpc_read_timeout 60s; grpc_send_timeout 60s; }}\n"
        ),
    );
    let agent = Agent::start(
        Export::Grpc(&rx),
        &["--port", &port.to_string(), "--port", &upstream.to_string()],
    );
    let rounds = 10;
    let out = run(Command::new("timeout")
        .args(["60", "python3"])
        .arg(fixture("grpc_service.py"))
        .args(["call", &port.to_string(), &rounds.to_string()]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ok {rounds}")
    );
    let mut blobs = 0;
    for (size, n) in [(1usize << 20, 8), (16 << 20, 3)] {
        let out = run(Command::new("timeout")
            .args(["120", "python3"])
            .arg(fixture("grpc_service.py"))
            .args([
                "blobs",
                &port.to_string(),
                &size.to_string(),
                &n.to_string(),
            ]));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("ok {n}")
        );
        blobs += n;
    }
    let calls = 6 * rounds + blobs;
    let err = stop_after(agent, &rx, 4 * calls);
    let spans = rx.spans();
    let counters = final_counters(&err);
    eprintln!("grpc through nginx: counters {counters:?}");
    // Every frame of every reply is walked in step, 16 MiB ones too (a frame header cut after
    // 8 bytes once lost a direction's alignment in about one run in three): four spans per call.
    assert_eq!(
        counters.get("http2_alignment_lost"),
        None,
        "frame alignment kept: {counters:?}"
    );
    assert_eq!(
        spans.len(),
        4 * calls,
        "four spans per call; counters {counters:?}"
    );
    // Two SERVER spans (the proxy's, the server's) and two CLIENT spans (the client's, the
    // proxy's) for each call.
    let count = |kind: &str, name: &str| {
        spans
            .iter()
            .filter(|s| s.kind() == kind && s.span.name == format!("shop.v1.Catalog/{name}"))
            .count()
    };
    for (name, per_round) in [
        ("Get", 2),
        ("List", 1),
        ("Upload", 1),
        ("Chat", 1),
        ("Crash", 1),
        ("Blob", 0),
    ] {
        let n = if name == "Blob" {
            2 * blobs
        } else {
            2 * per_round * rounds
        };
        for kind in ["server", "client"] {
            assert_eq!(count(kind, name), n, "{kind} {name}; counters {counters:?}");
        }
    }
    assert!(spans
        .iter()
        .filter(|s| s.span.name == "shop.v1.Catalog/Blob")
        .all(|s| s.attr("rpc.response.status_code") == Some("OK") && s.status_code() == 0));
    // Statuses survive the proxy: NOT_FOUND and UNKNOWN on every span of those calls, an error
    // on every client side and on no server side for NOT_FOUND.
    let missing: Vec<_> = spans
        .iter()
        .filter(|s| s.attr("rpc.response.status_code") == Some("NOT_FOUND"))
        .collect();
    assert_eq!(missing.len(), 4 * rounds);
    assert!(missing
        .iter()
        .all(|s| (s.status_code() == 2) == (s.kind() == "client")));
    let unknown = spans
        .iter()
        .filter(|s| s.attr("rpc.response.status_code") == Some("UNKNOWN"))
        .count();
    assert_eq!(unknown, 4 * rounds);
    // Each hop joins its caller on this host: the proxy's SERVER span is the child of the
    // client's call, the server's the child of the proxy's call.
    let servers = spans.iter().filter(|s| s.kind() == "server").count();
    assert_eq!(
        callers(&spans),
        (servers, 0),
        "every server span stitched to its caller"
    );
    // The proxy's calls are the children of the request it passes on when that one is the
    // only request it has open; with four clients at a time, often it is not: no guess then.
    let (linked, ambiguous, roots) = in_process(&spans, None);
    assert_eq!(roots, calls, "the client's calls start their traces");
    assert_eq!(linked + ambiguous, calls, "every proxy call accounted");
    eprintln!("grpc through nginx: {linked} of {calls} proxy calls linked, {ambiguous} ambiguous");
}

/// What `rounds` rounds of the Catalog calls (`grpc_service.py call`, `grpc_js_service.js
/// call`) must show on each side: Get twice (one NOT_FOUND: an error on the client only), List,
/// Upload and Chat with their message counts, Crash as UNKNOWN (an error on both sides).
fn assert_catalog_calls(spans: &[RSpan], rounds: usize) {
    let count = |kind: &str, name: &str| {
        spans
            .iter()
            .filter(|s| s.kind() == kind && s.span.name == format!("shop.v1.Catalog/{name}"))
            .collect::<Vec<_>>()
    };
    for kind in ["server", "client"] {
        let client = kind == "client";
        let gets = count(kind, "Get");
        assert_eq!(gets.len(), 2 * rounds, "{kind}");
        let missing: Vec<_> = gets
            .iter()
            .filter(|s| s.attr("rpc.response.status_code") == Some("NOT_FOUND"))
            .collect();
        assert_eq!(missing.len(), rounds, "{kind}");
        assert!(missing.iter().all(|s| (s.status_code() == 2) == client));
        assert!(gets
            .iter()
            .filter(|s| s.attr("rpc.response.status_code") == Some("OK"))
            .all(|s| s.status_code() == 0 && s.attr("error.type").is_none()));
        let crash = count(kind, "Crash");
        assert_eq!(crash.len(), rounds);
        assert!(crash
            .iter()
            .all(|s| s.attr("rpc.response.status_code") == Some("UNKNOWN")
                && s.status_code() == 2
                && s.attr("error.type") == Some("UNKNOWN")));
        // Messages each way, where every message prefix was seen (sent, received) per side.
        let expect = |name: &str, to_server: u32, to_client: u32| {
            let (sent, received) = if client {
                (to_server, to_client)
            } else {
                (to_client, to_server)
            };
            let all = count(kind, name);
            assert_eq!(all.len(), rounds, "{kind} {name}");
            for s in &all {
                assert_eq!(s.attr("rpc.system.name"), Some("grpc"));
                assert_eq!(
                    s.attr("rpc.method"),
                    Some(format!("shop.v1.Catalog/{name}").as_str())
                );
                assert_eq!(
                    s.attr("rpc.response.status_code"),
                    Some("OK"),
                    "{kind} {name}"
                );
                assert_eq!(s.attr("network.protocol.version"), Some("2"));
                if let Some(n) = s.attr("beholder.rpc.messages_sent") {
                    assert_eq!(n, sent.to_string(), "{kind} {name} sent");
                }
                if let Some(n) = s.attr("beholder.rpc.messages_received") {
                    assert_eq!(n, received.to_string(), "{kind} {name} received");
                }
            }
            let counted = all
                .iter()
                .filter(|s| s.attr("beholder.rpc.messages_received").is_some())
                .count();
            assert!(
                counted * 2 >= all.len(),
                "{kind} {name}: counts on {counted} of {}",
                all.len()
            );
        };
        expect("List", 1, 3);
        expect("Upload", 4, 1);
        expect("Chat", 3, 3);
    }
}

/// etcd (Debian's build: Go 1.19, grpc-go, stripped) serving etcdctl, two Go programs nobody
/// here wrote, on one host: puts, gets and revokes of a lease that does not exist, each
/// etcdctl run on a connection of its own. Each call gives one CLIENT span (etcdctl) and one
/// SERVER span (etcd) named by its gRPC method, with the gRPC status from the trailers
/// (NOT_FOUND: an error on the client only), and the server span is the child of the call.
/// Then HTTP/1 JSON requests to etcd's gateway, which makes its gRPC calls on a connection to
/// etcd itself that it opened before the agent started: those calls are found in the middle
/// of that connection and named from its header table.
#[test]
fn etcd_and_etcdctl_grpc_calls() {
    let port = free_port();
    let etcd = Etcd::start(port, None);
    let client_url = etcd.url.clone();
    let rx = Receiver::start();
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &port.to_string()]);
    let rounds = 10;
    etcd.calls(None, rounds);
    let gateway = 5;
    for i in 0..gateway {
        // base64 of "gw-<i>" and "v"
        let key = ["Z3ctMA==", "Z3ctMQ==", "Z3ctMg==", "Z3ctMw==", "Z3ctNA=="][i];
        let out = run(Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "20", "-d"])
            .arg(format!("{{\"key\":\"{key}\",\"value\":\"dg==\"}}"))
            .arg(format!("{client_url}/v3/kv/put")));
        assert!(String::from_utf8_lossy(&out.stdout).contains("revision"));
    }
    let wanted = 6 * rounds + 3 * gateway;
    let err = stop_after(agent, &rx, wanted);
    let counters = final_counters(&err);
    let spans = rx.spans();
    eprintln!("etcd: {} spans, counters {counters:?}", spans.len());
    let named = |kind: &str, name: &str| one(&spans, kind, |s| s.span.name == name);
    for kind in ["server", "client"] {
        for (name, calls, status) in [
            ("etcdserverpb.KV/Put", rounds + gateway, "OK"),
            ("etcdserverpb.KV/Range", rounds, "OK"),
            ("etcdserverpb.Lease/LeaseRevoke", rounds, "NOT_FOUND"),
        ] {
            let got = named(kind, name);
            assert_eq!(got.len(), calls, "{kind} {name}; counters {counters:?}");
            for s in got {
                assert_eq!(s.attr("rpc.system.name"), Some("grpc"), "{kind} {name}");
                assert_eq!(s.attr("rpc.method"), Some(name));
                assert_eq!(
                    s.attr("rpc.response.status_code"),
                    Some(status),
                    "{kind} {name}"
                );
                let error = status != "OK" && kind == "client";
                assert_eq!(s.status_code() == 2, error, "{kind} {name} span status");
            }
        }
    }
    // The gateway's HTTP/1 requests, served by etcd.
    assert_eq!(
        one(&spans, "server", |s| s.attr("url.path")
            == Some("/v3/kv/put"))
        .len(),
        gateway
    );
    let grpc: Vec<RSpan> = spans
        .iter()
        .filter(|s| s.attr("rpc.system.name") == Some("grpc"))
        .cloned()
        .collect();
    assert_eq!(
        callers(&grpc),
        (3 * rounds + gateway, 0),
        "every gRPC server span is the child of its call"
    );
}

/// `node grpc_js_service.js ARGS` with `@grpc/grpc-js` from `target/node` (bootstrap).
fn grpc_js(args: &[&str]) -> Command {
    let mut c = Command::new("node");
    c.arg(fixture("grpc_js_service.js")).args(args).env(
        "NODE_PATH",
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/node/node_modules"),
    );
    c
}

/// Node's `@grpc/grpc-js` against itself and against grpcio, both ways: a grpc-js server
/// called by grpc-js and by grpcio clients, and a grpcio server called by a grpc-js client,
/// each pair traced by an agent of its own. Every call gives its two spans with names,
/// statuses and message counts right, whichever implementation encoded the frames and header
/// blocks, and each server span is the child of the call that made it.
#[test]
fn grpc_js_and_grpcio_both_ways() {
    let rounds = 10;
    let pairs: [(&str, &str); 3] = [("node", "node"), ("node", "python"), ("python", "node")];
    for (server_impl, client_impl) in pairs {
        let port = free_port();
        let p = port.to_string();
        let _server = catalog(server_impl, port, None);
        let rx = Receiver::start();
        let agent = Agent::start(Export::Grpc(&rx), &["--port", &p]);
        catalog_calls(client_impl, port, rounds, 4);
        let calls = 6 * rounds;
        let err = stop_after(agent, &rx, 2 * calls);
        let spans = rx.spans();
        let counters = final_counters(&err);
        eprintln!("{client_impl} client, {server_impl} server: counters {counters:?}");
        assert_eq!(
            spans.len(),
            2 * calls,
            "{client_impl} client, {server_impl} server: one span per call on each side"
        );
        assert_catalog_calls(&spans, rounds);
        assert_eq!(
            callers(&spans),
            (calls, 0),
            "{client_impl} client, {server_impl} server: server spans stitched to their calls"
        );
    }
}

/// The Catalog server of `implementation` ("node": grpc-js, "python": grpcio) on `port`; with
/// `upstream`, a middle tier whose Get asks the same of the Catalog there.
fn catalog(implementation: &str, port: u16, upstream: Option<u16>) -> Proc {
    let mut args = vec!["serve".to_string(), port.to_string()];
    args.extend(upstream.map(|u| u.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut c = if implementation == "node" {
        grpc_js(&args)
    } else {
        tests::programs::python("grpc_service.py", &args)
    };
    let p = Proc::spawn(c.stdout(Stdio::null()));
    wait_port(port);
    p
}

/// `rounds` rounds of Catalog calls to `port` from a client of `implementation`, `concurrency`
/// at a time, within 60 s.
fn catalog_calls(implementation: &str, port: u16, rounds: usize, concurrency: usize) {
    let args = [
        "call".to_string(),
        port.to_string(),
        rounds.to_string(),
        concurrency.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let client = if implementation == "node" {
        grpc_js(&args)
    } else {
        tests::programs::python("grpc_service.py", &args)
    };
    let out = run(Command::new("timeout")
        .arg("60")
        .arg(client.get_program())
        .args(client.get_args())
        .envs(client.get_envs().filter_map(|(k, v)| Some((k, v?)))));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ok {rounds}"),
        "{implementation} client"
    );
}

/// Three gRPC hops on this host: a client calls a middle tier, whose Get handler calls a leaf
/// server (grpc-js in the middle of grpcio, and grpcio in the middle of grpc-js). The middle
/// tier's calls are linked to the request it is serving by its process's own state (HTTP/2
/// has no thread to go by: grpc core and Node's event loop write on threads of their own):
/// one call at a time, every Get is one trace of four spans, client -> middle SERVER ->
/// middle CLIENT (`process`) -> leaf SERVER; four at a time, no call gets a wrong parent
/// (those made while several requests were open say `ambiguous`), and the share linked is
/// printed.
#[test]
fn grpc_middle_tiers_link_their_calls_to_the_request_they_serve() {
    let rounds = 10;
    let cases = [("node", "python", "python"), ("python", "node", "node")];
    for (middle_impl, leaf_impl, client_impl) in cases {
        for concurrency in [1, 4] {
            let what =
                format!("{client_impl} -> {middle_impl} -> {leaf_impl}, {concurrency} at a time");
            let (leaf_port, middle_port) = (free_port(), free_port());
            let _leaf = catalog(leaf_impl, leaf_port, None);
            let middle = catalog(middle_impl, middle_port, Some(leaf_port));
            let rx = Receiver::start();
            let agent = Agent::start(
                Export::Grpc(&rx),
                &[
                    "--port",
                    &middle_port.to_string(),
                    "--port",
                    &leaf_port.to_string(),
                ],
            );
            catalog_calls(client_impl, middle_port, rounds, concurrency);
            // Six calls a round, two of them Gets the middle tier passes on.
            let (calls, relayed) = (6 * rounds, 2 * rounds);
            let err = stop_after(agent, &rx, 2 * calls + 2 * relayed);
            let spans = rx.spans();
            let counters = final_counters(&err);
            eprintln!("{what}: counters {counters:?}");
            assert_eq!(
                spans.len(),
                2 * calls + 2 * relayed,
                "{what}: one span per call on each side; counters {counters:?}"
            );
            // Every server span, the middle's and the leaf's, is the child of its caller.
            assert_eq!(callers(&spans), (calls + relayed, 0), "{what}: stitched");
            let (linked, ambiguous, roots) = in_process(&spans, Some("shop.v1.Catalog/Get"));
            let middle_pid = middle.pid().to_string();
            let middle_calls = spans
                .iter()
                .filter(|s| s.kind() == "client" && s.res("process.pid") == Some(&middle_pid))
                .count();
            assert_eq!(middle_calls, relayed, "{what}: the middle tier's calls");
            assert_eq!(
                roots, calls,
                "{what}: the client's calls start their traces"
            );
            assert_eq!(
                linked + ambiguous,
                relayed,
                "{what}: every middle call accounted"
            );
            eprintln!(
                "{what}: {linked} of {relayed} middle-tier calls linked, {ambiguous} ambiguous"
            );
            if concurrency == 1 {
                assert_eq!(
                    (linked, ambiguous),
                    (relayed, 0),
                    "{what}: one request open at a time: every call linked"
                );
                // Each Get the middle passed on is one trace of four spans.
                let mut traces = std::collections::HashMap::<String, usize>::new();
                for s in &spans {
                    *traces.entry(s.trace_id()).or_default() += 1;
                }
                let whole = traces.values().filter(|&&n| n == 4).count();
                assert_eq!(whole, relayed, "{what}: traces of four spans");
            }
        }
    }
}

/// A REST front end calling gRPC: curl asks Node's HTTP/1.1 server, whose handler calls Get on
/// a grpcio Catalog; one request at a time over one keep-alive connection, half of them for a
/// missing item (NOT_FOUND, answered 404). Every request is one trace of four spans: curl's
/// CLIENT, the front end's HTTP SERVER span, its gRPC CLIENT span (`process`: the one request
/// it had open) and the Catalog's SERVER span.
#[test]
fn a_rest_front_end_links_its_grpc_calls_to_the_request_it_serves() {
    let (leaf, front) = (free_port(), free_port());
    let _leaf = catalog("python", leaf, None);
    let (f, l) = (front.to_string(), leaf.to_string());
    let _front = Proc::spawn(grpc_js(&["gateway", &f, &l]).stdout(Stdio::null()));
    wait_port(front);
    let rx = Receiver::start();
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &f, "--port", &l]);
    let n = 20;
    let urls: Vec<String> = (0..n)
        .map(|i| {
            let id = if i % 2 == 0 { "42" } else { "missing" };
            format!("http://127.0.0.1:{front}/items/{id}")
        })
        .collect();
    // HTTP/1.1, one connection kept alive (not the h2c `curl` helper above).
    let out = run(Command::new("curl")
        .args(["-sS", "--max-time", "30", "-w", " %{http_code}\\n"])
        .args(&urls));
    let out = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.lines().filter(|l| *l == "42 200").count(),
        n / 2,
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| *l == "no such item 404").count(),
        n / 2,
        "{out}"
    );
    let err = stop_after(agent, &rx, 4 * n);
    let spans = rx.spans();
    let counters = final_counters(&err);
    eprintln!("REST front end: counters {counters:?}");
    assert_eq!(spans.len(), 4 * n, "four spans per request; {counters:?}");
    let by_id: std::collections::HashMap<String, &RSpan> =
        spans.iter().map(|s| (s.span_id(), s)).collect();
    let calls: Vec<&RSpan> = spans
        .iter()
        .filter(|s| s.span.name == "shop.v1.Catalog/Get" && s.kind() == "client")
        .collect();
    assert_eq!(calls.len(), n);
    for call in calls {
        let server = by_id
            .get(&call.parent_id())
            .unwrap_or_else(|| panic!("the call's parent is a span here: {call:?}"));
        assert_eq!(server.kind(), "server");
        assert_eq!(server.attr("network.protocol.version"), Some("1.1"));
        assert_eq!(server.res("process.pid"), call.res("process.pid"));
        assert_eq!(call.attr("beholder.link.method"), Some("process"));
        assert!(
            server.span.start_time_unix_nano <= call.span.start_time_unix_nano
                && call.span.end_time_unix_nano <= server.span.end_time_unix_nano
        );
        // The status the call got is the one the front end answered with.
        let (status, code) = if call.attr("rpc.response.status_code") == Some("NOT_FOUND") {
            ("404", 2)
        } else {
            ("200", 0)
        };
        assert_eq!(call.status_code(), code);
        assert_eq!(server.attr("http.response.status_code"), Some(status));
        // Above it curl's request, below it the Catalog's span of the same call.
        let curl_span = by_id.get(&server.parent_id()).expect("curl's span");
        assert_eq!(curl_span.kind(), "client");
        assert!(curl_span.parent_id().is_empty());
        let leaf_spans: Vec<_> = spans
            .iter()
            .filter(|s| s.parent_id() == call.span_id())
            .collect();
        assert_eq!(leaf_spans.len(), 1);
        assert_eq!(leaf_spans[0].kind(), "server");
        assert!([server, curl_span, leaf_spans[0]]
            .iter()
            .all(|s| s.trace_id() == call.trace_id()));
    }
}
