//! Harness for the root integration tests: an OTLP receiver built on the official protocol
//! definitions, the agent under test, and the real programs it traces.
pub mod agent;
pub mod chain;
pub mod links;
pub mod pki;
pub mod programs;
pub mod receiver;

use std::time::{Duration, Instant};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Waits until `f` returns true, or panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Waits until something listens on `port`.
pub fn wait_port(port: u16) {
    wait_port_for(port, Duration::from_secs(10));
}

/// Waits until something listens on `port`, for up to `timeout` (an agent loading its programs
/// on a busy machine takes longer than a test server).
pub fn wait_port_for(port: u16, timeout: Duration) {
    wait_until(timeout, &format!("a listener on port {port}"), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// The tests load eBPF programs: they must run as root. In CI a missing capability is a failure.
pub fn require_root() {
    // SAFETY: no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "integration tests must run as root (use `cargo xtask test`)"
    );
}

pub fn fixture(name: &str) -> String {
    format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}
