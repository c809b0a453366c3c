//! `cargo xtask image`: the agent's container image from `deploy/Containerfile`, built offline
//! with podman: a `FROM scratch` image holding the release binary and the shared libraries
//! `ldd` names (no base image is pulled).
use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

/// Copies `bin` and its libraries into `ctx/rootfs` at their own paths.
fn rootfs(bin: &Path, ctx: &Path) -> Result<()> {
    let root = ctx.join("rootfs");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    let dest = root.join("usr/local/bin/agent");
    std::fs::create_dir_all(dest.parent().expect("parent"))?;
    std::fs::copy(bin, &dest).with_context(|| format!("copying {}", bin.display()))?;
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line
            .split("=>")
            .last()
            .and_then(|r| r.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        let Some(p) = path else { continue };
        let src = Path::new(p);
        let to = root.join(p.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().expect("parent"))?;
        // The file itself, not the symlink: the image has no other copy.
        std::fs::copy(src, &to).with_context(|| format!("copying {p}"))?;
    }
    // /tmp and the mount points the DaemonSet uses exist in a read-only root filesystem.
    for d in ["tmp", "proc", "sys", "host/sys/fs/cgroup"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    Ok(())
}

pub fn build(root: &Path, bin: &Path) -> Result<()> {
    if Command::new("podman").arg("--version").output().is_err() {
        bail!("podman is not installed: `apt-get install podman` (Debian) and run again");
    }
    let ctx = root.join("target/image");
    rootfs(bin, &ctx)?;
    super::run(Command::new("podman").args([
        "build",
        "--storage-driver",
        "vfs",
        "-f",
        &root.join("deploy/Containerfile").display().to_string(),
        "-t",
        "localhost/beholder-agent:latest",
        &ctx.display().to_string(),
    ]))
}
