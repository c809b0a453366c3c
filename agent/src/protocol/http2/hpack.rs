//! HPACK (RFC 7541) decoding that survives starting in the middle of a connection.
//!
//! Hand-written because no maintained decoder can start mid-stream: they all abort a block that
//! refers to a dynamic-table entry they never saw. The agent often attaches to connections that
//! are hours old (gRPC channels live long), so this decoder keeps a *positional partial* table:
//! the dynamic table is indexed newest first, so an entry inserted after the agent attached sits
//! at a known position whatever came before it, even while the older entries are unknown. A field
//! that refers to an unknown entry is marked unknown (never guessed); the rest of the block still
//! decodes. Positions stay exact only if every insertion is seen, so a block the caller could not
//! feed whole (a lost or truncated frame) must be reported with [`Decoder::lose_sync`], and a
//! malformed block does the same by itself. Huffman strings are decoded by `httlib-huffman`.
use std::collections::VecDeque;

use bytes::Bytes;

use super::static_table::STATIC;

/// The protocol's initial dynamic-table size (SETTINGS_HEADER_TABLE_SIZE default).
pub const DEFAULT_TABLE_SIZE: usize = 4096;
/// The most table bytes one decoder keeps, whatever size the peers agreed: a bound on memory.
/// Entries beyond it become unknown positions (counted as unresolved when referred to).
pub const MAX_KEPT_TABLE_SIZE: usize = 65536;
/// The longest string literal accepted (a header name or value), and the most fields a block
/// may yield: bounds on what one block can make the agent allocate.
pub const MAX_STRING: usize = 65536;
pub const MAX_FIELDS: usize = 512;

/// One field of a decoded block. `None` is a part the decoder cannot know: it refers to a
/// dynamic-table entry inserted before the agent saw the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: Option<Bytes>,
    pub value: Option<Bytes>,
}

impl Field {
    /// The name, when known and valid UTF-8 (HTTP/2 names are lowercase ASCII).
    pub fn name_str(&self) -> Option<&str> {
        self.name
            .as_deref()
            .and_then(|n| std::str::from_utf8(n).ok())
    }

    pub fn value_str(&self) -> Option<&str> {
        self.value
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HpackError {
    #[error("block ends inside a field")]
    Truncated,
    #[error("integer too large")]
    IntegerOverflow,
    #[error("index 0")]
    ZeroIndex,
    #[error("string literal of {0} bytes is over the limit")]
    StringTooLong(usize),
    #[error("invalid Huffman code")]
    Huffman,
    #[error("dynamic table size update after the first field")]
    LateSizeUpdate,
    #[error("more than {MAX_FIELDS} fields in one block")]
    TooManyFields,
}

/// What one block left unresolved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Fields with an unknown name or value.
    pub unresolved: usize,
}

#[derive(Clone, Debug)]
struct Entry {
    name: Option<Bytes>,
    value: Option<Bytes>,
    /// RFC size (name + value + 32); a lower bound when a part is unknown.
    size: usize,
}

/// One direction's HPACK decoding state.
#[derive(Clone, Debug)]
pub struct Decoder {
    /// Known entries, newest first: dynamic index 62 is `table[0]`.
    table: VecDeque<Entry>,
    size: usize,
    /// The encoder's table size, when known: from the connection's start (the protocol
    /// default) or from a size update seen since.
    max_size: Option<usize>,
    /// Whether entries older than `table` may exist (inserted before the agent saw them).
    older_unknown: bool,
}

impl Decoder {
    /// For a connection seen from its start: the table is empty and fully known.
    pub fn new() -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: Some(DEFAULT_TABLE_SIZE),
            older_unknown: false,
        }
    }

    /// For a connection first seen in its middle: every entry inserted before is unknown.
    pub fn mid_stream() -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: None,
            older_unknown: true,
        }
    }

    /// Some insertion may have been missed (a block not fed whole): no known entry's position can
    /// be trusted any more. Entries inserted from the next block on are exact again.
    pub fn lose_sync(&mut self) {
        self.table.clear();
        self.size = 0;
        self.older_unknown = true;
    }

    /// Whether every entry of the table is known (no field can come out unknown).
    pub fn in_sync(&self) -> bool {
        !self.older_unknown
    }

    /// Decodes one complete header block into `out` (appended). On an error the fields decoded
    /// so far stay in `out` and the table loses sync (the rest of the block may have inserted
    /// entries).
    pub fn decode(
        &mut self,
        block: &Bytes,
        out: &mut Vec<Field>,
    ) -> Result<BlockStats, HpackError> {
        let r = self.decode_inner(block, out);
        if r.is_err() {
            self.lose_sync();
        }
        r
    }

    fn decode_inner(
        &mut self,
        block: &Bytes,
        out: &mut Vec<Field>,
    ) -> Result<BlockStats, HpackError> {
        let mut stats = BlockStats::default();
        let mut pos = 0;
        let mut fields = 0;
        while pos < block.len() {
            let b = block[pos];
            if b & 0xe0 == 0x20 {
                // Dynamic table size update: only before the block's first field.
                let size = integer(block, &mut pos, 5)?;
                if fields > 0 {
                    return Err(HpackError::LateSizeUpdate);
                }
                self.resize(size);
                continue;
            }
            fields += 1;
            if fields > MAX_FIELDS {
                return Err(HpackError::TooManyFields);
            }
            let field = if b & 0x80 != 0 {
                let index = integer(block, &mut pos, 7)?;
                self.lookup(index)?
            } else {
                // Literal: with incremental indexing (01), without (0000) or never indexed (0001).
                let (prefix, index_it) = if b & 0x40 != 0 { (6, true) } else { (4, false) };
                let name_index = integer(block, &mut pos, prefix)?;
                let name = if name_index == 0 {
                    Some(string(block, &mut pos)?)
                } else {
                    self.lookup(name_index)?.name
                };
                let value = string(block, &mut pos)?;
                let field = Field {
                    name,
                    value: Some(value),
                };
                if index_it {
                    self.insert(&field);
                }
                field
            };
            if field.name.is_none() || field.value.is_none() {
                stats.unresolved += 1;
            }
            out.push(field);
        }
        Ok(stats)
    }

    fn lookup(&self, index: usize) -> Result<Field, HpackError> {
        match index {
            0 => Err(HpackError::ZeroIndex),
            1..=61 => {
                let (n, v) = STATIC[index - 1];
                Ok(Field {
                    name: Some(Bytes::from_static(n.as_bytes())),
                    value: Some(Bytes::from_static(v.as_bytes())),
                })
            }
            // Beyond the known entries: inserted before the agent saw the connection (or beyond
            // what this decoder keeps). Never an error here: unknown, never guessed.
            _ => Ok(self
                .table
                .get(index - 62)
                .map(|e| Field {
                    name: e.name.clone(),
                    value: e.value.clone(),
                })
                .unwrap_or(Field {
                    name: None,
                    value: None,
                })),
        }
    }

    fn insert(&mut self, f: &Field) {
        let size =
            f.name.as_ref().map_or(0, Bytes::len) + f.value.as_ref().map_or(0, Bytes::len) + 32;
        if let Some(max) = self.max_size {
            if size > max {
                // RFC 7541 4.4: an entry larger than the table empties it.
                self.table.clear();
                self.size = 0;
                self.older_unknown = false;
                return;
            }
        }
        self.table.push_front(Entry {
            name: f.name.clone(),
            value: f.value.clone(),
            size,
        });
        self.size += size;
        self.evict();
    }

    fn resize(&mut self, max: usize) {
        self.max_size = Some(max);
        self.evict();
    }

    /// Drops the oldest known entries the encoder's table no longer holds (or this decoder does
    /// not keep), and notices when the known entries fill the table so that nothing older can
    /// remain (every entry takes at least 32 bytes).
    fn evict(&mut self) {
        let max = self.max_size.unwrap_or(usize::MAX);
        let keep = max.min(MAX_KEPT_TABLE_SIZE);
        while self.size > keep {
            let before = self.size;
            let Some(e) = self.table.pop_back() else {
                break;
            };
            self.size -= e.size;
            if before <= max {
                // Dropped for memory, not by the encoder: positions past the table are unknown.
                self.older_unknown = true;
            }
        }
        if self
            .max_size
            .is_some_and(|m| m <= MAX_KEPT_TABLE_SIZE && self.size + 32 > m)
        {
            self.older_unknown = false;
        }
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

/// An HPACK integer with an `n`-bit prefix at `block[*pos]` (RFC 7541 5.1).
fn integer(block: &[u8], pos: &mut usize, n: u32) -> Result<usize, HpackError> {
    let mask = (1usize << n) - 1;
    let first = *block.get(*pos).ok_or(HpackError::Truncated)? as usize & mask;
    *pos += 1;
    if first < mask {
        return Ok(first);
    }
    let mut value = mask;
    let mut shift = 0;
    loop {
        let b = *block.get(*pos).ok_or(HpackError::Truncated)?;
        *pos += 1;
        if shift > 21 {
            return Err(HpackError::IntegerOverflow);
        }
        value += ((b & 0x7f) as usize) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// A string literal at `block[*pos]` (RFC 7541 5.2): a slice of the block, or its Huffman
/// decoding.
fn string(block: &Bytes, pos: &mut usize) -> Result<Bytes, HpackError> {
    let huffman = *block.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = integer(block, pos, 7)?;
    if len > MAX_STRING {
        return Err(HpackError::StringTooLong(len));
    }
    let end = pos
        .checked_add(len)
        .filter(|&e| e <= block.len())
        .ok_or(HpackError::Truncated)?;
    let raw = block.slice(*pos..end);
    *pos = end;
    if !huffman {
        return Ok(raw);
    }
    let mut out = Vec::with_capacity(len * 8 / 5);
    httlib_huffman::decode(&raw, &mut out, httlib_huffman::DecoderSpeed::FourBits)
        .map_err(|_| HpackError::Huffman)?;
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests;
