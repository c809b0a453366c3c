//! Uprobes on CPython's asyncio (see `agent-ebpf/src/propagate/asyncio.rs`): attached to each
//! selected Python process (never to the others that share its interpreter's files), and
//! detached when it exits.
//!
//! A process is found by the runtime classifier; its interpreter is the `libpython3.X` it maps
//! (or its executable, when the interpreter is linked in), and its `_asyncio` the extension
//! module it maps, or the one in the interpreter's `lib-dynload` directory (probed before the
//! program imports asyncio: a uprobe on a file takes effect when the file is mapped). The
//! functions probed are static ones, so the files need their symbol tables: builds such as
//! pyenv's or python.org's source builds have them; distribution packages strip them (Debian's
//! `python3.11`), and there asyncio calls keep the thread rule only.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use agent_common::{
    PY_CONTEXT_RUN_PROGRAM, PY_CONTEXT_RUN_RET_PROGRAM, PY_CONTEXT_RUN_SYMBOL,
    PY_ENTER_TASK_PROGRAM, PY_ENTER_TASK_SYMBOL, PY_SET_RESULT_PROGRAM, PY_SET_RESULT_SYMBOL,
    PY_TASK_INIT_PROGRAM, PY_TASK_INIT_SYMBOL, PY_TASK_WAKEUP_DEF_SYMBOL,
};
use aya::{programs::uprobe::UProbeAttachLocation, Ebpf};
use object::{Object, ObjectSymbol};

use super::per_process::{self, AttachError, Point, Processes};

/// Every kernel program this module loads (`agent check` verifies them).
pub const PROGRAMS: [&str; 5] = [
    PY_CONTEXT_RUN_PROGRAM,
    PY_CONTEXT_RUN_RET_PROGRAM,
    PY_ENTER_TASK_PROGRAM,
    PY_TASK_INIT_PROGRAM,
    PY_SET_RESULT_PROGRAM,
];
/// CPython minor versions whose `_asyncio` the kernel programs read (3.9 to 3.11; tested on
/// 3.11): `enter_task(loop, task)`, `Future.set_result` taking one argument, and the future and
/// method object layouts named in `propagate/asyncio.rs`.
const MINORS: std::ops::RangeInclusive<u32> = 9..=11;
/// Python processes probed at once; past that, a new one keeps the thread rule (counted).
pub const MAX_PROCESSES: usize = 1024;
/// How long (in agent ticks) a Python process that has not mapped its interpreter yet is
/// looked at again.
const RETRIES: u8 = 10;

#[derive(Debug, thiserror::Error)]
pub enum PyProbeError {
    #[error("CPython 3.{0}: asyncio tasks are followed on 3.9 to 3.11 only")]
    Version(u32),
    #[error("no _asyncio extension module found next to {0}")]
    NoAsyncio(String),
    #[error("{file}: no symbol {symbol} (a stripped build keeps no symbol table)")]
    NoSymbol { file: String, symbol: &'static str },
    #[error("cannot read {0}: {1}")]
    Read(String, String),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("{MAX_PROCESSES} Python processes are probed already")]
    Full,
}

/// The files of one process's interpreter, as paths valid from the agent (inside the process's
/// root), with what the kernel programs need of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Install {
    /// The file holding `context_run` (`libpython3.X.so`, or the executable).
    pub interpreter: PathBuf,
    /// The file holding `_asyncio`'s functions.
    pub asyncio: PathBuf,
    /// `TaskWakeupDef` minus `Future.set_result`'s entry, in `asyncio`.
    pub wakeup_delta: u64,
}

/// The CPython minor version a file name names: `python3.11`, `libpython3.11.so.1.0`.
pub fn minor_version(file_name: &str) -> Option<u32> {
    let rest = file_name
        .strip_prefix("libpython3.")
        .or_else(|| file_name.strip_prefix("python3."))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let after = &rest[digits.len()..];
    // A debug (`d`) or old pymalloc (`m`) build's suffix, then nothing or the library suffix.
    let after = after.strip_prefix(['d', 'm']).unwrap_or(after);
    if !(after.is_empty() || after.starts_with(".so")) {
        return None;
    }
    digits.parse().ok()
}

/// What a process's executable and mappings say about its interpreter.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// The executable, inside the process's root.
    pub exe: PathBuf,
    /// A mapped `libpython3.X`, inside the process's root.
    pub libpython: Option<PathBuf>,
    /// A mapped `_asyncio` extension module, inside the process's root.
    pub asyncio: Option<PathBuf>,
    pub minor: Option<u32>,
}

/// Reads `/proc/<pid>`: `None` if the process is gone or runs no CPython.
pub fn seen(pid: u32) -> Option<Seen> {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let mut s = Seen {
        exe: inside(&exe),
        minor: exe
            .file_name()
            .and_then(|n| minor_version(&n.to_string_lossy())),
        ..Seen::default()
    };
    for path in maps.lines().filter_map(|l| l.split_whitespace().nth(5)) {
        let p = Path::new(path);
        let Some(name) = p.file_name().map(|n| n.to_string_lossy()) else {
            continue;
        };
        if s.libpython.is_none() && name.starts_with("libpython3.") {
            s.minor = minor_version(&name).or(s.minor);
            s.libpython = Some(inside(p));
        } else if s.asyncio.is_none() && name.starts_with("_asyncio.") && name.ends_with(".so") {
            s.asyncio = Some(inside(p));
        }
    }
    (s.minor.is_some()).then_some(s)
}

/// Symbol addresses of one ELF file (its symbol table and dynamic symbols).
fn symbols(path: &Path, wanted: &[&'static str]) -> Result<Vec<Option<u64>>, PyProbeError> {
    let read =
        |e: &dyn std::fmt::Display| PyProbeError::Read(path.display().to_string(), e.to_string());
    let data = std::fs::read(path).map_err(|e| read(&e))?;
    let elf = object::File::parse(&*data).map_err(|e| read(&e))?;
    let mut found = vec![None; wanted.len()];
    for sym in elf.symbols().chain(elf.dynamic_symbols()) {
        let Ok(name) = sym.name() else { continue };
        if let Some(i) = wanted.iter().position(|w| *w == name) {
            if sym.address() != 0 {
                found[i].get_or_insert(sym.address());
            }
        }
    }
    Ok(found)
}

/// Where `seen`'s interpreter keeps `_asyncio`, when the process has not mapped it yet:
/// `<prefix>/lib/python3.X/lib-dynload/_asyncio.*.so`, the prefix taken from `libpython`'s
/// directory (`<prefix>/lib`) or the executable's (`<prefix>/bin`).
fn asyncio_beside(seen: &Seen, minor: u32) -> Option<PathBuf> {
    let mut prefixes = Vec::new();
    if let Some(lib) = &seen.libpython {
        prefixes.extend(lib.parent().and_then(Path::parent));
    }
    prefixes.extend(seen.exe.parent().and_then(Path::parent));
    for prefix in prefixes {
        for lib in ["lib", "lib64"] {
            let dir = prefix
                .join(lib)
                .join(format!("python3.{minor}/lib-dynload"));
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("_asyncio.") && name.ends_with(".so") {
                    return Some(e.path());
                }
            }
        }
    }
    None
}

/// Resolves what `seen` needs probed. `Ok(None)`: the interpreter is not mapped yet (the
/// process has just started); look again later.
pub fn install(seen: &Seen) -> Result<Option<Install>, PyProbeError> {
    let minor = seen.minor.unwrap_or(0);
    if !MINORS.contains(&minor) {
        return Err(PyProbeError::Version(minor));
    }
    let interpreter = match &seen.libpython {
        Some(lib) => lib.clone(),
        None => seen.exe.clone(),
    };
    // `PyContext_Enter` is exported by whichever file holds the interpreter: an executable
    // without it loads a libpython not mapped yet (the process has just started).
    let found = symbols(&interpreter, &[PY_CONTEXT_RUN_SYMBOL, "PyContext_Enter"])?;
    if found[0].is_none() {
        if seen.libpython.is_none() && found[1].is_none() {
            return Ok(None);
        }
        return Err(PyProbeError::NoSymbol {
            file: interpreter.display().to_string(),
            symbol: PY_CONTEXT_RUN_SYMBOL,
        });
    }
    const WANTED: [&str; 4] = [
        PY_ENTER_TASK_SYMBOL,
        PY_TASK_INIT_SYMBOL,
        PY_SET_RESULT_SYMBOL,
        PY_TASK_WAKEUP_DEF_SYMBOL,
    ];
    // `_asyncio` is an extension module, or built into the interpreter.
    let asyncio = match seen.asyncio.clone().or_else(|| asyncio_beside(seen, minor)) {
        Some(a) => a,
        None if symbols(&interpreter, &WANTED[..1])?[0].is_some() => interpreter.clone(),
        None => return Err(PyProbeError::NoAsyncio(interpreter.display().to_string())),
    };
    let found = symbols(&asyncio, &WANTED)?;
    let mut addr = [0u64; 4];
    for (i, f) in found.iter().enumerate() {
        addr[i] = f.ok_or_else(|| PyProbeError::NoSymbol {
            file: asyncio.display().to_string(),
            symbol: WANTED[i],
        })?;
    }
    Ok(Some(Install {
        interpreter,
        asyncio,
        wakeup_delta: addr[3].wrapping_sub(addr[2]),
    }))
}

/// What happened to one process.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Already probed, not Python, or gone.
    Nothing,
    /// Its asyncio tasks are followed now.
    Probed(Install),
    /// Not decided yet (its interpreter is not mapped): looked at again on later ticks.
    Later,
}

/// The Python processes probed, and those waiting for their interpreter (by pid: looks so
/// far).
#[derive(Default)]
pub struct PyProbes {
    loaded: bool,
    probed: Processes,
    waiting: HashMap<u32, u8>,
}

impl PyProbes {
    /// Every process's links, taken out of their programs (`per_process::take`).
    pub fn take_links(
        &mut self,
        ebpf: &mut Ebpf,
        out: &mut Vec<aya::programs::uprobe::UProbeLink>,
    ) {
        self.probed.take_all(ebpf, out);
    }

    /// Probes process `pid` if it runs CPython with asyncio support and is not probed yet.
    pub fn attach(&mut self, ebpf: &mut Ebpf, pid: u32) -> Result<Outcome, PyProbeError> {
        let Some(since) = per_process::start_time(pid) else {
            return Ok(Outcome::Nothing);
        };
        if self.probed.contains(pid, since) {
            return Ok(Outcome::Nothing);
        }
        let Some(seen) = seen(pid) else {
            return Ok(Outcome::Nothing);
        };
        let Some(install) = install(&seen)? else {
            let tries = self.waiting.entry(pid).or_insert(0);
            *tries += 1;
            if *tries > RETRIES {
                self.waiting.remove(&pid);
                return Err(PyProbeError::NoSymbol {
                    file: seen.exe.display().to_string(),
                    symbol: PY_CONTEXT_RUN_SYMBOL,
                });
            }
            return Ok(Outcome::Later);
        };
        self.waiting.remove(&pid);
        if self.probed.len() >= MAX_PROCESSES {
            return Err(PyProbeError::Full);
        }
        if !self.loaded {
            per_process::load(ebpf, &PROGRAMS)?;
            self.loaded = true;
        }
        let point = |program, symbol, file| Point {
            program,
            location: UProbeAttachLocation::Symbol(symbol),
            file,
            cookie: None,
        };
        // The return probe goes first: a `Context.run` entered between the two attachments
        // then has a return without an entry (ignored), never an entry without a return
        // (which would leave the thread inside a callback for good).
        let points = [
            point(
                PY_CONTEXT_RUN_RET_PROGRAM,
                PY_CONTEXT_RUN_SYMBOL,
                &install.interpreter,
            ),
            point(
                PY_CONTEXT_RUN_PROGRAM,
                PY_CONTEXT_RUN_SYMBOL,
                &install.interpreter,
            ),
            point(
                PY_ENTER_TASK_PROGRAM,
                PY_ENTER_TASK_SYMBOL,
                &install.asyncio,
            ),
            point(PY_TASK_INIT_PROGRAM, PY_TASK_INIT_SYMBOL, &install.asyncio),
            Point {
                cookie: Some(install.wakeup_delta),
                ..point(
                    PY_SET_RESULT_PROGRAM,
                    PY_SET_RESULT_SYMBOL,
                    &install.asyncio,
                )
            },
        ];
        let links = per_process::attach_all(ebpf, pid, &points)?;
        self.probed.insert(pid, since, links);
        Ok(Outcome::Probed(install))
    }

    /// Processes waiting for their interpreter to be mapped.
    pub fn waiting(&self) -> Vec<u32> {
        self.waiting.keys().copied().collect()
    }

    /// Detaches the probes of processes that exited.
    pub fn sweep(&mut self, ebpf: &mut Ebpf) {
        self.probed.sweep(ebpf);
        self.waiting
            .retain(|pid, _| Path::new(&format!("/proc/{pid}")).exists());
    }

    pub fn probed(&self) -> usize {
        self.probed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_interpreter_names() {
        assert_eq!(minor_version("python3.11"), Some(11));
        assert_eq!(minor_version("libpython3.11.so.1.0"), Some(11));
        assert_eq!(minor_version("libpython3.9d.so"), Some(9));
        assert_eq!(minor_version("python3.12"), Some(12));
        assert_eq!(minor_version("python3"), None);
        assert_eq!(minor_version("python3.11-config"), None);
        assert_eq!(minor_version("libpython3.so"), None);
        assert_eq!(minor_version("node"), None);
    }

    #[test]
    fn an_unsupported_version_is_named() {
        let seen = Seen {
            exe: PathBuf::from("/nonexistent/python3.13"),
            minor: Some(13),
            ..Seen::default()
        };
        assert_eq!(
            install(&seen).unwrap_err().to_string(),
            "CPython 3.13: asyncio tasks are followed on 3.9 to 3.11 only"
        );
    }

    #[test]
    fn a_stripped_interpreter_is_named() {
        // Any stripped ELF file stands for a distribution's python3.X: no context_run.
        let seen = Seen {
            exe: PathBuf::from("/bin/ls"),
            libpython: Some(PathBuf::from("/bin/ls")),
            minor: Some(11),
            ..Seen::default()
        };
        let e = install(&seen).unwrap_err().to_string();
        assert!(e.contains("no symbol context_run"), "{e}");
    }
}
