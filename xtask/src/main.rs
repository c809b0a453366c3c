//! Project tasks: `cargo xtask run | test | build | check | bench | image`.
//!
//! Each bootstraps what it needs (nightly rust-src, bpf-linker on nightly's LLVM, and for tests
//! the real programs they drive) through `scripts/bootstrap.sh`, which is idempotent and takes
//! seconds when everything is already there.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

mod bench;
mod image;
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the agent (release) and run it as root; arguments after `--` go to the agent.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the agent (release).
    Build,
    /// Run `agent check`.
    Check,
    /// Run the whole test suite: unit and golden tests, then root integration tests with real programs.
    Test {
        /// Only run integration tests whose name contains this.
        filter: Option<String>,
    },
    /// Run every cargo-fuzz target (fuzz/) for a bounded time each (nightly, cargo-fuzz).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
    /// Build the agent's container image with podman (deploy/Containerfile):
    /// localhost/beholder-agent:latest.
    Image,
    /// Measure the agent's overhead and loss; writes bench/report.md and bench/report.json.
    Bench {
        /// Longer runs and more rounds (the short mode takes a few minutes).
        #[arg(long)]
        full: bool,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("[xtask] {:?}", cmd);
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn bootstrap(tests: bool) -> Result<()> {
    let mut cmd = Command::new("bash");
    cmd.arg(root().join("scripts/bootstrap.sh"));
    if tests {
        cmd.arg("--test");
    }
    run(&mut cmd)
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn build_agent() -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "-p", "agent"]))?;
    Ok(root().join("target/release/agent"))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn as_root(bin: &Path) -> Command {
    if is_root() {
        Command::new(bin)
    } else {
        let mut c = Command::new("sudo");
        c.arg("-E").arg(bin);
        c
    }
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Build => {
            bootstrap(false)?;
            build_agent()?;
        }
        Task::Check => {
            bootstrap(false)?;
            let bin = build_agent()?;
            run(as_root(&bin).arg("check"))?;
        }
        Task::Fuzz { secs } => {
            bootstrap(false)?;
            fuzz(secs)?;
        }
        Task::Image => {
            bootstrap(false)?;
            let bin = build_agent()?;
            image::build(&root(), &bin)?;
        }
        Task::Run { args } => {
            bootstrap(false)?;
            let bin = build_agent()?;
            run(as_root(&bin).args(args))?;
        }
        Task::Bench { full } => {
            bootstrap(true)?;
            if !is_root() {
                bail!("the benchmark loads eBPF programs: run it as root");
            }
            let bin = build_agent()?;
            run(cargo().args(["build", "--release", "-p", "tests", "--bin", "otlp-sink"]))?;
            bench::run(
                &root(),
                &bin,
                &root().join("target/release/otlp-sink"),
                bench::Plan::new(full),
            )?;
            // Userspace pipeline throughput (criterion), added to the report.
            run(cargo().args([
                "bench", "-p", "agent", "--bench", "pipeline", "--", "--noplot",
            ]))?;
            bench::add_pipeline(&root())?;
        }
        Task::Test { filter } => {
            bootstrap(true)?;
            if !is_root() {
                bail!("the integration tests load eBPF programs: run `sudo -E cargo xtask test` (or as root)");
            }
            // Unit and golden tests (no kernel needed).
            run(cargo().args([
                "test",
                "--workspace",
                "--exclude",
                "tests",
                "--exclude",
                "agent-ebpf",
            ]))?;
            let bin = build_agent()?;
            // Root integration tests: one at a time, since each runs an agent tracing the host.
            let mut cmd = cargo();
            cmd.args([
                "test",
                "--release",
                "-p",
                "tests",
                "--",
                "--test-threads=1",
                "--nocapture",
            ]);
            if let Some(f) = &filter {
                cmd.arg(f);
            }
            cmd.env("AGENT_BIN", &bin);
            run(&mut cmd)?;
            // A short bounded fuzzing pass (the long runs are recorded in the README).
            if filter.is_none() {
                fuzz(10)?;
            }
        }
    }
    Ok(())
}

/// The fuzz targets of `fuzz/Cargo.toml`.
const FUZZ_TARGETS: [&str; 6] = [
    "http1",
    "http2",
    "trace_context",
    "otel_config",
    "url_redact",
    "kernel_head",
];

/// Builds the fuzz targets (cargo-fuzz on nightly, installed if missing) and runs each for
/// `secs` seconds; a crash fails the task.
fn fuzz(secs: u64) -> Result<()> {
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let dir = root().join("fuzz");
    for t in FUZZ_TARGETS {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&dir)
            // The kernel object is not needed: its head scan is fuzzed as host code.
            .env("AYA_BUILD_SKIP", "1")
            .args(["+nightly", "fuzz", "run", "-O", t, "--"])
            .arg(format!("-max_total_time={secs}"))
            .arg("-max_len=4096");
        // A dictionary of the target's tokens, where one is kept (`fuzz/dict/<target>.dict`).
        let dict = format!("dict/{t}.dict");
        if dir.join(&dict).exists() {
            cmd.arg(format!("-dict={dict}"));
        }
        run(&mut cmd)?;
    }
    Ok(())
}
