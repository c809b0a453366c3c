//! Payload capture: copy a bounded prefix of what a data syscall moved into the per-CPU scratch,
//! behind a `DataHeader`, then into the ring buffer in one `bpf_ringbuf_output`.
use agent_common::{
    head_scan::{self, Opening},
    ConnInfo, DataHeader, CNT_CONNS_NOT_HTTP, CNT_READ_FAULT, CNT_RINGBUF_FULL, CNT_TRUNCATED,
    DATA_HEADER_SIZE, DIR_INGRESS, EVENT_DATA, MAX_IOVECS, MAX_PAYLOAD, PROTO_H2, ROLE_SERVER,
    VERDICT_IGNORE, WIRE_NONE,
};
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_probe_read_user,
    generated::{bpf_ktime_get_boot_ns, bpf_probe_read_user as raw_read_user, bpf_ringbuf_output},
};

use crate::{
    maps::{conn_key, count, global, scratch, IoArgs, BUF_IOVEC, CONNS, EVENTS, PAYLOAD_LIMIT},
    propagate::{self, head, inflight},
};

const MASK: usize = MAX_PAYLOAD - 1;

/// `DIR` is the direction of the calling program (`DIR_INGRESS` or `DIR_EGRESS`), a constant so
/// that each program carries only its own side's trace-context work. True when the connection
/// speaks HTTP/2: the caller hands the syscall to the frame walker instead (`h2walk`).
#[inline(always)]
pub fn emit_data<const DIR: u32>(args: &IoArgs, pid_tgid: u64, moved: u64) -> bool {
    let tgid = (pid_tgid >> 32) as u32;
    let Some(conn) = CONNS.get_ptr_mut(&conn_key(tgid, args.fd)) else {
        return false;
    };
    // SAFETY: live map value, used in place (RCU keeps it valid for this program's run even if
    // the LRU evicts it); a copy would not fit the BPF stack.
    let conn = unsafe { &mut *conn };
    if conn.proto == PROTO_H2 {
        // Opened with the HTTP/2 preface (`sock::h2_opening`): the frame walker copies it.
        return true;
    }
    let Some(scratch) = scratch(propagate::CAPTURE_SLOT) else {
        return false;
    };
    let buf = scratch.buf();

    let mut limit = global(&PAYLOAD_LIMIT) as u64;
    if limit > MAX_PAYLOAD as u64 {
        limit = MAX_PAYLOAD as u64;
    }
    let want = if moved < limit { moved } else { limit };
    if moved > want {
        count(CNT_TRUNCATED);
    }
    let payload = unsafe { buf.as_mut_ptr().add(DATA_HEADER_SIZE) };
    let captured = if args.buf_kind == BUF_IOVEC {
        copy_iovecs(payload, args.buf, args.count, want as usize)
    } else {
        copy_plain(payload, args.buf, want as usize)
    };
    let captured = forget_paths(buf.as_mut_ptr(), captured);

    if conn.opening != 0 && !opens_http::<DIR>(conn, payload, captured) {
        return false;
    }

    // SAFETY: helper without preconditions.
    let ts_exit = unsafe { bpf_ktime_get_boot_ns() };
    // Written in place: a 168-byte header built on the stack would not fit beside the rest.
    // SAFETY: the scratch buffer is larger than the header and 8-byte aligned.
    let header = unsafe { &mut *(buf.as_mut_ptr() as *mut DataHeader) };
    header.kind = EVENT_DATA;
    header.direction = args.direction;
    header.pid = tgid;
    header.tid = pid_tgid as u32;
    header.fd = args.fd;
    header.captured = captured as u32;
    header.sk = args.sk;
    header.len = moved;
    header.ts_enter = args.ts_enter;
    header.ts_exit = ts_exit;
    header.role = conn.role;
    header.layout = agent_common::LAYOUT_PREFIX;
    header.tuple = conn.tuple;
    header.comm = bpf_get_current_comm().unwrap_or_default();
    header.wire = args.wire;
    header.lost = crate::maps::losses(&header.pid);
    let wire = &mut header.wire;
    if DIR == DIR_INGRESS {
        if !propagate::incoming(
            payload,
            captured,
            pid_tgid,
            args,
            &conn.tuple,
            ts_exit,
            wire,
        ) && head::starts_with_status(payload, captured)
        {
            propagate::response_read(tgid, args.fd);
        }
    } else if wire.kind == WIRE_NONE {
        if head::starts_with_status(payload, captured) {
            inflight::close(args.sk);
        } else if head::starts_with_method(payload, captured) {
            propagate::linked(pid_tgid, args.fd, wire);
        }
    }
    let total = (DATA_HEADER_SIZE + (captured & MASK)) as u64;
    let total = if captured == MAX_PAYLOAD {
        (DATA_HEADER_SIZE + MAX_PAYLOAD) as u64
    } else {
        total
    };
    // SAFETY: `total` is bounded by the scratch size; the map pointer is the ring buffer.
    let ret = unsafe {
        bpf_ringbuf_output(
            core::ptr::addr_of!(EVENTS) as *mut _,
            buf.as_mut_ptr() as *mut _,
            total,
            crate::maps::ring_flags(),
        )
    };
    if ret < 0 {
        count(CNT_RINGBUF_FULL);
    }
    false
}

/// `captured` as the verifier sees a value read from memory: any count up to `MAX_PAYLOAD`,
/// the same on every path. Each way through the copy loops ends with a count of its own, and
/// the verifier would check all that follows once for each of them (past its million
/// instructions in the ingress exit on some 6.18 builds); written to the map value and read
/// back, they are all one state and the rest is checked once. `buf` is the scratch buffer.
#[inline(always)]
fn forget_paths(buf: *mut u8, captured: usize) -> usize {
    // SAFETY: the scratch buffer begins with the (8-byte aligned) `DataHeader`.
    let at = unsafe { core::ptr::addr_of_mut!((*(buf as *mut DataHeader)).captured) };
    // SAFETY: as above; volatile, so that the compiler keeps the store and the load.
    let n = unsafe {
        core::ptr::write_volatile(at, captured as u32);
        core::ptr::read_volatile(at)
    } as usize;
    if n > MAX_PAYLOAD {
        MAX_PAYLOAD
    } else {
        n
    }
}

/// The first bytes of a connection seen from its start: when the client's opening is not an HTTP
/// request (or the server speaks first), the connection is ignored from here on, so the kernel
/// copies none of its bytes again (TLS, databases, any binary protocol). False when ignored.
#[inline(always)]
fn opens_http<const DIR: u32>(conn: &mut ConnInfo, payload: *const u8, captured: usize) -> bool {
    let from_client = (conn.role == ROLE_SERVER) == (DIR == DIR_INGRESS);
    let opening = if from_client {
        head_scan::opening(&head::Masked(payload), captured)
    } else if head_scan::server_settings_first(&head::Masked(payload), captured) {
        Opening::Undecided
    } else {
        Opening::Other
    };
    match opening {
        Opening::Undecided => true,
        Opening::Request => {
            conn.opening = 0;
            true
        }
        Opening::Other => {
            conn.opening = 0;
            conn.verdict = VERDICT_IGNORE;
            count(CNT_CONNS_NOT_HTTP);
            false
        }
    }
}

#[inline(always)]
pub fn copy_plain(dst: *mut u8, src: u64, want: usize) -> usize {
    let n = if want > MAX_PAYLOAD {
        MAX_PAYLOAD
    } else {
        want
    };
    if n == 0 {
        return 0;
    }
    // SAFETY: dst has room for MAX_PAYLOAD bytes; the helper faults safely on bad user memory.
    let r = unsafe { raw_read_user(dst as *mut _, n as u32, src as *const _) };
    if r < 0 {
        count(CNT_READ_FAULT);
        return 0;
    }
    n
}

#[inline(always)]
pub fn copy_iovecs(dst: *mut u8, iov: u64, iovcnt: u64, want: usize) -> usize {
    let mut off: usize = 0;
    let mut i: u32 = 0;
    while i < MAX_IOVECS {
        if (i as u64) >= iovcnt || off >= want || off >= MAX_PAYLOAD {
            break;
        }
        // SAFETY: struct iovec { void *iov_base; size_t iov_len; } read from user memory.
        let Ok(entry) = (unsafe { bpf_probe_read_user((iov + i as u64 * 16) as *const [u64; 2]) })
        else {
            count(CNT_READ_FAULT);
            break;
        };
        let mut len = entry[1] as usize;
        let room = want - off;
        if len > room {
            len = room;
        }
        if len > MAX_PAYLOAD {
            len = MAX_PAYLOAD;
        }
        let at = off & MASK;
        if len > 0 {
            // SAFETY: at < MAX_PAYLOAD and len <= MAX_PAYLOAD: within the 2*MAX_PAYLOAD area.
            let r =
                unsafe { raw_read_user(dst.add(at) as *mut _, len as u32, entry[0] as *const _) };
            if r < 0 {
                count(CNT_READ_FAULT);
                break;
            }
        }
        off += len;
        i += 1;
    }
    if off > MAX_PAYLOAD {
        MAX_PAYLOAD
    } else {
        off
    }
}
