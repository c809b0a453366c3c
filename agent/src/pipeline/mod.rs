//! The running pipeline: ring reader -> connection tracker -> span queue.
pub mod budget;
pub mod discovery;
pub mod event;
pub mod reader;
pub mod tracker;
