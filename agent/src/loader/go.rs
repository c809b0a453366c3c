//! Uprobes on Go executables, attached once per executable for every process that runs it, as
//! the runtime classifier finds a selected process running it:
//! - `net/http` and goroutine spawns, for in-process links (`agent-ebpf/src/propagate/goroutine.rs`);
//! - `crypto/tls`, for the plaintext of TLS connections (`agent-ebpf/src/gotls.rs`).
//!
//! Functions are found by name in the symbol table or, in a stripped binary, in the
//! `.gopclntab` (`gosym`), and attached by file offset. Returns are probed at each return
//! instruction, never with a uretprobe (Go moves goroutine stacks).
use std::{collections::HashMap, os::unix::fs::MetadataExt, path::Path};

use agent_common::{
    GO_NEWPROC_PROGRAM, GO_NEWPROC_RET_PROGRAM, GO_NEWPROC_SYMBOL, GO_REQUEST_WRITE_PROGRAM,
    GO_REQUEST_WRITE_SYMBOL, GO_ROUNDTRIP_PROGRAM, GO_ROUNDTRIP_SYMBOL, GO_TLS_CLOSE_PROGRAM,
    GO_TLS_CLOSE_SYMBOL, GO_TLS_HANDSHAKE_PROGRAM, GO_TLS_HANDSHAKE_RET_PROGRAM,
    GO_TLS_HANDSHAKE_SYMBOL, GO_TLS_READ_PROGRAM, GO_TLS_READ_RET_PROGRAM, GO_TLS_READ_SYMBOL,
    GO_TLS_WRITE_PROGRAM, GO_TLS_WRITE_RET_PROGRAM, GO_TLS_WRITE_SYMBOL,
};
use aya::{programs::uprobe::UProbeAttachLocation, Ebpf};

use super::{
    gosym::{self, Func},
    per_process::{self, Links, Point},
};

/// Every kernel program this module loads (`agent check` verifies them).
pub const PROGRAMS: [&str; 11] = [
    GO_ROUNDTRIP_PROGRAM,
    GO_REQUEST_WRITE_PROGRAM,
    GO_NEWPROC_PROGRAM,
    GO_NEWPROC_RET_PROGRAM,
    GO_TLS_READ_PROGRAM,
    GO_TLS_WRITE_PROGRAM,
    GO_TLS_READ_RET_PROGRAM,
    GO_TLS_WRITE_RET_PROGRAM,
    GO_TLS_CLOSE_PROGRAM,
    GO_TLS_HANDSHAKE_PROGRAM,
    GO_TLS_HANDSHAKE_RET_PROGRAM,
];
/// The functions probed, by index into `gosym::functions`'s answer.
const SYMBOLS: [&str; 7] = [
    GO_ROUNDTRIP_SYMBOL,
    GO_REQUEST_WRITE_SYMBOL,
    GO_NEWPROC_SYMBOL,
    GO_TLS_READ_SYMBOL,
    GO_TLS_WRITE_SYMBOL,
    GO_TLS_CLOSE_SYMBOL,
    GO_TLS_HANDSHAKE_SYMBOL,
];
/// Go executables larger than this are not read for symbols.
const MAX_FILE_BYTES: u64 = 1 << 30;
/// Executables probed at once; past that one is not probed (counted).
const MAX_FILES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum GoProbeError {
    #[error("{0}")]
    Returns(#[from] ReturnsError),
    #[error("{0} not found")]
    NoFunction(&'static str),
    #[error(transparent)]
    Load(#[from] super::per_process::AttachError),
    #[error("too many Go processes or executables probed at once")]
    Full,
}

/// What was attached to one executable, each group or why not.
#[derive(Debug, PartialEq, Eq)]
pub enum Attached {
    /// Already probed (another process runs the same file), or gone.
    Before,
    New {
        /// `net/http`'s outgoing requests, linked to their request by goroutine.
        http: Result<(), String>,
        /// Goroutine spawns followed: how many return instructions were probed.
        spawns: Result<usize, String>,
        /// `crypto/tls` read and write: how many return instructions were probed.
        tls: Result<usize, String>,
    },
}

/// The probe points (program, file offset) of one executable, each group or why it cannot be
/// probed, with how many of a group's points are return instructions.
struct Plan {
    http: Result<Vec<At>, String>,
    spawns: Result<(Vec<At>, usize), String>,
    tls: Result<(Vec<At>, usize), String>,
}

/// A probe point: its program and file offset.
type At = (&'static str, u64);

/// File identity: (device, inode).
type FileId = (u64, u64);

/// The Go executables probed, each once for every process that runs it, once a selected process
/// (any, in whole-host mode) is found running it. Per-process uprobes (`UProbeScope::OneProcess`)
/// are not used: they fire only in the thread whose id is the pid, and a Go program runs its
/// goroutines on many threads. A process outside the selection that runs the same file as a
/// selected one takes the breakpoints too; the kernel programs drop its calls at their
/// selection check.
#[derive(Default)]
pub struct GoProbes {
    loaded: bool,
    /// The executables probed, by file identity.
    files: HashMap<FileId, Links>,
}

impl GoProbes {
    /// Every executable's links, taken out of their programs (`per_process::take`).
    pub fn take_links(
        &mut self,
        ebpf: &mut Ebpf,
        out: &mut Vec<aya::programs::uprobe::UProbeLink>,
    ) {
        for (_, links) in self.files.drain() {
            per_process::take(ebpf, links, out);
        }
    }

    /// Loads (verifies) the probe programs now, so that the first Go process found later is
    /// probed at once rather than after their verification.
    pub fn preload(&mut self, ebpf: &mut Ebpf) -> Result<(), GoProbeError> {
        if !self.loaded {
            per_process::load(ebpf, &PROGRAMS)?;
            self.loaded = true;
        }
        Ok(())
    }

    /// Probes the Go executable at `exe` (a path valid from the agent's mount namespace), run
    /// by a selected process, unless it already is.
    pub fn attach(&mut self, ebpf: &mut Ebpf, exe: &Path) -> Result<Attached, GoProbeError> {
        let Ok(m) = std::fs::metadata(exe) else {
            return Ok(Attached::Before);
        };
        let id = (m.dev(), m.ino());
        if self.files.contains_key(&id) {
            return Ok(Attached::Before);
        }
        if self.files.len() >= MAX_FILES {
            return Err(GoProbeError::Full);
        }
        self.preload(ebpf)?;
        let plan = plan(exe, m.len())?;
        let mut links: Links = Vec::new();
        let mut group = |points: &[At]| {
            let points: Vec<Point> = points
                .iter()
                .map(|&(program, off)| Point {
                    program,
                    location: UProbeAttachLocation::AbsoluteOffset(off),
                    file: exe,
                    cookie: None,
                })
                .collect();
            per_process::attach_everywhere(ebpf, &points)
                .map(|l| links.extend(l))
                .map_err(|e| e.to_string())
        };
        let http = plan.http.and_then(|p| group(&p));
        let spawns = plan.spawns.and_then(|(p, n)| group(&p).map(|_| n));
        let tls = plan.tls.and_then(|(p, n)| group(&p).map(|_| n));
        self.files.insert(id, links);
        Ok(Attached::New { http, spawns, tls })
    }
}

/// Reads executable `exe` (of `len` bytes) for the functions probed and their returns.
fn plan(exe: &Path, len: u64) -> Result<Plan, GoProbeError> {
    if len > MAX_FILE_BYTES {
        return Err(ReturnsError::Read("too large to read for symbols".into()).into());
    }
    let data = std::fs::read(exe).map_err(|e| ReturnsError::Read(e.to_string()))?;
    let funcs = gosym::functions(&data, &SYMBOLS).map_err(|e| ReturnsError::Elf(e.to_string()))?;
    let func = |i: usize| funcs[i].ok_or(GoProbeError::NoFunction(SYMBOLS[i]));
    let http = (|| {
        Ok::<_, GoProbeError>(vec![
            (GO_ROUNDTRIP_PROGRAM, func(0)?.file_offset),
            (GO_REQUEST_WRITE_PROGRAM, func(1)?.file_offset),
        ])
    })()
    .map_err(|e| e.to_string());
    // Returns before entries: an entry never leaves a note that no return takes.
    let spawns = (|| {
        let f = func(2)?;
        let mut points = returns(&data, &f, GO_NEWPROC_RET_PROGRAM, GO_NEWPROC_SYMBOL)?;
        let n = points.len();
        points.push((GO_NEWPROC_PROGRAM, f.file_offset));
        Ok::<_, GoProbeError>((points, n))
    })()
    .map_err(|e| e.to_string());
    let tls = (|| {
        let (read, write, close, hs) = (func(3)?, func(4)?, func(5)?, func(6)?);
        let mut points = returns(&data, &read, GO_TLS_READ_RET_PROGRAM, GO_TLS_READ_SYMBOL)?;
        points.extend(returns(
            &data,
            &write,
            GO_TLS_WRITE_RET_PROGRAM,
            GO_TLS_WRITE_SYMBOL,
        )?);
        points.extend(returns(
            &data,
            &hs,
            GO_TLS_HANDSHAKE_RET_PROGRAM,
            GO_TLS_HANDSHAKE_SYMBOL,
        )?);
        let n = points.len();
        points.extend([
            (GO_TLS_CLOSE_PROGRAM, close.file_offset),
            (GO_TLS_HANDSHAKE_PROGRAM, hs.file_offset),
            (GO_TLS_READ_PROGRAM, read.file_offset),
            (GO_TLS_WRITE_PROGRAM, write.file_offset),
        ]);
        Ok::<_, GoProbeError>((points, n))
    })()
    .map_err(|e| e.to_string());
    Ok(Plan { http, spawns, tls })
}

/// The return instructions of `f` as points for `program`.
fn returns(
    data: &[u8],
    f: &Func,
    program: &'static str,
    symbol: &str,
) -> Result<Vec<(&'static str, u64)>, GoProbeError> {
    Ok(return_offsets(data, f, symbol)?
        .into_iter()
        .map(|off| (program, f.file_offset + off))
        .collect())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReturnsError {
    #[error("cannot read the executable: {0}")]
    Read(String),
    #[error("not an ELF file the agent can read: {0}")]
    Elf(String),
    #[error("{symbol}: {why}")]
    Code { symbol: String, why: &'static str },
}

/// Offsets, from the start of function `f` (named `symbol` in errors) in the ELF file `elf`,
/// of its return instructions (x86-64), decoded from the function's first byte so that no
/// offset falls inside an instruction. Decoding stops at the first undecodable byte past the
/// last return: a size from `.gopclntab` runs to the next function, over padding.
pub fn return_offsets(elf: &[u8], f: &Func, symbol: &str) -> Result<Vec<u64>, ReturnsError> {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};
    let code = |why| ReturnsError::Code {
        symbol: symbol.into(),
        why,
    };
    let file = object::File::parse(elf).map_err(|e| ReturnsError::Elf(e.to_string()))?;
    if object::Object::architecture(&file) != object::Architecture::X86_64 {
        return Err(ReturnsError::Elf("not x86-64".into()));
    }
    let start = usize::try_from(f.file_offset).map_err(|_| code("outside the file"))?;
    let bytes = start
        .checked_add(f.size as usize)
        .and_then(|end| elf.get(start..end))
        .filter(|b| !b.is_empty())
        .ok_or_else(|| code("outside the file"))?;
    let mut decoder = Decoder::with_ip(64, bytes, f.addr, DecoderOptions::NONE);
    let mut out = Vec::new();
    for insn in &mut decoder {
        if insn.is_invalid() {
            if out.is_empty() {
                return Err(code("undecodable instruction"));
            }
            break;
        }
        if matches!(insn.mnemonic(), Mnemonic::Ret | Mnemonic::Retf) {
            out.push(insn.ip() - f.addr);
        }
    }
    if out.is_empty() {
        return Err(code("no return instruction"));
    }
    Ok(out)
}
