//! Program verification on every CPU at once.
//!
//! The kernel's verifier is most of the agent's start-up: seconds for the data-syscall exits
//! and the stitching program, one program at a time, each on one CPU. Programs verify
//! independently, so they are loaded ahead from one thread per CPU, largest first. This step
//! only saves time: a program that fails here is left unloaded, and the caller's own load of it
//! (each caller skips programs whose fd exists) fails again with its usual message.
use std::sync::Mutex;

use aya::{
    programs::{Program, ProgramError},
    Ebpf,
};

/// Loads the programs `names` (largest first) from one thread per CPU. Returns how many were
/// loaded here.
pub fn ahead(ebpf: &mut Ebpf, names: &[&str]) -> usize {
    let mut work: Vec<(usize, &mut Program)> = ebpf
        .programs_mut()
        .filter_map(|(name, p)| names.iter().position(|n| *n == name).map(|i| (i, p)))
        .collect();
    // Popped from the end: the first named goes first.
    work.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(work.len());
    let queue = Mutex::new(work);
    let loaded = Mutex::new(0usize);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let Some((i, prog)) = next else {
                    break;
                };
                let start = std::time::Instant::now();
                if load_once(prog).is_ok() && prog.fd().is_ok() {
                    *loaded.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                    let insns = prog
                        .info()
                        .ok()
                        .and_then(|i| i.verified_instruction_count());
                    tracing::debug!(
                        program = names[i],
                        ms = start.elapsed().as_millis() as u64,
                        verified_insns = insns,
                        "verified"
                    );
                }
            });
        }
    });
    loaded.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// Loads `prog` unless it is loaded already.
fn load_once(prog: &mut Program) -> Result<(), ProgramError> {
    if prog.fd().is_ok() {
        return Ok(());
    }
    match prog {
        Program::TracePoint(p) => p.load(),
        Program::RawTracePoint(p) => p.load(),
        Program::UProbe(p) => p.load(),
        Program::KProbe(p) => p.load(),
        // Not loaded ahead (the caller loads it as before).
        _ => Ok(()),
    }
}
