//! Userspace-only trait impls.
use crate::{
    ConnInfo, ConnTuple, EndpointKey, FlowSeq, IoArgs, TaskKey, TaskRef, TlsCall, TlsSock, WireCtx,
};

// SAFETY: plain-old-data `#[repr(C)]` types with explicit padding and no pointers.
unsafe impl aya::Pod for ConnTuple {}
unsafe impl aya::Pod for ConnInfo {}
unsafe impl aya::Pod for TlsCall {}
unsafe impl aya::Pod for TlsSock {}
unsafe impl aya::Pod for EndpointKey {}
unsafe impl aya::Pod for IoArgs {}
unsafe impl aya::Pod for WireCtx {}
unsafe impl aya::Pod for FlowSeq {}
unsafe impl aya::Pod for TaskKey {}
unsafe impl aya::Pod for TaskRef {}
unsafe impl aya::Pod for crate::PyThread {}
unsafe impl aya::Pod for crate::ChanNote {}
