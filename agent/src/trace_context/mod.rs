//! Trace context formats, one file per format.
pub mod w3c;

pub use w3c::TraceParent;
