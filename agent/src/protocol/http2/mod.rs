//! HTTP/2 (RFC 9113): framing, HPACK that survives a mid-connection start, and one exchange per
//! stream. Pure and synchronous.
mod conn;
pub mod frame;
pub mod hpack;
mod static_table;

pub use conn::{Grpc, H2Info, H2Stats, Http2Conn, Opened, StreamEnd, MAX_STREAMS};
