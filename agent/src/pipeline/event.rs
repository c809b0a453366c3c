//! Kernel ring-buffer items decoded into owned values.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use agent_common::{
    CloseEvent, ConnTuple, DataHeader, ExecEvent, DATA_HEADER_SIZE, EVENT_CLOSE, EVENT_DATA,
    EVENT_EXEC, EVENT_TLS_DATA,
};
use bytes::{Bytes, BytesMut};

/// Bytes of each allocation that payloads are copied into (`KernelEvent::decode_in`).
pub const ARENA_CHUNK: usize = 256 << 10;

/// Events handed from the ring reader to the tracker at once (one channel send and one wakeup
/// for up to `BATCH` events).
pub type Batch = Vec<KernelEvent>;
pub const BATCH: usize = 256;

#[derive(Debug)]
pub enum KernelEvent {
    Data {
        header: DataHeader,
        payload: Bytes,
    },
    Close(CloseEvent),
    /// A traced process `exec`'d (for the runtime classifier, not the tracker).
    Exec(u32),
    /// The network namespace of a process that just `exec`'d, read by the ring reader at once
    /// (a short-lived client may be gone before the tracker reaches its connections).
    Netns {
        pid: u32,
        netns: u64,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring item of {0} bytes is too short")]
    Short(usize),
    #[error("unknown ring item kind {0}")]
    Kind(u32),
}

impl KernelEvent {
    /// Payload bytes this event holds (what the event queue's byte budget counts).
    pub fn bytes(&self) -> usize {
        match self {
            KernelEvent::Data { payload, .. } => payload.len(),
            KernelEvent::Close(_) | KernelEvent::Exec(_) | KernelEvent::Netns { .. } => 0,
        }
    }

    /// Decodes one ring item; the payload is copied once, out of the ring.
    pub fn decode(item: &[u8]) -> Result<KernelEvent, DecodeError> {
        KernelEvent::decode_in(item, &mut BytesMut::with_capacity(item.len()))
    }

    /// As `decode`, copying the payload into `arena`: the payloads of consecutive items share
    /// its allocations (one per `ARENA_CHUNK` bytes, not one per event), each event holding a
    /// slice that frees its part of the chunk when the last slice of it drops.
    pub fn decode_in(item: &[u8], arena: &mut BytesMut) -> Result<KernelEvent, DecodeError> {
        if item.len() < 4 {
            return Err(DecodeError::Short(item.len()));
        }
        let kind = u32::from_ne_bytes([item[0], item[1], item[2], item[3]]);
        match kind {
            EVENT_DATA | EVENT_TLS_DATA => {
                if item.len() < DATA_HEADER_SIZE {
                    return Err(DecodeError::Short(item.len()));
                }
                // SAFETY: length checked; `DataHeader` is plain old data.
                let header: DataHeader = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                let end = (DATA_HEADER_SIZE + header.captured as usize).min(item.len());
                let src = &item[DATA_HEADER_SIZE..end];
                if arena.capacity() - arena.len() < src.len() {
                    *arena = BytesMut::with_capacity(ARENA_CHUNK.max(src.len()));
                }
                arena.extend_from_slice(src);
                let payload = arena.split().freeze();
                Ok(KernelEvent::Data { header, payload })
            }
            EVENT_CLOSE => {
                if item.len() < std::mem::size_of::<CloseEvent>() {
                    return Err(DecodeError::Short(item.len()));
                }
                // SAFETY: length checked; `CloseEvent` is plain old data.
                Ok(KernelEvent::Close(unsafe {
                    std::ptr::read_unaligned(item.as_ptr().cast())
                }))
            }
            EVENT_EXEC => {
                if item.len() < std::mem::size_of::<ExecEvent>() {
                    return Err(DecodeError::Short(item.len()));
                }
                // SAFETY: length checked; `ExecEvent` is plain old data.
                let e: ExecEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                Ok(KernelEvent::Exec(e.pid))
            }
            other => Err(DecodeError::Kind(other)),
        }
    }
}

/// Addresses of a connection as the span builder needs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub local: IpAddr,
    pub local_port: u16,
    pub peer: IpAddr,
    pub peer_port: u16,
    /// The bytes came decrypted from a TLS library (`url.scheme` `https`).
    pub tls: bool,
}

pub fn endpoints(t: &ConnTuple) -> Endpoints {
    let ip = |a: [u8; 16]| -> IpAddr {
        if t.family == 2 {
            IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
        } else {
            let v6 = Ipv6Addr::from(a);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
    };
    Endpoints {
        local: ip(t.local_addr),
        local_port: t.local_port,
        peer: ip(t.peer_addr),
        peer_port: t.peer_port,
        tls: false,
    }
}
