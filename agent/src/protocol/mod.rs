//! Pure, synchronous protocol parsers: bytes in, messages out. No tokio, no aya.
pub mod http1;
pub mod http2;
mod stream;

pub use stream::{Dir, Segment};
