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
    /// Reads and writes are probed in the library's internal functions that both exported
    /// forms call (`shared_callee`), not at the exported wrappers.
    pub internal: bool,
}

/// `TLS_PROBES` indices of the calls that `shared_callee` can move: (plain, `_ex`).
const READ: (usize, usize) = (0, 2);
const WRITE: (usize, usize) = (1, 3);

/// Finds the functions in the ELF file `data` (named `file` in errors).
pub fn library(data: &[u8], file: &str) -> Result<Library, TlsProbeError> {
    let elf =
        object::File::parse(data).map_err(|e| TlsProbeError::Read(file.into(), e.to_string()))?;
    let mut addrs: [Option<u64>; TLS_PROBES.len()] = Default::default();
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
        if addrs[i].is_none() && code_at(&elf, data, sym.address()).is_some() {
            addrs[i] = Some(sym.address());
        }
    }
    // Reads and writes are the point; the `_ex` forms and the binding calls are optional
    // (BoringSSL has no `_ex`).
    if addrs[0].is_none() || addrs[1].is_none() {
        return Err(TlsProbeError::NoSymbols(file.into()));
    }
    let mut found = Library::default();
    let moved = if elf.architecture() == object::Architecture::X86_64 {
        let callee =
            |(plain, ex): (usize, usize)| shared_callee(&elf, data, addrs[plain]?, addrs[ex]?);
        match (callee(READ), callee(WRITE)) {
            (Some(r), Some(w)) if r != w => Some((r, w)),
            _ => None,
        }
    } else {
        None
    };
    if let Some((r, w)) = moved {
        // Both forms of each call reach the library through its internal function, probed
        // with the `_ex` programs (same arguments, same result): the wrappers are not probed,
        // so no call is seen twice.
        for ((plain, ex), at) in [(READ, r), (WRITE, w)] {
            addrs[plain] = None;
            addrs[ex] = Some(at);
        }
        found.internal = true;
    }
    for (i, a) in addrs.iter().enumerate() {
        found.offsets[i] = a.and_then(|a| code_at(&elf, data, a)).map(|(off, _)| off);
    }
    Ok(found)
}

/// The file offset of the code at address `addr`, and the bytes from there to the end of its
/// section.
fn code_at<'d>(elf: &object::File<'d>, data: &'d [u8], addr: u64) -> Option<(u64, &'d [u8])> {
    let section = elf.sections().find(|s| {
        s.kind() == object::SectionKind::Text
            && (s.address()..s.address() + s.size()).contains(&addr)
    })?;
    let (start, size) = section.file_range()?;
    let off = addr - section.address() + start;
    let end = start.checked_add(size)?;
    Some((off, data.get(off as usize..end as usize)?))
}

/// The kernel runs a probed `push` itself, but single-steps most other instructions out of line,
/// which costs a second trap (about 9 to 15 µs in a VM, `bench/uprobe_cost.sh`). OpenSSL's
/// exported `SSL_read`/`SSL_read_ex` (and writes) begin with `sub $n,%rsp`, where a return
/// probe must sit, and both call one internal function, `ssl_read_internal(ssl, buf, num,
/// *readbytes)`, with the `_ex` form's arguments and result, whose first instruction is a
/// `push`. Probing it there gives the same calls at a tenth of the cost.
///
/// Returns that function's address when the code shows it: the `_ex` wrapper at `ex` passes
/// its four argument registers untouched to its first call (only `endbr64`, `push` or `sub
/// $n,%rsp` come before), the plain wrapper at `plain` calls the same function, and that
/// function begins with a `push` of a register. Anything else (BoringSSL, another compiler's
/// layout) keeps the probes at the exported functions.
fn shared_callee(elf: &object::File, data: &[u8], plain: u64, ex: u64) -> Option<u64> {
    use iced_x86::{Code, Decoder, DecoderOptions, Mnemonic, OpKind, Register};
    let decode = |addr: u64| {
        let (_, bytes) = code_at(elf, data, addr)?;
        let bytes = &bytes[..bytes.len().min(256)];
        Some(Decoder::with_ip(64, bytes, addr, DecoderOptions::NONE))
    };
    let direct_call = |i: &iced_x86::Instruction| {
        (i.code() == Code::Call_rel32_64).then(|| i.near_branch_target())
    };
    let mut target = None;
    for insn in decode(ex)?.into_iter().take(8) {
        if let Some(t) = direct_call(&insn) {
            target = Some(t);
            break;
        }
        let keeps_arguments = match insn.mnemonic() {
            Mnemonic::Endbr64 => true,
            Mnemonic::Push => insn.op0_kind() == OpKind::Register,
            Mnemonic::Sub => {
                insn.op0_kind() == OpKind::Register
                    && insn.op0_register() == Register::RSP
                    && matches!(
                        insn.op1_kind(),
                        OpKind::Immediate8to64 | OpKind::Immediate32to64
                    )
            }
            _ => false,
        };
        if !keeps_arguments {
            return None;
        }
    }
    let target = target?;
    let calls_it = decode(plain)?
        .into_iter()
        .take_while(|i| !i.is_invalid() && i.mnemonic() != Mnemonic::Ret)
        .take(64)
        .any(|i| direct_call(&i) == Some(target));
    let first = decode(target)?.into_iter().next()?;
    (calls_it && first.mnemonic() == Mnemonic::Push && first.op0_kind() == OpKind::Register)
        .then_some(target)
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
                let lib = std::fs::read(path)
                    .map_err(|e| TlsProbeError::Read(name.clone(), e.to_string()))
                    .and_then(|data| library(&data, &name))
                    .map_err(|e| e.to_string());
                if let Ok(lib) = &lib {
                    tracing::debug!(
                        "{name}: reads and writes probed {}",
                        match lib.internal {
                            true => "in its internal functions (first instruction emulated)",
                            false => "at the exported calls",
                        }
                    );
                }
                lib
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
        // Debian's OpenSSL 3: both forms of SSL_read and of SSL_write call one internal
        // function each, probed instead of the wrappers (`shared_callee`).
        assert!(lib.internal, "{lib:?}");
        let (r, w) = (lib.offsets[READ.1].unwrap(), lib.offsets[WRITE.1].unwrap());
        assert!(lib.offsets[READ.0].is_none() && lib.offsets[WRITE.0].is_none());
        assert_ne!(r, w);
        for (i, off) in lib.offsets.iter().enumerate().skip(4) {
            assert!(
                off.is_some(),
                "{} is exported by OpenSSL 3",
                TLS_PROBES[i].0
            );
        }
        // The internal functions begin with a push (0x41 0x5x: push r12-r15, or 0x5x).
        for off in [r, w] {
            let b = &data[off as usize..off as usize + 2];
            assert!(
                (0x50..=0x57).contains(&b[0]) || (b[0] == 0x41 && (0x50..=0x57).contains(&b[1])),
                "{b:02x?}"
            );
        }
        // The analysis refuses a pair that does not share its callee.
        let elf = object::File::parse(&*data).unwrap();
        let addr = |name: &str| {
            elf.dynamic_symbols()
                .find(|s| s.name().is_ok_and(|n| n.split('@').next() == Some(name)))
                .map(|s| s.address())
                .unwrap()
        };
        assert!(shared_callee(&elf, &data, addr("SSL_read"), addr("SSL_read_ex")).is_some());
        assert_eq!(
            shared_callee(&elf, &data, addr("SSL_read"), addr("SSL_write_ex")),
            None
        );
        // SSL_free's first instruction is a test, not a call: no callee.
        assert_eq!(
            shared_callee(&elf, &data, addr("SSL_read"), addr("SSL_free")),
            None
        );
        let ls = std::fs::read("/bin/ls").expect("/bin/ls");
        assert!(matches!(
            library(&ls, "ls"),
            Err(TlsProbeError::NoSymbols(_))
        ));
    }
}
