//! Fault tests: the backend goes away or is slow, servers restart, connections churn, and the
//! agent is stopped or killed under load. The traced programs must never notice.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tests::{
    agent::{Agent, Export},
    free_port,
    programs::{curl, python, run, Nginx, Proc},
    receiver::{Options, Receiver},
    wait_port, wait_until,
};

const NGINX: &str = "    location = /hello { return 200 \"hello\\n\"; }\n";

fn rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn hey(url: &str, secs: u32, rate: u32) -> Proc {
    Proc::spawn(
        Command::new("hey")
            .args([
                "-z",
                &format!("{secs}s"),
                "-c",
                "1",
                "-q",
                &rate.to_string(),
                url,
            ])
            .stdout(Stdio::null()),
    )
}

fn served_spans(rx: &Receiver, port: u16) -> usize {
    rx.spans()
        .iter()
        .filter(|s| s.kind() == "server" && s.attr("server.port") == Some(&port.to_string()))
        .count()
}

/// The backend is down for 30 s, then comes back: memory stays bounded, every request is either
/// received or counted as dropped, and export resumes by itself.
#[test]
fn backend_down_for_30s_then_back() {
    let port = free_port();
    let nginx = Nginx::start(port, NGINX);
    let grpc_port = free_port();
    let agent = Agent::start_env(
        Export::Console,
        &["--exe", "*/nginx"],
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                &format!("http://127.0.0.1:{grpc_port}"),
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "1000"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "200"),
        ],
    );
    let url = format!("http://127.0.0.1:{port}/hello");
    let load = hey(&url, 30, 100);
    let start = Instant::now();
    let mut peak = 0f64;
    while start.elapsed() < Duration::from_secs(30) {
        peak = peak.max(rss_mib(agent.pid()));
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(load);
    assert!(
        agent.stderr().contains("cannot export spans"),
        "the outage is reported:\n{}",
        agent.stderr()
    );
    assert!(
        peak < 128.0,
        "agent RSS stayed bounded during the outage: peak {peak:.1} MiB"
    );
    // The backend comes back on the same port.
    let rx = Receiver::start_with(Options {
        grpc_port,
        http_port: 0,
        ..Options::default()
    });
    wait_until(Duration::from_secs(30), "export to resume", || {
        served_spans(&rx, port) > 0
    });
    for _ in 0..5 {
        curl(&[&url]);
    }
    std::thread::sleep(Duration::from_secs(2));
    let (_, err) = agent.stop();
    let c = tests::agent::final_counters(&err);
    let served = nginx.access_log_lines() as u64;
    let received = served_spans(&rx, port) as u64;
    let dropped = c.get("spans_queue_full").copied().unwrap_or(0)
        + c.get("spans_export_failed").copied().unwrap_or(0);
    println!("backend outage: served {served}, received {received}, counted drops {dropped}, peak RSS {peak:.1} MiB");
    assert!(served > 2500, "load ran: {served}");
    assert!(
        dropped > 0,
        "a 1000-span queue overflows during a 30 s outage at 100 req/s, and that is counted"
    );
    assert!(err.contains("reachable again"), "{err}");
    assert_eq!(
        served,
        received + dropped,
        "every request is received or counted as dropped: {c:?}"
    );
}

/// A receiver that answers after 2 s: spans still arrive, none lost, and SIGTERM still stops the
/// agent promptly.
#[test]
fn slow_receiver() {
    let rx = Receiver::start_with(Options {
        delay: Duration::from_secs(2),
        ..Options::default()
    });
    let port = free_port();
    let nginx = Nginx::start(port, NGINX);
    let agent = Agent::start(Export::Grpc(&rx), &["--exe", "*/nginx"]);
    for _ in 0..3 {
        let load = hey(&format!("http://127.0.0.1:{port}/hello"), 2, 50);
        drop(load);
    }
    std::thread::sleep(Duration::from_millis(300));
    let served = nginx.access_log_lines();
    rx.wait_for(
        served,
        Duration::from_secs(30),
        "every span despite a slow backend",
        |s| s.kind() == "server",
    );
    let t = Instant::now();
    agent.stop();
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "stop took {:?}",
        t.elapsed()
    );
    assert_eq!(served_spans(&rx, port), served);
}

/// A traced server restarts, and where the kernel can be made to reuse its pid, the new process
/// behind the same pid gets its own resource.
#[test]
fn server_restart_and_pid_reuse() {
    let rx = Receiver::start();
    let port = free_port();
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &port.to_string()]);
    let first = Proc::spawn(
        python("threaded_server.py", &[&port.to_string()])
            .env("OTEL_SERVICE_NAME", "first")
            .stdout(Stdio::null()),
    );
    wait_port(port);
    let first_pid = first.pid();
    curl(&[&format!("http://127.0.0.1:{port}/one")]);
    rx.wait_for(1, Duration::from_secs(20), "first server span", |s| {
        s.attr("url.path") == Some("/one") && s.kind() == "server"
    });
    drop(first);
    // Ask the kernel to hand out the same pid again (root only), a few times if something races us.
    let mut second = None;
    for _ in 0..20 {
        let _ = std::fs::write("/proc/sys/kernel/ns_last_pid", (first_pid - 1).to_string());
        let p = Proc::spawn(
            python("threaded_server.py", &[&port.to_string()])
                .env("OTEL_SERVICE_NAME", "second")
                .stdout(Stdio::null()),
        );
        if p.pid() == first_pid {
            second = Some(p);
            break;
        }
        drop(p);
        std::thread::sleep(Duration::from_millis(100));
    }
    let second = second.expect("the kernel never reused the pid");
    wait_port(port);
    curl(&[&format!("http://127.0.0.1:{port}/two")]);
    let two = rx.wait_for(1, Duration::from_secs(20), "second server span", |s| {
        s.attr("url.path") == Some("/two") && s.kind() == "server"
    });
    agent.stop();
    let one = rx
        .spans()
        .into_iter()
        .find(|s| s.attr("url.path") == Some("/one") && s.kind() == "server")
        .expect("one");
    assert_eq!(
        one.res("process.pid"),
        two[0].res("process.pid"),
        "same pid"
    );
    assert_eq!(one.res("service.name"), Some("first"));
    assert_eq!(
        two[0].res("service.name"),
        Some("second"),
        "a reused pid gets the new process's resource"
    );
    drop(second);
}

/// Thousands of short-lived connections (ab: HTTP/1.0, one connection per request).
#[test]
fn thousands_of_short_connections() {
    let rx = Receiver::start();
    let port = free_port();
    let nginx = Nginx::start(port, NGINX);
    let agent = Agent::start(Export::Grpc(&rx), &["--exe", "*/nginx"]);
    run(Command::new("ab")
        .args([
            "-q",
            "-n",
            "3000",
            "-c",
            "20",
            &format!("http://127.0.0.1:{port}/hello"),
        ])
        .stdout(Stdio::null()));
    assert_eq!(nginx.access_log_lines(), 3000);
    rx.wait_for(3000, Duration::from_secs(60), "3000 server spans", |s| {
        s.kind() == "server"
    });
    std::thread::sleep(Duration::from_millis(800));
    let (_, err) = agent.stop();
    assert_eq!(
        served_spans(&rx, port),
        3000,
        "one span per connection's request, none doubled"
    );
    assert!(rx
        .spans()
        .iter()
        .all(|s| s.attr("network.protocol.version") == Some("1.0")));
    let c = tests::agent::final_counters(&err);
    assert_eq!(c.get("tracker_conns_full"), None, "{c:?}");
}

/// SIGTERM during load: the agent exits cleanly within seconds and flushes what it built.
#[test]
fn sigterm_during_load_flushes() {
    let rx = Receiver::start();
    let port = free_port();
    let _nginx = Nginx::start(port, NGINX);
    let agent = Agent::start(Export::Http(&rx), &["--exe", "*/nginx"]);
    let load = hey(&format!("http://127.0.0.1:{port}/hello"), 5, 500);
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    let (_, err) = agent.stop();
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "stopped in {:?}",
        t.elapsed()
    );
    drop(load);
    let c = tests::agent::final_counters(&err);
    let created = c.get("spans_created").copied().unwrap_or(0);
    assert!(created > 100, "{c:?}");
    let exported = c.get("spans_exported").copied().unwrap_or(0);
    let dropped: u64 = ["spans_queue_full", "spans_export_failed", "spans_rejected"]
        .iter()
        .filter_map(|k| c.get(*k))
        .sum();
    assert_eq!(
        created,
        exported + dropped,
        "everything built was flushed or counted: {c:?}"
    );
    assert_eq!(
        served_spans(&rx, port) as u64,
        exported,
        "the receiver got what the agent says it exported"
    );
}

fn attached_agent_programs() -> usize {
    let out = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .expect("bpftool (installed by scripts/bootstrap.sh --test)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            let mut words = l.split_whitespace().skip_while(|w| *w != "name").skip(1);
            matches!(words.next(), Some("sys_enter_read" | "sock_recv_length"))
        })
        .count()
}

/// SIGKILL: no program stays loaded, and the traced server is unaffected.
#[test]
fn sigkill_leaves_nothing_attached() {
    let port = free_port();
    let _nginx = Nginx::start(port, NGINX);
    let before = attached_agent_programs();
    let agent = Agent::start(Export::Console, &["--exe", "*/nginx"]);
    assert_eq!(
        attached_agent_programs(),
        before + 2,
        "the agent's programs are loaded while it runs"
    );
    // SAFETY: killing our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
    wait_until(
        Duration::from_secs(10),
        "the kernel to release the programs",
        || attached_agent_programs() == before,
    );
    drop(agent);
    assert_eq!(
        curl(&[&format!("http://127.0.0.1:{port}/hello")]),
        "hello\n",
        "nginx unaffected"
    );
}

/// Requests from a traced client to a server nobody traces leave stitching records nobody
/// claims. Past the map's capacity (65,536) each new one evicts the oldest: every such eviction
/// is counted, and the client notices nothing.
#[test]
fn stitching_map_evictions_are_counted() {
    let rx = Receiver::start();
    let port = free_port();
    let nginx = Nginx::start(port, NGINX);
    let n = 72_000u64;
    // ab waits for a line on stdin, so that the agent selects its pid before it sends anything.
    let mut ab = Proc::spawn(
        Command::new("sh")
            .args([
                "-c",
                &format!("read go; exec ab -q -k -n {n} -c 1 http://127.0.0.1:{port}/hello"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null()),
    );
    let pid = ab.pid().to_string();
    let agent = Agent::start_env(
        Export::Grpc(&rx),
        &["--pid", &pid],
        &[("OTEL_TRACES_EXPORTER", "none")],
    );
    let t = Instant::now();
    {
        use std::io::Write;
        let mut stdin = ab.child.stdin.take().expect("ab stdin");
        stdin.write_all(b"go\n").expect("start ab");
    }
    let st = ab.child.wait().expect("ab");
    assert!(st.success(), "ab failed");
    println!("{n} requests in {:?}", t.elapsed());
    assert_eq!(nginx.access_log_lines(), n as usize);
    let (_, err) = agent.stop();
    let c = tests::agent::final_counters(&err);
    let get = |k: &str| c.get(k).copied().unwrap_or(0);
    let marked = get("kernel_stitch_marked");
    assert_eq!(marked, n, "{c:?}");
    assert_eq!(get("kernel_stitch_claimed"), 0, "{c:?}");
    // The map holds 65,536; it may start evicting up to the per-CPU free lists' slack early.
    let evicted = get("kernel_lru_evicted_stitch");
    let slack = 256 * std::thread::available_parallelism().map_or(1, |n| n.get() as u64) + 64;
    assert!(
        evicted + 65_536 >= marked && evicted + 65_536 <= marked + 2 * slack,
        "evictions {evicted} for {marked} unclaimed records: {c:?}"
    );
}

/// 20,000 connections each send 15 KiB of a request head that never ends (1 KiB a write, so
/// the kernel copies every byte), then trickle one byte a second, while normal traffic runs.
/// The agent's memory stays under a ceiling well below the DaemonSet's 512 MiB limit (the
/// incomplete heads share one 64 MiB budget, the event queue another), the normal traffic is
/// still traced, and the heads given up are counted.
#[test]
fn twenty_thousand_slow_heads_stay_within_memory() {
    const CEILING_MIB: f64 = 384.0;
    let rx = Receiver::start();
    // Two servers and two clients of 10,000 connections each: a process here may hold at most
    // 20,000 open files (hard limit, and no CAP_SYS_RESOURCE to raise it).
    let slow_ports = [free_port(), free_port()];
    let _servers: Vec<Proc> = slow_ports
        .iter()
        .map(|p| {
            Proc::spawn(python("slow_heads.py", &["server", &p.to_string()]).stdout(Stdio::null()))
        })
        .collect();
    for p in slow_ports {
        wait_port(p);
    }
    let nginx = Nginx::start(free_port(), NGINX);
    let agent = Agent::start(
        Export::Grpc(&rx),
        &[
            "--port",
            &slow_ports[0].to_string(),
            "--port",
            &slow_ports[1].to_string(),
            "--port",
            &nginx.port.to_string(),
        ],
    );
    let pid = agent.pid();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak: f64 = 0.0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_mib(pid));
                std::thread::sleep(Duration::from_millis(200));
            }
            peak
        })
    };
    let t = Instant::now();
    let mut clients: Vec<Proc> = slow_ports
        .iter()
        .map(|p| {
            Proc::spawn(
                python(
                    "slow_heads.py",
                    &["client", &p.to_string(), "10000", "15", "10"],
                )
                .stdout(Stdio::piped()),
            )
        })
        .collect();
    // Normal traffic while the slow heads pile up.
    std::thread::sleep(Duration::from_secs(8));
    run(Command::new("hey")
        .args([
            "-n",
            "200",
            "-c",
            "4",
            &format!("http://127.0.0.1:{}/hello", nginx.port),
        ])
        .stdout(Stdio::null()));
    for client in &mut clients {
        let st = loop {
            if let Some(st) = client.child.try_wait().expect("client") {
                break st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(240),
                "the slow clients stalled"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let mut out = String::new();
        std::io::Read::read_to_string(client.child.stdout.as_mut().unwrap(), &mut out).unwrap();
        assert!(st.success() && out.contains("done 10000"), "{out}");
    }
    rx.wait_for(
        200,
        Duration::from_secs(30),
        "200 nginx server spans",
        |s| s.kind() == "server" && s.attr("url.path") == Some("/hello"),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    let (_, err) = agent.stop();
    let c = tests::agent::final_counters(&err);
    println!(
        "20,000 slow heads in {:?}: agent peak RSS {peak:.0} MiB; counters {c:?}",
        t.elapsed()
    );
    assert!(peak > 0.0 && peak < CEILING_MIB, "peak RSS {peak:.0} MiB");
    let given_up = c.get("http_head_budget_drops").copied().unwrap_or(0)
        + c.get("events_bytes_full").copied().unwrap_or(0)
        + c.get("kernel_ringbuf_full_events").copied().unwrap_or(0);
    assert!(
        given_up > 0,
        "nothing given up: the test did not load the agent: {c:?}"
    );
}

/// The span export queue is bounded in bytes as well as in spans: with the backend down and
/// requests whose URLs are 4 KiB long, a 256 KiB budget fills long before the 8192-span bound,
/// and every span is either exported, refused by the byte budget or dropped after retries, each
/// counted.
#[test]
fn span_queue_is_bounded_in_bytes() {
    let port = free_port();
    let nginx = Nginx::start(port, "    location / { return 200 \"ok\\n\"; }\n");
    let down = free_port();
    let agent = Agent::start_env(
        Export::Console,
        &["--exe", "*/nginx"],
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                &format!("http://127.0.0.1:{down}"),
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1"),
            ("BEHOLDER_SPAN_QUEUE_MAX_BYTES", "262144"),
        ],
    );
    let long = "a".repeat(4096);
    let urls: Vec<String> = (0..300)
        .map(|i| format!("http://127.0.0.1:{port}/{i}/{long}"))
        .collect();
    // One curl for all 300 requests (keep-alive), bounded in time.
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "60", "-o", "/dev/null"]);
    for u in &urls {
        cmd.arg(u);
    }
    run(&mut cmd);
    assert_eq!(nginx.access_log_lines(), 300);
    std::thread::sleep(Duration::from_secs(2));
    let (_, err) = agent.stop();
    let c = tests::agent::final_counters(&err);
    let get = |k: &str| c.get(k).copied().unwrap_or(0);
    assert_eq!(get("spans_created"), 300, "{c:?}");
    assert!(
        (230..300).contains(&get("spans_queue_bytes_full")),
        "about 50 spans of 5 KiB fit in 256 KiB (and one batch and four requests are held by the \
         exporter, whatever the pace of the tracker's hand-overs); the rest are refused and \
         counted: {c:?}"
    );
    assert_eq!(
        get("spans_queue_full"),
        0,
        "the 8192-span bound was never reached: {c:?}"
    );
    assert_eq!(
        get("spans_queue_bytes_full") + get("spans_export_failed") + get("spans_exported"),
        300,
        "every span accounted for: {c:?}"
    );
}
