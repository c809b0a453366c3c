//! What `/proc` says about TCP sockets when the agent starts: which local ports listen, and
//! which connections were already open. Connections the kernel programs never saw being created
//! get their side (server or client) from here; their first bytes may be mid-message, which the
//! parser skips until a message starts.
use std::{collections::HashSet, net::IpAddr};

use super::event::Endpoints;
use crate::protocol::http1::Side;

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    listening: HashSet<(IpAddr, u16)>,
    listening_any: HashSet<u16>,
    established: HashSet<(IpAddr, u16, IpAddr, u16)>,
}

fn norm(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl Snapshot {
    pub fn scan() -> Snapshot {
        let mut s = Snapshot::default();
        let mut entries = procfs::net::tcp().unwrap_or_default();
        entries.extend(procfs::net::tcp6().unwrap_or_default());
        for e in entries {
            let (l, r) = (e.local_address, e.remote_address);
            match e.state {
                procfs::net::TcpState::Listen => {
                    if l.ip().is_unspecified() {
                        s.listening_any.insert(l.port());
                    } else {
                        s.listening.insert((norm(l.ip()), l.port()));
                    }
                }
                procfs::net::TcpState::Established => {
                    s.established
                        .insert((norm(l.ip()), l.port(), norm(r.ip()), r.port()));
                }
                _ => {}
            }
        }
        s
    }

    pub fn established_count(&self) -> usize {
        self.established.len()
    }

    /// The side of a connection that was open before the agent started, if /proc knew it.
    pub fn side_of(&self, e: &Endpoints) -> Option<Side> {
        if !self
            .established
            .contains(&(e.local, e.local_port, e.peer, e.peer_port))
        {
            return None;
        }
        if self.listening_any.contains(&e.local_port)
            || self.listening.contains(&(e.local, e.local_port))
        {
            Some(Side::Server)
        } else {
            Some(Side::Client)
        }
    }
}
