//! Uprobes on Go's `net/http` (see `agent-ebpf/src/propagate/goroutine.rs`): attached once per
//! Go executable, for every process that runs it, as the runtime classifier finds them.
use std::{collections::HashSet, os::unix::fs::MetadataExt, path::Path};

use agent_common::{
    GO_REQUEST_WRITE_PROGRAM, GO_REQUEST_WRITE_SYMBOL, GO_ROUNDTRIP_PROGRAM, GO_ROUNDTRIP_SYMBOL,
};
use aya::{
    programs::{uprobe::UProbeScope, UProbe},
    Ebpf,
};

const PROBES: [(&str, &str); 2] = [
    (GO_ROUNDTRIP_PROGRAM, GO_ROUNDTRIP_SYMBOL),
    (GO_REQUEST_WRITE_PROGRAM, GO_REQUEST_WRITE_SYMBOL),
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
    pub fn attach(&mut self, ebpf: &mut Ebpf, exe: &Path) -> Result<bool, GoProbeError> {
        let Ok(m) = std::fs::metadata(exe) else {
            return Ok(false);
        };
        if !self.done.insert((m.dev(), m.ino())) {
            return Ok(false);
        }
        if !self.loaded {
            for (program, _) in PROBES {
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
        Ok(true)
    }
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, program: &'static str) -> Result<&'a mut UProbe, GoProbeError> {
    ebpf.program_mut(program)
        .ok_or(GoProbeError::Missing(program))?
        .try_into()
        .map_err(|source| GoProbeError::Program { program, source })
}
