//! Process selection, IPv6 and HTTP/1.0, privileges, and the agent's own metrics.
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use tests::{
    agent::{Agent, Export},
    free_port,
    programs::{curl, run, Nginx, Proc},
    receiver::Receiver,
    wait_until,
};

const T: Duration = Duration::from_secs(20);
const NGINX: &str = "    location = /hello { return 200 \"hello\\n\"; }\n";

/// `python3 -m http.server` speaks HTTP/1.0; here on IPv6 loopback, called by curl over IPv6.
#[test]
fn ipv6_and_http10_server() {
    let rx = Receiver::start();
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("http10-{port}"));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("page.txt"), "hello over ipv6\n").expect("file");
    let _server = Proc::spawn(
        Command::new("python3")
            .args(["-m", "http.server", &port.to_string(), "--bind", "::1"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_until(T, "python http.server on [::1]", || {
        std::net::TcpStream::connect(("::1", port)).is_ok()
    });
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &port.to_string()]);
    assert_eq!(
        curl(&["-6", &format!("http://[::1]:{port}/page.txt")]),
        "hello over ipv6\n"
    );
    let server = rx.wait_for(1, T, "server span", |s| {
        s.kind() == "server" && s.attr("url.path") == Some("/page.txt")
    });
    let client = rx.wait_for(1, T, "client span", |s| {
        s.kind() == "client" && s.attr("url.path") == Some("/page.txt")
    });
    agent.stop();
    let (s, c) = (&server[0], &client[0]);
    assert_eq!(s.attr("client.address"), Some("::1"));
    assert_eq!(s.attr("network.peer.address"), Some("::1"));
    assert_eq!(
        s.attr("network.protocol.version"),
        Some("1.0"),
        "python's http.server answers HTTP/1.0"
    );
    assert_eq!(s.attr("http.response.status_code"), Some("200"));
    assert_eq!(c.attr("network.peer.address"), Some("::1"));
    assert_eq!(c.attr("server.port"), Some(port.to_string().as_str()));
}

/// `--exe` traces only matching processes: nginx's server spans, not curl's client spans; and
/// `--pid` does the same by process id.
#[test]
fn exe_and_pid_filters() {
    let rx = Receiver::start();
    let port = free_port();
    let _nginx = Nginx::start(port, "    location = /hello { return 200 \"hello\\n\"; }\n");
    let agent = Agent::start(Export::Grpc(&rx), &["--exe", "*/nginx"]);
    for _ in 0..2 {
        curl(&[&format!("http://127.0.0.1:{port}/hello")]);
    }
    let spans = rx.wait_for(2, T, "nginx spans", |s| {
        s.attr("server.port") == Some(&port.to_string())
    });
    std::thread::sleep(Duration::from_millis(800));
    agent.stop();
    assert!(spans
        .iter()
        .all(|s| s.res("service.name") == Some("nginx") && s.kind() == "server"));
    assert!(
        rx.spans()
            .iter()
            .all(|s| s.res("service.name") == Some("nginx")),
        "only nginx is traced"
    );

    let rx = Receiver::start();
    let port2 = free_port();
    let server = Proc::spawn(
        Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port2.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    tests::wait_port(port2);
    let agent = Agent::start(Export::Grpc(&rx), &["--pid", &server.pid().to_string()]);
    curl(&["-o", "/dev/null", &format!("http://127.0.0.1:{port2}/")]);
    curl(&["-o", "/dev/null", &format!("http://127.0.0.1:{port}/hello")]);
    rx.wait_for(1, T, "python span", |s| s.kind() == "server");
    std::thread::sleep(Duration::from_millis(800));
    agent.stop();
    let spans = rx.spans();
    assert_eq!(spans.len(), 1, "only the selected pid: {spans:?}");
    assert_eq!(
        spans[0].res("process.pid"),
        Some(server.pid().to_string().as_str())
    );
}

/// Not root: a clear message that says how to fix it.
#[test]
fn not_root_is_explained() {
    tests::require_root();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            &tests::agent::agent_bin(),
        ])
        .output()
        .expect("setpriv");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must run as root"), "{err}");
}

/// The agent tracing port `port`, serving its own endpoint on `metrics_port` (once it listens).
fn agent_with_metrics(port: u16, metrics_port: u16) -> Proc {
    let mut cmd = Command::new(tests::agent::agent_bin());
    cmd.args([
        "--port",
        &port.to_string(),
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
    ])
    .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let agent = Proc::spawn(&mut cmd);
    // As long as `Agent::start` allows for the programs to load.
    tests::wait_port_for(metrics_port, std::time::Duration::from_secs(30));
    agent
}

/// The agent's counters are served in Prometheus format.
#[test]
fn metrics_endpoint_counts_spans() {
    let port = free_port();
    let metrics_port = free_port();
    let _nginx = Nginx::start(port, "    location = /hello { return 200 \"hello\\n\"; }\n");
    let _agent = agent_with_metrics(port, metrics_port);
    std::thread::sleep(Duration::from_millis(500));
    curl(&[&format!("http://127.0.0.1:{port}/hello")]);
    wait_until(T, "spans_exported_total 2", || {
        let text = String::from_utf8_lossy(
            &run(Command::new("curl")
                .args(["-s", &format!("http://127.0.0.1:{metrics_port}/metrics")]))
            .stdout,
        )
        .into_owned();
        text.contains("agent_spans_exported_total 2")
            && text.contains("agent_kernel_ringbuf_full_events_total 0")
    });
}

/// `/healthz` and `/readyz` beside `/metrics`; anything else is a 404; a connection that never
/// sends a request head is closed after the header timeout instead of holding a slot forever.
#[test]
fn health_endpoints_and_header_timeout() {
    use std::io::Read;
    let metrics_port = free_port();
    let _agent = agent_with_metrics(free_port(), metrics_port);
    let get = |path: &str| {
        let out = run(Command::new("curl").args([
            "-s",
            "--max-time",
            "5",
            "-w",
            " %{http_code}",
            &format!("http://127.0.0.1:{metrics_port}{path}"),
        ]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(get("/healthz"), "ok\n 200");
    assert_eq!(get("/readyz"), "ready\n 200");
    assert!(get("/nope").ends_with(" 404"));
    assert!(get("/metrics").contains("agent_spans_created_total"));
    let mut idle =
        std::net::TcpStream::connect(("127.0.0.1", metrics_port)).expect("connect to metrics");
    idle.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = idle.read(&mut buf).unwrap_or(0);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(14),
        "idle connection closed after {waited:?} ({n} bytes)"
    );
}

/// Connections that are not HTTP cost nothing once their first bytes show it: redis-server
/// moving 16 MiB values (RESP) and `openssl s_server` answering curl over TLS (ciphertext), both
/// in selected processes next to nginx. The kernel copies none of their bytes (without the check,
/// 33 MB reach userspace to be skipped there), counts each such connection, and the
/// HTTP traffic beside them is still traced exactly; the programs see their bytes unchanged.
#[test]
fn non_http_connections_are_not_copied() {
    let rx = Receiver::start();
    let (http_port, redis_port, tls_port) = (free_port(), free_port(), free_port());
    let nginx = Nginx::start(http_port, NGINX);
    let _redis = Proc::spawn(
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null()),
    );
    let pki = tests::pki::Pki::new("not-http");
    let _tls = Proc::spawn(
        Command::new("openssl")
            .args([
                "s_server",
                "-quiet",
                "-www",
                "-accept",
                &tls_port.to_string(),
            ])
            .arg("-cert")
            .arg(&pki.server_cert)
            .arg("-key")
            .arg(&pki.server_key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    tests::wait_port(redis_port);
    tests::wait_port(tls_port);
    // Debian's redis-server is a link to redis-check-rdb, the executable the agent sees.
    let agent = Agent::start(
        Export::Grpc(&rx),
        &[
            "--exe",
            "*/nginx",
            "--exe",
            "*/redis-check-rdb",
            "--exe",
            "*/openssl",
        ],
    );

    // 16 MiB into redis and back out, through two connections of redis-cli.
    let value: Vec<u8> = (0..16u32 << 20).map(|i| b'a' + (i % 23) as u8).collect();
    let file = std::env::temp_dir().join(format!("not-http-{redis_port}.bin"));
    std::fs::write(&file, &value).expect("value file");
    let redis_cli = |args: &[&str]| {
        let mut c = Command::new("timeout");
        c.args(["60", "redis-cli", "-p", &redis_port.to_string()])
            .args(args);
        c
    };
    let set = run(redis_cli(&["-x", "set", "big"]).stdin(std::fs::File::open(&file).unwrap()));
    assert_eq!(String::from_utf8_lossy(&set.stdout).trim(), "OK");
    let got = run(redis_cli(&["--no-raw", "strlen", "big"]).stdout(Stdio::piped()));
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "(integer) 16777216"
    );
    let got = run(redis_cli(&["get", "big"]).stdout(Stdio::piped()));
    assert!(
        got.stdout.starts_with(&value),
        "redis returned the 16 MiB value unchanged"
    );
    // Five TLS connections, each a full handshake and an HTTP exchange inside TLS.
    for _ in 0..5 {
        let page = run(Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&pki.ca)
            .arg(format!("https://127.0.0.1:{tls_port}/")));
        assert!(String::from_utf8_lossy(&page.stdout).contains("s_server"));
    }
    // And HTTP beside them, traced as always.
    for _ in 0..20 {
        assert_eq!(
            curl(&[&format!("http://127.0.0.1:{http_port}/hello")]),
            "hello\n"
        );
    }
    rx.wait_for(20, T, "20 nginx server spans", |s| s.kind() == "server");
    std::thread::sleep(Duration::from_millis(800));
    let (_, err) = agent.stop();
    let _ = std::fs::remove_file(&file);
    assert_eq!(nginx.access_log_lines(), 20);

    // The HTTP exchanged inside TLS is traced from its plaintext (s_server reads through an
    // SSL BIO, which OpenSSL's internal read serves: `loader::tls::shared_callee`); its
    // ciphertext, like redis's bytes, never is.
    let spans = rx.spans();
    assert_eq!(
        spans.len(),
        25,
        "nginx's 20 requests and s_server's 5 became spans"
    );
    let at = |port: u16| {
        spans
            .iter()
            .filter(|s| s.attr("server.port") == Some(&port.to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(at(http_port).len(), 20);
    let tls = at(tls_port);
    assert_eq!(tls.len(), 5, "one span per HTTPS exchange with s_server");
    assert!(tls
        .iter()
        .all(|s| s.kind() == "server" && s.attr("url.scheme") == Some("https")));
    let c = tests::agent::final_counters(&err);
    let not_http = c.get("kernel_conns_not_http").copied().unwrap_or(0);
    assert!(
        (3..=3 + 4).contains(&not_http),
        "three redis-cli connections counted as not HTTP (a client may open one more; the TLS \
         connections are bound to their plaintext, which is HTTP): {not_http}\n{c:?}"
    );
    let events = c.get("ring_events").copied().unwrap_or(0);
    assert!(
        events <= 3 * 25 + 8,
        "25 HTTP exchanges take three ring events each (read, write, close), plus at most one \
         for each non-HTTP connection's opening: {events}\n{c:?}"
    );
    assert_eq!(
        c.get("http_skipped_bytes"),
        None,
        "no byte of redis or TLS traffic reached userspace: {c:?}"
    );
}
