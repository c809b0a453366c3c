//! The Linux capabilities the agent needs, and which of them this process holds (`CapEff` in
//! `/proc/self/status`). Root holds them all; a non-root agent needs exactly these (measured
//! with `setpriv`, see `tests/tests/privilege.rs`).

/// One capability the agent uses, and what for.
pub struct Cap {
    pub name: &'static str,
    pub bit: u32,
    pub why: &'static str,
}

pub const NEEDED: [Cap; 5] = [
    Cap {
        name: "CAP_BPF",
        bit: 39,
        why: "load the kernel programs and create their maps",
    },
    Cap {
        name: "CAP_PERFMON",
        bit: 38,
        why: "attach to tracepoints and read kernel memory from the programs",
    },
    Cap {
        name: "CAP_DAC_READ_SEARCH",
        bit: 2,
        why: "read tracefs event ids and other users' /proc files",
    },
    Cap {
        name: "CAP_SYS_PTRACE",
        bit: 19,
        why: "read other users' processes' executables, environments and sockets in /proc",
    },
    Cap {
        name: "CAP_NET_ADMIN",
        bit: 12,
        why: "create the socket map (the kernel refuses it without) and attach sock_ops/sk_msg",
    },
];

/// The effective capability set of this process.
pub fn effective() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_cap_eff(&s))
        .unwrap_or(0)
}

/// `CapEff:` of a `/proc/<pid>/status` text.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The needed capabilities missing from `mask`.
pub fn missing(mask: u64) -> Vec<&'static Cap> {
    NEEDED
        .iter()
        .filter(|c| mask & (1u64 << c.bit) == 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_what_is_missing() {
        let status = "Name:\tagent\nCapInh:\t0000000000000000\nCapEff:\t000000c000080004\n";
        let eff = parse_cap_eff(status).unwrap();
        // BPF, PERFMON, SYS_PTRACE, DAC_READ_SEARCH: only NET_ADMIN is missing.
        let m: Vec<&str> = missing(eff).iter().map(|c| c.name).collect();
        assert_eq!(m, ["CAP_NET_ADMIN"]);
        assert!(missing(u64::MAX).is_empty());
        assert_eq!(missing(0).len(), NEEDED.len());
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }
}
