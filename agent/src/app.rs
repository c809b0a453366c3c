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
fn matching_pids(globs: &globset::GlobSet) -> Vec<u32> {
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
    // Go executables found by the classifier, probed by this loop as soon as they arrive.
    let (go_tx, mut go_rx) = mpsc::channel(1024);
    let (exec_tx, exec_rx) = std::sync::mpsc::sync_channel(4096);
    let mut go_probes = crate::loader::go::GoProbes::default();
    // Python, tokio and OpenSSL processes found by the classifier, probed here once they are
    // selected. Every process is reported (for OpenSSL) by the first sweep, before this loop
    // drains the channel: room for a busy host's.
    let (follow_tx, mut follow_rx) = mpsc::channel(16_384);
    let mut followers = Followers::default();
    let filter_pids = settings.filter_pids;
    if !filter_pids {
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
        let mut c = crate::runtimes::Classifier::new(map, metrics.clone(), go_tx, follow_tx);
        let t0 = std::time::Instant::now();
        c.sweep();
        tracing::info!(
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "classified the runtime of every process"
        );
        while let Ok(exe) = go_rx.try_recv() {
            probe_go(&mut ebpf, &mut go_probes, exe);
        }
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
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
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
            .run(ev_rx, ev_budget.clone()),
    );
    let mut reader = tokio::spawn(reader::run(
        ring,
        ev_tx,
        exec_tx,
        ev_budget,
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

    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    let mut last_kernel = vec![0u64; agent_common::COUNTER_NAMES.len()];
    let mut failed: Option<String> = None;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            r = &mut reader => { failed = Some(task_ended("ring reader", r)); break; }
            r = &mut tracker => { failed = Some(task_ended("connection tracker", r)); break; }
            r = &mut exporter => { failed = Some(task_ended("exporter", r)); break; }
            Some(exe) = go_rx.recv() => probe_go(&mut ebpf, &mut go_probes, exe),
            Some((pid, f)) = follow_rx.recv() => {
                followers.found(&mut ebpf, &metrics, pid, f, !filter_pids || pids.contains(&pid));
            }
            _ = tick.tick() => {
                ticks += 1;
                sync_kernel_counters(&ebpf, &metrics, &mut last_kernel);
                if !args.exe.is_empty() && ticks.is_multiple_of(2) {
                    // The kernel drops a pid from the allow-list when its process exits; forget
                    // it here too, so a later process that reuses it is judged afresh.
                    pids.retain(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
                    let new: Vec<u32> = matching_pids(&globs).into_iter().filter(|p| pids.insert(*p)).collect();
                    if !new.is_empty() {
                        tracing::info!(?new, "tracing new processes matching --exe");
                        if let Err(e) = loader::allow_pids(&mut ebpf, &new) {
                            tracing::warn!("cannot add processes to the filter: {e}");
                        }
                        for pid in new {
                            followers.selected(&mut ebpf, &metrics, pid);
                        }
                    }
                }
                followers.tick(&mut ebpf, &metrics);
                if ticks.is_multiple_of(30) {
                    loader::sweep_dead(&mut ebpf);
                    if followers.python.probed() > 0 && loader::py_task_notes_full(&ebpf) {
                        metrics.py_task_notes_map_full.inc();
                    }
                    if loader::task_notes_full(&ebpf) {
                        metrics.task_notes_map_full.inc();
                    }
                    let losses = metrics.losses();
                    if !losses.is_empty() {
                        tracing::warn!(?losses, "events or spans were dropped (see the agent metrics)");
                    }
                }
            }
        }
    }
    if let Some(why) = failed {
        ready.store(false, std::sync::atomic::Ordering::Release);
        tracing::error!(
            "{why}: detaching and exiting, so the agent is restarted rather than left half-alive"
        );
        drop(ebpf); // detaches every program
        anyhow::bail!(why);
    }
    runtimes_stop.store(true, std::sync::atomic::Ordering::Release);
    tracing::info!("stopping: flushing queued spans");
    let _ = stop_tx.send(true);
    let _ = reader.await;
    let _ = tracker.await;
    let _ = tokio::time::timeout(Duration::from_secs(15), exporter).await;
    sync_kernel_counters(&ebpf, &metrics, &mut last_kernel);
    let summary: Vec<String> = metrics
        .snapshot()
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    tracing::info!("final counters: {}", summary.join(" "));
    drop(ebpf); // detaches every program
    Ok(())
}

/// Attaches the `net/http`, goroutine and `crypto/tls` uprobes to the Go executables the runtime
/// classifier found.
fn probe_go(
    ebpf: &mut aya::Ebpf,
    probes: &mut crate::loader::go::GoProbes,
    exe: std::path::PathBuf,
) {
    use crate::loader::go::Attached;
    let exe_name = exe.display();
    match probes.attach(ebpf, &exe) {
        Ok(Attached::New { http, spawns, tls }) => {
            match (http, spawns) {
                (Ok(()), Ok(n)) => tracing::info!(
                    "Go executable {exe_name}: outgoing net/http calls link to their request by \
                     goroutine, also from goroutines the handler spawns (runtime.newproc1, {n} \
                     return points)"
                ),
                (Ok(()), Err(e)) => tracing::warn!(
                    "Go executable {exe_name}: outgoing net/http calls link to their request by \
                     goroutine, but calls from goroutines the handler spawns stay unlinked: {e}"
                ),
                (Err(e), _) => tracing::warn!(
                    "Go executable {exe_name}: cannot probe net/http ({e}); its calls get no \
                     in-process parent"
                ),
            }
            match tls {
                Ok(n) => tracing::info!(
                    "Go executable {exe_name}: crypto/tls reads and writes are traced \
                     ({n} return points)"
                ),
                Err(e) => tracing::info!(
                    "Go executable {exe_name}: its TLS connections give no spans: cannot probe \
                     crypto/tls ({e})"
                ),
            }
        }
        Ok(Attached::Before) => {}
        Err(e) => tracing::warn!(
            "Go executable {exe_name}: cannot probe it ({e}); its calls get no in-process \
             parent and its TLS connections no spans"
        ),
    }
}

/// The task runtimes followed with per-process uprobes (Python asyncio, tokio), and the
/// processes found before they were selected (`--exe` selects every 2 s).
#[derive(Default)]
struct Followers {
    python: crate::loader::python::PyProbes,
    tokio: crate::loader::tokio_tasks::TokioProbes,
    tls: crate::loader::tls::TlsProbes,
    unselected: std::collections::HashMap<u32, Vec<crate::runtimes::Follow>>,
}

impl Followers {
    /// The classifier found process `pid` of runtime `f`.
    fn found(
        &mut self,
        ebpf: &mut aya::Ebpf,
        metrics: &Metrics,
        pid: u32,
        f: crate::runtimes::Follow,
        selected: bool,
    ) {
        if pid == std::process::id() {
            // The agent is a tokio program too; it never traces itself.
            return;
        }
        if selected {
            self.probe(ebpf, metrics, pid, f);
        } else if self.unselected.len() < 16_384 {
            let fs = self.unselected.entry(pid).or_default();
            if !fs.contains(&f) {
                fs.push(f);
            }
        }
    }

    /// `--exe` selected process `pid`.
    fn selected(&mut self, ebpf: &mut aya::Ebpf, metrics: &Metrics, pid: u32) {
        for f in self.unselected.remove(&pid).unwrap_or_default() {
            self.probe(ebpf, metrics, pid, f);
        }
    }

    /// Detaches what exited, and looks again at Python processes whose interpreter was not
    /// mapped yet.
    fn tick(&mut self, ebpf: &mut aya::Ebpf, metrics: &Metrics) {
        self.python.sweep(ebpf);
        self.tokio.sweep(ebpf);
        self.tls.sweep(ebpf);
        for pid in self.tls.waiting() {
            self.probe(ebpf, metrics, pid, crate::runtimes::Follow::Tls);
        }
        self.unselected
            .retain(|pid, _| std::path::Path::new(&format!("/proc/{pid}")).exists());
        for pid in self.python.waiting() {
            self.probe(ebpf, metrics, pid, crate::runtimes::Follow::Python);
        }
    }

    fn probe(
        &mut self,
        ebpf: &mut aya::Ebpf,
        metrics: &Metrics,
        pid: u32,
        f: crate::runtimes::Follow,
    ) {
        use crate::loader::{python, tls, tokio_tasks as tk};
        match f {
            crate::runtimes::Follow::Tls => match self.tls.attach(ebpf, pid) {
                Ok(tls::Outcome::Probed(file)) => tracing::info!(
                    pid,
                    "OpenSSL in {}: the process's TLS reads and writes are traced",
                    file.display()
                ),
                Ok(tls::Outcome::Nothing) => {}
                Err(e) => {
                    metrics.tls_not_followed.inc();
                    tracing::warn!(
                        pid,
                        "OpenSSL calls are not followed ({e}): its TLS traffic gives no spans"
                    );
                }
            },
            crate::runtimes::Follow::Python => match self.python.attach(ebpf, pid) {
                Ok(python::Outcome::Probed(i)) => tracing::info!(
                    pid,
                    "Python process: outgoing calls of its asyncio tasks link to the request \
                     each task was created or woken for ({} and {})",
                    i.interpreter.display(),
                    i.asyncio.display()
                ),
                Ok(python::Outcome::Nothing | python::Outcome::Later) => {}
                Err(e) => {
                    metrics.python_not_followed.inc();
                    tracing::warn!(
                        pid,
                        "Python process: asyncio tasks are not followed ({e}); its calls link \
                         only when their thread has one request open"
                    );
                }
            },
            crate::runtimes::Follow::Tokio => match self.tokio.attach(ebpf, pid) {
                Ok(tk::Outcome::Probed(i)) => tracing::info!(
                    pid,
                    "tokio process: outgoing calls link to the request of the task (or its \
                     spawner) that sent them over a channel ({} task poll, {} spawn, {} channel \
                     send and {} receive instances probed{})",
                    i.poll.len(),
                    i.spawn.len(),
                    i.push.len(),
                    i.pop.len(),
                    if i.spawn.is_empty() {
                        "; no spawn function in this build: calls of spawned tasks get no parent"
                    } else {
                        ""
                    }
                ),
                Ok(tk::Outcome::Nothing) => {}
                Err(e) => {
                    metrics.tokio_not_followed.inc();
                    tracing::warn!(
                        pid,
                        "tokio process: tasks are not followed ({e}); its calls get no parent"
                    );
                }
            },
        }
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

fn sync_kernel_counters(ebpf: &aya::Ebpf, metrics: &Metrics, last: &mut [u64]) {
    for (i, v) in loader::kernel_counters(ebpf).into_iter().enumerate() {
        if let (Some(prev), Some(c)) = (last.get_mut(i), metrics.kernel.get(i)) {
            if v > *prev {
                c.inc_by(v - *prev);
                *prev = v;
            }
        }
    }
}
