//! Loads the embedded kernel programs, fills their settings and filter maps, and attaches them.
pub mod adopt;
pub mod btf;
pub mod caps;
pub mod check;
pub mod go;
pub mod gosym;
pub mod inject;
pub mod per_process;
pub mod python;
pub mod tls;
pub mod tokio_tasks;
pub mod verify;

use std::{net::IpAddr, path::Path};

use agent_common::{
    ConnInfo, EndpointKey, IoArgs, TaskKey, TaskRef, ANY_ADDR, FILTER_PIDS, FILTER_PORTS,
    MAP_ACTIVE_CONNECT, MAP_ACTIVE_IO, MAP_CONNS, MAP_COUNTERS, MAP_EVENTS, MAP_EXCLUDED, MAP_PIDS,
    MAP_PORTS, MAX_PAYLOAD,
};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};

/// The kernel object built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent"));

/// Every program and the tracepoint it attaches to. Exits and the socket classifier go first so
/// no entry is saved that nothing would consume.
pub const PROGRAMS: [(&str, &str); 25] = [
    ("sys_exit_read", "syscalls"),
    ("sys_exit_recvfrom", "syscalls"),
    ("sys_exit_readv", "syscalls"),
    ("sys_exit_recvmsg", "syscalls"),
    ("sys_exit_write", "syscalls"),
    ("sys_exit_sendto", "syscalls"),
    ("sys_exit_writev", "syscalls"),
    ("sys_exit_sendmsg", "syscalls"),
    ("sys_exit_accept4", "syscalls"),
    ("sys_exit_accept", "syscalls"),
    ("sys_exit_connect", "syscalls"),
    ("sock_send_length", "sock"),
    ("sock_recv_length", "sock"),
    ("sys_enter_close", "syscalls"),
    ("sys_enter_connect", "syscalls"),
    ("sys_enter_read", "syscalls"),
    ("sys_enter_recvfrom", "syscalls"),
    ("sys_enter_readv", "syscalls"),
    ("sys_enter_recvmsg", "syscalls"),
    ("sys_enter_write", "syscalls"),
    ("sys_enter_sendto", "syscalls"),
    ("sys_enter_writev", "syscalls"),
    ("sys_enter_sendmsg", "syscalls"),
    ("sched_process_exit", "sched"),
    ("sched_process_exec", "sched"),
];

/// The program attached to tracepoint `name`. The data-syscall exits of one direction run the
/// same code (each verifies in about 2 s, the largest part of start-up), so each direction's is
/// verified once and attached to all four of its tracepoints.
pub fn program_for(name: &'static str) -> &'static str {
    match name {
        "sys_exit_recvfrom" | "sys_exit_readv" | "sys_exit_recvmsg" => "sys_exit_read",
        "sys_exit_sendto" | "sys_exit_writev" | "sys_exit_sendmsg" => "sys_exit_write",
        other => other,
    }
}

/// Loads the HTTP/2 frame walkers (`agent-ebpf/src/h2walk.rs`) and puts them where the
/// data-syscall exits tail-call them, by direction.
pub fn load_h2_walkers(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    for name in agent_common::H2_WALK_PROGRAMS {
        let prog: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or(LoadError::Missing(name))?
            .try_into()
            .map_err(|source| LoadError::Walker { name, source })?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|source| LoadError::Walker { name, source })?;
        }
    }
    fill_program_array(
        ebpf,
        agent_common::MAP_H2_WALK,
        &agent_common::H2_WALK_PROGRAMS,
    )
}

/// Puts the loaded programs `names` into the program array `map`, each at its index (where
/// the kernel programs tail-call them).
pub fn fill_program_array(
    ebpf: &mut Ebpf,
    map: &'static str,
    names: &[&'static str],
) -> Result<(), LoadError> {
    let mut fds = Vec::new();
    for &name in names {
        let fd = ebpf
            .program(name)
            .ok_or(LoadError::Missing(name))?
            .fd()
            .map_err(|source| LoadError::Walker { name, source })?
            .try_clone()
            .map_err(|e| LoadError::WalkerArray(e.to_string()))?;
        fds.push(fd);
    }
    let mut array =
        aya::maps::ProgramArray::try_from(ebpf.map_mut(map).ok_or(LoadError::Missing(map))?)
            .map_err(|e| LoadError::WalkerArray(e.to_string()))?;
    for (i, fd) in fds.iter().enumerate() {
        array
            .set(i as u32, fd, 0)
            .map_err(|e| LoadError::WalkerArray(e.to_string()))?;
    }
    Ok(())
}

/// The distinct programs `PROGRAMS` attach (what the verifier must accept).
pub fn distinct_programs() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = Vec::new();
    for (name, _) in PROGRAMS {
        let p = program_for(name);
        if !v.contains(&p) {
            v.push(p);
        }
    }
    v
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this agent binary was built without its kernel programs (AYA_BUILD_SKIP was set); rebuild with `cargo xtask build`")]
    NoObject,
    #[error("loading the kernel programs failed: {0}. The agent needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN); run `agent check` for details")]
    Load(#[source] aya::EbpfError),
    #[error("program {0} is missing from the kernel object")]
    Missing(&'static str),
    #[error("attaching {name} to tracepoint {category}:{name} failed: {source}. Run `agent check` to see which kernel features this host lacks")]
    Attach {
        name: &'static str,
        category: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("tracefs is not mounted and could not be mounted at /sys/kernel/tracing: {0}. Mount it with `mount -t tracefs nodev /sys/kernel/tracing`")]
    Tracefs(std::io::Error),
    #[error("map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
    #[error("the HTTP/2 frame walker {name} failed to load: {source}. Run `agent check`")]
    Walker {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("the HTTP/2 frame walkers' program array: {0}")]
    WalkerArray(String),
}

pub struct Settings {
    pub payload_limit: u32,
    pub ring_bytes: u32,
    pub pids: Vec<u32>,
    /// The pid list is an allow-list even when empty (an executable glob matched nothing yet).
    pub filter_pids: bool,
    pub ports: Vec<u16>,
    pub excluded: Vec<(IpAddr, u16)>,
    pub excluded_any_port: Vec<u16>,
    /// How trace context crosses between processes.
    pub inject: crate::cli::Inject,
    /// `--inject tcp-option` on loopback connections too (a test aid).
    pub tcpopt_loopback: bool,
    /// The cgroup to inject in (None: the cgroup v2 root).
    pub cgroup: Option<std::path::PathBuf>,
    /// Sampling of traces that start here, as the kernel applies it.
    pub sample_threshold: u64,
    pub sample_parent_based: bool,
    /// The bench's floor (`--bench-floor`): every tracepoint gets a program that only runs the
    /// process filter, and nothing else is attached.
    pub floor: bool,
}

pub struct Loaded {
    pub ebpf: Ebpf,
    pub ring: RingBuf<MapData>,
    /// The cgroup whose connections get a `traceparent`, when injection is on and attached.
    pub injecting: Option<std::path::PathBuf>,
}

/// The raw tracepoint where a send's first sequence number is known (same-host stitching).
pub const STITCH_PROGRAM: &str = "tcp_sendmsg_locked";

fn attach_stitch(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    let prog: &mut aya::programs::RawTracePoint = ebpf
        .program_mut(STITCH_PROGRAM)
        .ok_or(LoadError::Missing(STITCH_PROGRAM))?
        .try_into()
        .map_err(|source| attach_error(STITCH_PROGRAM, source))?;
    if prog.fd().is_err() {
        prog.load()
            .map_err(|source| attach_error(STITCH_PROGRAM, source))?;
    }
    prog.attach(STITCH_PROGRAM)
        .map_err(|source| attach_error(STITCH_PROGRAM, source))?;
    Ok(())
}

/// The bench's floor: the floor tracepoint program on every tracepoint of `PROGRAMS`, and the
/// floor raw tracepoint program where the stitching program goes when `stitch` (the agent
/// attaches that one unless `--inject off`).
fn attach_floor(ebpf: &mut Ebpf, stitch: bool) -> Result<(), LoadError> {
    let [tp, raw] = agent_common::FLOOR_PROGRAMS;
    let prog: &mut TracePoint = ebpf
        .program_mut(tp)
        .ok_or(LoadError::Missing(tp))?
        .try_into()
        .map_err(|source| attach_error(tp, source))?;
    prog.load().map_err(|source| attach_error(tp, source))?;
    for (name, category) in PROGRAMS {
        prog.attach(category, name)
            .map_err(tracepoint_error(name, category))?;
    }
    if stitch {
        let prog: &mut aya::programs::RawTracePoint = ebpf
            .program_mut(raw)
            .ok_or(LoadError::Missing(raw))?
            .try_into()
            .map_err(|source| attach_error(raw, source))?;
        prog.load().map_err(|source| attach_error(raw, source))?;
        prog.attach(STITCH_PROGRAM)
            .map_err(|source| attach_error(raw, source))?;
    }
    tracing::warn!(
        tracepoints = PROGRAMS.len(),
        stitch,
        "start-up: bench floor attached (--bench-floor): programs that only run the process \
         filter; no event, no span"
    );
    Ok(())
}

/// The ring buffer the kernel programs write their events to.
fn take_ring(ebpf: &mut Ebpf) -> Result<RingBuf<MapData>, LoadError> {
    RingBuf::try_from(
        ebpf.take_map(MAP_EVENTS)
            .ok_or(LoadError::Missing(MAP_EVENTS))?,
    )
    .map_err(|e| LoadError::Map(MAP_EVENTS, e))
}

/// The error of a load or attachment of the program for tracepoint `category:name`.
fn tracepoint_error(
    name: &'static str,
    category: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> LoadError {
    move |source| LoadError::Attach {
        name,
        category,
        source,
    }
}

fn attach_error(name: &'static str, source: aya::programs::ProgramError) -> LoadError {
    LoadError::Attach {
        name,
        category: "tcp",
        source,
    }
}

/// Mounts tracefs if it is not there; tracepoints cannot be attached without it.
pub fn ensure_tracefs() -> Result<(), LoadError> {
    for p in [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ] {
        if std::path::Path::new(p).exists() {
            return Ok(());
        }
    }
    let r = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(LoadError::Tracefs(std::io::Error::last_os_error()));
    }
    tracing::info!("mounted tracefs at /sys/kernel/tracing");
    Ok(())
}

/// Raises RLIMIT_MEMLOCK where allowed; newer kernels charge BPF memory to the cgroup instead,
/// so failing is only a warning.
pub fn raise_memlock() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK ({}); fine on kernels >= 5.11, which account BPF memory to the cgroup",
            std::io::Error::last_os_error()
        );
    }
}

/// How far below capacity the kernel's LRU maps may already evict: each CPU's local free list
/// holds up to 128 entries (`LOCAL_FREE_TARGET`); twice that, per CPU.
fn lru_slack() -> u32 {
    // Every possible CPU has its own list ("0-N" in sysfs), whatever this process may use.
    let cpus = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| s.trim().rsplit(['-', ',']).next()?.parse::<u32>().ok())
        .map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            |last| last + 1,
        );
    256 * cpus
}

pub fn load(s: &Settings) -> Result<Loaded, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    ensure_tracefs()?;
    raise_memlock();
    let me = std::process::id();
    let limit = s.payload_limit.clamp(64, MAX_PAYLOAD as u32);
    let mut flags = 0u32;
    if s.filter_pids {
        flags |= FILTER_PIDS;
    }
    if !s.ports.is_empty() {
        flags |= FILTER_PORTS;
    }
    let ring = s.ring_bytes.next_power_of_two().max(1 << 16);
    let parent_based = s.sample_parent_based as u32;
    let mut mode = s.inject.kernel_mode();
    let (write_seq, copied_seq) = match btf::tcp_seq_offsets() {
        Ok(o) => o,
        Err(e) => {
            if mode != agent_common::INJECT_OFF {
                tracing::warn!("same-host stitching is off: {e}");
            }
            (0, 0)
        }
    };
    if write_seq == 0
        && (mode == agent_common::INJECT_STITCH || mode == agent_common::INJECT_TCPOPT)
    {
        mode = agent_common::INJECT_OFF;
    }
    let t_object = std::time::Instant::now();
    let mut ebpf = EbpfLoader::new()
        .override_global("INJECT_MODE", &mode, true)
        .override_global("OFF_WRITE_SEQ", &write_seq, true)
        .override_global("LRU_SLACK", &lru_slack(), true)
        .override_global("TCPOPT_LOOPBACK", &(s.tcpopt_loopback as u32), true)
        .override_global("OFF_COPIED_SEQ", &copied_seq, true)
        .override_global("AGENT_TGID", &me, true)
        .override_global("SAMPLE_THRESHOLD", &s.sample_threshold, true)
        .override_global("SAMPLE_PARENT_BASED", &parent_based, true)
        .override_global("PAYLOAD_LIMIT", &limit, true)
        .override_global("FILTER_FLAGS", &flags, true)
        .map_max_entries(MAP_EVENTS, ring)
        .load(OBJECT)
        .map_err(LoadError::Load)?;

    fill_maps(&mut ebpf, s)?;
    let object_ms = t_object.elapsed().as_millis() as u64;
    if s.floor {
        attach_floor(&mut ebpf, mode != agent_common::INJECT_OFF)?;
        let ring = take_ring(&mut ebpf)?;
        return Ok(Loaded {
            ebpf,
            ring,
            injecting: None,
        });
    }
    let t0 = std::time::Instant::now();
    // Every program start-up needs, verified on all CPUs at once, largest first (the loads
    // below then only report a failure, with their usual message).
    let mut ahead = vec!["sys_exit_read"];
    if mode != agent_common::INJECT_OFF {
        ahead.push(STITCH_PROGRAM);
    }
    ahead.extend(["sock_recv_length", "sock_send_length", "sys_exit_write"]);
    ahead.extend(agent_common::H2_WALK_PROGRAMS);
    if !s.filter_pids || !s.pids.is_empty() {
        // Whole-host mode probes the system's OpenSSL at start, and the processes selected at
        // start are probed before tracing begins: verified here with the rest, on every CPU,
        // instead of one after another when the first of them is probed (nginx under
        // `--exe`: 1.1 s to "tracing" with them verified after the rest, 0.75 s with them here).
        ahead.extend(tls::PROGRAMS);
    }
    ahead.extend(distinct_programs());
    let verified_ahead = verify::ahead(&mut ebpf, &ahead);
    // The HTTP/2 frame walkers the data-syscall exits tail-call: in place before those attach.
    load_h2_walkers(&mut ebpf)?;
    let mut verify = t0.elapsed();
    let mut attach = std::time::Duration::ZERO;
    let mut loaded = std::collections::HashSet::new();
    for (name, category) in PROGRAMS {
        let program = program_for(name);
        let prog: &mut TracePoint = ebpf
            .program_mut(program)
            .ok_or(LoadError::Missing(program))?
            .try_into()
            .map_err(tracepoint_error(name, category))?;
        if loaded.insert(program) && prog.fd().is_err() {
            let t = std::time::Instant::now();
            prog.load().map_err(tracepoint_error(name, category))?;
            verify += t.elapsed();
        }
        let t = std::time::Instant::now();
        prog.attach(category, name)
            .map_err(tracepoint_error(name, category))?;
        attach += t.elapsed();
    }
    tracing::info!(
        programs = loaded.len(),
        tracepoints = PROGRAMS.len(),
        verified_in_parallel = verified_ahead,
        maps_and_object_ms = object_ms,
        verify_ms = verify.as_millis() as u64,
        attach_ms = attach.as_millis() as u64,
        "start-up: kernel object loaded, programs verified, tracepoints attached"
    );
    if mode != agent_common::INJECT_OFF {
        attach_stitch(&mut ebpf)?;
    }
    if mode == agent_common::INJECT_TCPOPT {
        match inject::attach_tcp_option(&mut ebpf, s.cgroup.as_deref()) {
            Ok(root) => tracing::info!(
                "trace context also rides a TCP option on requests of selected processes in \
                 cgroup {} to other hosts (--inject tcp-option)",
                root.display()
            ),
            Err(e) => tracing::warn!(
                "the TCP-option carrier is off: {e}; same-host stitching still runs. Run `agent check`"
            ),
        }
    }
    let injecting = if s.inject == crate::cli::Inject::Header {
        match inject::attach(&mut ebpf, s.cgroup.as_deref()) {
            Ok(root) => {
                let pids: std::collections::HashSet<u32> = s.pids.iter().copied().collect();
                // Adoption respects the selection and the cgroup injection covers.
                let mount = inject::cgroup2_root();
                let a = adopt::adopt(
                    &mut ebpf,
                    |pid| {
                        (!s.filter_pids || pids.contains(&pid))
                            && mount
                                .as_deref()
                                .is_none_or(|m| root == m || inject::in_cgroup(pid, m, &root))
                    },
                    &s.ports,
                );
                tracing::info!(
                    adopted = a.connections,
                    not_adopted = a.failed,
                    "outgoing connections open before start join injection after their current exchange"
                );
                Some(root)
            }
            Err(e) => {
                tracing::warn!(
                    "traceparent injection is off: {e}. Spans still link inside each process, and \
                     across services that propagate the header themselves; run `agent check`"
                );
                None
            }
        }
    } else {
        None
    };
    let ring = take_ring(&mut ebpf)?;
    Ok(Loaded {
        ebpf,
        ring,
        injecting,
    })
}

fn endpoint_key(ip: IpAddr, port: u16) -> Vec<EndpointKey> {
    let mut keys = Vec::new();
    match ip {
        IpAddr::V4(v4) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&v4.octets());
            keys.push(EndpointKey {
                addr: a,
                port,
                _pad: [0; 6],
            });
            // The same endpoint as seen by an IPv6 socket (v4-mapped).
            keys.push(EndpointKey {
                addr: v4.to_ipv6_mapped().octets(),
                port,
                _pad: [0; 6],
            });
        }
        IpAddr::V6(v6) => keys.push(EndpointKey {
            addr: v6.octets(),
            port,
            _pad: [0; 6],
        }),
    }
    keys
}

fn fill_maps(ebpf: &mut Ebpf, s: &Settings) -> Result<(), LoadError> {
    let mut pids: HashMap<_, u32, u8> =
        HashMap::try_from(ebpf.map_mut(MAP_PIDS).ok_or(LoadError::Missing(MAP_PIDS))?)
            .map_err(|e| LoadError::Map(MAP_PIDS, e))?;
    for p in &s.pids {
        pids.insert(p, 1, 0)
            .map_err(|e| LoadError::Map(MAP_PIDS, e))?;
    }
    let mut ports: HashMap<_, u16, u8> = HashMap::try_from(
        ebpf.map_mut(MAP_PORTS)
            .ok_or(LoadError::Missing(MAP_PORTS))?,
    )
    .map_err(|e| LoadError::Map(MAP_PORTS, e))?;
    for p in &s.ports {
        ports
            .insert(p, 1, 0)
            .map_err(|e| LoadError::Map(MAP_PORTS, e))?;
    }
    let mut ex: HashMap<_, EndpointKey, u8> = HashMap::try_from(
        ebpf.map_mut(MAP_EXCLUDED)
            .ok_or(LoadError::Missing(MAP_EXCLUDED))?,
    )
    .map_err(|e| LoadError::Map(MAP_EXCLUDED, e))?;
    for (ip, port) in &s.excluded {
        for k in endpoint_key(*ip, *port) {
            ex.insert(k, 1, 0)
                .map_err(|e| LoadError::Map(MAP_EXCLUDED, e))?;
        }
    }
    for port in &s.excluded_any_port {
        ex.insert(
            EndpointKey {
                addr: ANY_ADDR,
                port: *port,
                _pad: [0; 6],
            },
            1,
            0,
        )
        .map_err(|e| LoadError::Map(MAP_EXCLUDED, e))?;
    }
    Ok(())
}

/// Adds processes to the allow-list while running (executable globs matching new processes).
pub fn allow_pids(ebpf: &mut Ebpf, new: &[u32]) -> Result<(), LoadError> {
    let mut pids: HashMap<_, u32, u8> =
        HashMap::try_from(ebpf.map_mut(MAP_PIDS).ok_or(LoadError::Missing(MAP_PIDS))?)
            .map_err(|e| LoadError::Map(MAP_PIDS, e))?;
    for p in new {
        pids.insert(p, 1, 0)
            .map_err(|e| LoadError::Map(MAP_PIDS, e))?;
    }
    Ok(())
}

/// Sums the kernel's per-CPU counters.
pub fn kernel_counters(ebpf: &Ebpf) -> Vec<u64> {
    let Some(map) = ebpf.map(MAP_COUNTERS) else {
        return Vec::new();
    };
    let Ok(arr) = PerCpuArray::<_, u64>::try_from(map) else {
        return Vec::new();
    };
    (0..agent_common::COUNTER_NAMES.len() as u32)
        .map(|i| arr.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0))
        .collect()
}

/// Entries in an LRU map, by its key and value sizes (the types are the kernel's).
fn count_entries<const K: usize, const V: usize>(ebpf: &Ebpf, name: &str) -> Option<u64> {
    let m = HashMap::<_, [u8; K], [u8; V]>::try_from(ebpf.map(name)?).ok()?;
    Some(m.keys().filter(Result::is_ok).count() as u64)
}

/// Recounts the live entries of the LRU maps whose evictions the kernel counts (its running
/// estimate drifts: an eviction never decrements it, and concurrent updates can be lost).
fn recount_lru(ebpf: &mut Ebpf) {
    use agent_common::{ConnInfo, FlowSeq, ServerReq, ThreadReqs, WireCtx, LRU_MAP_NAMES};
    use std::mem::size_of;
    let counts: Vec<Option<u64>> = LRU_MAP_NAMES
        .iter()
        .map(|name| match *name {
            "CONNS" => count_entries::<8, { size_of::<ConnInfo>() }>(ebpf, name),
            "STITCH" => {
                count_entries::<{ size_of::<FlowSeq>() }, { size_of::<WireCtx>() }>(ebpf, name)
            }
            "SERVER_REQS" => count_entries::<8, { size_of::<ServerReq>() }>(ebpf, name),
            "THREAD_REQS" => count_entries::<4, { size_of::<ThreadReqs>() }>(ebpf, name),
            "CONNECT_REFS" => count_entries::<8, 16>(ebpf, name),
            "BODY_LEFT" => count_entries::<8, 8>(ebpf, name),
            "LARGE_SENDS" => count_entries::<16, 1>(ebpf, name),
            "CONNECTING" => count_entries::<8, 1>(ebpf, name),
            "GO_REQ_OWNER" | "TASK_WRITING" => count_entries::<
                { size_of::<agent_common::TaskKey>() },
                { size_of::<agent_common::TaskRef>() },
            >(ebpf, name),
            _ => None,
        })
        .collect();
    let Some(Ok(mut live)) = ebpf.map_mut("LRU_LIVE").map(Array::<_, u64>::try_from) else {
        return;
    };
    for (i, n) in counts.into_iter().enumerate() {
        if let Some(n) = n {
            let _ = live.set(i as u32, n, 0);
        }
    }
}

/// Removes in-flight entries of threads that died inside a syscall and conn entries of
/// processes that exited without closing, so the bounded maps never fill with the dead; then
/// recounts the LRU maps' live entries.
pub fn sweep_dead(ebpf: &mut Ebpf) {
    let alive_thread = |k: u64| Path::new(&format!("/proc/{}/task/{}", k >> 32, k as u32)).exists();
    let alive_process = |k: u64| Path::new(&format!("/proc/{}", k >> 32)).exists();
    remove_dead::<IoArgs>(ebpf, MAP_ACTIVE_IO, alive_thread);
    remove_dead::<u64>(ebpf, MAP_ACTIVE_CONNECT, alive_thread);
    remove_dead::<u64>(ebpf, agent_common::MAP_GO_SPAWNING, alive_thread);
    remove_dead::<agent_common::PyThread>(ebpf, agent_common::MAP_PY_THREADS, alive_thread);
    remove_dead::<ConnInfo>(ebpf, MAP_CONNS, alive_process);
    remove_dead::<agent_common::TlsCall>(ebpf, agent_common::MAP_TLS_CALLS, alive_thread);
    for name in [
        "TASK_REQ",
        "GO_REQ_OWNER",
        "TASK_WRITING",
        agent_common::MAP_PY_TASKS,
    ] {
        remove_dead_tasks::<TaskRef>(ebpf, name);
    }
    remove_dead_tasks::<agent_common::TlsSock>(ebpf, agent_common::MAP_TLS_SOCKS);
    remove_dead_tasks::<agent_common::TlsCall>(ebpf, agent_common::MAP_GO_TLS_CALLS);
    remove_dead_tasks::<[u64; 2]>(ebpf, agent_common::MAP_GO_TLS_LOST);
    recount_lru(ebpf);
}

/// Capacity of the kernel's `TASK_REQ` map (`agent-ebpf/src/maps.rs`).
const CAP_TASK_REQ: usize = 65536;

/// Whether the goroutine-note map is full, so that its oldest notes are being evicted (it is
/// filled without the kernel's eviction estimate, see `propagate::goroutine`).
pub fn task_notes_full(ebpf: &Ebpf) -> bool {
    count_entries::<{ std::mem::size_of::<TaskKey>() }, { std::mem::size_of::<TaskRef>() }>(
        ebpf, "TASK_REQ",
    )
    .is_some_and(|n| n as usize + lru_slack() as usize >= CAP_TASK_REQ)
}

/// Capacity of the kernel's `PY_TASKS` map (`agent-ebpf/src/maps.rs`).
const CAP_PY_TASKS: usize = 65536;

/// Whether the asyncio task map is full, so that its oldest notes are being evicted.
pub fn py_task_notes_full(ebpf: &Ebpf) -> bool {
    count_entries::<{ std::mem::size_of::<TaskKey>() }, { std::mem::size_of::<TaskRef>() }>(
        ebpf,
        agent_common::MAP_PY_TASKS,
    )
    .is_some_and(|n| n as usize + lru_slack() as usize >= CAP_PY_TASKS)
}

/// Deletes the task notes (Go, asyncio) and TLS bindings of processes that exited.
fn remove_dead_tasks<V: aya::Pod>(ebpf: &mut Ebpf, name: &str) {
    let Some(Ok(mut m)) = ebpf.map_mut(name).map(HashMap::<_, TaskKey, V>::try_from) else {
        return;
    };
    let dead: Vec<TaskKey> = m
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !Path::new(&format!("/proc/{}", k.tgid)).exists())
        .collect();
    for k in dead {
        let _ = m.remove(&k);
    }
}

/// Deletes the entries of a map keyed by pid_tgid (or `pid << 32 | fd`) whose owner is gone.
fn remove_dead<V: aya::Pod>(ebpf: &mut Ebpf, name: &str, alive: impl Fn(u64) -> bool) {
    let Some(Ok(mut m)) = ebpf.map_mut(name).map(HashMap::<_, u64, V>::try_from) else {
        return;
    };
    let dead: Vec<u64> = m
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !alive(*k))
        .collect();
    for k in dead {
        let _ = m.remove(&k);
    }
}
