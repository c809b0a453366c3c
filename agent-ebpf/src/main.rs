//! Kernel programs of the agent. Entry points are thin; each hook family lives in its own file.
#![no_std]
#![no_main]

mod capture;
mod conn;
mod data;
mod maps;
mod propagate;
mod sock;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
