//! Do no harm: the safety matrix. Real clients (curl, wget, ab, hey in Go, Python blocking and
//! asyncio, Node) fetch 1 B to 16 MiB through a real nginx reverse proxy (buffering on and off,
//! HTTP/1.0 and HTTP/1.1 upstreams) and through HAProxy, and upload up to 16 MiB (whole, chunked,
//! `Expect: 100-continue`) directly and through the proxy; redis-py stores values up to 4 MiB that
//! hold text like an HTTP request line in a real redis-server. Each transfer is checked byte for
//! byte and bounded in time. The
//! matrix runs without the agent (baseline), with the default configuration (whole host), with a
//! narrow selection where the clients are outside it, and with the agent SIGKILLed in the middle
//! of a transfer. The opt-in header carrier (`--inject header`) is not in the suite: measured
//! here, it stalls nginx proxy transfers (see the README's carrier decision).
use std::{
    collections::HashMap,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    agent::{final_counters, Agent, Export},
    fixture, free_port,
    programs::{python, Nginx, Proc},
    receiver::Receiver,
    require_root, wait_port,
};

const FILES: [(&str, usize); 5] = [
    ("f1", 1),
    ("f8k", 8 << 10),
    ("f64k", 64 << 10),
    ("f1m", 1 << 20),
    ("f16m", 16 << 20),
];

struct Stack {
    backend: Nginx,
    proxy: Nginx,
    upload_port: u16,
    haproxy_port: u16,
    redis_port: u16,
    _procs: Vec<Proc>,
}

/// HAProxy (mode http) on `port` in front of `backend`, from its own config file.
fn haproxy(port: u16, backend: u16) -> Proc {
    let dir = std::env::temp_dir().join(format!("haproxy-test-{port}"));
    std::fs::create_dir_all(&dir).expect("haproxy dir");
    let conf = format!(
        "global\n  maxconn 256\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend f\n  bind 127.0.0.1:{port}\n  http-request set-path %[path,regsub(^/hp/,/)]\n  default_backend b\n\
         backend b\n  server s1 127.0.0.1:{backend}\n"
    );
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, conf).expect("haproxy cfg");
    let p = Proc::spawn(
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(Stdio::null()),
    );
    wait_port(port);
    p
}

/// redis-server on `port`, in the foreground, with no persistence.
fn redis(port: u16) -> Proc {
    let p = Proc::spawn(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null()),
    );
    wait_port(port);
    p
}

/// A static nginx backend with the test files, a Python upload server, and an nginx reverse
/// proxy in front of both.
fn stack() -> Stack {
    let backend = Nginx::start(free_port(), "");
    let html = backend.dir.join("html");
    for (name, size) in FILES {
        let mut data = vec![0u8; size];
        // Varied bytes, including text that looks like HTTP inside bodies.
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
        }
        let marker = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        if size > 4096 {
            data[4000..4000 + marker.len()].copy_from_slice(marker);
        }
        std::fs::write(html.join(name), data).expect("test file");
    }
    let upload_port = free_port();
    let upload = Proc::spawn(
        python("threaded_server.py", &[&upload_port.to_string()]).stdout(Stdio::null()),
    );
    wait_port(upload_port);
    let b = backend.port;
    let locations = format!(
        "    client_max_body_size 64m;\n\
         location /b1/ {{ proxy_pass http://127.0.0.1:{b}/; proxy_buffering on; }}\n\
         location /b0/ {{ proxy_pass http://127.0.0.1:{b}/; proxy_buffering off; }}\n\
         location /k1/ {{ proxy_pass http://127.0.0.1:{b}/; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n\
         location /up/ {{ proxy_pass http://127.0.0.1:{upload_port}; proxy_http_version 1.1; }}\n"
    );
    let proxy = Nginx::start(free_port(), &locations);
    let (haproxy_port, redis_port) = (free_port(), free_port());
    let procs = vec![upload, haproxy(haproxy_port, b), redis(redis_port)];
    Stack {
        backend,
        proxy,
        upload_port,
        haproxy_port,
        redis_port,
        _procs: procs,
    }
}

/// Runs the client matrix (when `only` is not empty, only its comma-separated cases: exact names,
/// or prefixes ending with `*`); returns the failed cases (empty: all passed) and the case count.
fn run_matrix(s: &Stack, only: &str) -> (Vec<String>, usize) {
    let started = Instant::now();
    let out = Command::new("timeout")
        .arg("600")
        .arg("python3")
        .arg(fixture("safety_client.py"))
        .arg(s.proxy.port.to_string())
        .arg(s.upload_port.to_string())
        .arg(s.backend.dir.join("html"))
        .arg(s.haproxy_port.to_string())
        .arg(s.redis_port.to_string())
        .arg(only)
        .output()
        .expect("safety client");
    let text = String::from_utf8_lossy(&out.stdout);
    let report: HashMap<String, Value> = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: {text} {}", String::from_utf8_lossy(&out.stderr)));
    println!("matrix: {} cases in {:?}", report.len(), started.elapsed());
    let mut failed: Vec<String> = report
        .iter()
        .filter(|(_, v)| v["ok"] != true)
        .map(|(k, v)| format!("{k}: {}", v["detail"]))
        .collect();
    failed.sort();
    (failed, report.len())
}

fn assert_all_pass(what: &str, s: &Stack) -> usize {
    assert_pass(what, s, "", 46)
}

fn assert_pass(what: &str, s: &Stack, only: &str, min_cases: usize) -> usize {
    let (failed, n) = run_matrix(s, only);
    assert!(n >= min_cases, "{what}: only {n} cases ran");
    assert!(
        failed.is_empty(),
        "{what}: {} of {n} transfers broke:\n{}",
        failed.len(),
        failed.join("\n")
    );
    n
}

#[test]
fn matrix_without_agent_is_the_baseline() {
    require_root();
    let s = stack();
    assert_all_pass("no agent", &s);
}

#[test]
fn matrix_default_whole_host() {
    require_root();
    let rx = Receiver::start();
    let agent = Agent::start(Export::Grpc(&rx), &[]);
    let s = stack();
    assert_all_pass("default configuration, whole host", &s);
    std::thread::sleep(Duration::from_secs(2));
    let (_, err) = agent.stop();
    let c = final_counters(&err);
    println!("counters: {c:?}");
    // The agent was really at work: proxy hops were stitched and spans exported.
    assert!(
        c.get("kernel_stitch_claimed").copied().unwrap_or(0) >= 40,
        "{c:?}"
    );
    assert!(!rx.spans().is_empty());
    for k in [
        "kernel_traceparent_inserted",
        "kernel_sockets_released_large_send",
    ] {
        assert_eq!(c.get(k).copied().unwrap_or(0), 0, "{k}: {c:?}");
    }
}

#[test]
fn matrix_narrow_selection_leaves_the_unselected_alone() {
    require_root();
    let rx = Receiver::start();
    let agent = Agent::start(Export::Grpc(&rx), &["--exe", "*/nginx"]);
    let s = stack();
    // Let the 2 s executable rescan pick up both nginx processes.
    std::thread::sleep(Duration::from_secs(3));
    assert_all_pass("--exe '*/nginx'", &s);
    std::thread::sleep(Duration::from_secs(2));
    agent.stop();
    // Only nginx was traced: no span of any client process.
    let spans = rx.spans();
    assert!(!spans.is_empty(), "nginx was not traced");
    for sp in &spans {
        assert_eq!(
            sp.res("process.executable.name"),
            Some("nginx"),
            "a span of an unselected process: {:?}",
            sp.res("service.name")
        );
    }
}

/// The opt-in TCP-option carrier, on loopback too (the test aid): every request of the matrix
/// from a traced process carries an option on its first segment, and still every transfer is
/// byte-exact and on time.
#[test]
fn matrix_tcp_option_carrier() {
    require_root();
    let rx = Receiver::start();
    let agent = Agent::start_env(
        Export::Grpc(&rx),
        &["--inject", "tcp-option"],
        &[("BEHOLDER_TCP_OPTION_LOOPBACK", "true")],
    );
    let s = stack();
    assert_all_pass("--inject tcp-option (loopback too)", &s);
    std::thread::sleep(Duration::from_secs(2));
    let (_, err) = agent.stop();
    let c = final_counters(&err);
    println!("counters: {c:?}");
    let get = |k: &str| c.get(k).copied().unwrap_or(0);
    assert!(get("kernel_tcpopt_written") >= 40, "{c:?}");
    assert!(get("kernel_tcpopt_claimed") >= 40, "{c:?}");
    assert_eq!(get("kernel_traceparent_inserted"), 0, "{c:?}");
}

/// The opt-in header carrier with a narrow selection: clients outside it never go through the
/// socket map, so their large uploads followed by a blocking `recv` never see the spurious
/// EAGAIN of `tcp_bpf` (the failure reported with `--exe '*/nginx'`), five times over.
#[test]
fn header_mode_leaves_unselected_clients_alone() {
    require_root();
    let rx = Receiver::start();
    let agent = Agent::start(
        Export::Grpc(&rx),
        &["--inject", "header", "--exe", "*/nginx"],
    );
    let s = stack();
    std::thread::sleep(Duration::from_secs(3));
    for round in 0..5 {
        assert_pass(
            &format!("--inject header, unselected clients, round {round}"),
            &s,
            "upload direct*,curl upload direct*",
            7,
        );
    }
    // The carrier was live: nginx (selected) got its upstream requests injected. (Only 1-byte
    // files: larger ones through nginx are what this carrier breaks, which is why it is opt-in.)
    assert_pass("--inject header, nginx", &s, "curl k1 f1,curl b1 f1", 2);
    let (_, err) = agent.stop();
    let c = final_counters(&err);
    println!("counters: {c:?}");
    assert!(
        c.get("kernel_traceparent_inserted").copied().unwrap_or(0) >= 1,
        "{c:?}"
    );
}

#[test]
fn transfer_survives_agent_sigkill() {
    require_root();
    let rx = Receiver::start();
    // The default configuration. The opt-in header carrier (`--inject header`) fails this on this
    // kernel (see the README's carrier decision).
    let agent = Agent::start(Export::Grpc(&rx), &[]);
    let s = stack();
    let want = std::fs::read(s.backend.dir.join("html/f16m")).expect("file");
    let out = std::env::temp_dir().join(format!("sigkill-{}", s.proxy.port));
    // 16 MiB at 4 MiB/s through the proxy: about 4 s, the agent killed after 1 s.
    let mut curl = Command::new("curl")
        .args(["-sS", "--max-time", "30", "--limit-rate", "4M", "-o"])
        .arg(&out)
        .arg(format!("http://127.0.0.1:{}/b0/f16m", s.proxy.port))
        .spawn()
        .expect("curl");
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: plain kill(2) of the agent under test.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
    let status = curl.wait().expect("curl");
    assert!(status.success(), "transfer failed after SIGKILL");
    let got = std::fs::read(&out).expect("output");
    assert!(got == want, "{} of {} bytes", got.len(), want.len());
    let _ = std::fs::remove_file(Path::new(&out));
    drop(agent);
}
