//! Connections that were open before the agent started never pass `sock_ops`' "established"
//! callback, so `sk_msg` would never see them: long-lived keep-alive pools would stay unlinked
//! until they reconnect. At start-up each traced process's established client connections are
//! put into the socket map through a duplicate of their fd (`pidfd_getfd`), and marked so that
//! nothing is written into them until their current exchange is over (`BODY_LEFT` =
//! `BODY_UNKNOWN` until a response is read): a connection may be adopted in the middle of a body.
use std::{
    collections::{HashMap, HashSet},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use agent_common::MAP_SOCKS;
use aya::{
    maps::{HashMap as BpfHashMap, SockHash},
    Ebpf,
};

/// Kernel map of request body bytes still to come (see `agent-ebpf/src/maps.rs`).
const MAP_BODY_LEFT: &str = "BODY_LEFT";
const BODY_UNKNOWN: u64 = u64::MAX;
const SO_COOKIE: libc::c_int = 57;

#[derive(Debug, Default)]
pub struct Adopted {
    pub connections: usize,
    pub failed: usize,
}

/// A duplicate, in this process, of fd `fd` of process `pid`.
fn dup_from(pid: u32, fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscalls; every returned fd is owned exactly once.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0);
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd as i32))
    }
}

fn cookie(fd: &OwnedFd) -> std::io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `v` and `len` describe a valid buffer for SO_COOKIE.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// Client-side established TCP sockets of one network namespace, by inode (only those with a
/// port in `ports`, when it is not empty).
fn client_sockets(p: &procfs::process::Process, ports: &[u16]) -> HashSet<u64> {
    let mut entries = p.tcp().unwrap_or_default();
    entries.extend(p.tcp6().unwrap_or_default());
    let listening: HashSet<u16> = entries
        .iter()
        .filter(|e| e.state == procfs::net::TcpState::Listen)
        .map(|e| e.local_address.port())
        .collect();
    entries
        .iter()
        .filter(|e| {
            e.state == procfs::net::TcpState::Established
                && !listening.contains(&e.local_address.port())
                && (ports.is_empty()
                    || ports.contains(&e.local_address.port())
                    || ports.contains(&e.remote_address.port()))
        })
        .map(|e| e.inode)
        .collect()
}

/// Adopts the established client connections of every process `traced` accepts.
pub fn adopt(ebpf: &mut Ebpf, traced: impl Fn(u32) -> bool, ports: &[u16]) -> Adopted {
    let mut out = Adopted::default();
    let me = std::process::id();
    let mut by_netns: HashMap<u64, HashSet<u64>> = HashMap::new();
    let mut found: Vec<(u32, i32)> = Vec::new();
    let Ok(all) = procfs::process::all_processes() else {
        return out;
    };
    for p in all.flatten() {
        let pid = p.pid as u32;
        if pid == me || !traced(pid) {
            continue;
        }
        let Ok(ns) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        let clients = by_netns
            .entry(std::os::unix::fs::MetadataExt::ino(&ns))
            .or_insert_with(|| client_sockets(&p, ports));
        if clients.is_empty() {
            continue;
        }
        let Ok(fds) = p.fd() else { continue };
        for fd in fds.flatten() {
            if let procfs::process::FDTarget::Socket(inode) = fd.target {
                if clients.contains(&inode) {
                    found.push((pid, fd.fd));
                }
            }
        }
    }
    let Some(Ok(mut body)) = ebpf
        .map_mut(MAP_BODY_LEFT)
        .map(BpfHashMap::<_, u64, u64>::try_from)
    else {
        return out;
    };
    for (pid, fd) in &found {
        let key = ((*pid as u64) << 32) | *fd as u64;
        let _ = body.insert(key, BODY_UNKNOWN, 0);
    }
    let Some(Ok(mut socks)) = ebpf.map_mut(MAP_SOCKS).map(SockHash::<_, u64>::try_from) else {
        return out;
    };
    for (pid, fd) in found {
        let res = dup_from(pid, fd).and_then(|dup| {
            let c = cookie(&dup)?;
            socks
                .insert(c, dup.as_raw_fd(), 0)
                .map_err(std::io::Error::other)
        });
        match res {
            Ok(()) => out.connections += 1,
            Err(e) => {
                // TLS sockets (kTLS), sockets closed meanwhile: left alone.
                tracing::debug!(pid, fd, "connection not adopted for injection: {e}");
                out.failed += 1;
            }
        }
    }
    out
}
