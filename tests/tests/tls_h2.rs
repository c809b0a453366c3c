//! HTTP/2 over TLS through OpenSSL: the kernel walks the frames of each `SSL_read`/`SSL_write`'s
//! plaintext as it walks a cleartext connection's syscalls, so bodies up to 16 MiB cost no copy
//! and lose no frame, and both ends of a connection on this host are stitched by stream id.
//! Real programs: nginx (`listen ... ssl http2`, `grpc_pass grpcs://`), curl (`--http2
//! --parallel`), h2load, and grpcio behind the proxies; every body checked, every run bounded.
use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tests::{
    agent::{final_counters, Agent, Export},
    fixture, free_port,
    links::callers,
    pki::Pki,
    programs::{python, run, sha256, tls_upstreams, wait_bounded, Nginx, Proc},
    receiver::{RSpan, Receiver},
    require_root, wait_port,
};

/// Body sizes served (1 KiB, 64 KiB, 1 MiB, 16 MiB).
const SIZES: [usize; 4] = [1 << 10, 64 << 10, 1 << 20, 16 << 20];

/// Waits until `rx` holds `n` spans (at most 60 s) and a moment more for any beyond them, then
/// stops the agent: its stderr.
fn stop_after(agent: Agent, rx: &Receiver, n: usize) -> String {
    let end = Instant::now() + Duration::from_secs(60);
    while rx.spans().len() < n && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    agent.stop().1
}

/// Counters that must stay zero when every frame was walked in step and nothing was copied
/// beyond what spans need.
fn assert_walked_clean(counters: &HashMap<String, u64>) {
    for name in [
        "http2_alignment_lost",
        "http2_ends_unseen",
        "kernel_h2_walk_incomplete",
        "kernel_h2_chunks_full",
        "kernel_payload_truncated",
        "kernel_tls_unbound",
    ] {
        assert_eq!(
            counters.get(name).copied().unwrap_or(0),
            0,
            "{name}: {counters:?}"
        );
    }
}

fn brief(s: &RSpan) -> String {
    format!(
        "{} {} {} {} pid={} parent={} link={}",
        s.res("service.name").unwrap_or("?"),
        s.kind(),
        s.span.name,
        s.attr("url.path").unwrap_or("?"),
        s.res("process.pid").unwrap_or("?"),
        s.parent_id(),
        s.attr("beholder.link.method").unwrap_or("?")
    )
}

/// One curl process fetching every file twice over one HTTP/2 connection, its streams in
/// flight at once (`--parallel`); every body checked against `sha`. The paths fetched.
fn curl_parallel(port: u16, pki: &Pki, sha: &HashMap<String, String>, run_no: usize) -> usize {
    let dir = std::env::temp_dir().join(format!("tls-h2-curl-{}-{run_no}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("curl dir");
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--http2",
        "--parallel",
        "--parallel-max",
        "8",
        "--max-time",
        "60",
        "-w",
        "%{http_version} %{response_code}\\n",
        "--cacert",
    ])
    .arg(&pki.ca);
    let mut want = Vec::new();
    for round in 0..2 {
        for n in SIZES {
            let out = dir.join(format!("{n}-{round}"));
            cmd.arg("-o")
                .arg(&out)
                .arg(format!("https://127.0.0.1:{port}/f/{n}.bin"));
            want.push((format!("/f/{n}.bin"), out));
        }
    }
    let out = run(&mut cmd);
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        lines,
        vec!["2 200".to_owned(); want.len()],
        "HTTP/2, all 200"
    );
    for (path, file) in &want {
        assert_eq!(
            Some(&sha256(file)),
            sha.get(path),
            "{path}: the body changed"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
    want.len()
}

#[test]
fn http2_over_tls_from_curl_and_h2load_is_walked_frame_by_frame_and_stitched() {
    require_root();
    let pki = Pki::new("tls-h2");
    let rx = Receiver::start();
    let port = free_port();
    let nginx = Nginx::start_tls_h2(port, &pki, "");
    let sha = nginx.serve_files(&SIZES, "");
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &port.to_string()]);

    // Three curl processes (8 streams in flight on each connection, 16 MiB bodies among them)
    // beside h2load's 600 streams of 64 KiB, 25 in flight on each of 4 connections.
    const CURLS: usize = 3;
    const H2LOAD: usize = 600;
    let (curled, h2load) = std::thread::scope(|s| {
        let curls: Vec<_> = (0..CURLS)
            .map(|i| {
                let (pki, sha) = (&pki, &sha);
                s.spawn(move || curl_parallel(port, pki, sha, i))
            })
            .collect();
        let mut child = Command::new("h2load")
            .args(["-n", &H2LOAD.to_string(), "-c", "4", "-m", "25"])
            .arg(format!("https://127.0.0.1:{port}/f/{}.bin", SIZES[1]))
            .stdout(Stdio::piped())
            .spawn()
            .expect("h2load");
        let mut stdout = child.stdout.take().expect("stdout");
        let reader = s.spawn(move || {
            let mut out = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut out).expect("h2load output");
            out
        });
        wait_bounded(
            &mut child,
            Instant::now() + Duration::from_secs(120),
            "h2load",
        );
        let curled: usize = curls.into_iter().map(|h| h.join().expect("curl")).sum();
        (curled, reader.join().expect("h2load output"))
    });
    assert!(
        h2load.contains(&format!("{H2LOAD} succeeded"))
            && h2load.contains(&format!("{H2LOAD} 2xx"))
            && h2load.contains("Application protocol: h2"),
        "h2load over TLS: {h2load}"
    );
    let requests = curled + H2LOAD;

    // Two spans per request: the client's (curl or h2load, probed in libssl) and nginx's.
    let err = stop_after(agent, &rx, 2 * requests);
    let spans = rx.spans();
    let counters = final_counters(&err);
    println!("counters: {counters:?}");
    assert_walked_clean(&counters);
    assert_eq!(spans.len(), 2 * requests, "two spans per request");
    let count = |service: &str, kind: &str| {
        spans
            .iter()
            .filter(|s| s.res("service.name") == Some(service) && s.kind() == kind)
            .count()
    };
    assert_eq!(count("nginx", "server"), requests);
    assert_eq!(count("curl", "client"), curled);
    assert_eq!(count("h2load", "client"), H2LOAD);
    for s in &spans {
        s.assert_attrs(
            &[
                ("network.protocol.version", "2"),
                ("url.scheme", "https"),
                ("http.response.status_code", "200"),
            ],
            &brief(s),
        );
        assert!(
            sha.contains_key(s.attr("url.path").unwrap_or("")),
            "{}",
            brief(s)
        );
    }
    // Every nginx stream is the child of the client stream that made it (same path, same
    // trace, around it in time, one each).
    for s in spans
        .iter()
        .filter(|s| s.kind() == "server" && s.parent_id().is_empty())
    {
        eprintln!(
            "ROOT {} peer={:?} start={}",
            brief(s),
            s.attr("network.peer.port"),
            s.span.start_time_unix_nano
        );
    }
    assert_eq!(callers(&spans), (requests, 0), "every server span stitched");
}

/// gRPC through two nginx proxies with a TLS hop between them: grpcio's client calls nginx A
/// over h2c; A calls nginx B with `grpc_pass grpcs://` (HTTP/2 over TLS, B's certificate
/// verified); B calls grpcio's server over h2c. nginx's OpenSSL calls are probed on both sides
/// of the TLS hop. Unary and streaming calls, then replies of 1 MiB and 16 MiB checked byte
/// for byte: six spans per call, each stitched to its caller, statuses intact.
#[test]
fn grpc_through_nginx_with_a_tls_hop_keeps_every_frame() {
    require_root();
    let pki = Pki::new("tls-grpc");
    let rx = Receiver::start();
    let upstream = free_port();
    let _server = Proc::spawn(
        python("grpc_service.py", &["serve", &upstream.to_string()])
            .env("OTEL_SERVICE_NAME", "catalog")
            .stdout(Stdio::null()),
    );
    wait_port(upstream);
    let timeouts = "grpc_read_timeout 60s; grpc_send_timeout 60s;";
    let bport = free_port();
    let back = Nginx::start_tls_h2(
        bport,
        &pki,
        &format!("    location / {{ grpc_pass grpc://127.0.0.1:{upstream}; {timeouts} }}\n"),
    );
    let fport = free_port();
    let front = Nginx::start_h2c(
        fport,
        &format!(
            "{}    location / {{ grpc_pass grpcs://127.0.0.1:{bport}; {timeouts} }}\n",
            tls_upstreams(&pki)
        ),
    );
    let ports = [fport, bport, upstream].map(|p| p.to_string());
    let agent = Agent::start(
        Export::Grpc(&rx),
        &[
            "--port", &ports[0], "--port", &ports[1], "--port", &ports[2],
        ],
    );
    let rounds = 5;
    let out = run(Command::new("timeout")
        .args(["60", "python3"])
        .arg(fixture("grpc_service.py"))
        .args(["call", &ports[0], &rounds.to_string()]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ok {rounds}")
    );
    let mut blobs = 0;
    for (size, n) in [(1usize << 20, 6), (16 << 20, 2)] {
        let out = run(Command::new("timeout")
            .args(["120", "python3"])
            .arg(fixture("grpc_service.py"))
            .args(["blobs", &ports[0], &size.to_string(), &n.to_string()]));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("ok {n}")
        );
        blobs += n;
    }
    let calls = 6 * rounds + blobs;
    let err = stop_after(agent, &rx, 6 * calls);
    let spans = rx.spans();
    let counters = final_counters(&err);
    println!("counters: {counters:?}");
    assert_walked_clean(&counters);
    assert_eq!(spans.len(), 6 * calls, "six spans per call");
    // Each end's share: the TLS hop's two ends give one span per call each.
    let at = |pid: u32, kind: &str| {
        spans
            .iter()
            .filter(|s| s.res("process.pid") == Some(&pid.to_string()) && s.kind() == kind)
            .count()
    };
    for (pid, what) in [(front.pid(), "nginx A"), (back.pid(), "nginx B")] {
        assert_eq!(at(pid, "server"), calls, "{what} server spans");
        assert_eq!(at(pid, "client"), calls, "{what} client spans");
    }
    let named = |name: &str| {
        spans
            .iter()
            .filter(|s| s.span.name == format!("shop.v1.Catalog/{name}"))
            .count()
    };
    for (name, per_round) in [("Get", 2), ("List", 1), ("Upload", 1), ("Chat", 1)] {
        assert_eq!(named(name), 6 * per_round * rounds, "{name}");
    }
    assert_eq!(named("Blob"), 6 * blobs);
    // Statuses cross the TLS hop: NOT_FOUND on every span of those calls (an error on client
    // spans only), UNKNOWN on every span of the crashing ones.
    let with = |code: &str| {
        spans
            .iter()
            .filter(|s| s.attr("rpc.response.status_code") == Some(code))
            .collect::<Vec<_>>()
    };
    let missing = with("NOT_FOUND");
    assert_eq!(missing.len(), 6 * rounds);
    assert!(missing
        .iter()
        .all(|s| (s.status_code() == 2) == (s.kind() == "client")));
    assert_eq!(with("UNKNOWN").len(), 6 * rounds);
    assert!(spans
        .iter()
        .filter(|s| s.span.name == "shop.v1.Catalog/Blob")
        .all(|s| s.attr("rpc.response.status_code") == Some("OK") && s.status_code() == 0));
    let servers = spans.iter().filter(|s| s.kind() == "server").count();
    for s in spans
        .iter()
        .filter(|s| s.kind() == "server" && s.parent_id().is_empty())
    {
        eprintln!("ROOT {} pid={:?}", brief(s), s.res("process.pid"));
    }
    assert_eq!(
        callers(&spans),
        (servers, 0),
        "every server span stitched to its caller, across the TLS hop too"
    );
}
