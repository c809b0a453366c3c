//! Empty library target so `agent-ebpf` can be a build-dependency of `agent` (aya-build).
#![no_std]
