//! Least privilege: the agent as user `nobody` holding only the capabilities it needs
//! (`setpriv`), tracing and linking as it does as root; `agent check` names a missing one.
use std::process::Command;

use tests::{
    agent::{agent_bin, Agent, Export},
    free_port,
    programs::{python, Proc},
    receiver::Receiver,
    wait_port,
};

/// The capabilities of `loader::caps::NEEDED`, as setpriv spells them.
const CAPS: [&str; 5] = [
    "bpf",
    "perfmon",
    "dac_read_search",
    "sys_ptrace",
    "net_admin",
];

/// `setpriv` arguments that run a program as nobody with exactly `caps` (inheritable, ambient
/// and bounding), and no way to gain more.
fn setpriv(caps: &[&str]) -> Vec<String> {
    let list: String = caps.iter().map(|c| format!(",+{c}")).collect();
    vec![
        "setpriv".into(),
        "--reuid=65534".into(),
        "--regid=65534".into(),
        "--clear-groups".into(),
        format!("--inh-caps=-all{list}"),
        format!("--ambient-caps=-all{list}"),
        format!("--bounding-set=-all{list}"),
        "--no-new-privs".into(),
        "--".into(),
    ]
}

fn check_as(caps: &[&str]) -> (bool, String) {
    let args = setpriv(caps);
    let out = Command::new(&args[0])
        .args(&args[1..])
        .arg(agent_bin())
        .arg("check")
        .output()
        .expect("setpriv");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn check_passes_with_the_needed_capabilities_and_names_a_missing_one() {
    let (ok, text) = check_as(&CAPS);
    assert!(ok, "{text}");
    assert!(text.contains("all checks passed"), "{text}");
    for missing in ["perfmon", "sys_ptrace", "net_admin"] {
        let caps: Vec<&str> = CAPS.iter().copied().filter(|c| *c != missing).collect();
        let (ok, text) = check_as(&caps);
        let name = format!("CAP_{}", missing.to_uppercase());
        assert!(!ok, "check passed without {name}:\n{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("[FAIL]") && l.contains(&name)),
            "{name} not named:\n{text}"
        );
    }
}

/// As nobody with the needed capabilities (NET_ADMIN too, for the TCP-option carrier): a
/// Python client calling a Python server on this host is traced, and the server span is the
/// client span's child (stitching and the option both at work).
#[test]
fn agent_as_nobody_traces_and_links() {
    let rx = Receiver::start();
    let port = free_port();
    let _server = Proc::spawn(&mut python("threaded_server.py", &[&port.to_string()]));
    wait_port(port);
    let prefix = setpriv(&CAPS);
    let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
    let agent = Agent::start_as(
        Export::Grpc(&rx),
        &prefix,
        &["--port", &port.to_string(), "--inject", "tcp-option"],
        &[("BEHOLDER_TCP_OPTION_LOOPBACK", "true")],
    );
    // The agent really runs as nobody.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid}"
    );
    assert!(
        !agent.stderr().contains("TCP-option carrier is off"),
        "{}",
        agent.stderr()
    );
    for i in 0..5 {
        let out = Command::new("curl")
            .args([
                "-sf",
                "-m",
                "10",
                &format!("http://127.0.0.1:{port}/priv/{i}"),
            ])
            .output()
            .expect("curl");
        assert!(out.status.success());
    }
    let spans = rx.wait_for(
        10,
        std::time::Duration::from_secs(20),
        "5 client and 5 server spans",
        |s| s.attr("url.path").is_some_and(|p| p.starts_with("/priv/")),
    );
    let (_, err) = agent.stop();
    for i in 0..5 {
        let path = format!("/priv/{i}");
        let c = spans
            .iter()
            .find(|s| s.kind() == "client" && s.attr("url.path") == Some(&path))
            .expect("client span");
        let s = spans
            .iter()
            .find(|s| s.kind() == "server" && s.attr("url.path") == Some(&path))
            .expect("server span");
        assert_eq!(s.trace_id(), c.trace_id(), "{path}");
        assert_eq!(s.parent_id(), c.span_id(), "{path}");
        assert!(s
            .res("process.executable.name")
            .is_some_and(|n| n.starts_with("python")));
    }
    let c = tests::agent::final_counters(&err);
    assert!(
        c.get("kernel_tcpopt_claimed").copied().unwrap_or(0) >= 5,
        "{c:?}"
    );
}
