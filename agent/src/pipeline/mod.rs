//! The running pipeline: ring reader -> connection tracker -> span queue.
pub mod event;
