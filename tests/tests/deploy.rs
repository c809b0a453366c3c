//! The Kubernetes manifests: valid against the Kubernetes schemas (`kubernetes-validate`,
//! strict: no unknown fields), and with the least privilege the agent needs.
use std::{path::PathBuf, process::Command};

fn manifests() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    assert!(!v.is_empty());
    v
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    for m in manifests() {
        let out = Command::new("kubernetes-validate")
            .arg("--strict")
            .arg(&m)
            .output()
            .expect("kubernetes-validate (installed by scripts/bootstrap.sh --test)");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {text}", m.display());
        assert!(text.contains("passed"), "{}: {text}", m.display());
    }
}

#[test]
fn daemonset_runs_with_least_privilege() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/daemonset.yaml");
    let y = std::fs::read_to_string(path).expect("daemonset.yaml");
    let has = |s: &str| {
        y.lines()
            .any(|l| l.split('#').next().unwrap_or("").contains(s))
    };
    assert!(!has("privileged: true"));
    assert!(has("privileged: false"));
    assert!(has("automountServiceAccountToken: false"));
    assert!(has("readOnlyRootFilesystem: true"));
    assert!(has("allowPrivilegeEscalation: false"));
    assert!(has(r#"drop: ["ALL"]"#));
    assert!(has(
        r#"add: ["BPF", "PERFMON", "DAC_READ_SEARCH", "SYS_PTRACE", "NET_ADMIN"]"#
    ));
    for probe in [
        "livenessProbe:",
        "readinessProbe:",
        "path: /healthz",
        "path: /readyz",
    ] {
        assert!(has(probe), "{probe}");
    }
    assert!(has("requests: { cpu:") && has("limits: { cpu:"));
}
