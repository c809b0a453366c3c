//! The control plane: keeps the kernel's selection and the per-process probes in step with the
//! processes on this host, and the kernel's counters in the agent's metrics.
//!
//! It runs on a thread of its own. What it does can take seconds (the kernel verifies a
//! runtime's probe programs the first time one is found, longer on a loaded host), and neither a
//! stop signal nor the pipeline may wait for that: the agent stops within its deadline whatever
//! this thread is doing.
use std::{collections::HashSet, sync::Arc, time::Duration};

use tokio::sync::{mpsc, oneshot, watch};

use crate::{loader, runtimes::Follow, telemetry::Metrics};

/// What the control thread owns.
pub struct Control {
    pub ebpf: aya::Ebpf,
    pub metrics: Arc<Metrics>,
    /// `--exe`: processes matching these are selected as they appear (every 2 s).
    pub exe_globs: Option<globset::GlobSet>,
    /// The processes selected (with `--pid` or `--exe`).
    pub pids: HashSet<u32>,
    /// Whether only the selected processes are traced (else the whole host).
    pub filter_pids: bool,
    pub followers: Followers,
}

impl Control {
    /// Runs on its own thread until `stop` turns true, then reads the kernel counters a last
    /// time and reports on `done`, then detaches every program and reports on `detached` how
    /// long that took. `found` brings the processes the runtime classifier found.
    pub fn spawn(
        self,
        found: mpsc::Receiver<(u32, Follow)>,
        stop: watch::Receiver<bool>,
        (done, detached): (oneshot::Sender<()>, oneshot::Sender<Detached>),
    ) -> std::io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                let (mut ebpf, mut followers) = rt.block_on(self.run(found, stop, done));
                // Dropping the object closes every link: the kernel takes each uprobe's
                // breakpoints out of the probed programs' code as it does (one RCU grace period
                // each). It can only do so from a task without a fatal signal pending: a probe
                // still attached when the agent exits is left in the program's code ("failed to
                // unregister, leaking uprobe"), trapping on every call until that program exits.
                // So the agent waits for this before it exits.
                let t = std::time::Instant::now();
                let links = followers.take_links(&mut ebpf);
                let n = links.len();
                // One after the other. Dropped from 32 threads at once they went a quarter faster
                // (31 Go probes: 2.6 s, not 3.4 s), but in a CI run the kernel failed 31 of those
                // removals ("failed to unregister") and left their breakpoints; never seen so.
                drop(links);
                let probes = t.elapsed();
                drop(ebpf);
                let _ = detached.send(Detached {
                    probes: n,
                    probes_took: probes,
                    took: t.elapsed(),
                });
            })
            .map(|_| ())
    }

    async fn run(
        mut self,
        mut found: mpsc::Receiver<(u32, Follow)>,
        mut stop: watch::Receiver<bool>,
        done: oneshot::Sender<()>,
    ) -> (aya::Ebpf, Followers) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ticks: u64 = 0;
        // The kernel counters as last read.
        let mut last_kernel = vec![0u64; agent_common::COUNTER_NAMES.len()];
        if !self.followers.floor && (!self.filter_pids || self.exe_globs.is_some()) {
            // A Go program may start (or be selected) later: its probe programs are verified
            // now, so that it is probed when found instead of about 0.5 s later (several
            // seconds on a busy host), during which its calls would go unfollowed.
            let t = std::time::Instant::now();
            match self.followers.go.preload(&mut self.ebpf) {
                Ok(()) => tracing::debug!(
                    elapsed_ms = t.elapsed().as_millis() as u64,
                    "Go probe programs verified ahead"
                ),
                Err(e) => tracing::debug!("Go probe programs not verified ahead: {e}"),
            }
        }
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                Some((pid, f)) = found.recv() => {
                    let selected = !self.filter_pids || self.pids.contains(&pid);
                    self.followers.found(&mut self.ebpf, &self.metrics, pid, f, selected);
                }
                _ = tick.tick() => {
                    ticks += 1;
                    self.tick(ticks, &mut last_kernel);
                }
            }
        }
        sync_kernel_counters(&self.ebpf, &self.metrics, &mut last_kernel);
        // Reported before detaching, which takes a while with many probes.
        let _ = done.send(());
        (self.ebpf, self.followers)
    }

    fn tick(&mut self, ticks: u64, last_kernel: &mut [u64]) {
        let ebpf = &mut self.ebpf;
        let metrics = &self.metrics;
        sync_kernel_counters(ebpf, metrics, last_kernel);
        if let Some(globs) = self.exe_globs.as_ref().filter(|_| ticks.is_multiple_of(2)) {
            // The kernel drops a pid from the allow-list when its process exits; forget it here
            // too, so a later process that reuses it is judged afresh.
            self.pids
                .retain(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
            let new: Vec<u32> = crate::app::matching_pids(globs)
                .into_iter()
                .filter(|p| self.pids.insert(*p))
                .collect();
            if !new.is_empty() {
                tracing::info!(?new, "tracing new processes matching --exe");
                if let Err(e) = loader::allow_pids(ebpf, &new) {
                    tracing::warn!("cannot add processes to the filter: {e}");
                }
                for pid in new {
                    self.followers.selected(ebpf, metrics, pid);
                }
            }
        }
        self.followers.tick(ebpf, metrics);
        if ticks.is_multiple_of(30) {
            loader::sweep_dead(ebpf);
            if self.followers.python.probed() > 0 && loader::py_task_notes_full(ebpf) {
                metrics.py_task_notes_map_full.inc();
            }
            if loader::task_notes_full(ebpf) {
                metrics.task_notes_map_full.inc();
            }
            let losses = metrics.losses();
            if !losses.is_empty() {
                tracing::warn!(
                    ?losses,
                    "events or spans were dropped (see the agent metrics)"
                );
            }
        }
    }
}

/// Attaches the `net/http`, goroutine and `crypto/tls` uprobes to the executable of Go process
/// `pid`, selected.
fn probe_go(
    ebpf: &mut aya::Ebpf,
    metrics: &Metrics,
    probes: &mut crate::loader::go::GoProbes,
    pid: u32,
) {
    use crate::loader::go::Attached;
    let Some(exe) = crate::runtimes::exe_path(pid) else {
        return;
    };
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
        Err(e) => {
            metrics.go_not_followed.inc();
            tracing::warn!(
                pid,
                "Go executable {exe_name}: cannot probe it ({e}); its calls get no in-process \
                 parent and its TLS connections no spans"
            )
        }
    }
}

/// What detaching took on the way out: `probes` uprobe links in `probes_took`, then the rest
/// of the programs (tracepoints, socket programs) and the maps, in `took` in all.
#[derive(Debug)]
pub struct Detached {
    pub probes: usize,
    pub probes_took: Duration,
    pub took: Duration,
}

/// The task runtimes followed with per-process uprobes (Python asyncio, tokio), and the
/// processes found before they were selected (`--exe` selects every 2 s).
#[derive(Default)]
pub struct Followers {
    pub go: crate::loader::go::GoProbes,
    pub python: crate::loader::python::PyProbes,
    pub tokio: crate::loader::tokio_tasks::TokioProbes,
    pub tls: crate::loader::tls::TlsProbes,
    unselected: std::collections::HashMap<u32, Vec<crate::runtimes::Follow>>,
    /// The bench's floor (`--bench-floor`): no process is probed.
    pub floor: bool,
}

impl Followers {
    /// Every probe's link, taken out of its program (dropping one detaches it).
    fn take_links(&mut self, ebpf: &mut aya::Ebpf) -> Vec<aya::programs::uprobe::UProbeLink> {
        let mut out = Vec::new();
        self.go.take_links(ebpf, &mut out);
        self.python.take_links(ebpf, &mut out);
        self.tokio.take_links(ebpf, &mut out);
        self.tls.take_links(ebpf, &mut out);
        out
    }

    /// The classifier found process `pid` of runtime `f`.
    pub fn found(
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
    pub fn selected(&mut self, ebpf: &mut aya::Ebpf, metrics: &Metrics, pid: u32) {
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
        if self.floor {
            return;
        }
        match f {
            crate::runtimes::Follow::Go => probe_go(ebpf, metrics, &mut self.go, pid),
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

pub fn sync_kernel_counters(ebpf: &aya::Ebpf, metrics: &Metrics, last: &mut [u64]) {
    for (i, v) in loader::kernel_counters(ebpf).into_iter().enumerate() {
        if let (Some(prev), Some(c)) = (last.get_mut(i), metrics.kernel.get(i)) {
            if v > *prev {
                c.inc_by(v - *prev);
                *prev = v;
            }
        }
    }
}
