//! Real programs the tests trace: nginx, Python servers and clients, curl, wrk.
use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Proc { child }
    }
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child; SIGTERM first so servers exit cleanly.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        std::thread::sleep(Duration::from_millis(50));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Nginx {
    _proc: Proc,
    pub port: u16,
    pub dir: PathBuf,
}

impl Nginx {
    /// nginx on 127.0.0.1:`port` with `locations` inside its server block.
    pub fn start(port: u16, locations: &str) -> Nginx {
        Nginx::start_listening(port, "", locations)
    }

    /// As `start`, speaking HTTP/2 over cleartext (h2c with prior knowledge) on `port`.
    pub fn start_h2c(port: u16, locations: &str) -> Nginx {
        Nginx::start_listening(port, " http2", locations)
    }

    /// As `start`, over TLS (HTTP/1.1) with `pki`'s server certificate. nginx uses the system's
    /// OpenSSL (`libssl.so.3`).
    pub fn start_tls(port: u16, pki: &crate::pki::Pki, locations: &str) -> Nginx {
        Nginx::start_listening(port, " ssl", &format!("{}{locations}", tls_server(pki)))
    }

    /// As `start_tls`, speaking HTTP/2 over TLS (ALPN `h2`).
    pub fn start_tls_h2(port: u16, pki: &crate::pki::Pki, locations: &str) -> Nginx {
        Nginx::start_listening(
            port,
            " ssl http2",
            &format!("{}{locations}", tls_server(pki)),
        )
    }

    pub fn start_listening(port: u16, listen: &str, locations: &str) -> Nginx {
        let dir = std::env::temp_dir().join(format!("nginx-test-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("logs")).expect("nginx dir");
        std::fs::create_dir_all(dir.join("html")).expect("nginx html");
        std::fs::write(
            dir.join("html/index.html"),
            "<html>hello from nginx</html>\n",
        )
        .expect("index");
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {d}/logs/error.log;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log {d}/logs/access.log;\n  keepalive_requests 1000000;\n  client_body_temp_path {d}/tmp;\n\
               proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n\
               server {{\n    listen 127.0.0.1:{port}{listen};\n    root {d}/html;\n{locations}\n  }}\n}}\n",
            d = dir.display()
        );
        std::fs::create_dir_all(dir.join("tmp")).expect("tmp");
        std::fs::write(dir.join("nginx.conf"), conf).expect("conf");
        let proc_ = Proc::spawn(
            Command::new("nginx")
                .args([
                    "-p",
                    &dir.to_string_lossy(),
                    "-c",
                    &dir.join("nginx.conf").to_string_lossy(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit()),
        );
        crate::wait_port(port);
        Nginx {
            _proc: proc_,
            port,
            dir,
        }
    }

    /// The nginx process (it runs without a master: this is its worker).
    pub fn pid(&self) -> u32 {
        self._proc.pid()
    }

    /// Writes a file of each size in `sizes` under `html/f/` (`<size>.bin`, bytes that differ
    /// along the file, so a shifted or repeated block changes its digest): the SHA-256 of each,
    /// by request path (`{prefix}/f/<size>.bin`).
    pub fn serve_files(
        &self,
        sizes: &[usize],
        prefix: &str,
    ) -> std::collections::HashMap<String, String> {
        std::fs::create_dir_all(self.dir.join("html/f")).expect("files dir");
        let mut sha = std::collections::HashMap::new();
        for &n in sizes {
            let data: Vec<u8> = (0..n as u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            let file = self.dir.join(format!("html/f/{n}.bin"));
            std::fs::write(&file, data).expect("file");
            sha.insert(format!("{prefix}/f/{n}.bin"), sha256(&file));
        }
        sha
    }

    /// Requests nginx logged (one line each).
    pub fn access_log_lines(&self) -> usize {
        std::fs::read_to_string(self.dir.join("logs/access.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn curl(args: &[&str]) -> String {
    String::from_utf8_lossy(
        &run(Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(args))
        .stdout,
    )
    .into_owned()
}

pub fn python(script: &str, args: &[&str]) -> Command {
    let mut c = Command::new("python3");
    c.arg(crate::fixture(script)).args(args);
    c
}

/// Builds the Go program in `fixtures/<name>/` (Debian's `golang-go`, offline: no modules, no
/// cgo, so a static binary with symbols) and returns its path. Built once per test binary run.
pub fn go_binary(name: &str) -> PathBuf {
    build_go(name, false)
}

/// As `go_binary`, stripped of its symbol table (`-ldflags=-s -w`), as release builds are: only
/// the `.gopclntab` names its functions.
pub fn go_binary_stripped(name: &str) -> PathBuf {
    build_go(name, true)
}

fn build_go(name: &str, stripped: bool) -> PathBuf {
    let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/go-fixtures");
    let out = out_dir.join(if stripped {
        format!("{name}-stripped")
    } else {
        name.to_owned()
    });
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all(&out_dir).expect("go fixture dir");
    let flags: &[&str] = if stripped { &["-ldflags=-s -w"] } else { &[] };
    run(Command::new("go")
        .arg("build")
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(crate::fixture(&format!("{name}/main.go")))
        .env("GO111MODULE", "off")
        .env("CGO_ENABLED", "0")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", out_dir.join("cache"))
        .env_remove("GOFLAGS"));
    out
}

/// The SHA-256 of a file, by `sha256sum`.
pub fn sha256(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_owned()
}

/// Waits for `child` at most until `deadline`: a stalled transfer fails the test.
/// A client that makes its first connection, prints "connected", then waits for a line on
/// stdin before going on (so that the agent can start in between), and ends by printing one
/// line: its report.
pub struct Waiting {
    child: Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Waiting {
    /// Spawns `cmd` and returns once it printed "connected".
    pub fn spawn(cmd: &mut Command) -> Waiting {
        use std::io::BufRead;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("client output");
        assert_eq!(line.trim(), "connected", "{cmd:?}");
        Waiting { child, out }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets the client go on, waits for it to end (within `within`, or it is killed and this
    /// panics) and returns its report line.
    pub fn release(mut self, within: Duration, what: &str) -> String {
        use std::io::{BufRead, Write};
        self.child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"go\n")
            .expect("go");
        // Waited for first: the time bound holds however the client fails (its one-line
        // report fits in the pipe).
        wait_bounded(&mut self.child, Instant::now() + within, what);
        let mut line = String::new();
        self.out.read_line(&mut line).expect("report");
        line
    }
}

pub fn wait_bounded(child: &mut std::process::Child, deadline: Instant, what: &str) {
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "{what} failed: {status}");
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} stalled: still running after its deadline");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// nginx directives for a TLS server block with `pki`'s certificate, whose `proxy_pass
/// https://` and `grpc_pass grpcs://` verify their upstream's certificate.
fn tls_server(pki: &crate::pki::Pki) -> String {
    format!(
        "    ssl_certificate {};\n    ssl_certificate_key {};\n{}",
        pki.server_cert.display(),
        pki.server_key.display(),
        tls_upstreams(pki)
    )
}

/// nginx directives that make `proxy_pass https://` and `grpc_pass grpcs://` verify their
/// upstream's certificate against `pki`'s CA (named `localhost`).
pub fn tls_upstreams(pki: &crate::pki::Pki) -> String {
    let ca = pki.ca.display();
    format!(
        "    proxy_ssl_trusted_certificate {ca};\n    proxy_ssl_verify on;\n    proxy_ssl_name localhost;\n\
         \x20   grpc_ssl_trusted_certificate {ca};\n    grpc_ssl_verify on;\n    grpc_ssl_name localhost;\n"
    )
}

/// Debian's etcd binaries (`etcd`, `etcdctl`), unpacked by `scripts/bootstrap.sh --test`.
pub fn etcd_bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/etcd/usr/bin")
        .join(name)
}

/// A one-member etcd serving clients on `127.0.0.1:<port>`: over TLS with `pki`'s server
/// certificate when given, else cleartext (h2c).
pub struct Etcd {
    _proc: Proc,
    /// `http://` or `https://127.0.0.1:<port>`.
    pub url: String,
}

impl Etcd {
    pub fn start(port: u16, tls: Option<&crate::pki::Pki>) -> Etcd {
        let peer = crate::free_port();
        let data = std::env::temp_dir().join(format!("etcd-test-{port}"));
        let _ = std::fs::remove_dir_all(&data);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new(etcd_bin("etcd"));
        cmd.args(["--name", "t", "--data-dir"]).arg(&data);
        if let Some(pki) = tls {
            cmd.arg("--cert-file")
                .arg(&pki.server_cert)
                .arg("--key-file")
                .arg(&pki.server_key);
        }
        let proc_ = Proc::spawn(
            cmd.args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("t={peer_url}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        );
        crate::wait_port(port);
        Etcd { _proc: proc_, url }
    }

    /// `rounds` times, each etcdctl run on a connection of its own: a put, a get of it, and a
    /// revoke of a lease that does not exist (NOT_FOUND), every answer checked.
    pub fn calls(&self, ca: Option<&std::path::Path>, rounds: usize) {
        for i in 0..rounds {
            let put = self.ctl(ca, &["put", &format!("key-{i}"), &format!("value-{i}")]);
            assert_eq!(String::from_utf8_lossy(&put.stdout).trim(), "OK", "{put:?}");
            let get = self.ctl(ca, &["get", &format!("key-{i}")]);
            assert!(
                String::from_utf8_lossy(&get.stdout).contains(&format!("value-{i}")),
                "{get:?}"
            );
            let revoke = self.ctl(ca, &["lease", "revoke", "1234"]);
            assert!(
                !revoke.status.success()
                    && String::from_utf8_lossy(&revoke.stderr).contains("lease not found"),
                "{revoke:?}"
            );
        }
    }

    /// etcdctl (API v3) against this etcd, trusting `ca` when given; at most 20 s.
    pub fn ctl(&self, ca: Option<&std::path::Path>, args: &[&str]) -> Output {
        let mut cmd = Command::new("timeout");
        cmd.arg("20")
            .arg(etcd_bin("etcdctl"))
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.url));
        if let Some(ca) = ca {
            cmd.arg(format!("--cacert={}", ca.display()));
        }
        cmd.args(args).output().expect("etcdctl")
    }
}
