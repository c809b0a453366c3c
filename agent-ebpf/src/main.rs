//! Kernel programs of the agent. Entry points are thin; each hook family lives in its own file.
#![no_std]
#![no_main]
// `atomic_xadd`: the only way to an atomic add on the BPF target (see `propagate/inflight.rs`).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod capture;
mod conn;
mod data;
mod floor;
mod gotls;
mod h2walk;
mod maps;
mod propagate;
mod regs;
mod sock;
mod tls;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
