//! W3C Trace Context `traceparent` (https://www.w3.org/TR/trace-context/).

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// Parses a header value. Anything malformed, including the all-zero ids the spec forbids and
    /// the reserved version `ff`, yields `None`.
    pub fn parse(value: &str) -> Option<TraceParent> {
        let v = value.trim().as_bytes();
        // version "-" trace-id "-" parent-id "-" flags; future versions may append fields.
        if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        let version = hex_byte(&v[0..2])?;
        if version == 0xff
            || (version == 0 && v.len() != 55)
            || (version > 0 && v.len() > 55 && v[55] != b'-')
        {
            return None;
        }
        let mut trace_id = [0u8; 16];
        hex_into(&v[3..35], &mut trace_id)?;
        let mut parent_id = [0u8; 8];
        hex_into(&v[36..52], &mut parent_id)?;
        let flags = hex_byte(&v[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    pub fn format(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            self.flags
        )
    }
}

fn nibble(c: u8) -> Option<u8> {
    // Lowercase only, as the spec requires.
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(s: &[u8]) -> Option<u8> {
    Some(nibble(s[0])? << 4 | nibble(s[1])?)
}

fn hex_into(s: &[u8], out: &mut [u8]) -> Option<()> {
    for (i, o) in out.iter_mut().enumerate() {
        *o = hex_byte(&s[2 * i..2 * i + 2])?;
    }
    Some(())
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Whether a `tracestate` value is valid per W3C Trace Context: at most 32 list members and 512
/// characters; each member `key=value`, the key lowercase (`a-z0-9_-*/`, starting with a letter
/// or, as `tenant@system`, a digit; tenant at most 241 and system at most 14 characters, a simple
/// key at most 256), the value at most 256 printable ASCII characters without `,` or `=` and not
/// ending in a space. Empty members (`a=1,,b=2`) are allowed. An invalid value is dropped whole.
pub fn valid_tracestate(value: &str) -> bool {
    if value.len() > 512 {
        return false;
    }
    let mut members = 0;
    for m in value.split(',') {
        let m = m.trim_matches([' ', '\t']);
        if m.is_empty() {
            continue;
        }
        members += 1;
        if members > 32 {
            return false;
        }
        let Some((key, val)) = m.split_once('=') else {
            return false;
        };
        if !valid_key(key) || !valid_value(val) {
            return false;
        }
    }
    true
}

fn key_chars(s: &str) -> bool {
    s.bytes().all(|c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'*' | b'/')
    })
}

fn valid_key(key: &str) -> bool {
    match key.split_once('@') {
        Some((tenant, system)) => {
            (1..=241).contains(&tenant.len())
                && (1..=14).contains(&system.len())
                && key_chars(tenant)
                && key_chars(system)
                && tenant.as_bytes()[0].is_ascii_alphanumeric()
                && system.as_bytes()[0].is_ascii_lowercase()
        }
        None => {
            (1..=256).contains(&key.len())
                && key.as_bytes()[0].is_ascii_lowercase()
                && key_chars(key)
        }
    }
}

fn valid_value(v: &str) -> bool {
    (1..=256).contains(&v.len())
        && v.bytes()
            .all(|c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
        && !v.ends_with(' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracestate_validity() {
        for ok in [
            "congo=t61rcWkgMzE",
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
            "a=1,,b=2",
            "tenant@system=x",
            "1tenant@sys=v",
            " k=v , l=w",
        ] {
            assert!(valid_tracestate(ok), "{ok}");
        }
        let many = (0..33)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        let long = format!("k={}", "v".repeat(255)) + &format!(",l={}", "v".repeat(255));
        for bad in [
            "novalue",
            "Upper=1",
            "k=a=b",
            "k=",
            "=v",
            "k=v,bare",
            "1key=v",
            "k=\u{7f}",
            "tenant@=v",
            "t@waytoolongsystemname=v",
            many.as_str(),
            long.as_str(),
        ] {
            assert!(!valid_tracestate(bad), "{bad}");
        }
        let thirty_two = (0..32)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(valid_tracestate(&thirty_two));
    }

    #[test]
    fn valid() {
        let tp =
            TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        assert_eq!(hex(&tp.trace_id), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(hex(&tp.parent_id), "b7ad6b7169203331");
        assert!(tp.sampled());
        assert_eq!(
            tp.format(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        let unsampled =
            TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00").unwrap();
        assert!(!unsampled.sampled());
        // A future version with extra fields is accepted.
        assert!(TraceParent::parse(
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra"
        )
        .is_some());
    }

    #[test]
    fn malformed() {
        for bad in [
            "",
            "garbage",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
            "00-0af7651916cd43dd8448eb211c8031zz-b7ad6b7169203331-01",
            "é0-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }
}
