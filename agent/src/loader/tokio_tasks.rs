//! Uprobes on tokio's task polls, spawns and mpsc channels (see
//! `agent-ebpf/src/propagate/tokio.rs`): attached to each selected tokio process whose
//! executable keeps its symbol table, at every instance of the generic functions followed
//! (found by demangled path), and detached when it exits. A stripped or fully inlined build has
//! no instances to probe: its calls keep no parent (`runtime`). A build without the spawn
//! function is followed without it: calls of spawned tasks then get no parent.
use std::{collections::HashMap, os::unix::fs::MetadataExt};

use agent_common::{
    TOKIO_POLL_PATH, TOKIO_POLL_PROGRAM, TOKIO_POLL_RET_PROGRAM, TOKIO_POP_PATH, TOKIO_POP_PROGRAM,
    TOKIO_PUSH_PATH, TOKIO_PUSH_PROGRAM, TOKIO_SPAWN_PATH, TOKIO_SPAWN_PROGRAM,
};
use aya::{programs::uprobe::UProbeAttachLocation, Ebpf};
use object::{Object, ObjectSection, ObjectSymbol};

use super::per_process::{self, AttachError, Point, Processes};

/// Every kernel program this module loads (`agent check` verifies them).
pub const PROGRAMS: [&str; 5] = [
    TOKIO_POLL_PROGRAM,
    TOKIO_POLL_RET_PROGRAM,
    TOKIO_PUSH_PROGRAM,
    TOKIO_POP_PROGRAM,
    TOKIO_SPAWN_PROGRAM,
];
/// Instances of one function probed at most (each costs a perf event per process).
const MAX_INSTANCES: usize = 512;
/// tokio processes probed at once.
pub const MAX_PROCESSES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TokioProbeError {
    #[error("cannot read {0}: {1}")]
    Read(String, String),
    #[error("{file}: no instance of {path} (a stripped or fully inlined build)")]
    NoInstance { file: String, path: &'static str },
    #[error("{file}: more than {MAX_INSTANCES} instances of {path}")]
    TooMany { file: String, path: &'static str },
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("{MAX_PROCESSES} tokio processes are probed already")]
    Full,
    /// What an earlier look at the same executable found.
    #[error("{0}")]
    Judged(String),
}

/// File offsets of every instance of the functions followed, in one executable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Instances {
    pub poll: Vec<u64>,
    pub push: Vec<u64>,
    pub pop: Vec<u64>,
    /// Empty where the build has no `bind_inner` (spawned tasks then inherit nothing).
    pub spawn: Vec<u64>,
}

/// Whether a demangled name (without its hash) is `path` or an instance of it (`path::<..>`,
/// as v0 mangling writes generic arguments).
fn is_instance(demangled: &str, path: &str) -> bool {
    demangled
        .strip_prefix(path)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("::<"))
}

/// Finds the instances in the ELF file `data` (named `file` in errors).
pub fn instances(data: &[u8], file: &str) -> Result<Instances, TokioProbeError> {
    let elf =
        object::File::parse(data).map_err(|e| TokioProbeError::Read(file.into(), e.to_string()))?;
    let mut found = Instances::default();
    for sym in elf.symbols() {
        if sym.kind() != object::SymbolKind::Text || sym.address() == 0 {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        if !name.contains("tokio") {
            continue;
        }
        let d = format!("{:#}", rustc_demangle::demangle(name));
        let which = if is_instance(&d, TOKIO_POLL_PATH) {
            &mut found.poll
        } else if is_instance(&d, TOKIO_PUSH_PATH) {
            &mut found.push
        } else if is_instance(&d, TOKIO_POP_PATH) {
            &mut found.pop
        } else if is_instance(&d, TOKIO_SPAWN_PATH) {
            &mut found.spawn
        } else {
            continue;
        };
        // The file offset of the function: its address within its section.
        let Some(section) = sym
            .section_index()
            .and_then(|i| elf.section_by_index(i).ok())
        else {
            continue;
        };
        let Some((start, _)) = section.file_range() else {
            continue;
        };
        which.push(sym.address() - section.address() + start);
    }
    for (v, path, required) in [
        (&mut found.poll, TOKIO_POLL_PATH, true),
        (&mut found.push, TOKIO_PUSH_PATH, true),
        (&mut found.pop, TOKIO_POP_PATH, true),
        (&mut found.spawn, TOKIO_SPAWN_PATH, false),
    ] {
        v.sort_unstable();
        v.dedup();
        if v.is_empty() && required {
            return Err(TokioProbeError::NoInstance {
                file: file.into(),
                path,
            });
        }
        if v.len() > MAX_INSTANCES {
            return Err(TokioProbeError::TooMany {
                file: file.into(),
                path,
            });
        }
    }
    Ok(found)
}

/// What happened to one process.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Already probed, or gone.
    Nothing,
    /// Its tasks are followed now.
    Probed(Instances),
}

/// The tokio processes probed, and what each executable holds (by file identity).
#[derive(Default)]
pub struct TokioProbes {
    loaded: bool,
    probed: Processes,
    files: HashMap<(u64, u64), Result<Instances, String>>,
}

impl TokioProbes {
    /// Every process's links, taken out of their programs (`per_process::take`).
    pub fn take_links(
        &mut self,
        ebpf: &mut Ebpf,
        out: &mut Vec<aya::programs::uprobe::UProbeLink>,
    ) {
        self.probed.take_all(ebpf, out);
    }

    /// Probes tokio process `pid` unless it is already.
    pub fn attach(&mut self, ebpf: &mut Ebpf, pid: u32) -> Result<Outcome, TokioProbeError> {
        let Some(since) = per_process::start_time(pid) else {
            return Ok(Outcome::Nothing);
        };
        if self.probed.contains(pid, since) {
            return Ok(Outcome::Nothing);
        }
        let Some(exe) = crate::runtimes::exe_path(pid) else {
            return Ok(Outcome::Nothing);
        };
        let Ok(m) = std::fs::metadata(&exe) else {
            return Ok(Outcome::Nothing);
        };
        let found = self
            .files
            .entry((m.dev(), m.ino()))
            .or_insert_with(|| {
                let name = exe.display().to_string();
                std::fs::read(&exe)
                    .map_err(|e| TokioProbeError::Read(name.clone(), e.to_string()))
                    .and_then(|data| instances(&data, &name))
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(TokioProbeError::Judged)?;
        if self.probed.len() >= MAX_PROCESSES {
            return Err(TokioProbeError::Full);
        }
        if !self.loaded {
            per_process::load(ebpf, &PROGRAMS)?;
            self.loaded = true;
        }
        let at = |program, off: &u64| Point {
            program,
            location: UProbeAttachLocation::AbsoluteOffset(*off),
            file: &exe,
            cookie: None,
        };
        // Return probes first (see `python.rs`): a poll entered between the two attachments
        // must not leave its thread polling for good.
        let points: Vec<Point> = found
            .poll
            .iter()
            .map(|o| at(TOKIO_POLL_RET_PROGRAM, o))
            .chain(found.poll.iter().map(|o| at(TOKIO_POLL_PROGRAM, o)))
            .chain(found.push.iter().map(|o| at(TOKIO_PUSH_PROGRAM, o)))
            .chain(found.pop.iter().map(|o| at(TOKIO_POP_PROGRAM, o)))
            .chain(found.spawn.iter().map(|o| at(TOKIO_SPAWN_PROGRAM, o)))
            .collect();
        let links = per_process::attach_all(ebpf, pid, &points)?;
        self.probed.insert(pid, since, links);
        Ok(Outcome::Probed(found))
    }

    /// Detaches the probes of processes that exited.
    pub fn sweep(&mut self, ebpf: &mut Ebpf) {
        self.probed.sweep(ebpf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_matched_by_path() {
        assert!(is_instance(TOKIO_POLL_PATH, TOKIO_POLL_PATH));
        assert!(is_instance(
            "tokio::runtime::task::raw::poll::<my::Fut, tokio::Sched>",
            TOKIO_POLL_PATH
        ));
        assert!(!is_instance(
            "tokio::runtime::task::raw::poll_future",
            TOKIO_POLL_PATH
        ));
        assert!(!is_instance(
            "tokio::sync::mpsc::list::Tx<T>::push_x",
            TOKIO_PUSH_PATH
        ));
    }

    /// Channel sends of the test binary's own, kept out of line (the agent's may all be
    /// inlined into their callers, which leaves no `push` to find).
    #[inline(never)]
    fn send_paths(tx: &tokio::sync::mpsc::Sender<std::path::PathBuf>, n: usize) -> usize {
        (0..n)
            .filter(|i| tx.try_send(std::path::PathBuf::from(i.to_string())).is_ok())
            .count()
    }

    /// More callers of the same `push`, so that it is not inlined into each of them.
    #[inline(never)]
    fn send_one_path(tx: &tokio::sync::mpsc::Sender<std::path::PathBuf>, i: usize) -> bool {
        match i % 4 {
            0 => tx.try_send(std::path::PathBuf::from("/a")).is_ok(),
            1 => tx.try_send(std::path::PathBuf::from("/b")).is_ok(),
            2 => tx.try_send(std::path::PathBuf::from("/c")).is_ok(),
            _ => tx.try_send(std::path::PathBuf::from("/d")).is_ok(),
        }
    }

    #[test]
    fn this_tokio_binary_has_polls_but_a_c_binary_has_none() {
        // The unit-test binary runs tokio tasks (and its channels).
        let (tx, _rx) = tokio::sync::mpsc::channel(4);
        assert_eq!(send_paths(&tx, std::hint::black_box(8)), 4);
        assert!((0..4).all(|i| !send_one_path(&tx, std::hint::black_box(i))));
        let me = std::fs::read("/proc/self/exe").expect("own exe");
        let found = instances(&me, "self").expect("instances");
        assert!(!found.poll.is_empty(), "{found:?}");
        assert!(!found.spawn.is_empty(), "tasks spawned: {found:?}");
        let ls = std::fs::read("/bin/ls").expect("/bin/ls");
        assert!(matches!(
            instances(&ls, "ls"),
            Err(TokioProbeError::NoInstance { .. })
        ));
    }
}
