//! Root integration tests: real programs over loopback, traced by the agent, spans received at a
//! real OTLP endpoint.
use std::{
    collections::HashSet,
    io::Write,
    process::{Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tests::{
    agent::{Agent, Export},
    free_port,
    programs::{curl, python, run, Nginx, Proc},
    receiver::{RSpan, Receiver},
    wait_port,
};

const T: Duration = Duration::from_secs(20);
const NGINX_LOCATIONS: &str =
    "    location = /hello { return 200 \"hello\\n\"; }\n    location = /fail { return 503; }\n";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
}

fn py_server(port: u16, service_name: &str) -> Proc {
    let p = Proc::spawn(
        python("threaded_server.py", &[&port.to_string()])
            .env("OTEL_SERVICE_NAME", service_name)
            .stdout(Stdio::null()),
    );
    wait_port(port);
    p
}

fn is_server_of(port: u16) -> impl Fn(&RSpan) -> bool {
    move |s| s.kind() == "server" && s.attr("server.port") == Some(&port.to_string())
}

fn is_client_to(port: u16) -> impl Fn(&RSpan) -> bool {
    move |s| s.kind() == "client" && s.attr("network.peer.port") == Some(&port.to_string())
}

/// Our own export traffic must never come back as spans.
fn assert_no_export_spans(rx: &Receiver) {
    for s in rx.spans() {
        for port in [rx.grpc.port(), rx.http.port()] {
            assert_ne!(
                s.attr("network.peer.port"),
                Some(port.to_string().as_str()),
                "export traffic traced: {s:?}"
            );
            assert_ne!(
                s.attr("server.port"),
                Some(port.to_string().as_str()),
                "export traffic traced: {s:?}"
            );
        }
    }
}

#[test]
fn check_reports_every_feature() {
    tests::require_root();
    let out = run(Command::new(tests::agent::agent_bin()).arg("check"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("all checks passed"), "{text}");
    // 25 tracepoints; the data-syscall exits of each direction share one program.
    assert!(text.contains("19/19"), "{text}");
    assert!(
        text.contains("[ ok ] verifier accepted the Go uprobes (net/http and goroutine spawns"),
        "{text}"
    );
    assert!(text.contains("loaded, not attached"), "{text}");
    assert!(text.contains("[ ok ] same-host stitching"), "{text}");
}

/// The README's first experience: no backend configured, whole host traced, spans on the console.
#[test]
fn console_shows_nginx_and_curl() {
    let port = free_port();
    let _nginx = Nginx::start(port, NGINX_LOCATIONS);
    let agent = Agent::start(Export::Console, &[]);
    curl(&[&format!("http://127.0.0.1:{port}/hello")]);
    tests::wait_until(T, "console spans", || {
        agent.stdout().contains("SERVER GET /hello -> 200")
    });
    let (out, _) = agent.stop();
    assert!(out.contains("[nginx pid"), "{out}");
    assert!(out.contains("CLIENT GET /hello -> 200"), "{out}");
    assert!(out.contains("[curl pid"), "{out}");
}

#[test]
fn nginx_and_curl_over_grpc() {
    let rx = Receiver::start();
    let port = free_port();
    let _nginx = Nginx::start(port, NGINX_LOCATIONS);
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &port.to_string()]);
    let before = unix_now();
    for _ in 0..3 {
        assert_eq!(
            curl(&[&format!("http://127.0.0.1:{port}/hello?x=1")]),
            "hello\n"
        );
    }
    curl(&["-o", "/dev/null", &format!("http://127.0.0.1:{port}/fail")]);
    let after = unix_now();
    let servers = rx.wait_for(4, T, "nginx server spans", is_server_of(port));
    let clients = rx.wait_for(4, T, "curl client spans", is_client_to(port));
    std::thread::sleep(Duration::from_millis(500));
    agent.stop();
    assert_eq!(
        rx.spans().iter().filter(|s| is_server_of(port)(s)).count(),
        4,
        "exactly one server span per request"
    );
    assert_eq!(
        rx.spans().iter().filter(|s| is_client_to(port)(s)).count(),
        4,
        "exactly one client span per request"
    );

    for s in &servers {
        assert_eq!(s.span.name, "GET");
        assert_eq!(s.res("service.name"), Some("nginx"));
        assert_eq!(s.res("process.executable.name"), Some("nginx"));
        assert_eq!(s.res("process.executable.path"), Some("/usr/sbin/nginx"));
        assert!(s.res("process.pid").is_some() && s.res("host.name").is_some());
        assert_eq!(s.res("telemetry.sdk.language"), Some("rust"));
        assert_eq!(s.attr("http.request.method"), Some("GET"));
        assert_eq!(s.attr("url.scheme"), Some("http"));
        assert_eq!(s.attr("network.protocol.version"), Some("1.1"));
        assert_eq!(s.attr("client.address"), Some("127.0.0.1"));
        assert_eq!(s.attr("network.peer.address"), Some("127.0.0.1"));
        assert_eq!(s.attr("server.address"), Some("127.0.0.1"));
        assert!(s
            .attr("user_agent.original")
            .is_some_and(|ua| ua.starts_with("curl/")));
        assert!(
            s.span.start_time_unix_nano >= before && s.span.end_time_unix_nano <= after,
            "span times within the test's wall clock"
        );
        assert!(s.duration() < Duration::from_secs(1));
        assert_eq!(s.span.trace_id.len(), 16);
        // curl is traced too: the agent put its client span's context on the wire.
        let caller = clients
            .iter()
            .find(|c| c.trace_id() == s.trace_id())
            .expect("curl's span in the same trace");
        assert_eq!(
            s.parent_id(),
            caller.span_id(),
            "nginx's span is curl's child"
        );
        assert!(
            caller.span.parent_span_id.is_empty(),
            "curl starts the trace"
        );
    }
    let ok: Vec<_> = servers
        .iter()
        .filter(|s| s.attr("url.path") == Some("/hello"))
        .collect();
    assert_eq!(ok.len(), 3);
    assert!(ok
        .iter()
        .all(|s| s.attr("http.response.status_code") == Some("200") && s.status_code() == 0));
    let fail = servers
        .iter()
        .find(|s| s.attr("url.path") == Some("/fail"))
        .expect("/fail span");
    assert_eq!(fail.attr("http.response.status_code"), Some("503"));
    assert_eq!(fail.status_code(), 2, "5xx is an error on a server span");

    for c in &clients {
        assert_eq!(c.res("service.name"), Some("curl"));
        assert_eq!(c.attr("server.port"), Some(port.to_string().as_str()));
        assert!(c
            .attr("url.full")
            .is_some_and(|u| u.starts_with(&format!("http://127.0.0.1:{port}/"))));
    }
    // A client span encloses the server span it caused. The server's end is stamped when its
    // `writev` returns, which may come a few µs after the client's `read` returned on the other
    // core: allow 1 ms of skew.
    const SKEW: u64 = 1_000_000;
    for s in &ok {
        let peer_port = s.attr("network.peer.port").expect("peer port");
        let c = clients.iter().find(|c| {
            c.attrs.contains_key("network.peer.port")
                && c.span.start_time_unix_nano <= s.span.start_time_unix_nano
                && c.span.end_time_unix_nano + SKEW >= s.span.end_time_unix_nano
        });
        assert!(
            c.is_some(),
            "no client span encloses server span from port {peer_port}"
        );
    }
    assert_no_export_spans(&rx);
}

/// A short, paced wrk burst (4 connections, about 3.5k req/s), whole host traced, exported over
/// HTTP/protobuf: one server span per request nginx served, nothing dropped, and none of the
/// agent's own export traffic traced. Loss at saturation is measured by `cargo xtask bench`.
#[test]
fn nginx_wrk_burst_over_http() {
    let rx = Receiver::start();
    let port = free_port();
    let nginx = Nginx::start(port, NGINX_LOCATIONS);
    let agent = Agent::start(Export::Http(&rx), &[]);
    let out = run(Command::new("wrk").args([
        "-t1",
        "-c4",
        "-d2s",
        "-s",
        &tests::fixture("wrk_paced.lua"),
        &format!("http://127.0.0.1:{port}/hello"),
    ]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let wrk_requests: usize = text
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in")
                .map(|(n, _)| n.trim().parse().expect("wrk count"))
        })
        .expect("wrk summary");
    std::thread::sleep(Duration::from_millis(300));
    let served = nginx.access_log_lines();
    assert!(
        served >= wrk_requests && wrk_requests > 100,
        "nginx served {served}, wrk counted {wrk_requests}"
    );
    rx.wait_for(
        served,
        Duration::from_secs(60),
        "server spans for every request",
        is_server_of(port),
    );
    std::thread::sleep(Duration::from_millis(700));
    let (_, err) = agent.stop();
    let spans = rx.spans();
    let servers: Vec<_> = spans.iter().filter(|s| is_server_of(port)(s)).collect();
    assert_eq!(servers.len(), served, "span count equals request count");
    let ids: HashSet<_> = servers.iter().map(|s| s.span_id()).collect();
    assert_eq!(ids.len(), served, "no duplicate spans");
    assert!(servers
        .iter()
        .all(|s| s.res("service.name") == Some("nginx") && s.attr("url.path") == Some("/hello")));
    assert!(!err.contains("dropped"), "the agent reported drops:\n{err}");
    assert_no_export_spans(&rx);
}

#[test]
fn python_threaded_server_with_curl_and_urllib() {
    let rx = Receiver::start();
    let port = free_port();
    let _server = py_server(port, "py-backend");
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &port.to_string()]);
    curl(&[&format!("http://127.0.0.1:{port}/from-curl")]);
    curl(&[
        "-o",
        "/dev/null",
        &format!("http://127.0.0.1:{port}/status/404"),
    ]);
    let out = run(&mut python(
        "urllib_client.py",
        &[&format!("http://127.0.0.1:{port}/from-urllib"), "2"],
    ));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200\n200\n");
    let servers = rx.wait_for(4, T, "python server spans", is_server_of(port));
    let clients = rx.wait_for(4, T, "client spans", is_client_to(port));
    std::thread::sleep(Duration::from_millis(500));
    agent.stop();
    assert!(
        servers
            .iter()
            .all(|s| s.res("service.name") == Some("py-backend")),
        "OTEL_SERVICE_NAME of the target names the service"
    );
    assert!(servers.iter().all(|s| s
        .res("process.executable.name")
        .is_some_and(|n| n.starts_with("python3"))));
    let paths: Vec<_> = servers.iter().filter_map(|s| s.attr("url.path")).collect();
    assert_eq!(paths.iter().filter(|p| **p == "/from-urllib").count(), 2);
    assert_eq!(paths.iter().filter(|p| **p == "/from-curl").count(), 1);
    let not_found = servers
        .iter()
        .find(|s| s.attr("url.path") == Some("/status/404"))
        .expect("404 span");
    assert_eq!(
        not_found.status_code(),
        0,
        "4xx is not an error on a server span"
    );
    let urllib: Vec<_> = clients
        .iter()
        .filter(|c| c.attr("url.path") == Some("/from-urllib"))
        .collect();
    assert_eq!(urllib.len(), 2);
    assert!(urllib.iter().all(|c| c
        .res("process.executable.name")
        .is_some_and(|n| n.starts_with("python3"))));
    assert!(urllib.iter().all(|c| c
        .attr("user_agent.original")
        .is_some_and(|u| u.starts_with("Python-urllib"))));
    let curl_404 = clients
        .iter()
        .find(|c| c.attr("url.path") == Some("/status/404"))
        .expect("client 404");
    assert_eq!(
        curl_404.status_code(),
        2,
        "4xx is an error on a client span"
    );
}

#[test]
fn incoming_traceparent_valid_garbage_and_unsampled() {
    let rx = Receiver::start();
    let port = free_port();
    let _server = py_server(port, "tp-server");
    let agent = Agent::start(Export::Http(&rx), &["--port", &port.to_string()]);
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    curl(&[
        "-H",
        "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "-H",
        "tracestate: congo=t61rcWkgMzE",
        &url("/valid"),
    ]);
    curl(&[
        "-H",
        "traceparent: 00-zzzz-not-a-trace-context-01",
        &url("/garbage"),
    ]);
    curl(&[
        "-H",
        "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        &url("/unsampled"),
    ]);
    curl(&[&url("/after")]);
    rx.wait_for(3, T, "server spans", is_server_of(port));
    std::thread::sleep(Duration::from_millis(800));
    agent.stop();
    let servers: Vec<_> = rx
        .spans()
        .into_iter()
        .filter(|s| is_server_of(port)(s))
        .collect();
    let by = |p: &str| {
        servers
            .iter()
            .find(|s| s.attr("url.path") == Some(p))
            .cloned()
    };
    let spans = rx.spans();
    let client = |p: &str| {
        spans
            .iter()
            .find(|s| s.kind() == "client" && s.attr("url.path") == Some(p))
            .cloned()
            .expect("curl's client span")
    };
    let valid = by("/valid").expect("valid span");
    assert_eq!(valid.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    // curl sent the context itself: its client span is the header's child, and the server span
    // is the client span's child (stitched on this host: curl's bytes are unchanged).
    let caller = client("/valid");
    assert_eq!(caller.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(caller.parent_id(), "00f067aa0ba902b7");
    assert_eq!(valid.parent_id(), caller.span_id());
    assert_eq!(valid.span.trace_state, "congo=t61rcWkgMzE");
    assert_ne!(valid.span_id(), "00f067aa0ba902b7");
    let garbage = by("/garbage").expect("garbage span");
    let caller = client("/garbage");
    assert!(
        caller.span.parent_span_id.is_empty(),
        "a malformed header starts a new root"
    );
    assert_eq!(garbage.parent_id(), caller.span_id());
    assert_eq!(garbage.trace_id(), caller.trace_id());
    assert_ne!(garbage.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(
        by("/unsampled").is_none(),
        "an unsampled incoming trace is not recorded"
    );
    assert!(by("/after").is_some(), "the agent kept working");
    assert_eq!(servers.len(), 3);
}

/// The agent starts while a keep-alive connection is open: requests after the start become
/// spans, nothing before it, and no garbage.
#[test]
fn keepalive_connection_open_before_agent_start() {
    let rx = Receiver::start();
    let port = free_port();
    let _server = py_server(port, "pre-existing");
    let mut client = Proc::spawn(
        python(
            "keepalive_client.py",
            &[&port.to_string(), "6", "/ka", "--pause"],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped()),
    );
    let mut stdout = std::io::BufReader::new(client.child.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("client output");
    assert_eq!(line.trim(), "paused");
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &port.to_string()]);
    writeln!(client.child.stdin.as_mut().expect("stdin")).expect("resume client");
    line.clear();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("client output");
    assert_eq!(line.trim(), "done");
    rx.wait_for(5, T, "server spans", is_server_of(port));
    rx.wait_for(5, T, "client spans", is_client_to(port));
    std::thread::sleep(Duration::from_millis(800));
    agent.stop();
    let spans = rx.spans();
    let servers: Vec<_> = spans.iter().filter(|s| is_server_of(port)(s)).collect();
    let clients: Vec<_> = spans.iter().filter(|s| is_client_to(port)(s)).collect();
    assert_eq!(
        servers.len(),
        5,
        "requests 1..5 after the start, not request 0"
    );
    assert_eq!(clients.len(), 5);
    for s in servers.iter().chain(clients.iter()) {
        assert_eq!(s.attr("url.path"), Some("/ka"));
        assert_eq!(s.attr("http.response.status_code"), Some("200"));
    }
    // Exactly requests 1..5: the server spans by their query, the client spans by their full URL.
    let queries: HashSet<_> = servers.iter().filter_map(|s| s.attr("url.query")).collect();
    let want: HashSet<String> = (1..6).map(|i| format!("i={i}")).collect();
    assert_eq!(queries, want.iter().map(String::as_str).collect());
    let fulls: HashSet<_> = clients.iter().filter_map(|s| s.attr("url.full")).collect();
    let want: HashSet<String> = (1..6)
        .map(|i| format!("http://127.0.0.1:{port}/ka?i={i}"))
        .collect();
    assert_eq!(fulls, want.iter().map(String::as_str).collect());
    let client_peer_ports: HashSet<_> = servers
        .iter()
        .filter_map(|s| s.attr("network.peer.port"))
        .collect();
    assert_eq!(
        client_peer_ports.len(),
        1,
        "all on the one pre-existing connection"
    );
}

/// 1,000 keep-alive requests give exactly 1,000 server spans and 1,000 client spans.
#[test]
fn thousand_keepalive_requests_exactly() {
    let rx = Receiver::start();
    let port = free_port();
    let nginx = Nginx::start(port, NGINX_LOCATIONS);
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &port.to_string()]);
    let out = run(&mut python(
        "keepalive_client.py",
        &[&port.to_string(), "1000", "/hello"],
    ));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "done");
    rx.wait_for(
        1000,
        Duration::from_secs(60),
        "1000 server spans",
        is_server_of(port),
    );
    rx.wait_for(
        1000,
        Duration::from_secs(60),
        "1000 client spans",
        is_client_to(port),
    );
    std::thread::sleep(Duration::from_millis(800));
    agent.stop();
    assert_eq!(nginx.access_log_lines(), 1000);
    let spans = rx.spans();
    let servers: Vec<_> = spans.iter().filter(|s| is_server_of(port)(s)).collect();
    let clients: Vec<_> = spans.iter().filter(|s| is_client_to(port)(s)).collect();
    assert_eq!(servers.len(), 1000, "none lost, none doubled");
    assert_eq!(clients.len(), 1000, "none lost, none doubled");
    assert_eq!(
        servers
            .iter()
            .map(|s| s.span_id())
            .collect::<HashSet<_>>()
            .len(),
        1000
    );
}

#[test]
fn garbage_config_is_refused_clearly() {
    tests::require_root();
    let out = Command::new(tests::agent::agent_bin())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
        .output()
        .expect("agent");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"carrier-pigeon\""),
        "{err}"
    );
    let out = Command::new(tests::agent::agent_bin())
        .args(["--payload-limit", "lots"])
        .output()
        .expect("agent");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--payload-limit"));
}

/// An unreachable backend is a warning: the agent keeps running, counts what it drops, and
/// stops cleanly.
#[test]
fn unreachable_backend_is_a_warning() {
    let port = free_port();
    let dead = free_port();
    let _server = py_server(port, "lonely");
    let agent = Agent::start_env(
        Export::Console,
        &["--port", &port.to_string()],
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                &format!("http://127.0.0.1:{dead}"),
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
        ],
    );
    curl(&[&format!("http://127.0.0.1:{port}/x")]);
    tests::wait_until(T, "an export warning", || {
        agent.stderr().contains("cannot export spans")
    });
    assert!(agent.stderr().contains("unreachable"), "{}", agent.stderr());
    curl(&[&format!("http://127.0.0.1:{port}/y")]);
    let (_, err) = agent.stop();
    assert!(err.contains("final counters"), "{err}");
}

/// Secrets in URLs never leave the host: a query token and the credentials of the OTLP endpoint.
#[test]
fn secrets_in_urls_are_redacted() {
    let rx = Receiver::start();
    let port = free_port();
    let _server = py_server(port, "private");
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &port.to_string()]);
    curl(&[&format!(
        "http://127.0.0.1:{port}/p?token=secret123&page=2&X-Goog-Signature=sig456"
    )]);
    rx.wait_for(1, T, "server span", is_server_of(port));
    std::thread::sleep(Duration::from_millis(500));
    agent.stop();
    let spans = rx.spans();
    let server = spans
        .iter()
        .find(|s| is_server_of(port)(s))
        .expect("server");
    assert_eq!(server.attr("url.path"), Some("/p"));
    assert_eq!(
        server.attr("url.query"),
        Some("token=REDACTED&page=2&X-Goog-Signature=REDACTED")
    );
    let client = spans
        .iter()
        .find(|s| s.kind() == "client" && s.attr("url.path") == Some("/p"))
        .expect("curl's client span");
    assert_eq!(
        client.attr("url.full"),
        Some(
            format!("http://127.0.0.1:{port}/p?token=REDACTED&page=2&X-Goog-Signature=REDACTED")
                .as_str()
        )
    );
    let all = format!("{spans:?}");
    assert!(
        !all.contains("secret123") && !all.contains("sig456"),
        "{all}"
    );

    // `--url-query drop` leaves query strings out, on the console too.
    let agent = Agent::start(
        Export::Console,
        &["--port", &port.to_string(), "--url-query", "drop"],
    );
    curl(&[&format!("http://127.0.0.1:{port}/q?token=secret789")]);
    tests::wait_until(T, "console spans", || {
        agent.stdout().contains("CLIENT GET /q -> 200")
    });
    let (out, err) = agent.stop();
    assert!(
        out.contains(&format!("url.full=\"http://127.0.0.1:{port}/q\"")),
        "{out}"
    );
    assert!(
        !out.contains("secret789") && !err.contains("secret789"),
        "{out}{err}"
    );

    // The endpoint's credentials are hidden in log lines.
    let dead = free_port();
    let agent = Agent::start_env(
        Export::Console,
        &["--port", &port.to_string()],
        &[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            &format!("http://user:hunter2@127.0.0.1:{dead}"),
        )],
    );
    curl(&[&format!("http://127.0.0.1:{port}/r")]);
    tests::wait_until(T, "an export warning", || {
        agent.stderr().contains("cannot export spans")
    });
    let (_, err) = agent.stop();
    assert!(!err.contains("hunter2"), "{err}");
    assert!(err.contains("REDACTED:REDACTED@127.0.0.1"), "{err}");
}
