//! Uprobes on Go's `net/http` and goroutine spawns (see `agent-ebpf/src/propagate/goroutine.rs`):
//! attached once per Go executable, for every process that runs it, as the runtime classifier
//! finds them.
use std::{collections::HashSet, os::unix::fs::MetadataExt, path::Path};

use agent_common::{
    GO_NEWPROC_PROGRAM, GO_NEWPROC_RET_PROGRAM, GO_NEWPROC_SYMBOL, GO_REQUEST_WRITE_PROGRAM,
    GO_REQUEST_WRITE_SYMBOL, GO_ROUNDTRIP_PROGRAM, GO_ROUNDTRIP_SYMBOL,
};
use aya::{
    programs::{
        uprobe::{UProbeAttachLocation, UProbeScope},
        UProbe,
    },
    Ebpf,
};
use object::{Object, ObjectSection, ObjectSymbol};

const PROBES: [(&str, &str); 2] = [
    (GO_ROUNDTRIP_PROGRAM, GO_ROUNDTRIP_SYMBOL),
    (GO_REQUEST_WRITE_PROGRAM, GO_REQUEST_WRITE_SYMBOL),
];
/// Every kernel program this module loads (`agent check` verifies them).
pub const PROGRAMS: [&str; 4] = [
    GO_ROUNDTRIP_PROGRAM,
    GO_REQUEST_WRITE_PROGRAM,
    GO_NEWPROC_PROGRAM,
    GO_NEWPROC_RET_PROGRAM,
];

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
}

/// What was attached to one executable.
#[derive(Debug, PartialEq, Eq)]
pub enum Attached {
    /// Already probed (another process runs the same file).
    Before,
    /// `net/http` probed; spawned goroutines followed too, or why not.
    New { spawns: Result<usize, String> },
}

/// Go executables already probed, by file identity.
#[derive(Default)]
pub struct GoProbes {
    done: HashSet<(u64, u64)>,
    loaded: bool,
}

impl GoProbes {
    /// Probes the Go executable at `exe` (a path valid from the agent's mount namespace) unless
    /// it already is. A binary without symbols (stripped) cannot be probed: its calls keep no
    /// in-process parent.
    pub fn attach(&mut self, ebpf: &mut Ebpf, exe: &Path) -> Result<Attached, GoProbeError> {
        let Ok(m) = std::fs::metadata(exe) else {
            return Ok(Attached::Before);
        };
        if !self.done.insert((m.dev(), m.ino())) {
            return Ok(Attached::Before);
        }
        if !self.loaded {
            for program in PROGRAMS {
                uprobe(ebpf, program)?
                    .load()
                    .map_err(|source| GoProbeError::Program { program, source })?;
            }
            self.loaded = true;
        }
        for (program, symbol) in PROBES {
            uprobe(ebpf, program)?
                .attach(symbol, exe, UProbeScope::AllProcesses)
                .map_err(|source| GoProbeError::Program { program, source })?;
        }
        // Without the spawn probes, calls made by a handler's own goroutine still link.
        let spawns = attach_spawns(ebpf, exe).map_err(|e| e.to_string());
        Ok(Attached::New { spawns })
    }
}

/// Probes `runtime.newproc1`'s entry and each of its return instructions; the number of
/// return instructions probed.
fn attach_spawns(ebpf: &mut Ebpf, exe: &Path) -> Result<usize, GoProbeError> {
    let data = std::fs::read(exe).map_err(|e| ReturnsError::Read(e.to_string()))?;
    let returns = return_offsets(&data, GO_NEWPROC_SYMBOL)?;
    let program = GO_NEWPROC_RET_PROGRAM;
    let p = uprobe(ebpf, program)?;
    let mut links = Vec::with_capacity(returns.len());
    for off in &returns {
        match p.attach(
            UProbeAttachLocation::SymbolOffset(GO_NEWPROC_SYMBOL, *off),
            exe,
            UProbeScope::AllProcesses,
        ) {
            Ok(link) => links.push(link),
            Err(source) => {
                // All or nothing: an entry without every return would leave notes behind.
                for link in links {
                    let _ = p.detach(link);
                }
                return Err(GoProbeError::Program { program, source });
            }
        }
    }
    let program = GO_NEWPROC_PROGRAM;
    if let Err(source) =
        uprobe(ebpf, program)?.attach(GO_NEWPROC_SYMBOL, exe, UProbeScope::AllProcesses)
    {
        let p = uprobe(ebpf, GO_NEWPROC_RET_PROGRAM)?;
        for link in links {
            let _ = p.detach(link);
        }
        return Err(GoProbeError::Program { program, source });
    }
    Ok(returns.len())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReturnsError {
    #[error("cannot read the executable: {0}")]
    Read(String),
    #[error("not an ELF file the agent can read: {0}")]
    Elf(String),
    #[error("symbol {0} not found (stripped binary?)")]
    NoSymbol(String),
    #[error("{symbol}: {why}")]
    Code { symbol: String, why: &'static str },
}

/// Offsets, from the start of function `symbol`, of its return instructions (x86-64), decoded
/// from the function's first byte to its last so that no offset falls inside an instruction.
pub fn return_offsets(elf: &[u8], symbol: &str) -> Result<Vec<u64>, ReturnsError> {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};
    let file = object::File::parse(elf).map_err(|e| ReturnsError::Elf(e.to_string()))?;
    if file.architecture() != object::Architecture::X86_64 {
        return Err(ReturnsError::Elf("not x86-64".into()));
    }
    let code = |why| ReturnsError::Code {
        symbol: symbol.into(),
        why,
    };
    let sym = file
        .symbols()
        .find(|s| s.name() == Ok(symbol))
        .ok_or_else(|| ReturnsError::NoSymbol(symbol.into()))?;
    let section = sym
        .section_index()
        .and_then(|i| file.section_by_index(i).ok())
        .ok_or_else(|| code("no section"))?;
    if sym.size() == 0 {
        return Err(code("no size"));
    }
    let bytes = section
        .data_range(sym.address(), sym.size())
        .map_err(|e| ReturnsError::Elf(e.to_string()))?
        .ok_or_else(|| code("outside its section"))?;
    let mut decoder = Decoder::with_ip(64, bytes, sym.address(), DecoderOptions::NONE);
    let mut out = Vec::new();
    for insn in &mut decoder {
        if insn.is_invalid() {
            return Err(code("undecodable instruction"));
        }
        if matches!(insn.mnemonic(), Mnemonic::Ret | Mnemonic::Retf) {
            out.push(insn.ip() - sym.address());
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

    /// Decodes a function of this test binary (x86-64, with symbols): its returns lie inside it.
    /// The Go executable's `runtime.newproc1` is covered by the root integration tests.
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
        let offs = return_offsets(&me, &name).unwrap();
        assert!(!offs.is_empty());
        let sym = file.symbols().find(|s| s.name() == Ok(&name)).unwrap();
        assert!(offs.iter().all(|&o| o < sym.size()));
    }

    #[test]
    fn a_missing_symbol_is_named() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(
            return_offsets(&me, "runtime.newproc1"),
            Err(ReturnsError::NoSymbol("runtime.newproc1".into()))
        );
    }
}
