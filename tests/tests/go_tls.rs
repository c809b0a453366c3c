//! Go `crypto/tls`: spans from the plaintext of `(*tls.Conn).Read`/`Write` in a stripped Go
//! binary (no symbol table: its functions are found in `.gopclntab`), as a TLS server and as a
//! TLS client in one process, between curl (OpenSSL) and nginx (OpenSSL), with bodies from 1 KiB
//! to 16 MiB, every transfer checked byte for byte and bounded in time.
use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tests::{
    agent::{final_counters, Agent, Export},
    free_port,
    links::callers,
    pki::Pki,
    programs::{etcd_bin, go_binary_stripped, sha256, wait_bounded, Etcd, Nginx, Proc},
    receiver::{RSpan, Receiver},
    require_root, wait_port,
};

/// Body sizes served (1 KiB, 64 KiB, 1 MiB, 16 MiB).
const SIZES: [usize; 4] = [1 << 10, 64 << 10, 1 << 20, 16 << 20];

fn brief(s: &RSpan) -> String {
    format!(
        "{} {} {} pid={} proto={} trace={} span={} parent={} link={}",
        s.res("service.name").unwrap_or("?"),
        s.kind(),
        s.attr("url.path").unwrap_or("?"),
        s.res("process.pid").unwrap_or("?"),
        s.attr("network.protocol.version").unwrap_or("?"),
        s.trace_id(),
        s.span_id(),
        s.parent_id(),
        s.attr("beholder.link.method").unwrap_or("?")
    )
}

/// Waits (at most 20 s) until the agent has probed a Go executable's `crypto/tls`: it does so
/// as its runtime classifier finds the program running, after start-up.
fn wait_go_probed(agent: &Agent, exe: &str) {
    let end = Instant::now() + Duration::from_secs(20);
    let needle = format!("{exe}: crypto/tls reads and writes are traced");
    while !agent.stderr().contains(&needle) {
        assert!(
            Instant::now() < end,
            "{exe}'s crypto/tls never probed:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// nginx serving the files over TLS, and the Go service `bin` in front of it.
struct Topology {
    gport: u16,
    nport: u16,
    nginx: Nginx,
    /// SHA-256 of each file, by request path.
    sha: HashMap<String, String>,
    go: Proc,
}

fn topology(pki: &Pki, bin: &std::path::Path) -> Topology {
    let (gport, nport) = (free_port(), free_port());
    let nginx = Nginx::start_tls(nport, pki, "");
    let sha = nginx.serve_files(&SIZES, "");
    let go = go_service(bin, gport, pki, nport);
    Topology {
        gport,
        nport,
        nginx,
        sha,
        go,
    }
}

/// The Go service `bin` serving TLS on `port`, in front of nginx on `nport`, once it listens.
fn go_service(bin: &std::path::Path, port: u16, pki: &Pki, nport: u16) -> Proc {
    let go = Proc::spawn(
        Command::new(bin)
            .arg(port.to_string())
            .arg(&pki.server_cert)
            .arg(&pki.server_key)
            .arg(&pki.ca)
            .arg(format!("https://127.0.0.1:{nport}")),
    );
    wait_port(port);
    go
}

/// One curl process fetching every size through the Go service on one connection (`http`:
/// `--http1.1` or `--http2`), each body written to a file and its digest checked.
fn curl_all(port: u16, pki: &Pki, http: &str, tag: &str, sha: &HashMap<String, String>) {
    let dir = std::env::temp_dir().join(format!("go-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "--max-time", "60", http, "--cacert"])
        .arg(&pki.ca);
    for n in SIZES {
        cmd.arg(format!("https://127.0.0.1:{port}/f/{n}.bin"))
            .arg("-o")
            .arg(dir.join(format!("{n}.bin")));
    }
    let mut child = cmd.stdout(Stdio::null()).spawn().expect("curl");
    wait_bounded(
        &mut child,
        Instant::now() + Duration::from_secs(90),
        "curl through the Go service",
    );
    for n in SIZES {
        let got = sha256(&dir.join(format!("{n}.bin")));
        assert_eq!(
            Some(&got),
            sha.get(&format!("/f/{n}.bin")),
            "{n} bytes through the Go service changed ({http})"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// curl -> Go service (stripped; TLS server, and TLS client with its own pool) -> nginx over
/// TLS. Every request gives four spans in one trace: curl's, the Go server's (stitched to curl's
/// call), the Go client's (linked in-process, by goroutine, to the Go server span), and nginx's
/// (stitched to the Go client's call). curl also speaks HTTP/2 to the Go server: Go's HTTP/2
/// server over `crypto/tls` is walked frame by frame like any other.
#[test]
fn a_stripped_go_tls_server_and_client_link_end_to_end() {
    require_root();
    let pki = Pki::new("go-tls");
    let rx = Receiver::start();
    let Topology {
        gport,
        nport,
        nginx,
        sha,
        go,
    } = topology(&pki, &go_binary_stripped("go_tls_service"));
    let (g, n) = (gport.to_string(), nport.to_string());
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &g, "--port", &n]);
    wait_go_probed(&agent, "go_tls_service-stripped");

    // Three HTTP/1.1 curls at once, twice, and one HTTP/2 curl beside the second round.
    const CURLS: usize = 3;
    for round in 0..2 {
        std::thread::scope(|s| {
            for i in 0..CURLS {
                let (pki, sha) = (&pki, &sha);
                s.spawn(move || curl_all(gport, pki, "--http1.1", &format!("{round}-{i}"), sha));
            }
            if round == 1 {
                s.spawn(|| curl_all(gport, &pki, "--http2", "h2", &sha));
            }
        });
    }
    let h1 = 2 * CURLS * SIZES.len();
    let h2 = SIZES.len();
    let requests = h1 + h2;

    let want = 4 * requests;
    let end = Instant::now() + Duration::from_secs(60);
    while rx.spans().len() < want && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let spans = rx.spans();
    let (_, err) = agent.stop();
    let counters = final_counters(&err);
    println!("counters: {counters:?}");
    let go_pid = go.pid().to_string();
    let nginx_pid = nginx.pid().to_string();
    let pid = |s: &RSpan| s.res("process.pid").unwrap_or("?").to_owned();
    let mut by_role: HashMap<(String, &str), usize> = HashMap::new();
    for s in &spans {
        let who = match pid(s) {
            p if p == go_pid => "go",
            p if p == nginx_pid => "nginx",
            _ => "curl",
        };
        *by_role.entry((who.to_owned(), s.kind())).or_default() += 1;
    }
    println!("{by_role:?}");
    let parents: std::collections::HashSet<String> = spans.iter().map(|s| s.parent_id()).collect();
    for s in spans
        .iter()
        .filter(|s| s.kind() == "client" && !parents.contains(&s.span_id()))
    {
        println!("a call without a server span: {}", brief(s));
    }
    assert_eq!(
        spans.len(),
        want,
        "four spans per request: {by_role:?}\n{}",
        spans.iter().map(brief).collect::<Vec<_>>().join("\n")
    );

    let by_id: HashMap<String, &RSpan> = spans.iter().map(|s| (s.span_id(), s)).collect();
    let (mut go_servers, mut go_clients, mut backs, mut linked, mut h2_servers) = (0, 0, 0, 0, 0);
    let mut go_roots = 0;
    for s in &spans {
        s.assert_attrs(
            &[
                ("url.scheme", "https"),
                ("http.response.status_code", "200"),
            ],
            &brief(s),
        );
        let parent = by_id.get(&s.parent_id()).copied();
        if let Some(p) = parent {
            assert_eq!(
                p.trace_id(),
                s.trace_id(),
                "{} under {}",
                brief(s),
                brief(p)
            );
            assert!(
                p.span.start_time_unix_nano <= s.span.start_time_unix_nano
                    && s.span.end_time_unix_nano <= p.span.end_time_unix_nano + 2_000_000,
                "a child outside its parent in time: {} under {}",
                brief(s),
                brief(p)
            );
        }
        let path = s.attr("url.path").unwrap_or("");
        match (pid(s), s.kind()) {
            (p, "server") if p == go_pid => {
                go_servers += 1;
                let Some(par) = parent else {
                    // Go's server read one byte of this request ahead (counted below).
                    assert!(s.parent_id().is_empty(), "unknown parent: {}", brief(s));
                    go_roots += 1;
                    continue;
                };
                assert!(
                    par.kind() == "client"
                        && par.res("service.name") == Some("curl")
                        && par.attr("url.path") == Some(path),
                    "{} under {}",
                    brief(s),
                    brief(par)
                );
                if s.attr("network.protocol.version") == Some("2") {
                    h2_servers += 1;
                }
            }
            (p, "client") if p == go_pid => {
                go_clients += 1;
                assert_eq!(
                    s.attr("network.protocol.version"),
                    Some("1.1"),
                    "{}",
                    brief(s)
                );
                match parent {
                    Some(par) => {
                        assert!(
                            par.kind() == "server"
                                && pid(par) == go_pid
                                && par.attr("url.path") == Some(path),
                            "WRONG PARENT: {} under {}",
                            brief(s),
                            brief(par)
                        );
                        linked += 1;
                    }
                    // HTTP/2 server streams are handled on goroutines of their own: no link.
                    None => assert!(s.parent_id().is_empty(), "unknown parent: {}", brief(s)),
                }
            }
            (p, "server") if p == nginx_pid => {
                backs += 1;
                let par = parent.unwrap_or_else(|| panic!("no caller: {}", brief(s)));
                assert!(
                    par.kind() == "client"
                        && pid(par) == go_pid
                        && par.attr("url.path") == Some(path),
                    "{} under {}",
                    brief(s),
                    brief(par)
                );
            }
            (_, "client") => {
                assert!(s.parent_id().is_empty(), "{}", brief(s));
            }
            _ => panic!("unexpected span {}", brief(s)),
        }
    }
    println!(
        "{requests} requests: {go_servers} Go server spans ({h2_servers} HTTP/2), {go_clients} \
         Go client spans ({linked} linked in-process), {backs} nginx spans"
    );
    assert_eq!(
        (go_servers, go_clients, backs),
        (requests, requests, requests)
    );
    assert_eq!(h2_servers, h2, "curl --http2 to Go's HTTP/2 server");
    // Go's goroutine evidence links nearly every call (see README: 197 to 199 of 200).
    assert!(
        linked + 2 >= h1,
        "HTTP/1.1 requests' upstream calls link to them by goroutine ({linked} of {h1})"
    );
    // Every server span (Go's, nginx's) is the stitched child of one call, around it in time,
    // but those whose stitching context the kernel counted as dropped.
    let dropped = counters
        .get("kernel_tls_claims_dropped")
        .copied()
        .unwrap_or(0) as usize;
    println!("{go_roots} Go server spans without caller, {dropped} contexts dropped");
    assert_eq!(
        go_roots, dropped,
        "every server span without caller is counted"
    );
    assert!(dropped <= 2, "{dropped} of {requests} requests unstitched");
    assert_eq!(callers(&spans), (2 * requests - dropped, dropped));
    for key in [
        "kernel_go_tls_unknown_conn",
        "kernel_tls_unbound",
        "http_responses_unseen",
        "http_orphan_responses",
        "http2_alignment_lost",
    ] {
        assert_eq!(counters.get(key).copied().unwrap_or(0), 0, "{key}");
    }
}

/// With `--exe '*go_tls_service*'`, only the Go service (unstripped: found by its symbol table)
/// is traced; curl and nginx, which map the same libssl, give no span and get every byte. A
/// second Go service runs a copy of the executable the glob does not match: its code is never
/// touched (no breakpoint at any probed function while the agent runs), and it gives no span
/// while serving the same traffic. The
/// service's connections to nginx were opened before the agent, so their reader goroutines were
/// already inside `Read` when the probes were attached: the response such a read returns is
/// never seen. Its request is then given no span (`http_responses_unseen`), and no later
/// response is paired with it: every Go client span matches its request in path and time, and
/// spans plus unseen responses add up to the requests made.
#[test]
fn only_the_selected_go_service_is_traced_and_its_older_connections_never_mispair() {
    require_root();
    let pki = Pki::new("go-tls-sel");
    let rx = Receiver::start();
    // Bound, not ignored: nginx serves until the test ends.
    let Topology {
        gport,
        nport,
        nginx: _nginx,
        sha,
        go,
    } = topology(&pki, &tests::programs::go_binary("go_tls_service"));
    let bin = tests::programs::go_binary("go_tls_service");
    let twin = bin.with_file_name(format!("unselected-copy-{}", std::process::id()));
    let _ = std::fs::remove_file(&twin);
    std::fs::copy(&bin, &twin).expect("copy");
    let twin_port = free_port();
    let twin_go = go_service(&twin, twin_port, &pki, nport);
    const CURLS: usize = 3;
    let round = |tag: &str, port: u16| {
        std::thread::scope(|s| {
            for i in 0..CURLS {
                let (pki, sha) = (&pki, &sha);
                let tag = format!("{tag}-{i}");
                s.spawn(move || curl_all(port, pki, "--http1.1", &tag, sha));
            }
        })
    };
    // The service's pool to nginx, opened before the agent: a reader goroutine waits in
    // `Read` on each connection.
    round("before", gport);
    // The first byte of probed functions, as both processes run them before the agent.
    let probed: Vec<(&str, u64, u8)> =
        ["crypto/tls.(*Conn).Read", "net/http.(*Transport).roundTrip"]
            .into_iter()
            .map(|f| {
                let at = symbol_address(&bin, f);
                let orig = code_byte(go.pid(), at);
                assert_eq!(code_byte(twin_go.pid(), at), orig, "{f}: the same code");
                assert_ne!(orig, 0xcc, "{f}: a breakpoint before the agent");
                (f, at, orig)
            })
            .collect();
    let agent = Agent::start(Export::Grpc(&rx), &["--exe", "*go_tls_service*"]);
    wait_go_probed(&agent, "go_tls_service");
    for &(f, at, orig) in &probed {
        assert_eq!(
            code_byte(go.pid(), at),
            0xcc,
            "{f}: no probe in the selected process"
        );
        assert_eq!(
            code_byte(twin_go.pid(), at),
            orig,
            "{f}: the unselected process's code was changed"
        );
    }
    std::thread::scope(|s| {
        s.spawn(|| round("after", gport));
        s.spawn(|| round("twin", twin_port));
    });
    let requests = CURLS * SIZES.len();
    let end = Instant::now() + Duration::from_secs(30);
    while rx.spans().len() < 2 * requests && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let spans = rx.spans();
    let (_, err) = agent.stop();
    // The agent exits only once it has detached every probe (a probe the kernel releases
    // from an exiting task stays in the code): the original bytes are back at once.
    assert!(
        err.contains("detached every program and probe"),
        "the agent exited before detaching"
    );
    for &(f, at, orig) in &probed {
        assert_eq!(
            code_byte(go.pid(), at),
            orig,
            "{f}: a probe left after the agent stopped"
        );
    }
    // And the service still serves every byte, its probed functions running unprobed.
    round("after-stop", gport);
    drop(twin_go);
    let _ = std::fs::remove_file(&twin);
    let counters = final_counters(&err);
    println!("counters: {counters:?}");
    assert_eq!(counters.get("go_not_followed"), None, "{counters:?}");
    let go_pid = go.pid().to_string();
    let by_id: HashMap<String, &RSpan> = spans.iter().map(|s| (s.span_id(), s)).collect();
    let (mut servers, mut clients) = (0, 0);
    for s in &spans {
        assert_eq!(s.res("process.pid"), Some(go_pid.as_str()), "{}", brief(s));
        s.assert_attrs(
            &[
                ("url.scheme", "https"),
                ("http.response.status_code", "200"),
            ],
            &brief(s),
        );
        let path = s.attr("url.path").unwrap_or("");
        if s.kind() == "server" {
            servers += 1;
            // Its caller (curl) is not traced.
            assert!(s.parent_id().is_empty(), "{}", brief(s));
            continue;
        }
        clients += 1;
        let Some(par) = by_id.get(&s.parent_id()) else {
            // No goroutine evidence: no parent, never a wrong one.
            assert!(s.parent_id().is_empty(), "unknown parent: {}", brief(s));
            continue;
        };
        assert!(
            par.kind() == "server" && par.attr("url.path") == Some(path),
            "WRONG PARENT: {} under {}",
            brief(s),
            brief(par)
        );
        assert!(
            par.span.start_time_unix_nano <= s.span.start_time_unix_nano
                && s.span.end_time_unix_nano <= par.span.end_time_unix_nano,
            "a call outside its request in time: {} under {} (call {}..{}, request {}..{})",
            brief(s),
            brief(par),
            s.span.start_time_unix_nano,
            s.span.end_time_unix_nano,
            par.span.start_time_unix_nano,
            par.span.end_time_unix_nano
        );
    }
    let unseen = counters.get("http_responses_unseen").copied().unwrap_or(0) as usize;
    // A connection's last request after a read nobody saw waits for the next read to tell it.
    let waiting = counters.get("http_pending_at_exit").copied().unwrap_or(0) as usize;
    println!(
        "{requests} requests: {servers} server spans, {clients} client spans, {unseen} unseen, \
         {waiting} still pending at exit"
    );
    assert_eq!(servers, requests);
    assert_eq!(
        clients + unseen + waiting,
        requests,
        "every call is a span or counted"
    );
    assert!(
        unseen + waiting <= CURLS,
        "at most one per connection opened before the agent"
    );
    assert_eq!(
        counters
            .get("kernel_go_tls_unknown_conn")
            .copied()
            .unwrap_or(0),
        0
    );
}

/// The address of function `name` in Go executable `bin` (not position-independent: the same
/// in every process), from `go tool nm`.
fn symbol_address(bin: &std::path::Path, name: &str) -> u64 {
    let out = Command::new("go")
        .args(["tool", "nm"])
        .arg(bin)
        .output()
        .expect("go tool nm");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            let (addr, kind, sym) = (w.next()?, w.next()?, w.next()?);
            (kind == "T" && sym == name).then(|| u64::from_str_radix(addr, 16).ok())?
        })
        .unwrap_or_else(|| panic!("{name} not in {}", bin.display()))
}

/// The byte at address `at` of process `pid`'s memory, as the process runs it (a uprobe is a
/// breakpoint written into its copy of the page).
fn code_byte(pid: u32, at: u64) -> u8 {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("/proc/PID/mem");
    let mut b = [0u8];
    mem.read_exact_at(&mut b, at).expect("read code");
    b[0]
}

/// etcd serving gRPC over TLS to etcdctl: two stripped Go programs nobody here wrote (Debian's
/// build, Go 1.19, grpc-go), HTTP/2 over `crypto/tls` at both ends, each etcdctl run on a
/// connection of its own. Every call gives a CLIENT span (etcdctl) and a SERVER span (etcd)
/// named by its gRPC method, with the status from the trailers, and the server span is the
/// stitched child of its call.
#[test]
fn etcd_and_etcdctl_grpc_over_go_tls() {
    require_root();
    let pki = Pki::new("etcd-tls");
    let port = free_port();
    let etcd = Etcd::start(port, Some(&pki));
    let client_url = etcd.url.clone();
    let rx = Receiver::start();
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let agent = Agent::start(
        Export::Grpc(&rx),
        &["--port", &port.to_string(), "--metrics-addr", &metrics_addr],
    );
    // Calls counted start once both executables are probed.
    wait_go_probed(&agent, "etcd");
    // etcdctl's executable is probed as the agent finds one running: a watch waits long enough.
    let mut watch = Command::new(etcd_bin("etcdctl"))
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={client_url}"))
        .arg(format!("--cacert={}", pki.ca.display()))
        .args(["watch", "warm"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl watch");
    wait_go_probed(&agent, "etcdctl");
    let _ = watch.kill();
    let _ = watch.wait();
    // The watch was probed while it ran: a read of its connection that the library served
    // from its buffer, before any syscall of a probed call bound it, is rightly counted as
    // unbound. What the counted calls do is measured from here (kernel counters reach the
    // metrics endpoint once a second).
    std::thread::sleep(Duration::from_millis(1500));
    let warm_unbound = Agent::metric(metrics_port, "agent_kernel_tls_unbound_total");
    let warm_unknown = Agent::metric(metrics_port, "agent_kernel_go_tls_unknown_conn_total");
    let warm_cut = Agent::metric(metrics_port, "agent_kernel_tls_writes_cut_by_exit_total");
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64;
    let rounds = 10;
    etcd.calls(Some(&pki.ca), rounds);
    let wanted = 6 * rounds;
    let end = Instant::now() + Duration::from_secs(20);
    let counted = |rx: &Receiver| -> Vec<RSpan> {
        rx.spans()
            .into_iter()
            .filter(|s| s.span.start_time_unix_nano > t0)
            .collect()
    };
    while counted(&rx).len() < wanted && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(800));
    let (_, err) = agent.stop();
    let counters = final_counters(&err);
    let spans = counted(&rx);
    println!(
        "etcd over TLS: {} spans, counters {counters:?} (during the warm-up: unbound \
         {warm_unbound}, unknown connection {warm_unknown})",
        spans.len()
    );
    let mut names: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for s in &spans {
        *names
            .entry((s.kind().to_owned(), s.span.name.clone()))
            .or_default() += 1;
    }
    println!("{names:?}");
    let mut lost_clients = 0;
    for kind in ["server", "client"] {
        for (name, status) in [
            ("etcdserverpb.KV/Put", "OK"),
            ("etcdserverpb.KV/Range", "OK"),
            ("etcdserverpb.Lease/LeaseRevoke", "NOT_FOUND"),
        ] {
            let got: Vec<&RSpan> = spans
                .iter()
                .filter(|s| s.kind() == kind && s.span.name == name)
                .collect();
            // Every server span is there. An etcdctl CLIENT span can be lost on a busy machine,
            // never silently: no more are lost than the kernel counted (below).
            let missing = rounds - got.len().min(rounds);
            assert!(
                got.len() <= rounds && (missing == 0 || kind == "client"),
                "{kind} {name}: {} of {rounds}; counters {counters:?}",
                got.len()
            );
            lost_clients += missing;
            for s in got {
                s.assert_attrs(
                    &[
                        ("rpc.system.name", "grpc"),
                        ("rpc.method", name),
                        ("rpc.response.status_code", status),
                        ("network.protocol.version", "2"),
                    ],
                    &brief(s),
                );
                let error = status != "OK" && kind == "client";
                assert_eq!(s.status_code() == 2, error, "{kind} {name} span status");
            }
        }
    }
    // A lost CLIENT span has a counted cause: the request's `Write` sent its record, then
    // etcdctl exited (it had its response) before that thread reached the return probe
    // (`kernel_tls_writes_cut_by_exit`), or its `tls.Conn` did not lead to a known socket
    // (`kernel_go_tls_unknown_conn`). Both also count calls that cost no span (a write cut
    // after the response, etcd's gateway connection), so they bound the loss from above.
    let get = |k: &str| counters.get(k).copied().unwrap_or(0);
    let counted = (get("kernel_tls_writes_cut_by_exit") - warm_cut)
        + (get("kernel_go_tls_unknown_conn") - warm_unknown);
    assert!(
        lost_clients as u64 <= counted,
        "{lost_clients} etcdctl spans lost, {counted} counted: {counters:?}"
    );
    assert_eq!(
        spans.len() + lost_clients,
        wanted,
        "two spans per call: {names:?}"
    );
    // Every server span is the child of its call (the one whose caller's span was lost
    // aside).
    let clients: std::collections::HashSet<String> = spans
        .iter()
        .filter(|s| s.kind() == "client")
        .map(|s| s.span_id())
        .collect();
    let (kept, orphaned): (Vec<RSpan>, Vec<RSpan>) = spans
        .iter()
        .cloned()
        .partition(|s| s.kind() == "client" || clients.contains(&s.parent_id()));
    assert_eq!(
        orphaned.len(),
        lost_clients,
        "server spans whose call is lost"
    );
    assert_eq!(
        callers(&kept),
        (3 * rounds - lost_clients, 0),
        "every server span is the child of its call"
    );
    // `kernel_go_tls_unknown_conn` may count calls of etcd's own (its gateway's connection,
    // whose socket is not read from its `tls.Conn`); other calls of that connection never
    // bind, and may be counted in `kernel_tls_unbound` (`agent-ebpf/src/tls.rs`, `finish`).
    // Without one during the counted calls, every call of theirs binds.
    if get("kernel_go_tls_unknown_conn") == warm_unknown {
        assert_eq!(
            get("kernel_tls_unbound") - warm_unbound,
            0,
            "unbound during the counted calls ({warm_unbound} during the warm-up): {counters:?}"
        );
    }
    assert_eq!(get("http2_alignment_lost"), 0, "{counters:?}");
}
