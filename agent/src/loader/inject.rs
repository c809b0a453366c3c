//! Attaches trace-context injection: `sock_ops` on the cgroup v2 root puts outgoing TCP
//! connections into the socket map, and `sk_msg` on that map edits their requests.
use std::{fs::File, path::PathBuf};

use agent_common::MAP_SOCKS;
use aya::{
    maps::{ProgramArray, SockHash},
    programs::{links::CgroupAttachMode, SkMsg, SockOps},
    Ebpf,
};

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo); sock_ops needs one"
    )]
    NoCgroup2,
    #[error("opening cgroup {0}: {1}")]
    Cgroup(PathBuf, std::io::Error),
    #[error("program or map {0} is missing from the kernel object")]
    Missing(&'static str),
    #[error("{0}: {detail}", detail = chain(.1))]
    Program(&'static str, aya::programs::ProgramError),
    #[error("socket map: {0}")]
    Map(aya::maps::MapError),
    #[error("socket map: {0}")]
    Dup(std::io::Error),
}

/// An error with its causes, as aya keeps the OS error in `source`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The root of the cgroup v2 hierarchy: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        // Fields: id parent major:minor root mount-point ...; only the hierarchy's root mount.
        let mut f = left.split_whitespace();
        let root = f.nth(3)?;
        let mount = f.next()?;
        (root == "/").then(|| PathBuf::from(mount))
    })
}

/// Whether process `pid` lives in cgroup directory `dir` (or below it) of the cgroup v2
/// hierarchy mounted at `root`, from its `0::/path` line in `/proc/<pid>/cgroup`.
pub fn in_cgroup(pid: u32, root: &std::path::Path, dir: &std::path::Path) -> bool {
    let Ok(rel) = dir.strip_prefix(root) else {
        return false;
    };
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .is_some_and(|p| std::path::Path::new(p.trim_start_matches('/')).starts_with(rel))
}

/// The program `out_msg` tail-calls to carry out its edit, and the program array it is found in.
const EDIT_PROGRAM: &str = "out_msg_edit";
const EDIT_ARRAY: &str = "MSG_EDIT";

/// Loads the edit program and puts it where `out_msg` tail-calls it.
fn load_edit(ebpf: &mut Ebpf) -> Result<(), InjectError> {
    let prog: &mut SkMsg = ebpf
        .program_mut(EDIT_PROGRAM)
        .ok_or(InjectError::Missing(EDIT_PROGRAM))?
        .try_into()
        .map_err(|e| InjectError::Program(EDIT_PROGRAM, e))?;
    prog.load()
        .map_err(|e| InjectError::Program(EDIT_PROGRAM, e))?;
    let fd = prog
        .fd()
        .map_err(|e| InjectError::Program(EDIT_PROGRAM, e))?
        .try_clone()
        .map_err(InjectError::Dup)?;
    let mut array = ProgramArray::try_from(
        ebpf.map_mut(EDIT_ARRAY)
            .ok_or(InjectError::Missing(EDIT_ARRAY))?,
    )
    .map_err(InjectError::Map)?;
    array.set(0, &fd, 0).map_err(InjectError::Map)
}

/// Loads both programs (the verifier checks them) without attaching anything; returns the
/// cgroup they would cover.
pub fn verify(ebpf: &mut Ebpf) -> Result<PathBuf, InjectError> {
    let root = cgroup2_root().ok_or(InjectError::NoCgroup2)?;
    load_edit(ebpf)?;
    for name in ["out_msg", "out_sockops"] {
        let prog = ebpf.program_mut(name).ok_or(InjectError::Missing(name))?;
        match prog {
            aya::programs::Program::SkMsg(p) => p.load(),
            aya::programs::Program::SockOps(p) => p.load(),
            _ => return Err(InjectError::Missing(name)),
        }
        .map_err(|e| InjectError::Program(name, e))?;
    }
    Ok(root)
}

/// Loads and attaches both programs to `cgroup` (default: the cgroup v2 root); returns the
/// cgroup they cover.
pub fn attach(ebpf: &mut Ebpf, cgroup: Option<&std::path::Path>) -> Result<PathBuf, InjectError> {
    let root = match cgroup {
        Some(p) => p.to_path_buf(),
        None => cgroup2_root().ok_or(InjectError::NoCgroup2)?,
    };
    let cgroup = File::open(&root).map_err(|e| InjectError::Cgroup(root.clone(), e))?;

    let socks: SockHash<_, u64> =
        SockHash::try_from(ebpf.map(MAP_SOCKS).ok_or(InjectError::Missing(MAP_SOCKS))?)
            .map_err(InjectError::Map)?;
    let socks_fd = socks.fd().try_clone().map_err(InjectError::Dup)?;
    load_edit(ebpf)?;

    let msg: &mut SkMsg = ebpf
        .program_mut("out_msg")
        .ok_or(InjectError::Missing("out_msg"))?
        .try_into()
        .map_err(|e| InjectError::Program("out_msg", e))?;
    msg.load().map_err(|e| InjectError::Program("out_msg", e))?;
    msg.attach(&socks_fd)
        .map_err(|e| InjectError::Program("out_msg", e))?;

    let ops: &mut SockOps = ebpf
        .program_mut("out_sockops")
        .ok_or(InjectError::Missing("out_sockops"))?
        .try_into()
        .map_err(|e| InjectError::Program("out_sockops", e))?;
    ops.load()
        .map_err(|e| InjectError::Program("out_sockops", e))?;
    ops.attach(&cgroup, CgroupAttachMode::Single)
        .map_err(|e| InjectError::Program("out_sockops", e))?;
    Ok(root)
}

/// The TCP-option carrier's program (`--inject tcp-option`).
pub const TCP_OPTION_PROGRAM: &str = "tcp_option";

/// Loads the TCP-option carrier's `sock_ops` program for the verifier, without attaching it.
pub fn verify_tcp_option(ebpf: &mut Ebpf) -> Result<(), InjectError> {
    let ops: &mut SockOps = ebpf
        .program_mut(TCP_OPTION_PROGRAM)
        .ok_or(InjectError::Missing(TCP_OPTION_PROGRAM))?
        .try_into()
        .map_err(|e| InjectError::Program(TCP_OPTION_PROGRAM, e))?;
    ops.load()
        .map_err(|e| InjectError::Program(TCP_OPTION_PROGRAM, e))
}

/// Loads and attaches the TCP-option carrier to `cgroup` (default: the cgroup v2 root), beside
/// any `sock_ops` program already there (a cgroup link); returns the cgroup it covers.
pub fn attach_tcp_option(
    ebpf: &mut Ebpf,
    cgroup: Option<&std::path::Path>,
) -> Result<PathBuf, InjectError> {
    let root = match cgroup {
        Some(p) => p.to_path_buf(),
        None => cgroup2_root().ok_or(InjectError::NoCgroup2)?,
    };
    let dir = File::open(&root).map_err(|e| InjectError::Cgroup(root.clone(), e))?;
    verify_tcp_option(ebpf)?;
    let ops: &mut SockOps = ebpf
        .program_mut(TCP_OPTION_PROGRAM)
        .ok_or(InjectError::Missing(TCP_OPTION_PROGRAM))?
        .try_into()
        .map_err(|e| InjectError::Program(TCP_OPTION_PROGRAM, e))?;
    ops.attach(&dir, CgroupAttachMode::Single)
        .map_err(|e| InjectError::Program(TCP_OPTION_PROGRAM, e))?;
    Ok(root)
}
