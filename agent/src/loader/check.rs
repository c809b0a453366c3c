//! `agent check`: every kernel feature the agent needs, and whether this host has it.
use std::path::Path;

use aya::{programs::TracePoint, EbpfLoader};

use super::{btf, ensure_tracefs, raise_memlock, PROGRAMS};

struct Report {
    failed: usize,
}

impl Report {
    fn line(&mut self, ok: bool, what: &str, detail: &str) {
        if ok {
            println!(
                "[ ok ] {what}{}",
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                }
            );
        } else {
            self.failed += 1;
            println!("[FAIL] {what}: {detail}");
        }
    }
}

/// Prints the report; returns whether everything the agent needs is there.
pub fn run() -> bool {
    let mut r = Report { failed: 0 };
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("kernel {}", release.trim());
    let caps = super::caps::effective();
    for c in super::caps::NEEDED.iter() {
        let held = caps & (1u64 << c.bit) != 0;
        if held {
            r.line(true, c.name, c.why);
        } else {
            r.line(
                false,
                c.name,
                &format!(
                    "missing: needed to {}. Run as root, or grant it (setpriv/capsh, or the \
                     DaemonSet's capabilities list)",
                    c.why
                ),
            );
        }
    }
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown").unwrap_or_default();
    if !lockdown.is_empty() {
        println!(
            "       lockdown: {} (the agent never needs bpf_probe_write_user)",
            lockdown.trim()
        );
    }
    let btf_ok = Path::new("/sys/kernel/btf/vmlinux").exists();
    r.line(
        btf_ok,
        "kernel BTF (/sys/kernel/btf/vmlinux)",
        if btf_ok {
            ""
        } else {
            "missing: needs CONFIG_DEBUG_INFO_BTF=y"
        },
    );
    if btf_ok {
        match btf::check_sock_common() {
            Ok(()) => r.line(
                true,
                "struct sock_common layout matches the kernel programs",
                "",
            ),
            Err(e) => r.line(false, "struct sock_common layout", &e),
        }
    }
    match ensure_tracefs() {
        Ok(()) => r.line(true, "tracefs", "mounted"),
        Err(e) => r.line(false, "tracefs", &e.to_string()),
    }
    let events = [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists());
    for (name, category) in PROGRAMS {
        let found = events.is_some_and(|e| Path::new(&format!("{e}/{category}/{name}")).exists());
        if !found {
            r.line(
                false,
                &format!("tracepoint {category}:{name}"),
                "not present in tracefs (sock:* needs Linux >= 6.3)",
            );
        }
    }
    raise_memlock();
    if super::OBJECT.is_empty() {
        r.line(
            false,
            "kernel programs",
            "this binary was built without them (AYA_BUILD_SKIP)",
        );
    } else {
        match EbpfLoader::new().load(super::OBJECT) {
            Err(e) => r.line(
                false,
                "load kernel programs and maps (ring buffer, hash, LRU, per-CPU)",
                &e.to_string(),
            ),
            Ok(mut ebpf) => {
                r.line(
                    true,
                    "load kernel programs and maps (ring buffer, hash, LRU, per-CPU)",
                    "",
                );
                // Only verified, never attached: a check must not touch live traffic.
                let mut verified = 0;
                let programs = super::distinct_programs();
                for name in programs.iter().copied() {
                    let res = ebpf
                        .program_mut(name)
                        .ok_or_else(|| "missing".to_string())
                        .and_then(|p| <&mut TracePoint>::try_from(p).map_err(|e| e.to_string()))
                        .and_then(|p| p.load().map_err(|e| e.to_string()));
                    match res {
                        Ok(()) => verified += 1,
                        Err(e) => r.line(false, &format!("verify {name}"), &e),
                    }
                }
                r.line(
                    verified == programs.len(),
                    "verifier accepted the tracepoint programs (loaded, not attached)",
                    &format!("{verified}/{}", programs.len()),
                );
                // The HTTP/2 frame walkers: tail-called by the data-syscall exits.
                match super::load_h2_walkers(&mut ebpf) {
                    Ok(()) => r.line(
                        true,
                        "verifier accepted the HTTP/2 frame walkers (tail-called, not attached)",
                        "",
                    ),
                    Err(e) => r.line(
                        false,
                        "verifier accepted the HTTP/2 frame walkers (tail-called, not attached)",
                        &e.to_string(),
                    ),
                }
                // The runtime uprobes: verified here, attached only where their runtime is found.
                let mut uprobes = |programs: &[&str]| -> Vec<String> {
                    programs
                        .iter()
                        .filter_map(|name| {
                            ebpf.program_mut(name)
                                .ok_or_else(|| "missing".to_string())
                                .and_then(|p| {
                                    <&mut aya::programs::UProbe>::try_from(p)
                                        .map_err(|e| e.to_string())
                                })
                                .and_then(|p| p.load().map_err(|e| e.to_string()))
                                .err()
                                .map(|e| format!("{name}: {e}"))
                        })
                        .collect()
                };
                let go = uprobes(&super::go::PROGRAMS);
                r.line(
                    go.is_empty(),
                    "verifier accepted the Go uprobes (net/http and goroutine spawns: goroutine linking; crypto/tls: TLS plaintext)",
                    &go.join("; "),
                );
                let py = uprobes(&super::python::PROGRAMS);
                r.line(
                    py.is_empty(),
                    "verifier accepted the Python asyncio uprobes (task linking)",
                    &py.join("; "),
                );
                let tk = uprobes(&super::tokio_tasks::PROGRAMS);
                r.line(
                    tk.is_empty(),
                    "verifier accepted the tokio uprobes (task polls, spawns and channels: task linking)",
                    &tk.join("; "),
                );
                let mut tls = uprobes(&super::tls::PROGRAMS);
                if tls.is_empty() {
                    if let Err(e) = super::fill_program_array(
                        &mut ebpf,
                        agent_common::MAP_TLS_H2_WALK,
                        &agent_common::TLS_H2_WALK_PROGRAMS,
                    ) {
                        tls.push(e.to_string());
                    }
                }
                r.line(
                    tls.is_empty(),
                    "verifier accepted the OpenSSL uprobes (TLS plaintext from SSL_read/SSL_write, \
                     HTTP/2 frames walked)",
                    &tls.join("; "),
                );
                let stitch = super::btf::tcp_seq_offsets().and_then(|_| {
                    ebpf.program_mut(super::STITCH_PROGRAM)
                        .ok_or_else(|| "missing".to_string())
                        .and_then(|p| {
                            <&mut aya::programs::RawTracePoint>::try_from(p)
                                .map_err(|e| e.to_string())
                        })
                        .and_then(|p| p.load().map_err(|e| e.to_string()))
                });
                match stitch {
                    Ok(()) => r.line(
                        true,
                        "same-host stitching (raw tracepoint tcp_sendmsg_locked, tcp_sock offsets from BTF)",
                        "",
                    ),
                    Err(e) => println!(
                        "[warn] same-host stitching unavailable ({e}); spans still link inside each process"
                    ),
                }
                // Optional, opt-in: the TCP-option carrier.
                match super::inject::verify_tcp_option(&mut ebpf) {
                    Ok(()) => r.line(
                        true,
                        "TCP-option carrier for --inject tcp-option (sock_ops verified, not attached)",
                        "",
                    ),
                    Err(e) => println!("[warn] --inject tcp-option is unavailable here ({e})"),
                }
                // Optional, opt-in: the header carrier.
                match super::inject::verify(&mut ebpf) {
                    Ok(root) => r.line(
                        true,
                        "traceparent header carrier for --inject header (sock_ops + sk_msg verified, not attached)",
                        &root.display().to_string(),
                    ),
                    Err(e) => println!("[warn] --inject header is unavailable here ({e})"),
                }
            }
        }
    }
    if r.failed == 0 {
        println!("all checks passed: this host can run the agent");
    } else {
        println!("{} check(s) failed", r.failed);
    }
    r.failed == 0
}
