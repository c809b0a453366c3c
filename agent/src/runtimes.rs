//! What a thread is evidence of in each process: its runtime, read from its executable and the
//! libraries it maps, and written into the kernel's `PROC_RUNTIME` map.
//!
//! The kernel links an outgoing call to the one request its thread has open (`thread`). That
//! is evidence only where a request's work stays on the thread that read it: threaded servers,
//! and single-threaded event loops (Node, Python asyncio, nginx). Runtimes that move tasks
//! between threads and write a request from another task than the one handling it (Go's
//! goroutines, tokio's scheduler, .NET's thread pool, Erlang's schedulers) would get wrong
//! parents from it, so their calls get none. A process not classified yet (exec'd a moment ago)
//! gets none either: the kernel resets a process's entry at `exec`.
use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use agent_common::{RUNTIME_GO, RUNTIME_PENDING, RUNTIME_TASKS, RUNTIME_THREADS, RUNTIME_TOKIO};
use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use object::{Object, ObjectSection};

/// What the thread is evidence of in a process, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// One request's work at a time on the thread that read it.
    Threads,
    /// Tasks move between threads: the named runtime.
    Tasks(&'static str),
}

impl Runtime {
    fn kernel_value(self) -> u8 {
        match self {
            Runtime::Threads => RUNTIME_THREADS,
            Runtime::Tasks("go") => RUNTIME_GO,
            Runtime::Tasks("tokio") => RUNTIME_TOKIO,
            Runtime::Tasks(_) => RUNTIME_TASKS,
        }
    }
}

/// Largest file whose read-only data is searched for a runtime's marks (a bigger one is judged
/// by its sections and name only).
const MAX_SCAN_BYTES: u64 = 512 << 20;
/// Distinct files remembered; past that the cache starts over.
const MAX_FILES: usize = 16_384;

/// The text every binary with a tokio runtime keeps: tokio's own panic message for a call
/// outside one (the same in every tokio 1.x); read-only data survives stripping. (Its default
/// worker-thread name is no mark: tokio 1.4x renamed it, and the compiler builds such short
/// strings from immediates.)
const TOKIO_MARK: &[u8] = b"must be called from the context of a Tokio 1.x runtime";

/// Judges one ELF file by what any build of these runtimes leaves in it, stripped or not.
/// `has_mark(offset, size)` says whether that byte range of the file holds `TOKIO_MARK`.
/// Hand-written: no crate names the runtime an ELF file was built with.
pub fn classify_elf<'a, R: object::ReadRef<'a>>(
    data: R,
    file_name: &str,
    mut has_mark: impl FnMut(u64, u64) -> bool,
) -> Runtime {
    if file_name == "beam.smp" {
        return Runtime::Tasks("erlang");
    }
    if file_name.starts_with("libcoreclr.so") {
        return Runtime::Tasks("dotnet");
    }
    let Ok(elf) = object::File::parse(data) else {
        return Runtime::Threads;
    };
    // Every Go binary, stripped or not, keeps its build info and pc-line table sections.
    if elf.sections().any(|s| {
        s.name()
            .is_ok_and(|n| n == ".go.buildinfo" || n.ends_with(".gopclntab"))
    }) {
        return Runtime::Tasks("go");
    }
    if elf
        .sections()
        .filter(|s| s.name().is_ok_and(|n| n.starts_with(".rodata")))
        .filter_map(|s| s.file_range())
        .any(|(offset, size)| has_mark(offset, size))
    {
        return Runtime::Tasks("tokio");
    }
    Runtime::Threads
}

/// Bytes read from a file at a time when looking for `TOKIO_MARK`.
const SCAN_CHUNK: usize = 1 << 20;

/// Whether that range of `file` holds `TOKIO_MARK`, read a chunk at a time into one reused
/// buffer: a big program's read-only data (node's is 47 MB) is judged in about 15 ms instead
/// of the 35 to 100 that copying it whole into fresh memory took, so a process that exec'd is
/// classified before its first requests (until then its calls get no in-thread parent).
fn mark_in_file(file: &File, offset: u64, size: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let finder = memchr::memmem::Finder::new(TOKIO_MARK);
    let keep = TOKIO_MARK.len() - 1;
    let mut buf = vec![0u8; SCAN_CHUNK + keep];
    // Bytes carried over from the previous chunk, so a mark across two chunks is found.
    let mut carried = 0;
    let mut at = offset;
    let end = offset.saturating_add(size);
    while at < end {
        let want = ((end - at) as usize).min(SCAN_CHUNK);
        let n = match file.read_at(&mut buf[carried..carried + want], at) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        let filled = carried + n;
        if finder.find(&buf[..filled]).is_some() {
            return true;
        }
        carried = filled.min(keep);
        buf.copy_within(filled - carried..filled, 0);
        at += n as u64;
    }
    false
}

/// The runtime of the file at `path`, remembered by its identity.
struct FileCache {
    by_file: HashMap<(u64, u64, i64), Runtime>,
}

impl FileCache {
    fn judge(&mut self, path: &Path) -> Option<Runtime> {
        let f = File::open(path).ok()?;
        let m = f.metadata().ok()?;
        let id = (m.dev(), m.ino(), m.mtime());
        if let Some(r) = self.by_file.get(&id) {
            return Some(*r);
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let r = if m.len() > MAX_SCAN_BYTES {
            classify_elf(&[][..], &name, |_, _| false)
        } else {
            // Reads only the headers and section names, not the whole file; read-only data is
            // searched from the file itself.
            let cache = object::read::ReadCache::new(&f);
            classify_elf(&cache, &name, |offset, size| mark_in_file(&f, offset, size))
        };
        if self.by_file.len() >= MAX_FILES {
            self.by_file.clear();
        }
        self.by_file.insert(id, r);
        Some(r)
    }
}

/// The runtime of process `pid`: its executable, then each file-backed library it maps.
fn classify_pid(files: &mut FileCache, pid: u32) -> Option<Runtime> {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let exe = files.judge(Path::new(&format!("/proc/{pid}/exe")))?;
    if exe != Runtime::Threads {
        return Some(exe);
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let mut seen = std::collections::HashSet::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        if !path.starts_with('/') || !path.contains(".so") || !seen.insert(path) {
            continue;
        }
        let inside = root.join(path.trim_start_matches('/'));
        match files.judge(&inside) {
            // Go inside a library: the process's own threads are not goroutines, so `r14` is
            // no goroutine there; only the thread rule is switched off.
            Some(Runtime::Tasks("go")) => return Some(Runtime::Tasks("go library")),
            Some(r @ Runtime::Tasks(_)) => return Some(r),
            _ => {}
        }
    }
    Some(Runtime::Threads)
}

/// Identity of the executable of `pid` (changes at `exec`).
fn exe_id(pid: u32) -> Option<(u64, u64)> {
    let m = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
    Some((m.dev(), m.ino()))
}

/// The executable of `pid` as a path the agent can open (inside the process's root).
pub fn exe_path(pid: u32) -> Option<PathBuf> {
    let target = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let rel = target.strip_prefix("/").ok()?;
    Some(Path::new(&format!("/proc/{pid}/root")).join(rel))
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Keeps the kernel's `PROC_RUNTIME` map in step with the processes on this host.
pub struct Classifier {
    map: BpfHashMap<MapData, u32, u8>,
    files: FileCache,
    /// `runtime_map_full`: processes whose entry did not fit in the kernel map;
    /// `runtime_follow_queue_full`: Go, Python, tokio and OpenSSL processes the agent's
    /// control loop had no room for.
    metrics: std::sync::Arc<crate::telemetry::Metrics>,
    /// Go, Python, tokio and OpenSSL processes found, for their probes.
    followed: tokio::sync::mpsc::Sender<(u32, Follow)>,
}

/// The task runtime of a process whose tasks the agent can follow with uprobes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Follow {
    /// `net/http`, goroutine spawns and `crypto/tls`.
    Go,
    Python,
    Tokio,
    /// Any process but Go's (whose `crypto/tls` is not OpenSSL): probed if it holds OpenSSL.
    Tls,
}

impl Classifier {
    pub fn new(
        map: BpfHashMap<MapData, u32, u8>,
        metrics: std::sync::Arc<crate::telemetry::Metrics>,
        followed: tokio::sync::mpsc::Sender<(u32, Follow)>,
    ) -> Classifier {
        Classifier {
            map,
            files: FileCache {
                by_file: HashMap::new(),
            },
            metrics,
            followed,
        }
    }

    /// Classifies every process not classified yet, and those the kernel reset at `exec`. The
    /// kernel map itself says which are done: the kernel removes a process's entry when it
    /// exits (so a reused pid has none) and resets it at `exec`.
    pub fn sweep(&mut self) {
        let done: std::collections::HashSet<u32> = self
            .map
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| *v != RUNTIME_PENDING)
            .map(|(k, _)| k)
            .collect();
        for pid in pids() {
            if !done.contains(&pid) {
                self.classify(pid);
            }
        }
    }

    /// Classifies `pid` and records it in the kernel map.
    fn classify(&mut self, pid: u32) {
        let exe = exe_id(pid);
        let Some(r) = classify_pid(&mut self.files, pid) else {
            return;
        };
        match self.set(pid, r) {
            Ok(()) if exe_id(pid) != exe => {
                // It exec'd while being looked at: judge the new program next time.
                let _ = self.map.insert(pid, RUNTIME_PENDING, 0);
            }
            Ok(()) => {
                let follow = match r {
                    Runtime::Tasks("go") => Some(Follow::Go),
                    Runtime::Threads if crate::loader::python::seen(pid).is_some() => {
                        Some(Follow::Python)
                    }
                    Runtime::Tasks("tokio") => Some(Follow::Tokio),
                    _ => None,
                };
                let tls = (r != Runtime::Tasks("go")).then_some(Follow::Tls);
                for f in follow.into_iter().chain(tls) {
                    if self.followed.try_send((pid, f)).is_err() {
                        // Not followed: asyncio keeps the thread rule, tokio and Go none, TLS no
                        // spans.
                        self.metrics.runtime_follow_queue_full.inc();
                    }
                }
                if let Runtime::Tasks(name) = r {
                    tracing::debug!(
                        pid,
                        runtime = name,
                        "runtime moves work between threads: its calls get no in-thread parent"
                    );
                }
            }
            Err(e) => {
                self.metrics.runtime_map_full.inc();
                tracing::debug!(pid, "cannot record the process's runtime: {e}");
            }
        }
    }

    fn set(&mut self, pid: u32, r: Runtime) -> Result<(), MapError> {
        self.map.insert(pid, r.kernel_value(), 0)
    }

    /// Sweeps every `every`, and classifies a process again as soon as the kernel reports its
    /// `exec` (`execs`), until `stop` is set.
    pub fn run(
        mut self,
        every: Duration,
        execs: std::sync::mpsc::Receiver<u32>,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        use std::sync::mpsc::RecvTimeoutError;
        let mut next = std::time::Instant::now() + every;
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            let wait = next.saturating_duration_since(std::time::Instant::now());
            match execs.recv_timeout(wait) {
                Ok(pid) => self.classify(pid),
                Err(RecvTimeoutError::Timeout) => {
                    self.sweep();
                    next = std::time::Instant::now() + every;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(wait);
                    self.sweep();
                    next = std::time::Instant::now() + every;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `bytes[offset..offset + size]` holds `TOKIO_MARK`.
    fn mark_in_slice(bytes: &[u8], offset: u64, size: u64) -> bool {
        let (start, end) = (offset as usize, offset.saturating_add(size) as usize);
        bytes
            .get(start..end.min(bytes.len()))
            .is_some_and(|d| memchr::memmem::find(d, TOKIO_MARK).is_some())
    }

    #[test]
    fn a_mark_is_found_in_a_file_wherever_it_lies_across_chunks() {
        let path = std::env::temp_dir().join(format!("beholder-mark-{}", std::process::id()));
        let len = 3 * SCAN_CHUNK;
        let f = |at: Option<usize>| {
            let mut bytes = vec![b'x'; len];
            if let Some(at) = at {
                bytes[at..at + TOKIO_MARK.len()].copy_from_slice(TOKIO_MARK);
            }
            std::fs::write(&path, &bytes).unwrap();
            File::open(&path).unwrap()
        };
        let across = SCAN_CHUNK - 7;
        assert!(mark_in_file(&f(Some(across)), 0, len as u64));
        assert!(mark_in_file(&f(Some(across)), 100, len as u64 - 100));
        assert!(mark_in_file(
            &f(Some(len - TOKIO_MARK.len())),
            0,
            len as u64
        ));
        assert!(mark_in_file(&f(Some(0)), 0, TOKIO_MARK.len() as u64));
        // Outside the range, cut by its end, or absent: not found.
        assert!(!mark_in_file(&f(Some(across)), across as u64 + 1, 10 << 20));
        assert!(!mark_in_file(&f(Some(across)), 0, across as u64 + 5));
        assert!(!mark_in_file(&f(None), 0, len as u64));
        // A range past the end of the file (a truncated file) is no mark and no error.
        assert!(!mark_in_file(&f(None), len as u64 * 2, 100));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_c_binary_is_threaded_and_names_decide_the_rest() {
        let ls = std::fs::read("/bin/ls").expect("/bin/ls");
        assert_eq!(
            classify_elf(&ls[..], "ls", |o, n| mark_in_slice(&ls, o, n)),
            Runtime::Threads
        );
        assert_eq!(
            classify_elf(&b"not an elf"[..], "x", |_, _| true),
            Runtime::Threads
        );
        assert_eq!(
            classify_elf(&[][..], "beam.smp", |_, _| false),
            Runtime::Tasks("erlang")
        );
        assert_eq!(
            classify_elf(&[][..], "libcoreclr.so", |_, _| false),
            Runtime::Tasks("dotnet")
        );
    }

    #[test]
    fn this_tokio_binary_is_a_task_runtime() {
        // The unit-test binary links tokio with its multi-thread runtime.
        let me = std::fs::read("/proc/self/exe").expect("own exe");
        assert_eq!(
            classify_elf(&me[..], "agent-test", |o, n| mark_in_slice(&me, o, n)),
            Runtime::Tasks("tokio")
        );
        let mut files = FileCache {
            by_file: HashMap::new(),
        };
        let pid = std::process::id();
        assert_eq!(classify_pid(&mut files, pid), Some(Runtime::Tasks("tokio")));
        assert_eq!(files.by_file.len(), 1, "judged once, by the executable");
    }
}
