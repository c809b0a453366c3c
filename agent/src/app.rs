//! Wires the pipeline together and runs it until SIGINT/SIGTERM.
use std::{
    collections::HashSet,
    net::{IpAddr, ToSocketAddrs},
    time::Duration,
};

use anyhow::Context;
use tokio::{
    signal::unix::SignalKind,
    sync::{mpsc, watch},
};

use crate::{
    cli::{Inject, MetricsAddr, RunArgs},
    export::{self, config::ExportConfig},
    loader::{self, Settings},
    pipeline::{discovery::Snapshot, reader, tracker::Tracker},
    telemetry::Metrics,
};

/// Kernel events waiting for the tracker.
const EVENT_QUEUE: usize = 65_536;
/// Payload bytes the event queue may hold at once.
const EVENT_BYTES: usize = 64 << 20;

/// The capabilities the agent needs and this process lacks (none for root).
fn missing_privileges() -> Vec<&'static crate::loader::caps::Cap> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Vec::new();
    }
    crate::loader::caps::missing(crate::loader::caps::effective())
}

/// Processes whose executable path or name matches one of the globs.
pub(crate) fn matching_pids(globs: &globset::GlobSet) -> Vec<u32> {
    let me = std::process::id() as i32;
    procfs::process::all_processes()
        .map(|all| {
            all.filter_map(Result::ok)
                .filter(|p| p.pid != me)
                .filter(|p| {
                    p.exe().ok().is_some_and(|e| {
                        globs.is_match(&e) || e.file_name().is_some_and(|n| globs.is_match(n))
                    })
                })
                .map(|p| p.pid as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn excluded_endpoints(cfg: &ExportConfig) -> (Vec<(IpAddr, u16)>, Vec<u16>) {
    let Some(ep) = &cfg.endpoint else {
        return (Vec::new(), Vec::new());
    };
    let Some((host, port)) = export::config::host_port(&ep.url) else {
        return (Vec::new(), Vec::new());
    };
    match (host.as_str(), port).to_socket_addrs() {
        Ok(addrs) => {
            let mut v: Vec<(IpAddr, u16)> = addrs.map(|a| (a.ip(), port)).collect();
            v.sort();
            v.dedup();
            (v, Vec::new())
        }
        Err(e) => {
            tracing::warn!("cannot resolve OTLP host {host:?} ({e}); excluding port {port} on every address from tracing");
            (Vec::new(), vec![port])
        }
    }
}

async fn probe_backend(cfg: &ExportConfig) {
    let Some(ep) = &cfg.endpoint else { return };
    let Some((host, port)) = export::config::host_port(&ep.url) else {
        return;
    };
    let target = format!("{host}:{port}");
    match tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(&target),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(
            "OTLP backend {} is unreachable now ({e}); the agent keeps tracing and retries",
            export::config::display_url(&ep.url)
        ),
        Err(_) => tracing::warn!(
            "OTLP backend {} did not answer within 2 s; the agent keeps tracing and retries",
            export::config::display_url(&ep.url)
        ),
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let missing = missing_privileges();
    if !missing.is_empty() {
        let names: Vec<String> = missing
            .iter()
            .map(|c| format!("{} (to {})", c.name, c.why))
            .collect();
        anyhow::bail!(
            "the agent must run as root or hold these capabilities (it loads eBPF programs); \
             missing: {}. Try `sudo agent`, or `agent check` to see what is missing",
            names.join(", ")
        );
    }
    let cfg = ExportConfig::from_env().context("invalid OpenTelemetry exporter configuration")?;
    let sampler = crate::sampling::Sampler::from_env()
        .context("invalid OpenTelemetry sampler configuration")?;
    let limits =
        crate::span::limits::Limits::from_env().context("invalid OpenTelemetry attribute limit")?;
    let metrics = Metrics::new();
    let mut urls = crate::span::redact::UrlPolicy {
        query: args.url_query,
        ..Default::default()
    };
    urls.secret_keys.extend(
        args.redact_keys
            .iter()
            .map(|k| k.trim().to_ascii_lowercase())
            .filter(|k| !k.is_empty()),
    );

    let globs = {
        let mut b = globset::GlobSetBuilder::new();
        for g in &args.exe {
            b.add(
                globset::Glob::new(g)
                    .with_context(|| format!("--exe {g:?} is not a valid glob"))?,
            );
        }
        b.build().context("building --exe globs")?
    };
    let mut pids: HashSet<u32> = args.pids.iter().copied().collect();
    if !args.exe.is_empty() {
        pids.extend(matching_pids(&globs));
    }
    let (excluded, excluded_any_port) = excluded_endpoints(&cfg);
    let settings = Settings {
        payload_limit: args.payload_limit,
        ring_bytes: args.ring_size,
        pids: pids.iter().copied().collect(),
        filter_pids: !args.pids.is_empty() || !args.exe.is_empty(),
        ports: args.ports.clone(),
        excluded,
        excluded_any_port,
        inject: args.inject,
        tcpopt_loopback: args.tcp_option_loopback,
        cgroup: args.cgroup.clone(),
        sample_threshold: sampler.kernel_threshold(),
        sample_parent_based: sampler.parent_based,
        floor: args.bench_floor,
    };
    let snapshot = Snapshot::scan();
    let loader::Loaded {
        mut ebpf,
        ring,
        injecting,
    } = loader::load(&settings)?;
    // Every data program is attached from here on: a syscall that began earlier may have been
    // seen in one direction and not the other (the programs attach one after another), and
    // half an exchange would shift every later pairing on its connection.
    let attached_ns = crate::clock::Clock::boot_now_ns();
    match (&injecting, args.inject) {
        (Some(cg), _) => tracing::info!(
            "trace context: same-host stitching, and traceparent written into outgoing HTTP/1.x \
             requests of selected processes in cgroup {} (--inject header)",
            cg.display()
        ),
        (None, Inject::Off) => tracing::info!("trace context propagation is off (--inject off)"),
        (None, _) => tracing::info!(
            "trace context: same-host stitching (no byte on the wire changes; --inject header \
             also writes traceparent for callees without the agent)"
        ),
    }
    match &cfg.endpoint {
        None if cfg.discard => {
            tracing::info!("OTEL_TRACES_EXPORTER=none: spans are built and counted, not exported")
        }
        None => tracing::info!("no OTEL_EXPORTER_OTLP_ENDPOINT set: printing spans to the console"),
        Some(ep) => {
            tracing::info!(protocol = ?ep.protocol, "exporting spans to {}", export::config::display_url(&ep.url))
        }
    }
    // What a thread is evidence of in each process, before any call is linked by it; then kept
    // up to date by its own thread (new processes, and those the kernel reset at exec).
    let runtimes_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (exec_tx, exec_rx) = std::sync::mpsc::sync_channel(4096);
    // Go, Python, tokio and OpenSSL processes found by the classifier, probed once they are
    // selected (by the control thread after start-up). Every process is reported (for OpenSSL)
    // by the first sweep, before start-up drains the channel: room for a busy host's.
    let (follow_tx, mut follow_rx) = mpsc::channel(16_384);
    let mut followers = crate::control::Followers::default();
    followers.floor = args.bench_floor;
    let filter_pids = settings.filter_pids;
    if !filter_pids && !args.bench_floor {
        for (lib, r) in followers.tls.whole_host(&mut ebpf) {
            match r {
                Ok(()) => tracing::info!(
                    "OpenSSL in {}: TLS reads and writes of every process using it are traced",
                    lib.display()
                ),
                Err(e) => {
                    metrics.tls_not_followed.inc();
                    tracing::warn!("OpenSSL in {} is not followed: {e}", lib.display());
                }
            }
        }
    }
    {
        let map = ebpf
            .take_map(agent_common::MAP_RUNTIMES)
            .context("the kernel object has no runtime map")?;
        let map = aya::maps::HashMap::try_from(map).context("the runtime map")?;
        let mut c = crate::runtimes::Classifier::new(map, metrics.clone(), follow_tx);
        let t0 = std::time::Instant::now();
        c.sweep();
        tracing::info!(
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "classified the runtime of every process"
        );
        while let Ok((pid, f)) = follow_rx.try_recv() {
            followers.found(
                &mut ebpf,
                &metrics,
                pid,
                f,
                !filter_pids || pids.contains(&pid),
            );
        }
        let stop = runtimes_stop.clone();
        std::thread::Builder::new()
            .name("runtimes".into())
            .spawn(move || c.run(Duration::from_millis(250), exec_rx, stop))
            .context("starting the runtime classifier")?;
    }
    tracing::info!(
        connections_open_before_start = snapshot.established_count(),
        "tracing HTTP/1.x and HTTP/2 on {}",
        if settings.filter_pids {
            format!("{} selected process(es)", settings.pids.len())
        } else {
            "the whole host".into()
        }
    );
    probe_backend(&cfg).await;

    let sink = export::Sink::new(&cfg).context("setting up the OTLP exporter")?;
    let (span_tx, span_rx) = export::queue(&cfg);
    // Batches of at most BATCH events; the budgets bound what they hold together.
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
    let ev_items = std::sync::Arc::new(crate::pipeline::budget::ByteBudget::new(EVENT_QUEUE));
    let ev_budget = std::sync::Arc::new(crate::pipeline::budget::ByteBudget::new(EVENT_BYTES));
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut exporter = tokio::spawn(export::run(
        span_rx,
        sink,
        cfg.clone(),
        metrics.clone(),
        Duration::from_secs(10),
        stop_rx.clone(),
    ));
    let mut tracker = tokio::spawn(
        Tracker::new(metrics.clone(), span_tx, snapshot, sampler, (urls, limits))
            .attached_at(attached_ns)
            .run(ev_rx, (ev_items.clone(), ev_budget.clone())),
    );
    let mut reader = tokio::spawn(reader::run(
        ring,
        reader::Events {
            tx: ev_tx,
            items: ev_items,
            bytes: ev_budget,
        },
        exec_tx,
        metrics.clone(),
        stop_rx,
    ));
    // Ready once the kernel programs are attached (above) and the pipeline runs; a pipeline task
    // that ends makes the agent exit (below), so it is never attached and half-alive.
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    if let MetricsAddr::At(addr) = args.metrics_addr {
        tokio::spawn(crate::metrics_server::serve(
            addr,
            metrics.clone(),
            ready.clone(),
        ));
    }

    // The selection and the per-process probes from here on, on a thread of their own.
    let (control_stop, control_stop_rx) = watch::channel(false);
    let (control_tx, mut control_done) = tokio::sync::oneshot::channel();
    let (detached_tx, detached) = tokio::sync::oneshot::channel();
    crate::control::Control {
        ebpf,
        metrics: metrics.clone(),
        exe_globs: (!args.exe.is_empty()).then_some(globs),
        pids,
        filter_pids,
        followers,
    }
    .spawn(follow_rx, control_stop_rx, (control_tx, detached_tx))
    .context("starting the control thread")?;

    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())
        .context("installing SIGINT handler")?;
    let failed = tokio::select! {
        _ = sigint.recv() => None,
        _ = sigterm.recv() => None,
        r = &mut reader => Some(task_ended("ring reader", r)),
        r = &mut tracker => Some(task_ended("connection tracker", r)),
        r = &mut exporter => Some(task_ended("exporter", r)),
        _ = &mut control_done => Some("the control thread ended".to_string()),
    };
    let _ = control_stop.send(true);
    if let Some(why) = failed {
        ready.store(false, std::sync::atomic::Ordering::Release);
        tracing::error!(
            "{why}: detaching and exiting, so the agent is restarted rather than left half-alive"
        );
        let _ = tokio::time::timeout(Duration::from_secs(5), control_done).await;
        wait_detached(detached).await;
        anyhow::bail!(why);
    }
    runtimes_stop.store(true, std::sync::atomic::Ordering::Release);
    tracing::info!("stopping: flushing queued spans");
    let _ = stop_tx.send(true);
    let _ = reader.await;
    let _ = tracker.await;
    let _ = tokio::time::timeout(Duration::from_secs(15), exporter).await;
    // The control thread reads the kernel counters a last time and detaches every program,
    // unless it is busy past the deadline (the kernel verifying a probe's programs): then the
    // counters are those of its last tick, and exiting detaches.
    if tokio::time::timeout(Duration::from_secs(2), control_done)
        .await
        .is_err()
    {
        tracing::warn!(
            "the control thread is still busy (attaching probes): kernel counters below are \
             those of the last second"
        );
    }
    let summary: Vec<String> = metrics
        .snapshot()
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    tracing::info!("final counters: {}", summary.join(" "));
    wait_detached(detached).await;
    Ok(())
}

/// How long the agent waits, on its way out, for the control thread to detach every program.
const DETACH_DEADLINE: Duration = Duration::from_secs(40);

/// Waits (bounded) for the control thread to have detached every program: a uprobe still
/// attached when the process exits cannot be taken out of the probed program's code by the
/// kernel (see `control::Control::spawn`).
async fn wait_detached(detached: tokio::sync::oneshot::Receiver<crate::control::Detached>) {
    match tokio::time::timeout(DETACH_DEADLINE, detached).await {
        Ok(Ok(d)) => tracing::info!(
            elapsed_ms = d.took.as_millis() as u64,
            probes = d.probes,
            probes_ms = d.probes_took.as_millis() as u64,
            "detached every program and probe"
        ),
        Ok(Err(_)) => tracing::warn!("the control thread ended without detaching"),
        Err(_) => tracing::warn!(
            "exiting with probes still attached after {} s: the kernel may leave their \
             breakpoints in the probed programs (a trap per call until they exit)",
            DETACH_DEADLINE.as_secs()
        ),
    }
}

/// Why a pipeline task ended before the agent was asked to stop.
fn task_ended<T: std::fmt::Debug>(name: &str, r: Result<T, tokio::task::JoinError>) -> String {
    match r {
        Err(e) if e.is_panic() => {
            let p = e.into_panic();
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            format!("pipeline task {name} panicked: {msg}")
        }
        Err(e) => format!("pipeline task {name} was cancelled: {e}"),
        Ok(v) => format!("pipeline task {name} ended unexpectedly ({v:?})"),
    }
}
