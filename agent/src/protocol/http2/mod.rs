//! HTTP/2 (RFC 9113): framing, HPACK that survives a mid-connection start, and (to come) one
//! record per stream. Pure and synchronous.
pub mod frame;
pub mod hpack;
mod static_table;
