//! Command line.
use std::net::SocketAddr;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "agent",
    version,
    about = "Traces HTTP traffic of unmodified programs with eBPF and exports OpenTelemetry spans.\n\n\
Export is configured with the standard OTEL_EXPORTER_OTLP_* variables; with no endpoint set, spans are printed to the console."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace (the default).
    Run(RunArgs),
    /// Report each kernel feature the agent needs and whether this host has it.
    Check,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Trace only these processes (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Trace only connections with this local or peer port (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Trace only processes whose executable path or name matches this glob, e.g. `*nginx*`
    /// (repeatable; new processes are picked up every 2 s).
    #[arg(long = "exe", value_name = "GLOB")]
    pub exe: Vec<String>,
    /// Bytes of each read/write copied from the kernel: enough for request and response heads.
    #[arg(long, value_name = "BYTES", default_value_t = agent_common::DEFAULT_PAYLOAD_LIMIT,
          value_parser = clap::value_parser!(u32).range(64..=agent_common::MAX_PAYLOAD as i64))]
    pub payload_limit: u32,
    /// Kernel ring buffer size in bytes (rounded up to a power of two).
    #[arg(long, value_name = "BYTES", default_value_t = 8 << 20)]
    pub ring_size: u32,
    /// How trace context crosses from a caller to its callee. `stitch` (default): between traced
    /// processes on this host, by connection and TCP sequence number, with no byte changed on the
    /// wire. `header`: also write a W3C `traceparent` into outgoing HTTP/1.x requests of selected
    /// processes (sock_ops + sk_msg; opt-in, see the README for why). `tcp-option`: stitching,
    /// plus the context in an experimental TCP option on the first segment of each request a
    /// selected process sends to another host, for the agent there (opt-in; both ends run the
    /// agent). `off`: nothing.
    #[arg(long, value_name = "stitch|tcp-option|header|off", default_value = "stitch", env = "BEHOLDER_INJECT",
          value_parser = parse_inject)]
    pub inject: Inject,
    /// Test aid: with `--inject tcp-option`, put the option on loopback connections too (where
    /// same-host stitching alone would do), so one host exercises the cross-host path.
    #[arg(long, hide = true, env = "BEHOLDER_TCP_OPTION_LOOPBACK")]
    pub tcp_option_loopback: bool,
    /// A bench aid (`cargo xtask bench`'s floor): attach programs that only run the process
    /// filter to the agent's tracepoints, and nothing else; no span comes out.
    #[arg(long, hide = true)]
    pub bench_floor: bool,
    /// Query strings in `url.full` and `url.query`: `redact` (default) reports the values of
    /// secret-looking keys as REDACTED; `drop` leaves query strings out entirely.
    #[arg(long, value_name = "redact|drop", default_value = "redact", env = "BEHOLDER_URL_QUERY",
          value_parser = parse_url_query)]
    pub url_query: crate::span::redact::QueryMode,
    /// Query keys whose values are redacted, comma-separated, matched case-insensitively as
    /// substrings; added to the defaults (token, key, secret, password, passwd, auth, session,
    /// sig, credential).
    #[arg(
        long,
        value_name = "KEYS",
        env = "BEHOLDER_REDACT_KEYS",
        value_delimiter = ','
    )]
    pub redact_keys: Vec<String>,
    /// cgroup v2 directory whose processes get `traceparent` injection; default: the root of the
    /// host's cgroup v2 hierarchy from /proc/self/mountinfo. In a container with its own cgroup
    /// namespace, mount the host's /sys/fs/cgroup and point here (see deploy/kubernetes).
    #[arg(long, value_name = "DIR", env = "BEHOLDER_CGROUP")]
    pub cgroup: Option<std::path::PathBuf>,
    /// Where the agent's own Prometheus metrics are served; `off` to disable.
    #[arg(long, value_name = "ADDR|off", default_value = "127.0.0.1:9464", value_parser = parse_metrics_addr)]
    pub metrics_addr: MetricsAddr,
}

#[derive(Debug, Clone)]
pub enum MetricsAddr {
    Off,
    At(SocketAddr),
}

/// How trace context crosses from a caller to its callee (`--inject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inject {
    Off,
    Stitch,
    Header,
    TcpOption,
}

impl Inject {
    /// The kernel's `INJECT_MODE`.
    pub fn kernel_mode(self) -> u32 {
        match self {
            Inject::Off => agent_common::INJECT_OFF,
            Inject::Stitch => agent_common::INJECT_STITCH,
            Inject::Header => agent_common::INJECT_HEADER,
            Inject::TcpOption => agent_common::INJECT_TCPOPT,
        }
    }
}

fn parse_url_query(s: &str) -> Result<crate::span::redact::QueryMode, String> {
    use crate::span::redact::QueryMode;
    match s.trim().to_ascii_lowercase().as_str() {
        "redact" => Ok(QueryMode::Redact),
        "drop" => Ok(QueryMode::Drop),
        _ => Err(format!("{s:?}: expected redact or drop")),
    }
}

fn parse_inject(s: &str) -> Result<Inject, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "stitch" | "on" => Ok(Inject::Stitch),
        "header" => Ok(Inject::Header),
        "tcp-option" => Ok(Inject::TcpOption),
        "off" | "none" => Ok(Inject::Off),
        _ => Err(format!("{s:?}: expected stitch, tcp-option, header or off")),
    }
}

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr::Off);
    }
    s.parse()
        .map(MetricsAddr::At)
        .map_err(|e| format!("{s:?}: {e} (expected host:port or off)"))
}
