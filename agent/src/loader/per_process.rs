//! Uprobes attached to one process at a time (`UProbeScope::OneProcess`: other processes that
//! map the same files are never touched), remembered with the process's start time so that a
//! reused pid is judged afresh, and detached when the process exits.
use std::{collections::HashMap, path::Path};

use aya::{
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeLinkId, UProbeScope},
        ProgramError, UProbe,
    },
    Ebpf,
};

/// The links of one process's probes, by program.
pub type Links = Vec<(&'static str, UProbeLinkId)>;

/// One probe to attach: its program, where in the file (a symbol, or a file offset), the
/// file, and the attach cookie the program reads.
pub struct Point<'a> {
    pub program: &'static str,
    pub location: UProbeAttachLocation<'a>,
    pub file: &'a Path,
    pub cookie: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("program {0} is missing from the kernel object")]
    Missing(&'static str),
    #[error("{program}: {source}")]
    Program {
        program: &'static str,
        source: ProgramError,
    },
}

/// The processes probed (by pid: start time and links).
#[derive(Default)]
pub struct Processes {
    probed: HashMap<u32, (u64, Links)>,
}

impl Processes {
    /// Whether process `pid`, started at `since`, is probed already.
    pub fn contains(&self, pid: u32, since: u64) -> bool {
        self.probed.get(&pid).is_some_and(|(t, _)| *t == since)
    }

    pub fn insert(&mut self, pid: u32, since: u64, links: Links) {
        self.probed.insert(pid, (since, links));
    }

    pub fn len(&self) -> usize {
        self.probed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.probed.is_empty()
    }

    /// Every process's links, taken out of their programs (`take`).
    pub fn take_all(&mut self, ebpf: &mut Ebpf, out: &mut Vec<UProbeLink>) {
        for (_, (_, links)) in self.probed.drain() {
            take(ebpf, links, out);
        }
    }

    /// Detaches the probes of processes that exited (or whose pid another process took).
    pub fn sweep(&mut self, ebpf: &mut Ebpf) {
        let gone: Vec<u32> = self
            .probed
            .iter()
            .filter(|(pid, (since, _))| start_time(**pid) != Some(*since))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in gone {
            if let Some((_, links)) = self.probed.remove(&pid) {
                detach(ebpf, links);
            }
        }
    }
}

/// A process's identity across pid reuse: its start time (`/proc/<pid>/stat`, field 22).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Counted after the command name (which may hold spaces) ends with ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

pub fn uprobe<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<&'a mut UProbe, AttachError> {
    ebpf.program_mut(program)
        .ok_or(AttachError::Missing(program))?
        .try_into()
        .map_err(|source| AttachError::Program { program, source })
}

/// Loads `programs` (once per agent).
pub fn load(ebpf: &mut Ebpf, programs: &[&'static str]) -> Result<(), AttachError> {
    for program in programs {
        let u = uprobe(ebpf, program)?;
        if u.fd().is_err() {
            u.load()
                .map_err(|source| AttachError::Program { program, source })?;
        }
    }
    Ok(())
}

/// Attaches every point to process `pid`, all or nothing: a half-probed process would be
/// half followed.
pub fn attach_all(ebpf: &mut Ebpf, pid: u32, points: &[Point]) -> Result<Links, AttachError> {
    let Some(one) = std::num::NonZeroU32::new(pid) else {
        return Ok(Vec::new());
    };
    attach_scoped(ebpf, UProbeScope::OneProcess(one), points)
}

/// As `attach_all`, for every process that maps the files (whole-host tracing, where every
/// process is selected and the programs still check the selection).
pub fn attach_everywhere(ebpf: &mut Ebpf, points: &[Point]) -> Result<Links, AttachError> {
    attach_scoped(ebpf, UProbeScope::AllProcesses, points)
}

fn attach_scoped(
    ebpf: &mut Ebpf,
    scope: UProbeScope,
    points: &[Point],
) -> Result<Links, AttachError> {
    let mut links = Vec::with_capacity(points.len());
    for p in points {
        let at = UProbeAttachPoint {
            location: match p.location {
                UProbeAttachLocation::Symbol(s) => UProbeAttachLocation::Symbol(s),
                UProbeAttachLocation::SymbolOffset(s, o) => {
                    UProbeAttachLocation::SymbolOffset(s, o)
                }
                UProbeAttachLocation::AbsoluteOffset(o) => UProbeAttachLocation::AbsoluteOffset(o),
            },
            cookie: p.cookie,
        };
        let program = p.program;
        match uprobe(ebpf, program).and_then(|u| {
            u.attach(at, p.file, scope)
                .map_err(|source| AttachError::Program { program, source })
        }) {
            Ok(link) => links.push((program, link)),
            Err(e) => {
                detach(ebpf, links);
                return Err(e);
            }
        }
    }
    Ok(links)
}

/// Takes `links` out of their programs as owned links: dropping one detaches it, so the agent
/// can detach many at once on its way out (`control::detach_all`).
pub fn take(ebpf: &mut Ebpf, links: Links, out: &mut Vec<UProbeLink>) {
    for (program, link) in links {
        if let Ok(link) = uprobe(ebpf, program).and_then(|p| {
            p.take_link(link)
                .map_err(|source| AttachError::Program { program, source })
        }) {
            out.push(link);
        }
    }
}

pub fn detach(ebpf: &mut Ebpf, links: Links) {
    for (program, link) in links {
        if let Ok(p) = uprobe(ebpf, program) {
            let _ = p.detach(link);
        }
    }
}
