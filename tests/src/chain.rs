//! A chain of real services that know nothing about tracing, for the propagation tests:
//! `curl` -> nginx (`proxy_pass`, forwards headers) -> Python `ThreadingHTTPServer` (calls on with
//! urllib, forwards nothing) -> Node `http` (calls on with `http.get`, forwards nothing) -> nginx
//! answering itself. Front (curl, proxy) and back (the rest) may live in two network namespaces
//! joined by a veth pair, standing for two hosts.
use std::{
    collections::HashMap,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    fixture, free_port,
    programs::Proc,
    receiver::{RSpan, Receiver},
    wait_until,
};

/// Service names (`OTEL_SERVICE_NAME` in each program's environment) along the chain.
pub const PROXY: &str = "chain-proxy";
pub const PY: &str = "chain-py";
pub const NODE: &str = "chain-node";
pub const LEAF: &str = "chain-leaf";

/// Where the two halves of the chain run.
#[derive(Clone, Default)]
pub struct Layout {
    /// Network namespace of curl and the proxy (None: this one).
    pub front_ns: Option<String>,
    /// Network namespace of the Python, Node and leaf services.
    pub back_ns: Option<String>,
    /// Address of the back half as the front reaches it.
    pub back_ip: String,
}

impl Layout {
    pub fn local() -> Layout {
        Layout {
            back_ip: "127.0.0.1".into(),
            ..Layout::default()
        }
    }
}

/// A command, run inside `ns` when given.
pub fn in_ns(ns: &Option<String>, program: &str) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}

/// Waits until `host:port` accepts connections inside `ns`.
pub fn wait_tcp(ns: &Option<String>, host: &str, port: u16) {
    wait_until(
        Duration::from_secs(15),
        &format!("a listener on {host}:{port}"),
        || {
            in_ns(ns, "bash")
                .args(["-c", &format!("exec 3<>/dev/tcp/{host}/{port}")])
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        },
    );
}

fn nginx(ns: &Option<String>, tag: &str, service: &str, servers: &str) -> (Proc, PathBuf) {
    let dir = std::env::temp_dir().join(format!("chain-nginx-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tmp")).expect("nginx dir");
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n\
           fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n{servers}\n}}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).expect("nginx conf");
    let p = Proc::spawn(
        in_ns(ns, "nginx")
            .args(["-p", &dir.to_string_lossy(), "-c", "nginx.conf"])
            .env("OTEL_SERVICE_NAME", service)
            .stdout(Stdio::null()),
    );
    (p, dir)
}

pub struct Chain {
    pub layout: Layout,
    pub proxy_port: u16,
    pub py_port: u16,
    pub node_port: u16,
    pub leaf_port: u16,
    _procs: Vec<Proc>,
}

impl Chain {
    /// Starts every service (after the agent, so every connection is new to it).
    pub fn start(layout: Layout) -> Chain {
        let (proxy_port, py_port, node_port, leaf_port) =
            (free_port(), free_port(), free_port(), free_port());
        let back = &layout.back_ns;
        let (leaf, _) = nginx(
            back,
            &format!("leaf-{leaf_port}"),
            LEAF,
            &format!(
                "  server {{ listen 127.0.0.1:{leaf_port}; location / {{ return 200 \"leaf\\n\"; }} }}"
            ),
        );
        let node = Proc::spawn(
            in_ns(back, "node")
                .arg(fixture("chain_node.js"))
                .args([
                    "127.0.0.1",
                    &node_port.to_string(),
                    &format!("http://127.0.0.1:{leaf_port}"),
                ])
                .env("OTEL_SERVICE_NAME", NODE)
                .stdout(Stdio::null()),
        );
        let py = Proc::spawn(
            in_ns(back, "python3")
                .arg(fixture("chain_service.py"))
                .args([
                    &layout.back_ip,
                    &py_port.to_string(),
                    &format!("http://127.0.0.1:{node_port}"),
                ])
                .env("OTEL_SERVICE_NAME", PY)
                .stdout(Stdio::null()),
        );
        let (proxy, _) = nginx(
            &layout.front_ns,
            &format!("proxy-{proxy_port}"),
            PROXY,
            &format!(
                "  server {{ listen 127.0.0.1:{proxy_port}; location / {{ proxy_pass http://{}:{py_port}; }} }}",
                layout.back_ip
            ),
        );
        wait_tcp(back, "127.0.0.1", leaf_port);
        wait_tcp(back, "127.0.0.1", node_port);
        wait_tcp(&layout.front_ns, &layout.back_ip, py_port);
        wait_tcp(&layout.front_ns, "127.0.0.1", proxy_port);
        Chain {
            layout,
            proxy_port,
            py_port,
            node_port,
            leaf_port,
            _procs: vec![proxy, py, node, leaf],
        }
    }

    /// One request into the chain with curl (in the front namespace); returns the body.
    pub fn curl(&self, path: &str, headers: &[&str]) -> String {
        let mut c = in_ns(&self.layout.front_ns, "curl");
        c.args(["-sS", "--max-time", "20"]);
        for h in headers {
            c.args(["-H", h]);
        }
        c.arg(format!("http://127.0.0.1:{}{path}", self.proxy_port));
        let out = c.output().expect("curl");
        assert!(
            out.status.success(),
            "curl {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The answer every request through the whole chain gets.
pub const CHAIN_BODY: &str = "py[node[leaf]]\n";

/// The spans of one request (by its unique `url.path`), in chain order, once all arrived:
/// curl CLIENT, proxy SERVER, proxy CLIENT, py SERVER, py CLIENT, node SERVER, node CLIENT,
/// leaf SERVER.
pub const HOPS: [(&str, &str); 8] = [
    ("curl", "client"),
    (PROXY, "server"),
    (PROXY, "client"),
    (PY, "server"),
    (PY, "client"),
    (NODE, "server"),
    (NODE, "client"),
    (LEAF, "server"),
];

/// Groups spans by `url.path`.
pub fn by_path(spans: &[RSpan]) -> HashMap<String, Vec<RSpan>> {
    let mut m: HashMap<String, Vec<RSpan>> = HashMap::new();
    for s in spans {
        if let Some(p) = s.attr("url.path") {
            m.entry(p.to_owned()).or_default().push(s.clone());
        }
    }
    m
}

/// Checks that `spans` (all spans of one request path) form one trace with every parent link of
/// the chain right; `root_parent` is the parent id curl's span must have ("" for a root).
pub fn check_trace(path: &str, spans: &[RSpan], root_parent: &str) -> Result<String, String> {
    let mut ordered = Vec::new();
    for (service, kind) in HOPS {
        let found: Vec<&RSpan> = spans
            .iter()
            .filter(|s| s.res("service.name") == Some(service) && s.kind() == kind)
            .collect();
        if found.len() != 1 {
            return Err(format!(
                "{path}: {} {service} {kind} spans (want 1); spans: {:?}",
                found.len(),
                describe(spans)
            ));
        }
        ordered.push(found[0]);
    }
    if spans.len() != HOPS.len() {
        return Err(format!(
            "{path}: {} spans, want {}: {:?}",
            spans.len(),
            HOPS.len(),
            describe(spans)
        ));
    }
    let trace = ordered[0].trace_id();
    if let Some(s) = ordered.iter().find(|s| s.trace_id() != trace) {
        return Err(format!(
            "{path}: {} {} is in trace {}, not {trace}: {:?}",
            s.res("service.name").unwrap_or("?"),
            s.kind(),
            s.trace_id(),
            describe(spans)
        ));
    }
    if ordered[0].parent_id() != root_parent {
        return Err(format!(
            "{path}: curl's client span has parent {:?}, want {root_parent:?}",
            ordered[0].parent_id()
        ));
    }
    for w in ordered.windows(2) {
        if w[1].parent_id() != w[0].span_id() {
            return Err(format!(
                "{path}: {} {} has parent {}, want {} ({} {}): {:?}",
                w[1].res("service.name").unwrap_or("?"),
                w[1].kind(),
                w[1].parent_id(),
                w[0].span_id(),
                w[0].res("service.name").unwrap_or("?"),
                w[0].kind(),
                describe(spans)
            ));
        }
    }
    Ok(trace)
}

/// Checks one request's spans through the chain without requiring every in-process link: each
/// SERVER span must be the child of the CLIENT span that called it (stitching is exact), and
/// each CLIENT span must be either the child of its own service's SERVER span for this request
/// (`beholder.link.method=thread`) or have no parent at all, saying why (`ambiguous` or
/// `none`). Anything else is a wrong parent. Returns how many of the three in-process hops
/// linked.
pub fn check_honest(path: &str, spans: &[RSpan]) -> Result<usize, String> {
    let mut ordered = Vec::new();
    for (service, kind) in HOPS {
        let found: Vec<&RSpan> = spans
            .iter()
            .filter(|s| s.res("service.name") == Some(service) && s.kind() == kind)
            .collect();
        if found.len() != 1 {
            return Err(format!(
                "{path}: {} {service} {kind} spans (want 1); spans: {:?}",
                found.len(),
                describe(spans)
            ));
        }
        ordered.push(found[0]);
    }
    let mut linked = 0;
    for w in ordered.windows(2) {
        let (caller, s) = (w[0], w[1]);
        let what = |s: &RSpan| format!("{} {}", s.res("service.name").unwrap_or("?"), s.kind());
        if s.kind() == "server" || (s.parent_id() == caller.span_id()) {
            if s.parent_id() != caller.span_id() || s.trace_id() != caller.trace_id() {
                return Err(format!(
                    "{path}: {} is not the child of {}: {:?}",
                    what(s),
                    what(caller),
                    describe(spans)
                ));
            }
            if s.kind() == "client" {
                let method = s.attr("beholder.link.method").unwrap_or("");
                if method != "thread" {
                    return Err(format!("{path}: {} linked by {method:?}", what(s)));
                }
                linked += 1;
            }
        } else {
            let method = s.attr("beholder.link.method").unwrap_or("");
            if !s.parent_id().is_empty() || !matches!(method, "ambiguous" | "none") {
                return Err(format!(
                    "{path}: WRONG PARENT: {} has parent {:?} ({method}), not {} {}: {:?}",
                    what(s),
                    s.parent_id(),
                    what(caller),
                    caller.span_id(),
                    describe(spans)
                ));
            }
        }
    }
    Ok(linked)
}

fn describe(spans: &[RSpan]) -> Vec<String> {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} {} trace={} span={} parent={}",
                s.res("service.name").unwrap_or("?"),
                s.kind(),
                s.trace_id(),
                s.span_id(),
                s.parent_id()
            )
        })
        .collect()
}

/// Waits until every path in `paths` has all 8 spans (or the timeout passes).
pub fn wait_chains(rx: &Receiver, paths: &[String], timeout: Duration) {
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        let m = by_path(&rx.spans());
        if paths
            .iter()
            .all(|p| m.get(p).is_some_and(|v| v.len() >= HOPS.len()))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
