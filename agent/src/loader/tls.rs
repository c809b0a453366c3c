//! Uprobes on OpenSSL's read and write calls (see `agent-ebpf/src/tls.rs`), attached to each
//! selected process that maps `libssl.so*`, found from `/proc/PID/maps` through
//! `/proc/PID/root` (so a container's own library is the one probed), and detached when the
//! process exits. In whole-host mode each library is probed once for every process instead
//! (the system's at start), so short-lived clients are traced from their first call.
//!
//! Not probed: OpenSSL linked into an executable (Node's, BoringSSL in grpcio): those stacks
//! use memory BIOs, whose calls make no syscall to bind them to a socket (see
//! `agent-ebpf/src/tls.rs`).
//!
//! A process that has not mapped the library yet (Python loads `_ssl` on `import ssl`) is
//! looked at again for a few ticks. Symbols are resolved here, once per file, from its dynamic
//! symbol table (an exported API needs no debug symbols), and attached by file offset.
use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use agent_common::TLS_PROBES;
use aya::{programs::uprobe::UProbeAttachLocation, Ebpf};
use object::{Object, ObjectSection, ObjectSymbol};

use super::per_process::{self, AttachError, Point, Processes};

/// Every kernel program this module loads (`agent check` verifies them).
/// The OpenSSL probes, and the HTTP/2 frame walkers their return probes tail-call
/// (`agent_common::TLS_H2_WALK_PROGRAMS`, loaded as uprobe programs, never attached).
pub const PROGRAMS: [&str; 12] = [
    "ssl_read",
    "ssl_write",
    "ssl_read_ex",
    "ssl_write_ex",
    "ssl_do_handshake",
    "ssl_handshake_ret",
    "ssl_set_fd",
    "ssl_free",
    "ssl_ret",
    "ssl_ex_ret",
    agent_common::TLS_H2_WALK_PROGRAMS[0],
    agent_common::TLS_H2_WALK_PROGRAMS[1],
];
/// Processes probed at once; past that a new one is not followed (counted).
pub const MAX_PROCESSES: usize = 1024;
/// How many ticks a process without the library mapped is looked at again.
const RETRIES: u8 = 10;
/// Processes waiting for their library at once.
const MAX_WAITING: usize = 4096;
/// Files larger than this are not read for symbols (a Node executable is about 100 MB).
const MAX_FILE_BYTES: u64 = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TlsProbeError {
    #[error("cannot read {0}: {1}")]
    Read(String, String),
    #[error("{0}: no SSL_read and SSL_write exported")]
    NoSymbols(String),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("{MAX_PROCESSES} processes are probed for TLS already")]
    Full,
    #[error("HTTP/2 over TLS frame walkers: {0}")]
    Walkers(String),
    /// What an earlier look at the same file found.
    #[error("{0}")]
    Judged(String),
}

/// File offsets of the OpenSSL functions in one file, by `TLS_PROBES` index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Library {
    pub offsets: [Option<u64>; TLS_PROBES.len()],
}

/// Finds the functions in the ELF file `data` (named `file` in errors).
pub fn library(data: &[u8], file: &str) -> Result<Library, TlsProbeError> {
    let elf =
        object::File::parse(data).map_err(|e| TlsProbeError::Read(file.into(), e.to_string()))?;
    let mut found = Library::default();
    for sym in elf.dynamic_symbols().chain(elf.symbols()) {
        if sym.kind() != object::SymbolKind::Text || sym.address() == 0 || sym.is_undefined() {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        // Versioned names (`SSL_read@@OPENSSL_3.0.0`) as some tools write them.
        let name = name.split('@').next().unwrap_or(name);
        let Some(i) = TLS_PROBES.iter().position(|(s, _, _)| *s == name) else {
            continue;
        };
        if found.offsets[i].is_some() {
            continue;
        }
        let Some(section) = sym
            .section_index()
            .and_then(|i| elf.section_by_index(i).ok())
        else {
            continue;
        };
        let Some((start, _)) = section.file_range() else {
            continue;
        };
        found.offsets[i] = Some(sym.address() - section.address() + start);
    }
    // Reads and writes are the point; the `_ex` forms and the binding calls are optional
    // (BoringSSL has no `_ex`).
    if found.offsets[0].is_none() || found.offsets[1].is_none() {
        return Err(TlsProbeError::NoSymbols(file.into()));
    }
    Ok(found)
}

/// The file of process `pid` that holds OpenSSL, as a path valid from the agent: a mapped
/// `libssl.so*`, else the executable when it exports `SSL_read` (checked by the caller).
pub fn mapped_library(pid: u32) -> Option<PathBuf> {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            Path::new(p)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libssl.so"))
        })
        .map(|p| root.join(p.trim_start_matches('/')))
}

/// The probes of library `file`: return probes first (see `python.rs`), so that a call entered
/// between the two attachments leaves no note on its thread that a later syscall would take
/// for its own.
fn points<'a>(lib: &Library, file: &'a Path) -> Vec<Point<'a>> {
    let mut points = Vec::new();
    for ret in [true, false] {
        for (i, (_, entry, exit)) in TLS_PROBES.iter().enumerate() {
            let Some(off) = lib.offsets[i] else { continue };
            let program = match (ret, exit) {
                (true, Some(exit)) => *exit,
                (true, None) => continue,
                (false, _) => *entry,
            };
            points.push(Point {
                program,
                location: UProbeAttachLocation::AbsoluteOffset(off),
                file,
                cookie: None,
            });
        }
    }
    points
}

/// What happened to one process.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Already probed, gone, or holding no OpenSSL (yet: looked at again for a while).
    Nothing,
    /// Its TLS calls are followed now, in this file.
    Probed(PathBuf),
}

/// Libraries probed for every process at once, at most (whole-host mode).
const MAX_FILES: usize = 256;
/// Where distributions install OpenSSL 3's libssl, probed at start in whole-host mode so
/// that a short-lived client (curl) is traced from its first call.
const SYSTEM_LIBRARIES: [&str; 4] = [
    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    "/lib/x86_64-linux-gnu/libssl.so.3",
    "/usr/lib64/libssl.so.3",
    "/usr/lib/libssl.so.3",
];

#[derive(Default)]
pub struct TlsProbes {
    loaded: bool,
    probed: Processes,
    /// Whole-host mode: the libraries probed for every process, by (device, inode). A process
    /// starting later is then traced from its first call, which per-process probes attached
    /// after its `exec` would miss.
    everywhere: Option<HashMap<(u64, u64), per_process::Links>>,
    /// What each file holds, by (device, inode).
    files: HashMap<(u64, u64), Result<Library, String>>,
    /// Processes with no OpenSSL mapped yet: ticks left to look again.
    waiting: HashMap<u32, u8>,
}

impl TlsProbes {
    /// Every process's and library's links, taken out of their programs (`per_process::take`).
    pub fn take_links(
        &mut self,
        ebpf: &mut Ebpf,
        out: &mut Vec<aya::programs::uprobe::UProbeLink>,
    ) {
        self.probed.take_all(ebpf, out);
        for (_, links) in self.everywhere.iter_mut().flat_map(|m| m.drain()) {
            per_process::take(ebpf, links, out);
        }
    }

    /// Whole-host mode: libraries are probed for every process that maps them, starting with
    /// the system's own. Returns what each system library found gave.
    pub fn whole_host(&mut self, ebpf: &mut Ebpf) -> Vec<(PathBuf, Result<(), TlsProbeError>)> {
        self.everywhere = Some(HashMap::new());
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for path in SYSTEM_LIBRARIES.map(PathBuf::from) {
            let Ok(m) = std::fs::metadata(&path) else {
                continue;
            };
            if seen.contains(&(m.dev(), m.ino())) {
                continue;
            }
            seen.push((m.dev(), m.ino()));
            let r = self.everywhere(ebpf, &path).map(|_| ());
            out.push((path, r));
        }
        out
    }

    /// Probes library `path` for every process (whole-host mode). True if newly probed.
    fn everywhere(&mut self, ebpf: &mut Ebpf, path: &Path) -> Result<bool, TlsProbeError> {
        let Ok(m) = std::fs::metadata(path) else {
            return Ok(false);
        };
        let id = (m.dev(), m.ino());
        if self
            .everywhere
            .as_ref()
            .is_some_and(|e| e.contains_key(&id))
        {
            return Ok(false);
        }
        let Some(lib) = self.judge(path) else {
            return Ok(false);
        };
        let lib = lib.map_err(TlsProbeError::Judged)?;
        let files = self.everywhere.get_or_insert_with(HashMap::new);
        if files.len() >= MAX_FILES {
            return Err(TlsProbeError::Full);
        }
        self.load(ebpf)?;
        let links = per_process::attach_everywhere(ebpf, &points(&lib, path))?;
        self.everywhere
            .get_or_insert_with(HashMap::new)
            .insert(id, links);
        Ok(true)
    }

    fn load(&mut self, ebpf: &mut Ebpf) -> Result<(), TlsProbeError> {
        if !self.loaded {
            per_process::load(ebpf, &PROGRAMS)?;
            super::fill_program_array(
                ebpf,
                agent_common::MAP_TLS_H2_WALK,
                &agent_common::TLS_H2_WALK_PROGRAMS,
            )
            .map_err(|e| TlsProbeError::Walkers(e.to_string()))?;
            self.loaded = true;
        }
        Ok(())
    }

    /// Probes process `pid` if it holds OpenSSL, unless it is probed already.
    pub fn attach(&mut self, ebpf: &mut Ebpf, pid: u32) -> Result<Outcome, TlsProbeError> {
        if self.everywhere.is_some() {
            return match mapped_library(pid) {
                Some(path) => {
                    self.waiting.remove(&pid);
                    Ok(match self.everywhere(ebpf, &path)? {
                        true => Outcome::Probed(path),
                        false => Outcome::Nothing,
                    })
                }
                None => {
                    self.wait(pid);
                    Ok(Outcome::Nothing)
                }
            };
        }
        let Some(since) = per_process::start_time(pid) else {
            self.waiting.remove(&pid);
            return Ok(Outcome::Nothing);
        };
        if self.probed.contains(pid, since) {
            self.waiting.remove(&pid);
            return Ok(Outcome::Nothing);
        }
        let (file, lib) = match self.find(pid) {
            Some(found) => found,
            None => {
                self.wait(pid);
                return Ok(Outcome::Nothing);
            }
        };
        self.waiting.remove(&pid);
        let lib = lib.map_err(TlsProbeError::Judged)?;
        if self.probed.len() >= MAX_PROCESSES {
            return Err(TlsProbeError::Full);
        }
        self.load(ebpf)?;
        let links = per_process::attach_all(ebpf, pid, &points(&lib, &file))?;
        self.probed.insert(pid, since, links);
        Ok(Outcome::Probed(file))
    }

    /// The OpenSSL file of `pid` and what it holds, judged once per file.
    fn find(&mut self, pid: u32) -> Option<(PathBuf, Result<Library, String>)> {
        let path = mapped_library(pid)?;
        let r = self.judge(&path)?;
        Some((path, r))
    }

    fn judge(&mut self, path: &Path) -> Option<Result<Library, String>> {
        let m = std::fs::metadata(path).ok()?;
        let r = self
            .files
            .entry((m.dev(), m.ino()))
            .or_insert_with(|| {
                let name = path.display().to_string();
                if m.len() > MAX_FILE_BYTES {
                    return Err(format!("{name}: too large to read for symbols"));
                }
                std::fs::read(path)
                    .map_err(|e| TlsProbeError::Read(name.clone(), e.to_string()))
                    .and_then(|data| library(&data, &name))
                    .map_err(|e| e.to_string())
            })
            .clone();
        Some(r)
    }

    fn wait(&mut self, pid: u32) {
        if !self.waiting.contains_key(&pid) && self.waiting.len() < MAX_WAITING {
            self.waiting.insert(pid, RETRIES);
        }
    }

    /// Processes to look at again (their library may be mapped now), each for a few ticks.
    pub fn waiting(&mut self) -> Vec<u32> {
        self.waiting.retain(|pid, left| {
            *left = left.saturating_sub(1);
            *left > 0 && Path::new(&format!("/proc/{pid}")).exists()
        });
        self.waiting.keys().copied().collect()
    }

    /// Detaches the probes of processes that exited.
    pub fn sweep(&mut self, ebpf: &mut Ebpf) {
        self.probed.sweep(ebpf);
    }

    pub fn probed(&self) -> usize {
        self.probed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_libssl_exports_the_calls_and_ls_does_not() {
        let path = "/usr/lib/x86_64-linux-gnu/libssl.so.3";
        let data = std::fs::read(path).expect("libssl.so.3 (Debian's libssl3)");
        let lib = library(&data, path).expect("OpenSSL symbols");
        assert!(
            lib.offsets.iter().all(Option::is_some),
            "every call probed is exported by OpenSSL 3: {lib:?}"
        );
        let ls = std::fs::read("/bin/ls").expect("/bin/ls");
        assert!(matches!(
            library(&ls, "ls"),
            Err(TlsProbeError::NoSymbols(_))
        ));
    }
}
