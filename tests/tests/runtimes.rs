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

/// The service under test's callee: nginx answering "ok" on a free port.
fn backend() -> (tests::programs::Nginx, u16) {
    let port = free_port();
    let nginx = tests::programs::Nginx::start(port, "    location / { return 200 \"ok\\n\"; }\n");
    (nginx, port)
}

/// What the client spans of a service under concurrent load say about their parents.
#[derive(Debug, Default)]
struct Links {
    /// Parent = the server span of the same request.
    linked: usize,
    /// Parent = some other span: a lie.
    wrong: usize,
    /// No parent.
    unlinked: usize,
    /// `beholder.link.method` of every client span, counted.
    methods: std::collections::BTreeMap<String, usize>,
    /// Client spans of calls no request made (`/bg/...`), and how many of them got a parent.
    background: usize,
    background_parented: usize,
    /// Client spans of calls made after their request was answered (`/r/<i>/late`, from a
    /// detached task), and how many of them got a parent.
    late: usize,
    late_parented: usize,
    counters: std::collections::HashMap<String, u64>,
}

/// `n` requests `/r/<i>` from 8 concurrent clients to `service` (listening on `port`, each
/// request answered with `marker[...]` after one call to a backend), traced with
/// `--pid service`: pairs each request's server span with its client span.
fn concurrent_calls(service: &Proc, port: u16, n: usize, marker: &str) -> Links {
    concurrent_calls_after(service, port, n, marker, |_| {})
}

/// As `concurrent_calls`, running `ready` once the agent traces (before the load).
fn concurrent_calls_after(
    service: &Proc,
    port: u16,
    n: usize,
    marker: &str,
    ready: impl FnOnce(&Agent),
) -> Links {
    concurrent_fanout(service, port, n, marker, &[""], ready)
}

/// As `concurrent_calls_after`, for a service that makes one call per suffix in `calls` for
/// each request, to the request's own path plus that suffix.
fn concurrent_fanout(
    service: &Proc,
    port: u16,
    n: usize,
    marker: &str,
    calls: &[&str],
    ready: impl FnOnce(&Agent),
) -> Links {
    let rx = Receiver::start();
    let agent = Agent::start(Export::Grpc(&rx), &["--pid", &service.pid().to_string()]);
    ready(&agent);
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
    for i in 0..n {
        curl.arg(format!("http://127.0.0.1:{port}/r/{i}"));
    }
    let out = run(&mut curl);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches(&format!("{marker}[ok]"))
            .count(),
        n
    );
    // A server span and its client spans per request (the background's spans aside); the
    // agent is stopped either way, so that a shortfall shows with its counters.
    let of_requests = |s: &tests::receiver::RSpan| {
        s.attr("url.path")
            .is_some_and(|p| p.starts_with("/r/") && !p.ends_with("/late"))
    };
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while rx.spans().iter().filter(|s| of_requests(s)).count() < (1 + calls.len()) * n
        && std::time::Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(800));
    let (_, err) = agent.stop();
    let spans = rx.spans();
    let got = spans.iter().filter(|s| of_requests(s)).count();
    assert_eq!(
        got,
        (1 + calls.len()) * n,
        "spans of the requests; agent counters: {:?}",
        tests::agent::final_counters(&err)
    );
    let mut l = Links {
        counters: tests::agent::final_counters(&err),
        ..Links::default()
    };
    for s in spans.iter().filter(|s| s.kind() == "client") {
        let parented = !s.parent_id().is_empty();
        match s.attr("url.path") {
            Some(p) if p.starts_with("/bg/") => {
                l.background += 1;
                l.background_parented += usize::from(parented);
            }
            Some(p) if p.starts_with("/r/") && p.ends_with("/late") => {
                l.late += 1;
                l.late_parented += usize::from(parented);
            }
            _ => {}
        }
    }
    for i in 0..n {
        let path = format!("/r/{i}");
        let one = |kind: &str, path: &str| {
            let v: Vec<_> = spans
                .iter()
                .filter(|s| s.kind() == kind && s.attr("url.path") == Some(path))
                .collect();
            assert_eq!(v.len(), 1, "one {kind} span for {path}");
            v[0]
        };
        let server = one("server", &path);
        for suffix in calls {
            let call = format!("{path}{suffix}");
            let client = one("client", &call);
            let method = client.attr("beholder.link.method").expect("link method");
            *l.methods.entry(method.to_owned()).or_default() += 1;
            if client.parent_id().is_empty() {
                assert!(
                    !matches!(method, "thread" | "task"),
                    "{call}: method {method} without a parent"
                );
                l.unlinked += 1;
            } else {
                assert!(
                    matches!(method, "thread" | "task"),
                    "{call}: a parent only from the thread or the runtime's task, not {method}"
                );
                if client.parent_id() == server.span_id() {
                    l.linked += 1;
                } else {
                    l.wrong += 1;
                }
            }
        }
    }
    l
}

/// What an asyncio service's calls must show under 8 concurrent clients: several requests are
/// open on the loop's thread at once, so the thread is no evidence of which one a call belongs
/// to (before the agent followed tasks, 115 of 200 aiohttp calls got another request's parent).
/// Every call is made by the task the request's callback created or woke, so it links by
/// `task`; none may be wrong, and a call without a parent says why.
fn assert_asyncio_links(runtime: &str, l: &Links, n: usize) {
    eprintln!("{runtime} (8 concurrent): {l:?}");
    assert_eq!(l.wrong, 0, "a wrong parent is worse than none");
    assert!(
        l.linked * 100 >= n * 95,
        "{runtime}: at least 95% of calls link to their request by task: {l:?}"
    );
    let task = l.methods.get("task").copied().unwrap_or(0) as u64;
    assert!(
        task <= l.counters.get("kernel_link_task").copied().unwrap_or(0),
        "every task link was counted by the kernel: {:?}",
        l.counters
    );
    assert_eq!(
        l.methods
            .keys()
            .filter(|m| !matches!(m.as_str(), "task" | "thread" | "ambiguous" | "none"))
            .count(),
        0,
        "an asyncio loop is judged by its tasks, else by its thread: {:?}",
        l.methods
    );
}

/// An aiohttp service (one event loop, a shared client pool, an await before each call), 200
/// requests. aiohttp reads requests in a callback that wakes the connection's task, which
/// creates a task per request that makes the call. A background task of the same loop calls
/// the backend too, every few milliseconds, while requests are open: no request caused those
/// calls, so none of them may get a parent (the thread rule gave one whenever a single request
/// was open).
#[test]
fn asyncio_aiohttp_calls_link_to_their_request_by_task() {
    let (_nginx, backend) = backend();
    let port = free_port();
    let service = Proc::spawn(
        tests::programs::python(
            "aiohttp_service.py",
            &[
                &port.to_string(),
                &format!("http://127.0.0.1:{backend}"),
                "background",
            ],
        )
        .stdout(Stdio::null()),
    );
    wait_port(port);
    let l = concurrent_calls(&service, port, 200, "aio");
    assert_asyncio_links("asyncio (aiohttp)", &l, 200);
    assert!(l.background >= 20, "the background task called out: {l:?}");
    assert_eq!(
        l.background_parented, 0,
        "a call no request made gets no parent: {l:?}"
    );
    assert!(
        l.counters
            .get("kernel_link_task_unbound")
            .copied()
            .unwrap_or(0)
            >= 20,
        "calls of tasks no request caused are counted: {:?}",
        l.counters
    );
}

/// A FastAPI service on uvicorn (h11, the plain asyncio loop) calling out with httpx's async
/// client, 200 requests. uvicorn creates each request's task in the callback that read it;
/// FastAPI and anyio run the handler in tasks of their own below it.
#[test]
fn asyncio_uvicorn_fastapi_httpx_calls_link_to_their_request_by_task() {
    let (_nginx, backend) = backend();
    let port = free_port();
    let service = Proc::spawn(
        tests::programs::python(
            "fastapi_service.py",
            &[&port.to_string(), &format!("http://127.0.0.1:{backend}")],
        )
        .stdout(Stdio::null()),
    );
    wait_port(port);
    let l = concurrent_calls(&service, port, 200, "fastapi");
    assert_asyncio_links("asyncio (uvicorn + FastAPI + httpx)", &l, 200);
}

/// A Go net/http service (goroutines on a few threads, `http.Get` after a 2 ms sleep, no header
/// forwarded) under 8 concurrent clients, 200 requests. Go moves goroutines between threads and
/// writes each request from the connection's own writer goroutine, so a thread with one request
/// open is no evidence at all: before the agent knew the runtime, some client spans got another
/// request's parent. Now the goroutine links them (uprobes on `net/http`), none may be wrong,
/// and a call without a parent says why.
#[test]
fn go_service_links_by_goroutine_and_never_gets_a_wrong_parent() {
    let bin = tests::programs::go_binary("go_service");
    let (_nginx, backend) = backend();
    let port = free_port();
    let service = Proc::spawn(
        Command::new(&bin)
            .args([port.to_string(), format!("http://127.0.0.1:{backend}")])
            .stdout(Stdio::null()),
    );
    wait_port(port);
    let l = concurrent_calls(&service, port, 200, "go");
    eprintln!("Go (net/http, 8 concurrent): {l:?}");
    assert_eq!(l.wrong, 0, "a wrong parent is worse than none");
    assert_eq!(
        l.methods.get("task").copied().unwrap_or(0),
        l.linked,
        "every link of a Go call comes from its goroutine: {:?}",
        l.methods
    );
    assert!(
        l.linked >= 180,
        "the goroutine links nearly every call (a request whose first byte Go's background \
         reader took is read by two goroutines and stays unlinked): {l:?}"
    );
    assert_eq!(
        l.methods.get("runtime").copied().unwrap_or(0),
        l.unlinked,
        "a Go call without a parent says its runtime is why: {:?}",
        l.methods
    );
    assert_eq!(
        l.counters.get("kernel_link_task").copied().unwrap_or(0),
        l.linked as u64,
        "each link counted: {:?}",
        l.counters
    );
}

/// Runs `program PORT NEXT spawn`, a service whose handler makes its two calls, `/a` and `/b`,
/// from a child and a grandchild it spawns, concurrently, under 150 requests from 8 concurrent
/// clients, and asserts what every runtime that follows spawns must show: no wrong parent,
/// every link by task, two client spans per request, and nearly all of them linked.
fn spawned_calls(program: &std::path::Path, marker: &str) -> Links {
    let (_nginx, backend) = backend();
    let port = free_port();
    let service = Proc::spawn(
        Command::new(program)
            .args([
                port.to_string(),
                format!("http://127.0.0.1:{backend}"),
                "spawn".to_owned(),
            ])
            .stdout(Stdio::null()),
    );
    wait_port(port);
    let l = concurrent_fanout(&service, port, 150, marker, &["/a", "/b"], |_| {});
    eprintln!("{marker} (calls from spawned tasks, 8 concurrent): {l:?}");
    assert_eq!(l.wrong, 0, "a wrong parent is worse than none");
    assert_eq!(
        l.methods.get("task").copied().unwrap_or(0),
        l.linked,
        "every link of a call from a spawned task comes from its task: {:?}",
        l.methods
    );
    assert!(
        l.linked >= 270,
        "children and grandchildren of the handler's task link nearly every call: {l:?}"
    );
    assert_eq!(
        l.linked + l.unlinked,
        300,
        "two client spans per request: {l:?}"
    );
    l
}

/// The Go service fanning each request out to goroutines it spawns: one call from a child,
/// one from a grandchild, concurrently. Each new goroutine inherits the request of the one that
/// spawned it (`runtime.newproc1`, probed at its return instructions), so both calls link to
/// their request; before, the spawned goroutines had no note and every call stayed unlinked.
#[test]
fn go_calls_from_spawned_goroutines_link_to_their_request() {
    spawned_calls(&tests::programs::go_binary("go_service"), "go");
}

/// The tokio service making each request's calls from tasks the handler spawns: `/a` from a
/// child task, `/b` from the child's own child, concurrently. Each task spawned inherits the
/// open request of the task that spawned it (`OwnedTasks::bind_inner`, probed), and hands it on
/// over reqwest's channel, so both calls link to their request; before, spawned tasks had no
/// note and every call stayed unlinked (0 of 300). Each handler also spawns a detached task
/// that calls `/late` 20 ms after the request was answered, by when the same keep-alive
/// connection is serving a later request: its note names the answered request, which is no
/// longer open, so no late call may get a parent.
#[test]
fn tokio_calls_from_spawned_tasks_link_to_their_request() {
    let l = spawned_calls(
        std::path::Path::new(env!("CARGO_BIN_EXE_tokio-service")),
        "tokio",
    );
    assert_eq!(l.late, 150, "one late call per request: {l:?}");
    assert_eq!(
        l.late_parented, 0,
        "a call made after its request was answered gets no parent: {l:?}"
    );
}

/// A shell, traced from before, that later execs the Go service: the pid keeps its place in
/// the selection, but its runtime changes at `exec`. The kernel resets the process's runtime
/// there and tells the agent, which classifies the new program and probes it at once, so the
/// shell's threaded verdict never applies to Go's threads.
#[test]
fn a_shell_that_execs_go_is_judged_as_go() {
    let bin = tests::programs::go_binary("go_service");
    let (_nginx, backend) = backend();
    let port = free_port();
    let go = std::env::temp_dir().join(format!("go-exec-{port}"));
    let _ = std::fs::remove_file(&go);
    let script = format!(
        "while [ ! -e {go} ]; do sleep 0.05; done; exec {bin} {port} http://127.0.0.1:{backend}",
        go = go.display(),
        bin = bin.display()
    );
    let service = Proc::spawn(
        Command::new("sh")
            .args(["-c", &script])
            .stdout(Stdio::null()),
    );
    let l = concurrent_calls_after(&service, port, 200, "go", |agent| {
        std::fs::write(&go, b"go").expect("go file");
        wait_port(port);
        // The first Go program found has its probe programs verified then (about 0.5 s here):
        // the calls start once the exec'd program is probed.
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while !agent
            .stderr()
            .contains("go_service: outgoing net/http calls link")
        {
            assert!(std::time::Instant::now() < end, "{}", agent.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let _ = std::fs::remove_file(&go);
    eprintln!("Go exec'd by a traced shell (8 concurrent): {l:?}");
    assert_eq!(l.wrong, 0, "a wrong parent is worse than none");
    assert_eq!(
        l.methods.get("thread"),
        None,
        "never the shell's thread rule: {l:?}"
    );
    assert!(l.linked >= 180, "probed right after the exec: {l:?}");
}

/// The Java service with `client` (`urlconnection` or `httpclient`) under the shared load.
fn java_calls(client: &str) -> Links {
    let (_nginx, backend) = backend();
    let port = free_port();
    let service = Proc::spawn(
        Command::new("java")
            .arg(fixture("java_service/Service.java"))
            .args([
                port.to_string(),
                format!("http://127.0.0.1:{backend}"),
                client.to_owned(),
            ])
            .stdout(Stdio::null()),
    );
    // The JDK compiles the source file at start-up.
    tests::wait_port_for(port, Duration::from_secs(60));
    concurrent_calls(&service, port, 200, "java")
}

/// Java's `HttpServer` on a fixed pool of handler threads, calling out with the blocking
/// `HttpURLConnection` on the handler thread: each handler thread has exactly its one request
/// open, so every call links by the thread, and none wrongly.
#[test]
fn java_thread_pool_with_urlconnection_links_every_call() {
    let l = java_calls("urlconnection");
    eprintln!("Java (HttpServer + HttpURLConnection, 8 concurrent): {l:?}");
    assert_eq!(l.wrong, 0, "a wrong parent is worse than none");
    assert_eq!(l.linked, 200, "blocking calls on handler threads: {l:?}");
}

/// The same server calling out with `java.net.http.HttpClient`, whose I/O runs on the client's
/// selector thread, which reads no request of its own: no thread evidence names the caller, so
/// those calls get no parent, and none a wrong one.
#[test]
fn java_httpclient_calls_are_never_given_a_wrong_parent() {
    let l = java_calls("httpclient");
    eprintln!("Java (HttpServer + HttpClient, 8 concurrent): {l:?}");
    assert_eq!(l.wrong, 0, "a wrong parent is worse than none");
    assert_eq!(l.linked + l.unlinked, 200);
}

/// A tokio service built by the tests (multi-thread runtime, hyper server, reqwest client),
/// 200 requests from 8 concurrent clients: tasks move between worker threads and reqwest
/// writes each request from its connection's own task, handed over a channel, so no thread is
/// evidence of the caller. The agent follows the task that sent the request over the channel
/// (uprobes on tokio's task polls and mpsc channel). A background task of the same process
/// calls the backend through the same client pool every few milliseconds: no request caused
/// those calls, so none of them may get a parent.
#[test]
fn tokio_calls_link_to_their_request_by_task() {
    let (_nginx, backend) = backend();
    let port = free_port();
    let service = Proc::spawn(
        Command::new(env!("CARGO_BIN_EXE_tokio-service"))
            .args([
                port.to_string(),
                format!("http://127.0.0.1:{backend}"),
                "background".into(),
            ])
            .stdout(Stdio::null()),
    );
    wait_port(port);
    let l = concurrent_calls(&service, port, 200, "tokio");
    eprintln!("tokio (hyper + reqwest, 8 concurrent): {l:?}");
    assert_eq!(l.wrong, 0, "a wrong parent is worse than none");
    assert!(
        l.linked * 100 >= 200 * 95,
        "at least 95% of calls link to their request by task: {l:?}"
    );
    assert!(l.background >= 20, "the background task called out: {l:?}");
    assert_eq!(
        l.background_parented, 0,
        "a call no request made gets no parent: {l:?}"
    );
    assert_eq!(
        l.methods
            .keys()
            .filter(|m| !matches!(m.as_str(), "task" | "runtime"))
            .count(),
        0,
        "a tokio process links by task or says its runtime is why not: {:?}",
        l.methods
    );
}
