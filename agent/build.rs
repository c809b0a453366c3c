//! Builds the kernel programs (`agent-ebpf`) with nightly + bpf-linker; the binary embeds them.
//! `scripts/bootstrap.sh` (run by `cargo xtask`) installs that toolchain.
fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest).join("../agent-ebpf");
    let root = root.canonicalize()?;
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    // With AYA_BUILD_SKIP (unit tests, docs) the binary embeds an empty object and says so at run time.
    let object = std::path::Path::new(&std::env::var("OUT_DIR")?).join("agent");
    if !object.exists() {
        std::fs::write(object, [])?;
    }
    Ok(())
}
