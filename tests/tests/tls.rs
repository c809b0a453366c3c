//! HTTPS through OpenSSL: spans from the plaintext of `SSL_read`/`SSL_write`, for real programs
//! that use the system's `libssl.so.3` (nginx, curl, Python's `ssl`), with bodies from 1 KiB to
//! 16 MiB through a TLS reverse proxy, every transfer checked byte for byte and bounded in time.
use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tests::{
    agent::{final_counters, Agent, Export},
    fixture, free_port,
    pki::Pki,
    programs::{sha256, wait_bounded, Nginx, Waiting},
    receiver::{RSpan, Receiver},
    require_root,
};

/// Body sizes served (1 KiB, 64 KiB, 1 MiB, 16 MiB).
const SIZES: [usize; 4] = [1 << 10, 64 << 10, 1 << 20, 16 << 20];

/// The two nginx servers: `back` serves the files over TLS, `front` serves them through
/// `proxy_pass https://` to `back` (a new TLS connection for every request).
struct Proxy {
    front: Nginx,
    back: Nginx,
    /// SHA-256 of each file, by request path (as the client asks for it, through the proxy).
    sha: HashMap<String, String>,
}

fn start_proxy(pki: &Pki) -> Proxy {
    let (fport, bport) = (free_port(), free_port());
    let back = Nginx::start_tls(bport, pki, "");
    let front = Nginx::start_tls(
        fport,
        pki,
        &format!(
            "    location /p/ {{ proxy_pass https://127.0.0.1:{bport}/; proxy_http_version 1.1; }}\n"
        ),
    );
    let sha = back.serve_files(&SIZES, "/p");
    Proxy { front, back, sha }
}

fn paths() -> Vec<String> {
    SIZES.iter().map(|n| format!("/p/f/{n}.bin")).collect()
}

/// One `tls_client.py` run's report: `(path, status, length, sha256)` per request.
type Report = Vec<(String, u16, usize, String)>;

fn parse_report(line: &str) -> Report {
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line}"));
    v.as_array()
        .expect("list")
        .iter()
        .map(|r| {
            (
                r[0].as_str().expect("path").to_owned(),
                r[1].as_u64().expect("status") as u16,
                r[2].as_u64().expect("length") as usize,
                r[3].as_str().expect("sha").to_owned(),
            )
        })
        .collect()
}

/// Runs the Python client (`rounds` times over every path) and checks every body.
fn python_client(p: &Proxy, pki: &Pki, rounds: usize) -> Report {
    let mut child = Command::new("python3")
        .arg(fixture("tls_client.py"))
        .arg(p.front.port.to_string())
        .arg(&pki.ca)
        .arg(rounds.to_string())
        .args(paths())
        .stdout(Stdio::piped())
        .spawn()
        .expect("tls client");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    wait_bounded(
        &mut child,
        Instant::now() + Duration::from_secs(120),
        "python TLS client",
    );
    let mut line = String::new();
    out.read_line(&mut line).expect("report");
    let report = parse_report(&line);
    check_bodies(p, &report);
    report
}

fn check_bodies(p: &Proxy, report: &Report) {
    for (path, status, len, sha) in report {
        assert_eq!(*status, 200, "{path}");
        assert_eq!(
            Some(sha),
            p.sha.get(path),
            "{path}: the body changed ({len} bytes)"
        );
    }
}

/// curl fetching the two smaller files on one connection: its own process each time (a
/// short-lived client traced from its first call), every body checked.
fn curl_pair(p: &Proxy, pki: &Pki) -> Report {
    let small = &paths()[..2];
    let urls: Vec<String> = small
        .iter()
        .map(|s| format!("https://127.0.0.1:{}{s}", p.front.port))
        .collect();
    let out = tests::programs::run(
        Command::new("curl")
            .args(["-sS", "--max-time", "60", "--cacert"])
            .arg(&pki.ca)
            .args(&urls),
    );
    let mut rest = &out.stdout[..];
    let mut report = Vec::new();
    for (path, n) in small.iter().zip(SIZES) {
        assert!(rest.len() >= n, "curl got {} bytes, want {n}", rest.len());
        let tmp = std::env::temp_dir().join(format!("tls-curl-{}", std::process::id()));
        std::fs::write(&tmp, &rest[..n]).expect("body");
        report.push((path.clone(), 200, n, sha256(&tmp)));
        let _ = std::fs::remove_file(tmp);
        rest = &rest[n..];
    }
    assert!(rest.is_empty(), "curl got {} bytes too many", rest.len());
    check_bodies(p, &report);
    report
}

/// The spans received once `n` have arrived (and a moment more, for any extra), or after 60 s.
fn wait_spans(rx: &Receiver, n: usize) -> Vec<RSpan> {
    let end = Instant::now() + Duration::from_secs(60);
    while rx.spans().len() < n && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    rx.spans()
}

/// Span counts by (service, pid, kind, path).
fn breakdown(spans: &[RSpan]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for s in spans {
        let k = format!(
            "{} {} {} {}",
            s.res("service.name").unwrap_or("?"),
            pid_of(s),
            s.kind(),
            s.attr("url.path").unwrap_or("?")
        );
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

fn pid_of(s: &RSpan) -> &str {
    s.res("process.pid").unwrap_or("?")
}

fn brief(s: &RSpan) -> String {
    format!(
        "{} {} {} pid={} trace={} span={} parent={} link={}",
        s.res("service.name").unwrap_or("?"),
        s.kind(),
        s.attr("url.path").unwrap_or("?"),
        pid_of(s),
        s.trace_id(),
        s.span_id(),
        s.parent_id(),
        s.attr("beholder.link.method").unwrap_or("?")
    )
}

/// Waits (at most 20 s) until the agent has logged probing each of `pids`.
fn wait_probed(agent: &Agent, pids: &[u32], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pids
        .iter()
        .all(|pid| agent.stderr().contains(&format!("pid={pid}")))
    {
        assert!(
            Instant::now() < deadline,
            "{what} not probed:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn openssl_clients_through_an_nginx_tls_proxy_link_end_to_end() {
    require_root();
    let pki = Pki::new("tls-proxy");
    let rx = Receiver::start();
    let p = start_proxy(&pki);
    let (f, b) = (p.front.port.to_string(), p.back.port.to_string());
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &f, "--port", &b]);

    // Three keep-alive Python clients at once (the 16 MiB bodies among them), and curl runs
    // beside them: the proxy opens a TLS connection to the back for every request.
    const PY: usize = 3;
    const ROUNDS: usize = 4;
    const CURLS: usize = 6;
    let (reports, curls) = std::thread::scope(|s| {
        let pys: Vec<_> = (0..PY)
            .map(|_| s.spawn(|| python_client(&p, &pki, ROUNDS)))
            .collect();
        let curls = s.spawn(|| (0..CURLS).map(|_| curl_pair(&p, &pki)).collect::<Vec<_>>());
        let reports: Vec<Report> = pys.into_iter().map(|h| h.join().expect("py")).collect();
        (reports, curls.join().expect("curls"))
    });
    let requests =
        reports.iter().map(Vec::len).sum::<usize>() + curls.iter().map(Vec::len).sum::<usize>();
    assert_eq!(requests, PY * ROUNDS * SIZES.len() + CURLS * 2);

    // Four spans per request: the client's, the proxy's server and client spans, the back's.
    let spans = wait_spans(&rx, 4 * requests);
    let (_, err) = agent.stop();
    let counters = final_counters(&err);
    println!("counters: {counters:?}");
    assert_eq!(
        spans.len(),
        4 * requests,
        "one span per request at each of the four ends: {:?}",
        breakdown(&spans)
    );

    let nginx_front = p.front.pid().to_string();
    let nginx_back = p.back.pid().to_string();
    let by_id: HashMap<String, &RSpan> = spans.iter().map(|s| (s.span_id(), s)).collect();
    let (mut callers, mut front_servers, mut front_clients, mut backs) = (0, 0, 0, 0);
    let mut linked_in_proxy = 0;
    for s in &spans {
        let path = s.attr("url.path").unwrap_or("");
        s.assert_attrs(
            &[
                ("url.scheme", "https"),
                ("http.response.status_code", "200"),
                ("network.protocol.version", "1.1"),
            ],
            &brief(s),
        );
        let parent = by_id.get(&s.parent_id()).copied();
        if let Some(par) = parent {
            assert_eq!(
                par.trace_id(),
                s.trace_id(),
                "{} under {}",
                brief(s),
                brief(par)
            );
        }
        match (pid_of(s), s.kind()) {
            (pid, "server") if pid == nginx_front => {
                // Called over TLS by a traced client on this host: stitched to that call.
                front_servers += 1;
                let par = parent.unwrap_or_else(|| panic!("no caller: {}", brief(s)));
                assert!(
                    par.kind() == "client" && par.attr("url.path") == Some(path),
                    "{} under {}",
                    brief(s),
                    brief(par)
                );
                assert!(
                    matches!(
                        par.res("service.name"),
                        Some("curl" | "python3.11" | "python3")
                    ),
                    "{}",
                    brief(par)
                );
            }
            (pid, "client") if pid == nginx_front => {
                front_clients += 1;
                // In-process: the proxy's own request for this path, or no parent at all.
                match parent {
                    Some(par) => {
                        assert!(
                            par.kind() == "server"
                                && pid_of(par) == nginx_front
                                && par.attr("url.path") == Some(&format!("/p{path}"))
                                && s.attr("beholder.link.method") == Some("thread"),
                            "WRONG PARENT: {} under {}",
                            brief(s),
                            brief(par)
                        );
                        linked_in_proxy += 1;
                    }
                    None => {
                        assert!(s.parent_id().is_empty(), "unknown parent: {}", brief(s));
                        assert!(
                            matches!(
                                s.attr("beholder.link.method"),
                                Some("ambiguous" | "none" | "unclassified")
                            ),
                            "{}",
                            brief(s)
                        );
                    }
                }
                assert!(
                    s.attr("url.full")
                        .is_some_and(|u| u.starts_with("https://127.0.0.1:")),
                    "{}",
                    brief(s)
                );
            }
            (pid, "server") if pid == nginx_back => {
                backs += 1;
                let par = parent.unwrap_or_else(|| panic!("no caller: {}", brief(s)));
                assert!(
                    par.kind() == "client"
                        && pid_of(par) == nginx_front
                        && par.attr("url.path") == Some(path),
                    "{} under {}",
                    brief(s),
                    brief(par)
                );
            }
            (_, "client") => {
                callers += 1;
                assert!(s.parent_id().is_empty(), "{}", brief(s));
                assert!(
                    s.attr("url.full")
                        .is_some_and(|u| u == format!("https://127.0.0.1:{f}{path}")),
                    "{}",
                    brief(s)
                );
            }
            _ => panic!("unexpected span {}", brief(s)),
        }
    }
    println!(
        "{requests} requests: {callers} callers, {front_servers} proxy servers, \
         {front_clients} proxy calls ({linked_in_proxy} linked in-process), {backs} back servers"
    );
    assert_eq!(
        (callers, front_servers, front_clients, backs),
        (requests, requests, requests, requests)
    );
    assert!(
        linked_in_proxy > 0,
        "no proxy call linked to its request in-process"
    );
    assert_eq!(counters.get("kernel_tls_unbound").copied().unwrap_or(0), 0);
    assert_eq!(counters.get("tls_not_followed").copied().unwrap_or(0), 0);
}

/// With `--exe '*nginx*'`, only nginx is probed (per process, never the clients that map the
/// same library); a keep-alive connection opened before the agent is traced from its next
/// request; the clients outside the selection give no span and receive every byte unchanged.
#[test]
fn only_selected_processes_are_probed_including_a_connection_older_than_the_agent() {
    require_root();
    let pki = Pki::new("tls-select");
    let rx = Receiver::start();
    let p = start_proxy(&pki);
    let paths = paths();
    let early = Waiting::spawn(
        Command::new("python3")
            .arg(fixture("tls_client.py"))
            .arg("--wait")
            .arg(p.front.port.to_string())
            .arg(&pki.ca)
            .arg("2")
            .args(&paths),
    );

    let agent = Agent::start(Export::Grpc(&rx), &["--exe", "*nginx*"]);
    // The agent probes the nginx processes it finds at start.
    wait_probed(&agent, &[p.back.pid(), p.front.pid()], "nginx");
    let line = early.release(Duration::from_secs(120), "early client");
    let early_report = parse_report(&line);
    check_bodies(&p, &early_report);
    let fresh = python_client(&p, &pki, 2);
    let curls = curl_pair(&p, &pki);
    // After the first (pre-agent) request of the early client.
    let traced = early_report.len() - 1 + fresh.len() + curls.len();
    let spans = wait_spans(&rx, 3 * traced);
    let (_, err) = agent.stop();
    let counters = final_counters(&err);
    println!("counters: {counters:?}");
    let nginx: Vec<&RSpan> = spans
        .iter()
        .filter(|s| s.res("service.name") == Some("nginx"))
        .collect();
    assert_eq!(
        nginx.len(),
        spans.len(),
        "only nginx is selected: {:?}",
        spans.iter().map(brief).collect::<Vec<_>>()
    );
    let count = |pid: u32, kind: &str| {
        nginx
            .iter()
            .filter(|s| pid_of(s) == pid.to_string() && s.kind() == kind)
            .count()
    };
    assert_eq!(count(p.front.pid(), "server"), traced, "proxy server spans");
    assert_eq!(count(p.front.pid(), "client"), traced, "proxy calls");
    assert_eq!(count(p.back.pid(), "server"), traced, "back server spans");
    for s in &nginx {
        assert_eq!(s.attr("url.scheme"), Some("https"), "{}", brief(s));
    }
    // Each back span is stitched to the proxy call that made it.
    let by_id: HashMap<String, &RSpan> = nginx.iter().map(|s| (s.span_id(), *s)).collect();
    for s in nginx
        .iter()
        .filter(|s| pid_of(s) == p.back.pid().to_string())
    {
        let par = by_id
            .get(&s.parent_id())
            .unwrap_or_else(|| panic!("no caller: {}", brief(s)));
        assert_eq!(par.attr("url.path"), s.attr("url.path"));
        assert_eq!(par.kind(), "client");
    }
    let stderr = err;
    assert!(
        stderr.contains("OpenSSL in /proc/"),
        "nginx probed per process:\n{stderr}"
    );
    assert_eq!(counters.get("kernel_tls_unbound").copied().unwrap_or(0), 0);
}

/// A selected multi-threaded OpenSSL client whose threads all predate the agent (each has
/// made a request on its own keep-alive connection before the agent starts): the per-process
/// probes fire in every thread of the process, not only in the one whose id is the pid, so
/// every later request of every thread gives its client span, over the connection it was
/// already using.
#[test]
fn every_thread_of_a_selected_openssl_process_is_traced() {
    require_root();
    let pki = Pki::new("tls-threads");
    let rx = Receiver::start();
    let p = start_proxy(&pki);
    const THREADS: usize = 6;
    const ROUNDS: usize = 5;
    let path = "/p/f/65536.bin";
    let client = Waiting::spawn(
        Command::new("python3")
            .arg(fixture("tls_threads_client.py"))
            .arg(p.front.port.to_string())
            .arg(&pki.ca)
            .arg(THREADS.to_string())
            .arg(ROUNDS.to_string())
            .arg(path),
    );
    let threads = std::fs::read_dir(format!("/proc/{}/task", client.pid()))
        .expect("tasks")
        .count();
    assert!(threads > THREADS, "{threads} threads");

    let agent = Agent::start(Export::Grpc(&rx), &["--exe", "*python3*"]);
    wait_probed(&agent, &[client.pid()], "threaded client");
    let line = client.release(Duration::from_secs(120), "threaded TLS client");
    let report: Vec<(u64, u64, u64, u64)> = serde_json::from_str(line.trim()).expect("report");
    assert_eq!(report.len(), THREADS * ROUNDS);
    for (t, k, status, len) in &report {
        assert_eq!((*status, *len), (200, 65536), "thread {t} request {k}");
    }
    let spans = wait_spans(&rx, THREADS * ROUNDS);
    let (_, err) = agent.stop();
    let counters = final_counters(&err);
    let mut got: Vec<String> = spans
        .iter()
        .filter(|s| s.kind() == "client")
        .map(|s| {
            s.assert_attrs(
                &[
                    ("url.scheme", "https"),
                    ("http.response.status_code", "200"),
                ],
                &brief(s),
            );
            s.attr("url.full").unwrap_or("?").to_owned()
        })
        .collect();
    got.sort();
    let mut want: Vec<String> = (0..THREADS)
        .flat_map(|t| {
            (0..ROUNDS)
                .map(move |k| format!("https://127.0.0.1:{}{path}?thread={t}&n={k}", p.front.port))
        })
        .collect();
    want.sort();
    assert_eq!(
        got, want,
        "one client span per request of every thread; {counters:?}"
    );
    assert_eq!(
        spans.len(),
        THREADS * ROUNDS,
        "only the selected client gives spans"
    );
    assert_eq!(counters.get("kernel_tls_unbound").copied().unwrap_or(0), 0);
}
