//! The agent under test, as a child process.
use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::receiver::Receiver;

pub fn agent_bin() -> String {
    std::env::var("AGENT_BIN")
        .unwrap_or_else(|_| format!("{}/../target/release/agent", env!("CARGO_MANIFEST_DIR")))
}

pub struct Agent {
    child: Child,
    pub stdout: Arc<Mutex<String>>,
    pub stderr: Arc<Mutex<String>>,
}

/// How the agent exports.
pub enum Export<'a> {
    Console,
    Grpc(&'a Receiver),
    Http(&'a Receiver),
}

fn pump(r: impl Read + Send + 'static, into: Arc<Mutex<String>>, echo: bool) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if echo {
                eprintln!("  [agent] {line}");
            }
            let mut s = into.lock().expect("lock");
            s.push_str(&line);
            s.push('\n');
        }
    });
}

impl Agent {
    /// Starts the agent and waits until its programs are attached.
    pub fn start(export: Export<'_>, args: &[&str]) -> Agent {
        Self::start_env(export, args, &[])
    }

    pub fn start_env(export: Export<'_>, args: &[&str], env: &[(&str, &str)]) -> Agent {
        Self::start_as(export, &[], args, env)
    }

    /// Starts the agent through `prefix` (a program and its arguments that then run the agent,
    /// such as `setpriv ... --`).
    pub fn start_as(
        export: Export<'_>,
        prefix: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        crate::require_root();
        let mut cmd = match prefix.split_first() {
            Some((p, rest)) => {
                let mut c = Command::new(p);
                c.args(rest).arg(agent_bin());
                c
            }
            None => Command::new(agent_bin()),
        };
        cmd.args(args);
        if !args.contains(&"--metrics-addr") {
            cmd.args(["--metrics-addr", "off"]);
        }
        cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .env(
                "AGENT_LOG",
                std::env::var("TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match export {
            Export::Console => {}
            Export::Grpc(r) => {
                cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", r.grpc))
                    .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
            }
            Export::Http(r) => {
                cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", r.http))
                    .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf");
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "starting {}: {e} (build it with `cargo xtask build`)",
                agent_bin()
            )
        });
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        pump(child.stdout.take().expect("stdout"), stdout.clone(), false);
        pump(child.stderr.take().expect("stderr"), stderr.clone(), true);
        let mut agent = Agent {
            child,
            stdout,
            stderr,
        };
        let start = std::time::Instant::now();
        loop {
            if agent.stderr().contains("tracing HTTP/1.x and HTTP/2 on") {
                break;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!(
                    "agent exited during start-up ({status}):\n{}",
                    agent.stderr()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "agent not ready after 30 s:\n{}",
                agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    /// The value of counter `name` (its Prometheus name, such as
    /// `agent_kernel_tls_unbound_total`) on the agent's metrics endpoint at `127.0.0.1:port`
    /// (the agent started with `--metrics-addr 127.0.0.1:port`). Kernel counters there are
    /// read from the kernel once a second.
    pub fn metric(port: u16, name: &str) -> u64 {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            .expect("metrics request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("metrics response");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the agent's metrics:\n{text}"))
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("lock").clone()
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().expect("lock").clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait for a clean exit (the agent flushes what is queued).
    pub fn stop(mut self) -> (String, String) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = std::time::Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(
                    status.success(),
                    "agent exited with {status}:\n{}",
                    self.stderr()
                );
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "agent did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        (self.stdout(), self.stderr())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The counters the agent logs at exit (`final counters: name=value ...`). Panics when the agent
/// logged no such line (it did not stop cleanly): a missing counter must never read as zero.
pub fn final_counters(stderr: &str) -> std::collections::HashMap<String, u64> {
    let tail: String = stderr.lines().rev().take(20).collect::<Vec<_>>().join("\n");
    stderr
        .lines()
        .find_map(|l| l.split_once("final counters: ").map(|(_, c)| c.to_owned()))
        .unwrap_or_else(|| panic!("the agent logged no final counters; last lines:\n{tail}"))
        .split_whitespace()
        .filter_map(|kv| {
            kv.split_once('=')
                .and_then(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        })
        .collect()
}
