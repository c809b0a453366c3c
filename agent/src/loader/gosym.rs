//! Functions of a Go executable, by name: from its symbol table, or from its `.gopclntab` when
//! it is stripped (Debian's `etcd` is). Every Go binary keeps that table: the runtime needs it
//! for stack traces and garbage collection.
//!
//! Hand-written: the crates that read `.gopclntab` are whole reverse-engineering tool kits
//! (`unstrip`, `smda`); the agent needs only the function table's entry addresses and names,
//! about a hundred lines, for the layouts of Go 1.16 and 1.17 (magic `0xfffffffa`) and Go 1.18
//! and later (`0xfffffff0`, `0xfffffff1` since 1.20: same layout). The probes need the
//! register ABI, Go 1.17 and later, so older tables are not read.
use object::{Object, ObjectSection, ObjectSymbol};

/// One function's code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Func {
    /// Its virtual address.
    pub addr: u64,
    /// Its size in bytes (to the next function's entry, from `.gopclntab`).
    pub size: u64,
    /// Where its first byte is in the file (what a uprobe attaches to).
    pub file_offset: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GoSymError {
    #[error("not an ELF file the agent can read: {0}")]
    Elf(String),
    #[error("no symbol table and no .gopclntab section")]
    NoTable,
    #[error(".gopclntab of an unsupported Go release (magic {0:#x}; Go 1.17 or later is needed)")]
    Unsupported(u32),
    #[error(".gopclntab is malformed: {0}")]
    Malformed(&'static str),
}

/// The functions named `wanted` in the ELF file `elf`, in that order (`None`: not in it).
pub fn functions(elf: &[u8], wanted: &[&str]) -> Result<Vec<Option<Func>>, GoSymError> {
    let file = object::File::parse(elf).map_err(|e| GoSymError::Elf(e.to_string()))?;
    let mut out: Vec<Option<Func>> = vec![None; wanted.len()];
    for sym in file.symbols() {
        if sym.kind() != object::SymbolKind::Text || sym.size() == 0 {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        if let Some(i) = wanted.iter().position(|w| *w == name) {
            out[i] = func(&file, sym.address(), sym.size());
        }
    }
    if out.iter().all(Option::is_some) {
        return Ok(out);
    }
    let Some(section) = file.section_by_name(".gopclntab") else {
        return if file.symbols().next().is_some() {
            Ok(out)
        } else {
            Err(GoSymError::NoTable)
        };
    };
    let table = section
        .data()
        .map_err(|_| GoSymError::Malformed("section data"))?;
    // An assembly-called function's ABI0 wrapper has the same name in the table (the symbol
    // table says `.abi0`): a name found twice is not probed, rather than probed at a guess.
    let mut found = vec![None; wanted.len()];
    let mut twice = vec![false; wanted.len()];
    for (addr, size, name) in Table::parse(table)?.iter() {
        let Some(name) = name else { continue };
        if let Some(i) = wanted.iter().position(|w| w.as_bytes() == name) {
            twice[i] |= found[i].is_some();
            found[i] = func(&file, addr, size);
        }
    }
    for i in 0..wanted.len() {
        if out[i].is_none() && !twice[i] {
            out[i] = found[i];
        }
    }
    Ok(out)
}

/// The function at `addr`, with the file offset of the section holding it.
fn func(file: &object::File, addr: u64, size: u64) -> Option<Func> {
    let section = file
        .sections()
        .find(|s| s.address() <= addr && addr < s.address() + s.size())?;
    let (start, _) = section.file_range()?;
    Some(Func {
        addr,
        size,
        file_offset: addr - section.address() + start,
    })
}

/// A `.gopclntab` header and its function table (`runtime.pcHeader`, `runtime.functab`).
struct Table<'a> {
    data: &'a [u8],
    nfunc: usize,
    /// 0 before Go 1.18: entries are then absolute addresses.
    text_start: u64,
    funcnames: usize,
    pcln: usize,
    /// Go 1.18 and later: 32-bit entry offsets from `text_start`.
    short: bool,
}

impl<'a> Table<'a> {
    fn parse(data: &'a [u8]) -> Result<Table<'a>, GoSymError> {
        let magic = u32::from_le_bytes(
            data.get(..4)
                .ok_or(GoSymError::Malformed("header"))?
                .try_into()
                .unwrap_or_default(),
        );
        let short = match magic {
            0xffff_fff0 | 0xffff_fff1 => true,
            0xffff_fffa => false,
            m => return Err(GoSymError::Unsupported(m)),
        };
        if data.get(7) != Some(&8) {
            return Err(GoSymError::Malformed("pointer size is not 8"));
        }
        let word = |i: usize| read_u64(data, 8 + 8 * i).ok_or(GoSymError::Malformed("header"));
        let (nfunc, text_start, funcnames, pcln) = if short {
            (word(0)?, word(2)?, word(3)?, word(7)?)
        } else {
            (word(0)?, 0, word(2)?, word(6)?)
        };
        let t = Table {
            data,
            nfunc: usize::try_from(nfunc).map_err(|_| GoSymError::Malformed("nfunc"))?,
            text_start,
            funcnames: usize::try_from(funcnames).map_err(|_| GoSymError::Malformed("names"))?,
            pcln: usize::try_from(pcln).map_err(|_| GoSymError::Malformed("pclntab"))?,
            short,
        };
        // The table holds nfunc + 1 entries (the last one ends the text).
        t.entry(t.nfunc)
            .ok_or(GoSymError::Malformed("function table"))?;
        Ok(t)
    }

    /// Entry `i` of the function table: the function's address and its `_func`'s offset.
    fn entry(&self, i: usize) -> Option<(u64, usize)> {
        if self.short {
            let at = self.pcln.checked_add(i.checked_mul(8)?)?;
            let entry = read_u32(self.data, at)? as u64;
            let off = read_u32(self.data, at + 4)? as usize;
            Some((self.text_start.checked_add(entry)?, off))
        } else {
            let at = self.pcln.checked_add(i.checked_mul(16)?)?;
            Some((
                read_u64(self.data, at)?,
                read_u64(self.data, at + 8)? as usize,
            ))
        }
    }

    /// The name of the `_func` at `off` in the pc-line table.
    fn name(&self, off: usize) -> Option<&'a [u8]> {
        // `_func.nameoff` follows the entry: a 32-bit offset (1.18+) or a pointer-size address.
        let at = self.pcln.checked_add(off)? + if self.short { 4 } else { 8 };
        let nameoff = usize::try_from(read_u32(self.data, at)? as i32).ok()?;
        let start = self.funcnames.checked_add(nameoff)?;
        let rest = self.data.get(start..)?;
        let len = rest.iter().position(|&b| b == 0)?;
        Some(&rest[..len])
    }

    /// Every function: address, size and name (`None`: out of the table's bounds).
    fn iter(&self) -> impl Iterator<Item = (u64, u64, Option<&'a [u8]>)> + '_ {
        (0..self.nfunc).filter_map(move |i| {
            let (addr, off) = self.entry(i)?;
            let (next, _) = self.entry(i + 1)?;
            Some((addr, next.checked_sub(addr)?, self.name(off)))
        })
    }
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        data.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn read_u64(data: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        data.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Go 1.18+ table of two functions, `a.f` at 0x1000 (0x40 bytes) and `b.g` after it.
    fn table() -> Vec<u8> {
        let mut t = vec![0u8; 8 + 8 * 8];
        t[..4].copy_from_slice(&0xffff_fff1u32.to_le_bytes());
        t[6] = 1;
        t[7] = 8;
        let names = t.len();
        t.extend_from_slice(b"a.f\0b.g\0");
        let pcln = t.len();
        // functab: (entryoff, funcoff) x 3, then two _func (entryoff, nameoff).
        for (entry, func) in [(0u32, 24u32), (0x40, 32), (0x60, 0)] {
            t.extend_from_slice(&entry.to_le_bytes());
            t.extend_from_slice(&func.to_le_bytes());
        }
        for (entry, name) in [(0u32, 0i32), (0x40, 4)] {
            t.extend_from_slice(&entry.to_le_bytes());
            t.extend_from_slice(&name.to_le_bytes());
        }
        for (i, v) in [2u64, 0, 0x1000, names as u64, 0, 0, 0, pcln as u64]
            .into_iter()
            .enumerate()
        {
            t[8 + 8 * i..16 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        t
    }

    #[test]
    fn reads_the_function_table_of_go_1_18_and_later() {
        let t = table();
        let got: Vec<_> = Table::parse(&t).unwrap().iter().collect();
        assert_eq!(
            got,
            vec![
                (0x1000, 0x40, Some(&b"a.f"[..])),
                (0x1040, 0x20, Some(&b"b.g"[..]))
            ]
        );
    }

    #[test]
    fn refuses_old_and_truncated_tables() {
        let mut t = table();
        t[..4].copy_from_slice(&0xffff_fffbu32.to_le_bytes());
        assert_eq!(
            Table::parse(&t).err(),
            Some(GoSymError::Unsupported(0xffff_fffb))
        );
        let t = table();
        for cut in [3, 20, t.len() - 20] {
            assert!(Table::parse(&t[..cut]).is_err(), "cut at {cut}");
        }
        // A name offset past the end gives no name, not a panic.
        let mut t = table();
        let n = t.len();
        t[n - 4..].copy_from_slice(&i32::MAX.to_le_bytes());
        let got: Vec<_> = Table::parse(&t).unwrap().iter().collect();
        assert_eq!(got[1].2, None);
    }

    /// The Go toolchain's own table against its symbol table, for every function of a Go
    /// program built here with symbols (Debian's `golang-go`, installed by the bootstrap).
    #[test]
    fn the_table_of_a_go_program_agrees_with_its_symbols() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/gosym-test");
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("main.go");
        std::fs::write(
            &src,
            "package main\nimport (\"crypto/tls\"; \"os\")\nfunc main() { \
             c, err := tls.Dial(\"tcp\", os.Args[1], nil); if err == nil { c.Write(nil); c.Read(nil); c.Close() } }\n",
        )
        .unwrap();
        let bin = dir.join("prog");
        let out = std::process::Command::new("go")
            .args(["build", "-o"])
            .arg(&bin)
            .arg(&src)
            .env("GO111MODULE", "off")
            .env("CGO_ENABLED", "0")
            .env("GOCACHE", dir.join("cache"))
            .output()
            .expect("go (Debian's golang-go)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let data = std::fs::read(&bin).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let section = file.section_by_name(".gopclntab").unwrap();
        let table = section.data().unwrap();
        let parsed = Table::parse(table).unwrap();
        let by_addr: std::collections::HashMap<u64, &[u8]> = parsed
            .iter()
            .map(|(a, _, n)| (a, n.expect("every name in bounds")))
            .collect();
        let mut checked = 0;
        for sym in file.symbols() {
            if sym.kind() != object::SymbolKind::Text || sym.size() == 0 {
                continue;
            }
            let name = sym.name().unwrap();
            let table = by_addr
                .get(&sym.address())
                .map(|n| String::from_utf8_lossy(n));
            let table = table.unwrap_or_else(|| panic!("{name} at {:#x}", sym.address()));
            // ABI0 wrappers are named `.abi0` in the symbol table only; the compiler's
            // generated `type..` functions are spelled differently in each, and the table
            // shortens type arguments (`[...]`).
            let bare = name.strip_suffix(".abi0").unwrap_or(name);
            if !bare.starts_with("type..") && !table.contains("[...]") {
                assert_eq!(table, bare);
            }
            checked += 1;
        }
        assert!(checked > 1000, "{checked} functions compared");
        let wanted = ["crypto/tls.(*Conn).Read", "crypto/tls.(*Conn).Write"];
        let by_symbols = functions(&data, &wanted).unwrap();
        assert!(by_symbols.iter().all(Option::is_some));
        // The same program stripped of its symbol table: found in the table, at the same place.
        let stripped = dir.join("prog-stripped");
        let s = std::process::Command::new("strip")
            .arg("-o")
            .arg(&stripped)
            .arg(&bin)
            .status()
            .expect("strip (binutils)");
        assert!(s.success());
        let data = std::fs::read(&stripped).unwrap();
        assert!(object::File::parse(&*data)
            .unwrap()
            .symbols()
            .next()
            .is_none());
        let by_table = functions(&data, &wanted).unwrap();
        for (a, b) in by_symbols.iter().zip(&by_table) {
            let (a, b) = (a.unwrap(), b.unwrap());
            assert_eq!((a.addr, a.file_offset), (b.addr, b.file_offset));
            assert!(b.size >= a.size && b.size < a.size + 64, "{a:?} {b:?}");
        }
    }
}
