//! Reads member offsets of a kernel struct from `/sys/kernel/btf/vmlinux`, to check the
//! `struct sock_common` offsets the kernel programs rely on. A minimal BTF walk: no crate exposes
//! member offsets of the running kernel's BTF in a stable public API (aya's BTF types are
//! internal to its loader).
use std::collections::HashMap;

const BTF_KIND_STRUCT: u32 = 4;
const BTF_KIND_UNION: u32 = 5;

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn name_at(strs: &[u8], off: u32) -> &str {
    let s = strs.get(off as usize..).unwrap_or_default();
    let end = s.iter().position(|c| *c == 0).unwrap_or(s.len());
    std::str::from_utf8(&s[..end]).unwrap_or("")
}

/// Byte offsets of the named members of struct `name`, including members of anonymous
/// unions/structs nested directly in it.
pub fn struct_offsets(btf: &[u8], name: &str) -> Option<HashMap<String, u32>> {
    let hdr_len = u32_at(btf, 4)? as usize;
    let type_off = u32_at(btf, 8)? as usize;
    let type_len = u32_at(btf, 12)? as usize;
    let str_off = u32_at(btf, 16)? as usize;
    let str_len = u32_at(btf, 20)? as usize;
    let types = btf.get(hdr_len + type_off..hdr_len + type_off + type_len)?;
    let strs = btf.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
    // First pass: start of every type record, so anonymous member types can be followed.
    let mut records: Vec<(usize, u32, u32, u32)> = vec![(0, 0, 0, 0)]; // (pos, name_off, kind, vlen)
    let mut i = 0;
    while i + 12 <= types.len() {
        let name_off = u32_at(types, i)?;
        let info = u32_at(types, i + 4)?;
        let kind = (info >> 24) & 0x1f;
        let vlen = info & 0xffff;
        records.push((i, name_off, kind, vlen));
        let extra = match kind {
            1 | 14 | 17 => 4,
            3 => 12,
            4 | 5 => vlen as usize * 12,
            6 | 13 => vlen as usize * 8,
            15 | 19 => vlen as usize * 12,
            _ => 0,
        };
        i += 12 + extra;
    }
    let members = |rec: &(usize, u32, u32, u32)| -> Vec<(String, u32, u32)> {
        let (pos, _, _, vlen) = *rec;
        let kflag = u32_at(types, pos + 4).unwrap_or(0) >> 31;
        (0..vlen as usize)
            .filter_map(|m| {
                let at = pos + 12 + m * 12;
                let n = u32_at(types, at)?;
                let ty = u32_at(types, at + 4)?;
                let off = u32_at(types, at + 8)?;
                let bits = if kflag == 1 { off & 0x00ff_ffff } else { off };
                Some((name_at(strs, n).to_owned(), ty, bits / 8))
            })
            .collect()
    };
    let target = records
        .iter()
        .find(|r| r.2 == BTF_KIND_STRUCT && name_at(strs, r.1) == name)?;
    let mut out = HashMap::new();
    for (member, ty, off) in members(target) {
        if member.is_empty() {
            if let Some(inner) = records
                .get(ty as usize)
                .filter(|r| r.2 == BTF_KIND_STRUCT || r.2 == BTF_KIND_UNION)
            {
                for (m, ty2, off2) in members(inner) {
                    if m.is_empty() {
                        if let Some(inner2) = records
                            .get(ty2 as usize)
                            .filter(|r| r.2 == BTF_KIND_STRUCT || r.2 == BTF_KIND_UNION)
                        {
                            for (m3, _, off3) in members(inner2) {
                                out.insert(m3, off + off2 + off3);
                            }
                        }
                    } else {
                        out.insert(m, off + off2);
                    }
                }
            }
        } else {
            out.insert(member, off);
        }
    }
    Some(out)
}

/// Offsets of `write_seq` and `copied_seq` in the running kernel's `struct tcp_sock`, which
/// same-host stitching reads (they move between kernel versions, so they come from BTF).
pub fn tcp_seq_offsets() -> Result<(u32, u32), String> {
    let btf = std::fs::read("/sys/kernel/btf/vmlinux")
        .map_err(|e| format!("/sys/kernel/btf/vmlinux: {e}"))?;
    let offs = struct_offsets(&btf, "tcp_sock").ok_or("struct tcp_sock not found in BTF")?;
    match (offs.get("write_seq"), offs.get("copied_seq")) {
        (Some(w), Some(c)) if *w != 0 && *c != 0 => Ok((*w, *c)),
        _ => Err("tcp_sock.write_seq or copied_seq missing from BTF".into()),
    }
}

/// The `struct sock_common` offsets the kernel programs use (see `agent-ebpf/src/sock.rs`).
pub const SOCK_COMMON_OFFSETS: [(&str, u32); 7] = [
    ("skc_daddr", 0),
    ("skc_rcv_saddr", 4),
    ("skc_dport", 12),
    ("skc_num", 14),
    ("skc_family", 16),
    ("skc_v6_daddr", 56),
    ("skc_v6_rcv_saddr", 72),
];

/// Compares the running kernel's layout with what the kernel programs assume.
pub fn check_sock_common() -> Result<(), String> {
    let btf = std::fs::read("/sys/kernel/btf/vmlinux")
        .map_err(|e| format!("/sys/kernel/btf/vmlinux: {e}"))?;
    let offs = struct_offsets(&btf, "sock_common").ok_or("struct sock_common not found in BTF")?;
    for (name, want) in SOCK_COMMON_OFFSETS {
        match offs.get(name) {
            Some(got) if *got == want => {}
            Some(got) => {
                return Err(format!(
                    "{name} is at {got}, the kernel programs read {want}"
                ))
            }
            None => return Err(format!("{name} missing from struct sock_common")),
        }
    }
    Ok(())
}
