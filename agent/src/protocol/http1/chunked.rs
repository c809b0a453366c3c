//! Chunked transfer coding (RFC 9112 7.1), tracked byte by byte so a body may arrive in any
//! number of pieces; chunk data that the kernel did not capture can be skipped.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkState {
    Size { value: u64, digits: u8 },
    Ext { value: u64 },
    SizeLf { value: u64 },
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    FinalLf,
    Done,
}

#[derive(Debug, PartialEq, Eq)]
pub struct ChunkError;

impl Default for ChunkState {
    fn default() -> Self {
        ChunkState::Size {
            value: 0,
            digits: 0,
        }
    }
}

impl ChunkState {
    /// Consumes bytes until the body ends or `data` runs out; returns the bytes used.
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < data.len() && *self != ChunkState::Done {
            if let ChunkState::Data(left) = *self {
                let take = left.min((data.len() - i) as u64);
                i += take as usize;
                *self = if take == left {
                    ChunkState::DataCr
                } else {
                    ChunkState::Data(left - take)
                };
                continue;
            }
            let b = data[i];
            i += 1;
            *self = self.step(b)?;
        }
        Ok(i)
    }

    fn step(self, b: u8) -> Result<ChunkState, ChunkError> {
        use ChunkState::*;
        let after_size = |value: u64| {
            if value == 0 {
                TrailerStart
            } else {
                Data(value)
            }
        };
        Ok(match self {
            Size { value, digits } => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                    if digits >= 15 {
                        return Err(ChunkError);
                    }
                    Size {
                        value: value * 16 + d,
                        digits: digits + 1,
                    }
                }
                _ if digits == 0 => return Err(ChunkError),
                b';' | b' ' | b'\t' => Ext { value },
                b'\r' => SizeLf { value },
                b'\n' => after_size(value),
                _ => return Err(ChunkError),
            },
            Ext { value } => match b {
                b'\r' => SizeLf { value },
                b'\n' => after_size(value),
                _ => Ext { value },
            },
            SizeLf { value } if b == b'\n' => after_size(value),
            DataCr if b == b'\r' => DataLf,
            DataCr | DataLf if b == b'\n' => Size {
                value: 0,
                digits: 0,
            },
            TrailerStart => match b {
                b'\r' => FinalLf,
                b'\n' => Done,
                _ => TrailerLine,
            },
            TrailerLine if b == b'\n' => TrailerStart,
            TrailerLine => TrailerLine,
            FinalLf if b == b'\n' => Done,
            _ => return Err(ChunkError),
        })
    }

    /// Skips `n` bytes the kernel did not capture; only possible inside chunk data.
    pub fn skip(&mut self, n: u64) -> Result<(), ChunkError> {
        if n == 0 {
            return Ok(());
        }
        match *self {
            ChunkState::Data(left) if n <= left => {
                *self = if n == left {
                    ChunkState::DataCr
                } else {
                    ChunkState::Data(left - n)
                };
                Ok(())
            }
            _ => Err(ChunkError),
        }
    }
}
