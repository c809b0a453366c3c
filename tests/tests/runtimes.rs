//! Runtimes beyond C and Python: Node's libuv server and client, and Go's net/http client (hey).
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use tests::{
    agent::{Agent, Export},
    fixture, free_port,
    programs::{run, Proc},
    receiver::Receiver,
    wait_port,
};

#[test]
fn node_server_node_and_go_clients() {
    let rx = Receiver::start();
    let port = free_port();
    let _server = Proc::spawn(
        Command::new("node")
            .arg(fixture("node_server.js"))
            .arg(port.to_string())
            .env("OTEL_SERVICE_NAME", "node-api")
            .stdout(Stdio::null()),
    );
    wait_port(port);
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &port.to_string()]);
    run(Command::new("node")
        .arg(fixture("node_client.js"))
        .arg(port.to_string()));
    run(Command::new("hey")
        .args(["-n", "3", "-c", "1", &format!("http://127.0.0.1:{port}/go")])
        .stdout(Stdio::null()));
    let servers = rx.wait_for(9, Duration::from_secs(20), "server spans", |s| {
        s.kind() == "server"
    });
    let clients = rx.wait_for(9, Duration::from_secs(20), "client spans", |s| {
        s.kind() == "client"
    });
    std::thread::sleep(Duration::from_millis(800));
    agent.stop();
    assert_eq!(
        rx.spans().len(),
        18,
        "one server and one client span per request"
    );
    assert!(servers
        .iter()
        .all(|s| s.res("service.name") == Some("node-api")));
    let errors = servers
        .iter()
        .filter(|s| s.attr("url.path") == Some("/err"))
        .collect::<Vec<_>>();
    assert_eq!(errors.len(), 2);
    assert!(errors
        .iter()
        .all(|s| s.status_code() == 2 && s.attr("http.response.status_code") == Some("500")));
    let posts = servers
        .iter()
        .filter(|s| s.attr("http.request.method") == Some("POST"))
        .count();
    assert_eq!(
        posts, 3,
        "5000-byte bodies beyond the payload prefix are skipped, not mistaken for requests"
    );
    let node_clients = clients
        .iter()
        .filter(|c| c.res("process.executable.name") == Some("node"))
        .count();
    let go_clients = clients
        .iter()
        .filter(|c| c.res("service.name") == Some("hey"))
        .count();
    assert_eq!((node_clients, go_clients), (6, 3));
    assert!(clients
        .iter()
        .filter(|c| c.res("service.name") == Some("hey"))
        .all(|c| c.attr("url.path") == Some("/go")));
}

/// An aiohttp service (one event loop, a shared client pool, an await before each call) under 8
/// concurrent clients, 200 requests: several requests are open on the loop's thread at once, so
/// the thread is no evidence of which one a call belongs to. No client span may get another
/// request's server span as its parent (before, 115 of 200 did); a client span has a parent only
/// when its thread had exactly one request open, and says so (`beholder.link.method`).
#[test]
fn asyncio_service_never_gets_a_wrong_parent() {
    let rx = Receiver::start();
    let (backend, port) = (free_port(), free_port());
    let _nginx =
        tests::programs::Nginx::start(backend, "    location / { return 200 \"ok\\n\"; }\n");
    let service = Proc::spawn(
        tests::programs::python(
            "aiohttp_service.py",
            &[&port.to_string(), &format!("http://127.0.0.1:{backend}")],
        )
        .stdout(Stdio::null()),
    );
    wait_port(port);
    let agent = Agent::start(Export::Grpc(&rx), &["--pid", &service.pid().to_string()]);
    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "--fail",
        "-Z",
        "--parallel-max",
        "8",
        "--max-time",
        "60",
    ]);
    for i in 0..200 {
        curl.arg(format!("http://127.0.0.1:{port}/r/{i}"));
    }
    let out = run(&mut curl);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("aio[ok]")
            .count(),
        200
    );
    rx.wait_for(
        400,
        Duration::from_secs(30),
        "200 server and 200 client spans",
        |_| true,
    );
    std::thread::sleep(Duration::from_millis(800));
    let (_, err) = agent.stop();
    let spans = rx.spans();
    let (mut linked, mut wrong, mut ambiguous) = (0, 0, 0);
    for i in 0..200 {
        let path = format!("/r/{i}");
        let one = |kind: &str| {
            let v: Vec<_> = spans
                .iter()
                .filter(|s| s.kind() == kind && s.attr("url.path") == Some(path.as_str()))
                .collect();
            assert_eq!(v.len(), 1, "one {kind} span for {path}");
            v[0]
        };
        let (server, client) = (one("server"), one("client"));
        let method = client.attr("beholder.link.method").expect("link method");
        if client.parent_id().is_empty() {
            assert!(
                matches!(method, "ambiguous" | "none"),
                "{path}: no parent, method {method}"
            );
            ambiguous += (method == "ambiguous") as usize;
        } else {
            assert_eq!(method, "thread", "{path}: a parent only from the thread");
            if client.parent_id() == server.span_id() {
                linked += 1;
            } else {
                wrong += 1;
            }
        }
    }
    let c = tests::agent::final_counters(&err);
    eprintln!(
        "asyncio (aiohttp, 8 concurrent): {linked}/200 linked, {ambiguous} ambiguous, {wrong} \
         wrong; kernel_link_ambiguous={:?}",
        c.get("kernel_link_ambiguous")
    );
    assert_eq!(wrong, 0, "a wrong parent is worse than none");
    assert!(
        ambiguous as u64 <= c.get("kernel_link_ambiguous").copied().unwrap_or(0),
        "every ambiguous span was counted by the kernel: {c:?}"
    );
}
