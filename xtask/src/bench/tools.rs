//! Processes a benchmark drives: nginx, the agent, the OTLP sink, wrk and hey; and what /proc
//! says about them.
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub fn wait_port(port: u16) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on {port}")
}

pub struct Nginx {
    pub _guard: Guard,
    pub port: u16,
    /// The same location over HTTP/2 cleartext (`listen ... http2`).
    pub h2_port: u16,
    /// The same location over TLS (HTTP/1.1, a throwaway self-signed certificate).
    pub tls_port: u16,
    pub dir: PathBuf,
}

impl Nginx {
    pub fn start(dir: &Path) -> Result<Nginx> {
        let port = free_port()?;
        let h2_port = free_port()?;
        let tls_port = free_port()?;
        std::fs::create_dir_all(dir.join("logs"))?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        let status = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout"])
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .stderr(Stdio::null())
            .status()
            .context("running openssl for the TLS server's certificate")?;
        anyhow::ensure!(status.success(), "openssl req failed: {status}");
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {d}/logs/error.log;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log {d}/logs/access.log;\n  keepalive_requests 10000000;\n  client_body_temp_path {d}/tmp;\n\
               proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n\
               server {{\n    listen 127.0.0.1:{port};\n    location = /hello {{ return 200 \"hello\\n\"; }}\n  }}\n\
               server {{\n    listen 127.0.0.1:{h2_port} http2;\n    location = /hello {{ return 200 \"hello\\n\"; }}\n  }}\n\
               server {{\n    listen 127.0.0.1:{tls_port} ssl http2;\n    ssl_certificate {d}/cert.pem;\n    ssl_certificate_key {d}/key.pem;\n    location = /hello {{ return 200 \"hello\\n\"; }}\n  }}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let child = Command::new("nginx")
            .args([
                "-p",
                &d.to_string(),
                "-c",
                &dir.join("nginx.conf").to_string_lossy(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let n = Nginx {
            _guard: Guard(child),
            port,
            h2_port,
            tls_port,
            dir: dir.to_path_buf(),
        };
        wait_port(port)?;
        wait_port(h2_port)?;
        wait_port(tls_port)?;
        Ok(n)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hello", self.port)
    }

    pub fn h2_url(&self) -> String {
        format!("http://127.0.0.1:{}/hello", self.h2_port)
    }

    pub fn tls_url(&self) -> String {
        format!("https://127.0.0.1:{}/hello", self.tls_port)
    }

    /// Requests served since the last call (counts and truncates the access log).
    pub fn take_requests(&self) -> Result<u64> {
        let p = self.dir.join("logs/access.log");
        let n = std::fs::read_to_string(&p)
            .map(|s| s.lines().count() as u64)
            .unwrap_or(0);
        std::fs::write(&p, "")?;
        // nginx keeps appending at its own offset: reopen its logs.
        unsafe { libc::kill(self._guard.0.id() as i32, libc::SIGUSR1) };
        std::thread::sleep(Duration::from_millis(200));
        Ok(n)
    }
}

pub struct Agent {
    pub guard: Guard,
    pub stderr: Arc<Mutex<String>>,
    /// From spawning the agent to its "tracing" line.
    pub start_ms: u64,
}

/// A `key=<integer>` field of the agent's log line that contains `line`.
fn log_field(stderr: &str, line: &str, key: &str) -> Option<u64> {
    let l = stderr.lines().find(|l| l.contains(line))?;
    let at = l.find(&format!("{key}="))? + key.len() + 1;
    l[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

impl Agent {
    /// The agent with the selection `select` (`--exe '*/nginx'`, `--port P`).
    pub fn start_for(bin: &Path, select: &[&str], env: &[(&str, String)]) -> Result<Agent> {
        let mut cmd = Command::new(bin);
        cmd.args(select)
            .args(["--metrics-addr", "off"])
            .env("NO_COLOR", "1")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let t0 = Instant::now();
        let mut child = cmd.spawn().context("starting the agent")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stderr.take().context("agent stderr")?;
        let s = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut s = s.lock().expect("lock");
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut a = Agent {
            guard: Guard(child),
            stderr,
            start_ms: 0,
        };
        let end = Instant::now() + Duration::from_secs(30);
        while !a
            .stderr
            .lock()
            .expect("lock")
            .contains("tracing HTTP/1.x and HTTP/2 on")
        {
            if Instant::now() > end {
                bail!("agent did not start:\n{}", a.stderr.lock().expect("lock"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        a.start_ms = t0.elapsed().as_millis() as u64;
        Ok(a)
    }

    /// Where its start-up went (the agent's `start-up:` log line): object and maps, program
    /// verification, tracepoint attachment, in ms; and the whole start to "tracing".
    pub fn startup(&self) -> serde_json::Value {
        let err = self.stderr.lock().expect("lock");
        let f = |k: &str| log_field(&err, "start-up:", k);
        serde_json::json!({
            "start_ms": self.start_ms,
            "object_ms": f("maps_and_object_ms"),
            "verify_ms": f("verify_ms"),
            "attach_ms": f("attach_ms"),
        })
    }

    /// Milliseconds from its spawn to its "tracing" line.
    pub fn start_ms(&self) -> u64 {
        self.start_ms
    }

    pub fn pid(&self) -> u32 {
        self.guard.0.id()
    }

    /// SIGTERM, wait, and return the final counters it logged.
    pub fn stop(mut self) -> Result<Vec<(String, u64)>> {
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        let status = self.guard.0.wait()?;
        std::thread::sleep(Duration::from_millis(100));
        let err = self.stderr.lock().expect("lock").clone();
        if !status.success() {
            bail!("agent exited with {status}:\n{err}");
        }
        let line = err
            .lines()
            .find_map(|l| l.split_once("final counters: ").map(|(_, c)| c.to_owned()))
            .unwrap_or_default();
        Ok(line
            .split_whitespace()
            .filter_map(|kv| {
                kv.split_once('=')
                    .and_then(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            })
            .collect())
    }
}

/// CPU seconds (user + system) a process has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// (VmRSS, VmHWM) in MiB.
/// The agent's CPU seconds so far (0 without an agent) and the kernel's eBPF run totals.
pub fn cost_now(agent: Option<u32>) -> (f64, (u64, u64)) {
    (agent.map(cpu_seconds).unwrap_or(0.0), bpf_prog_stats())
}

pub fn rss_mib(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

pub struct LoadResult {
    pub requests: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

fn to_us(v: &str) -> Option<f64> {
    let (num, unit) = v
        .trim()
        .split_at(v.trim().find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        _ => return None,
    })
}

/// Saturating keep-alive load with wrk.
pub fn wrk(url: &str, secs: u32, conns: u32) -> Result<LoadResult> {
    run_wrk(url, secs, conns, &[])
}

/// Paced keep-alive load with wrk: each of `conns` connections waits `delay_ms` after every
/// response (wrk's Lua `delay()` hook), which holds the rate well below saturation while keeping
/// wrk's microsecond latency histogram.
pub fn wrk_paced(url: &str, secs: u32, conns: u32, delay_ms: u32) -> Result<LoadResult> {
    let script = std::env::temp_dir().join(format!("wrk-delay-{delay_ms}.lua"));
    std::fs::write(
        &script,
        format!("function delay()\n  return {delay_ms}\nend\n"),
    )?;
    run_wrk(url, secs, conns, &["-s", &script.to_string_lossy()])
}

fn run_wrk(url: &str, secs: u32, conns: u32, extra: &[&str]) -> Result<LoadResult> {
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
        ])
        .args(extra)
        .arg(url)
        .output()
        .context("running wrk")?;
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

fn parse_wrk(text: &str) -> Result<LoadResult> {
    let find = |prefix: &str| {
        text.lines().find_map(|l| {
            l.trim()
                .strip_prefix(prefix)
                .map(str::trim)
                .map(str::to_owned)
        })
    };
    let requests = text
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in")
                .and_then(|(n, _)| n.trim().parse().ok())
        })
        .context(format!("wrk output: {text}"))?;
    Ok(LoadResult {
        requests,
        rps: find("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        p50_us: find("50%").and_then(|v| to_us(&v)).unwrap_or(0.0),
        p99_us: find("99%").and_then(|v| to_us(&v)).unwrap_or(0.0),
    })
}

/// Saturating HTTP/2 cleartext load with h2load: `clients` connections with `streams` requests
/// in flight on each, for `secs` seconds. h2load reports no percentiles: `p50_us` holds the mean
/// time per request, `p99_us` its mean plus two standard deviations.
pub fn h2load(url: &str, secs: u32, clients: u32, streams: u32) -> Result<LoadResult> {
    h2load_with(url, secs, clients, streams, &[])
}

/// As `h2load`, with more h2load arguments (headers, a request body).
pub fn h2load_with(
    url: &str,
    secs: u32,
    clients: u32,
    streams: u32,
    extra: &[&str],
) -> Result<LoadResult> {
    let out = Command::new("h2load")
        .args([
            "-c",
            &clients.to_string(),
            "-m",
            &streams.to_string(),
            "-D",
            &secs.to_string(),
        ])
        .args(extra)
        .arg(url)
        .output()
        .context("running h2load")?;
    parse_h2load(&String::from_utf8_lossy(&out.stdout))
}

/// Unary gRPC load on `port`'s `shop.v1.Catalog/Get` (grpc_service.py): h2load posting one
/// length-prefixed message per request, with gRPC's headers.
pub fn grpc_load(work: &Path, port: u16, secs: u32) -> Result<LoadResult> {
    let body = work.join("grpc-get.bin");
    // Not compressed, 2 bytes long: "42".
    std::fs::write(&body, [0, 0, 0, 0, 2, b'4', b'2'])?;
    h2load_with(
        &format!("http://127.0.0.1:{port}/shop.v1.Catalog/Get"),
        secs,
        4,
        16,
        &[
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-d",
            &body.to_string_lossy(),
        ],
    )
}

fn parse_h2load(text: &str) -> Result<LoadResult> {
    // "requests: 1000 total, 1000 started, 1000 done, 1000 succeeded, 0 failed, ..."
    let requests = text
        .lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("requests:")?;
            rest.split(',')
                .find_map(|p| p.trim().strip_suffix(" succeeded"))
                .and_then(|n| n.trim().parse().ok())
        })
        .context(format!("h2load output: {text}"))?;
    // "finished in 4.00s, 12345.67 req/s, 1.23MB/s"
    let rps = text
        .lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("finished in ")?;
            rest.split(',')
                .nth(1)?
                .trim()
                .strip_suffix(" req/s")?
                .parse()
                .ok()
        })
        .unwrap_or(0.0);
    // "time for request:   120us   4.12ms   300us   150us   85.00%" (min max mean sd +/- sd)
    let times: Vec<f64> = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("time for request:"))
        .map(|r| r.split_whitespace().filter_map(to_us).collect())
        .unwrap_or_default();
    let (mean, sd) = (
        times.get(2).copied().unwrap_or(0.0),
        times.get(3).copied().unwrap_or(0.0),
    );
    Ok(LoadResult {
        requests,
        rps,
        p50_us: mean,
        p99_us: mean + 2.0 * sd,
    })
}

/// Load at a fixed rate with hey (`conns` workers of `rate / conns` req/s each, keep-alive).
pub fn hey(url: &str, secs: u32, rate: u32, conns: u32) -> Result<LoadResult> {
    let per = (rate / conns).max(1);
    let out = Command::new("hey")
        .args([
            "-z",
            &format!("{secs}s"),
            "-c",
            &conns.to_string(),
            "-q",
            &per.to_string(),
            url,
        ])
        .output()
        .context("running hey")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let pct = |p: &str| {
        text.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(&format!("{p}% in "))
                    .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
            })
            .map(|s| s * 1e6)
            .unwrap_or(0.0)
    };
    let requests = text
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("[200]")
                .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        })
        .sum();
    let rps = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Requests/sec:")
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0);
    Ok(LoadResult {
        requests,
        rps,
        p50_us: pct("50"),
        p99_us: pct("99"),
    })
}

/// Spans of `key` (`service/kind`) the sink counted.
/// One `GET /hello` to 127.0.0.1:`port` (HTTP/1.0, so the server closes), its answer read and
/// dropped; errors are ignored (the caller watches for the span, not the answer).
pub fn get_once(port: u16) {
    use std::io::{Read, Write};
    if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(b"GET /hello HTTP/1.0\r\nHost: bench\r\n\r\n");
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
}

pub fn sink_count(http_port: u16, key: &str) -> u64 {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", http_port)) else {
        return 0;
    };
    use std::io::{Read, Write};
    let _ = s.write_all(b"GET /count HTTP/1.0\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key} "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Total eBPF run time and run count of the agent's programs (needs `kernel.bpf_stats_enabled`).
pub fn bpf_prog_stats() -> (u64, u64) {
    let per = bpf_per_program();
    (
        per.values().map(|v| v.0).sum(),
        per.values().map(|v| v.1).sum(),
    )
}

/// Run time (ns) and run count of each of the agent's programs, by name.
pub fn bpf_per_program() -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut m = std::collections::BTreeMap::new();
    let Ok(out) = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
    else {
        return m;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return m;
    };
    for p in v.as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or("");
        // Every program of the agent: syscall and sock tracepoints, the stitching raw
        // tracepoint, the exit hook, the carriers (`out_*`, `tcp_option`), the uprobes on
        // OpenSSL, Go, Python and tokio, and the bench's floor. The HTTP/2 walkers run as
        // tail calls, whose time the kernel charges to their caller.
        let ours = [
            "sys_",
            "sock_",
            "tcp_",
            "sched_process",
            "out_",
            "ssl_",
            "go_",
            "py_",
            "tokio_",
            "floor_",
        ];
        if ours.iter().any(|p| name.starts_with(p)) {
            let e = m.entry(name.to_owned()).or_insert((0, 0));
            e.0 += p["run_time_ns"].as_u64().unwrap_or(0);
            e.1 += p["run_cnt"].as_u64().unwrap_or(0);
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2load_output_is_read() {
        let text = "finished in 4.00s, 12345.50 req/s, 1.23MB/s\n\
                    requests: 49382 total, 49382 started, 49382 done, 49380 succeeded, 2 failed, 0 errored, 0 timeout\n\
                    time for request:      120us      4.12ms       300us       150us    85.00%\n";
        let r = parse_h2load(text).expect("parsed");
        assert_eq!(r.requests, 49380);
        assert_eq!(r.rps, 12345.5);
        assert_eq!((r.p50_us, r.p99_us), (300.0, 600.0));
    }
}
