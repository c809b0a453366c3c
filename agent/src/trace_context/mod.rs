//! Trace context: the W3C format, and how each span finds its trace and parent.
pub mod h2_owner;
pub mod h2_stitch;
pub mod h2_wait;
pub mod link;
pub mod w3c;

pub use w3c::TraceParent;
