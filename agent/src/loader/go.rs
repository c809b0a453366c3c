//! Uprobes on Go executables, attached once per executable for every process that runs it, as
//! the runtime classifier finds them:
//! - `net/http` and goroutine spawns, for in-process links (`agent-ebpf/src/propagate/goroutine.rs`);
//! - `crypto/tls`, for the plaintext of TLS connections (`agent-ebpf/src/gotls.rs`).
//!
//! Functions are found by name in the symbol table or, in a stripped binary, in the
//! `.gopclntab` (`gosym`), and attached by file offset. Returns are probed at each return
//! instruction, never with a uretprobe (Go moves goroutine stacks).
use std::{collections::HashSet, os::unix::fs::MetadataExt, path::Path};

use agent_common::{
    GO_NEWPROC_PROGRAM, GO_NEWPROC_RET_PROGRAM, GO_NEWPROC_SYMBOL, GO_REQUEST_WRITE_PROGRAM,
    GO_REQUEST_WRITE_SYMBOL, GO_ROUNDTRIP_PROGRAM, GO_ROUNDTRIP_SYMBOL, GO_TLS_CLOSE_PROGRAM,
    GO_TLS_CLOSE_SYMBOL, GO_TLS_HANDSHAKE_PROGRAM, GO_TLS_HANDSHAKE_RET_PROGRAM,
    GO_TLS_HANDSHAKE_SYMBOL, GO_TLS_READ_PROGRAM, GO_TLS_READ_RET_PROGRAM, GO_TLS_READ_SYMBOL,
    GO_TLS_WRITE_PROGRAM, GO_TLS_WRITE_RET_PROGRAM, GO_TLS_WRITE_SYMBOL,
};
use aya::{
    programs::{
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
        UProbe,
    },
    Ebpf,
};

use super::gosym::{self, Func};

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

#[derive(Debug, thiserror::Error)]
pub enum GoProbeError {
    #[error("program {0} is missing from the kernel object")]
    Missing(&'static str),
    #[error("{program}: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("{0}")]
    Returns(#[from] ReturnsError),
    #[error("{0} not found")]
    NoFunction(&'static str),
    #[error(transparent)]
    Load(#[from] super::per_process::AttachError),
}

/// What was attached to one executable, each group or why not.
#[derive(Debug, PartialEq, Eq)]
pub enum Attached {
    /// Already probed (another process runs the same file).
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

/// Go executables already probed, by file identity.
#[derive(Default)]
pub struct GoProbes {
    done: HashSet<(u64, u64)>,
    loaded: bool,
}

impl GoProbes {
    /// Probes the Go executable at `exe` (a path valid from the agent's mount namespace) unless
    /// it already is.
    pub fn attach(&mut self, ebpf: &mut Ebpf, exe: &Path) -> Result<Attached, GoProbeError> {
        let Ok(m) = std::fs::metadata(exe) else {
            return Ok(Attached::Before);
        };
        if !self.done.insert((m.dev(), m.ino())) {
            return Ok(Attached::Before);
        }
        if !self.loaded {
            super::per_process::load(ebpf, &PROGRAMS)?;
            self.loaded = true;
        }
        if m.len() > MAX_FILE_BYTES {
            return Err(ReturnsError::Read("too large to read for symbols".into()).into());
        }
        let data = std::fs::read(exe).map_err(|e| ReturnsError::Read(e.to_string()))?;
        let funcs =
            gosym::functions(&data, &SYMBOLS).map_err(|e| ReturnsError::Elf(e.to_string()))?;
        let func = |i: usize| funcs[i].ok_or(GoProbeError::NoFunction(SYMBOLS[i]));
        let http = (|| {
            let points = [
                (GO_ROUNDTRIP_PROGRAM, func(0)?.file_offset),
                (GO_REQUEST_WRITE_PROGRAM, func(1)?.file_offset),
            ];
            attach_points(ebpf, exe, &points)
        })()
        .map_err(|e| e.to_string());
        // Returns before entries: an entry never leaves a note that no return takes.
        let spawns = (|| {
            let f = func(2)?;
            let mut points = returns(&data, &f, GO_NEWPROC_RET_PROGRAM, GO_NEWPROC_SYMBOL)?;
            let n = points.len();
            points.push((GO_NEWPROC_PROGRAM, f.file_offset));
            attach_points(ebpf, exe, &points).map(|_| n)
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
            attach_points(ebpf, exe, &points).map(|_| n)
        })()
        .map_err(|e| e.to_string());
        Ok(Attached::New { http, spawns, tls })
    }
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

/// Attaches every point (program, file offset) to `exe` for all processes, or none.
fn attach_points(
    ebpf: &mut Ebpf,
    exe: &Path,
    points: &[(&'static str, u64)],
) -> Result<(), GoProbeError> {
    let mut links: Vec<(&'static str, UProbeLinkId)> = Vec::with_capacity(points.len());
    for &(program, off) in points {
        let r = uprobe(ebpf, program).and_then(|p| {
            p.attach(
                UProbeAttachLocation::AbsoluteOffset(off),
                exe,
                UProbeScope::AllProcesses,
            )
            .map_err(|source| GoProbeError::Program { program, source })
        });
        match r {
            Ok(link) => links.push((program, link)),
            Err(e) => {
                for (program, link) in links {
                    if let Ok(p) = uprobe(ebpf, program) {
                        let _ = p.detach(link);
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(())
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

fn uprobe<'a>(ebpf: &'a mut Ebpf, program: &'static str) -> Result<&'a mut UProbe, GoProbeError> {
    ebpf.program_mut(program)
        .ok_or(GoProbeError::Missing(program))?
        .try_into()
        .map_err(|source| GoProbeError::Program { program, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::{Object, ObjectSymbol};

    /// Decodes a function of this test binary (x86-64, with symbols): its returns lie inside it.
    /// Go executables' functions are covered by `gosym`'s tests and the root integration tests.
    #[test]
    fn finds_the_returns_of_a_function_in_the_agent_itself() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let file = object::File::parse(&*me).unwrap();
        let name = file
            .symbols()
            .filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 64)
            .filter_map(|s| s.name().ok().map(str::to_owned))
            .find(|n| n.contains("return_offsets"))
            .expect("this test binary has symbols");
        let f = gosym::functions(&me, &[&name]).unwrap()[0].expect("found by its symbol");
        let offs = return_offsets(&me, &f, &name).unwrap();
        assert!(!offs.is_empty());
        assert!(offs.iter().all(|&o| o < f.size));
    }

    #[test]
    fn a_function_that_is_not_there_is_none() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(gosym::functions(&me, &["runtime.newproc1"]), Ok(vec![None]));
    }
}
