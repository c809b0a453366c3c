//! The userspace agent: a pipeline from kernel events to OTLP spans.
//!
//! loader -> pipeline::reader -> pipeline::tracker (protocol parsers) -> span -> export
pub mod app;
pub mod cli;
pub mod clock;
pub mod control;
pub mod export;
pub mod fast;
pub mod loader;
pub mod metrics_server;
pub mod pipeline;
pub mod process;
pub mod protocol;
pub mod runtimes;
pub mod sampling;
pub mod span;
pub mod telemetry;
pub mod trace_context;
