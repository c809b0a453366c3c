//! HTTP/2 in the kernel: walks the frames a data syscall moved and copies only what spans need,
//! so no body byte crosses into userspace however large the bodies are, and no frame header is
//! missed however many frames one syscall carries.
//!
//! Kept: every frame header, the whole payload of HEADERS, CONTINUATION, SETTINGS, RST_STREAM,
//! GOAWAY and PUSH_PROMISE, and the first 5 bytes of a DATA payload (a gRPC message prefix).
//! Passed over: the rest of DATA, and PING, PRIORITY and WINDOW_UPDATE payloads. The event is a
//! sequence of records `[u32 data][u32 gap][data]` that covers the syscall in order, so that
//! userspace sees the stream with holes where it was passed over (`LAYOUT_H2_CHUNKS`). A frame
//! cut by the end of a syscall continues in the next one: the direction's `H2Walk` in the
//! connection's `ConnInfo` says how much of it is still to keep and to pass over, or holds the
//! first bytes of a frame header cut in two.
//!
//! Tail-called from `sys_exit_read`/`sys_exit_write` (a fresh verifier budget), and for HTTP/2
//! over TLS from the OpenSSL return probes (`tls.rs`), which walk the plaintext the call moved
//! the same way; one step of `bpf_loop` is one frame header, one kept run or one passed-over run.
use agent_common::{
    DataHeader, H2Walk, CNT_H2_CHUNKS_FULL, CNT_H2_WALK_INCOMPLETE, CNT_READ_FAULT,
    CNT_RINGBUF_FULL, DATA_HEADER_SIZE, DIR_EGRESS, DIR_INGRESS, EVENT_DATA, EVENT_TLS_DATA,
    H2_CHUNK_HEADER, H2_WALK_STEPS, LAYOUT_H2_CHUNKS, MAX_PAYLOAD,
};
use aya_ebpf::{
    cty::c_void,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_user,
        generated::{
            bpf_ktime_get_boot_ns, bpf_loop, bpf_probe_read_user as raw_read_user,
            bpf_ringbuf_output,
        },
    },
    macros::{map, tracepoint, uprobe},
    maps::PerCpuArray,
    programs::{ProbeContext, TracePointContext},
};

use crate::{
    maps::{conn_key, count, scratch, IoArgs, ACTIVE_IO, BUF_IOVEC, CONNS, EVENTS, SCRATCH},
    propagate,
};

const MASK: usize = MAX_PAYLOAD - 1;
const REC: u32 = H2_CHUNK_HEADER as u32;
const FRAME_HEADER: u32 = 9;
const RET: usize = 16;
/// Iovecs the walker may advance over to find one offset (HTTP/2 writers hand `writev` each
/// frame as its own vectors, hundreds at a time; the walk reads them as it goes).
const IOVEC_STEPS: u32 = 16;

/// The walk's state: one for the syscall walkers, one for the TLS walkers (a return probe and
/// a syscall exit never share one, even on one CPU).
#[map]
static H2_WALKS: PerCpuArray<Walk> = PerCpuArray::with_max_entries(2, 0);

/// The OpenSSL call a TLS walker walks, written by the return probe just before its tail call:
/// `buf` is the plaintext, `count` the bytes moved, `fd` and `sk` the bound socket.
#[repr(C)]
pub struct TlsWalk {
    pub io: IoArgs,
    /// The event's `ts_exit` (for a write, when its last syscall sent its bytes).
    pub ts_exit: u64,
    /// The call marked its connection busy (`tls::settle` after the walk).
    pub settle: bool,
}

#[map]
pub static TLS_WALK_IO: PerCpuArray<TlsWalk> = PerCpuArray::with_max_entries(1, 0);

/// Which walk (`H2_WALKS` entry, scratch slot, event kind).
const SYSCALL: u32 = 0;
const TLS: u32 = 1;

#[tracepoint]
pub fn h2_walk_ingress(ctx: TracePointContext) -> u32 {
    walk::<DIR_INGRESS>(&ctx);
    0
}

#[tracepoint]
pub fn h2_walk_egress(ctx: TracePointContext) -> u32 {
    walk::<DIR_EGRESS>(&ctx);
    0
}

#[uprobe]
pub fn h2_walk_tls_ingress(_ctx: ProbeContext) -> u32 {
    walk_tls::<DIR_INGRESS>();
    0
}

#[uprobe]
pub fn h2_walk_tls_egress(_ctx: ProbeContext) -> u32 {
    walk_tls::<DIR_EGRESS>();
    0
}

#[inline(always)]
fn walk_tls<const DIR: u32>() {
    let Some(args) = TLS_WALK_IO.get_ptr(0) else {
        return;
    };
    // SAFETY: this CPU's live map value, written by the program that tail-called this one.
    let (args, ts_exit) = unsafe { ((*args).io, (*args).ts_exit) };
    walk_io::<DIR, TLS>(&args, bpf_get_current_pid_tgid(), args.count, ts_exit);
    settle_tls();
}

/// The walked TLS call's connection is no longer busy with it (`tls::settle`); also when the
/// tail call into the walker failed.
#[inline(always)]
pub fn settle_tls() {
    let Some(args) = TLS_WALK_IO.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's live map value.
    let args = unsafe { &mut *args };
    if args.settle {
        args.settle = false;
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        crate::tls::settle(tgid, args.io.fd, args.io.sk, args.io.direction);
    }
}

/// The walk's state. It lives in a per-CPU map, not on the stack: the verifier checks a
/// `bpf_loop` step until the caller's state stops changing, and values it loads from a map are
/// unknown to it, so the step is checked once (every offset is masked where it is used).
#[repr(C)]
pub struct Walk {
    /// Scratch slot of the event being built.
    slot: u32,
    iov: u32,
    buf: u64,
    count: u64,
    moved: u64,
    /// Bytes of the syscall walked so far.
    off: u64,
    /// Bytes of records written after the event header.
    out: u32,
    /// Offset of the open record's header, and its data and gap so far.
    rec: u32,
    data: u32,
    gap: u32,
    /// Kept bytes that did not fit (passed over instead).
    full: u32,
    /// Where the event being built starts in the syscall (an earlier part went out in an event
    /// of its own when the scratch filled), and the events' `ts_exit`.
    ev_off: u64,
    ts_exit: u64,
    st: H2Walk,
    /// Iovec cursor (`iov` set): the vector the walk is in, where it starts in the syscall,
    /// and its address and length.
    iv_idx: u64,
    iv_start: u64,
    iv_base: u64,
    iv_len: u64,
}

#[inline(always)]
fn walk<const DIR: u32>(ctx: &TracePointContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if let Some(args) = ACTIVE_IO.get_ptr(&pid_tgid) {
        // SAFETY: this thread's live map value, copied before it is removed.
        let args = unsafe { *args };
        // SAFETY: offset from the syscall exit tracepoint format.
        let ret = unsafe { ctx.read_at::<i64>(RET) }.unwrap_or(0);
        if ret > 0 {
            walk_io::<DIR, SYSCALL>(&args, pid_tgid, ret as u64, 0);
        }
    }
    let _ = ACTIVE_IO.remove(&pid_tgid);
}

/// Walks the `moved` bytes of one syscall (`SYSCALL`) or OpenSSL call (`TLS`, a plain buffer,
/// whose event's `ts_exit` is given) and sends what it kept.
#[inline(always)]
fn walk_io<const DIR: u32, const WHICH: u32>(
    args: &IoArgs,
    pid_tgid: u64,
    moved: u64,
    tls_exit: u64,
) {
    let slot = if WHICH == TLS {
        propagate::TLS_SLOT
    } else {
        propagate::CAPTURE_SLOT
    };
    let tgid = (pid_tgid >> 32) as u32;
    let Some(conn) = CONNS.get_ptr_mut(&conn_key(tgid, args.fd)) else {
        return;
    };
    // SAFETY: live map value, used in place.
    let conn = unsafe { &mut *conn };
    let Some(scratch) = scratch(slot) else {
        return;
    };
    let buf = scratch.buf();
    let d = (DIR & 1) as usize;
    let Some(wp) = H2_WALKS.get_ptr_mut(WHICH) else {
        return;
    };
    // SAFETY: this CPU's live map value; the program runs to completion on this CPU.
    let w = unsafe { &mut *wp };
    // Field by field: a whole `Walk` would not fit the BPF stack.
    w.slot = slot;
    w.iov = (WHICH == SYSCALL && args.buf_kind == BUF_IOVEC) as u32;
    w.buf = args.buf;
    w.count = if w.iov != 0 { args.count } else { 0 };
    w.moved = moved;
    w.off = 0;
    w.out = REC;
    w.rec = 0;
    w.data = 0;
    w.gap = 0;
    w.full = 0;
    w.ev_off = 0;
    w.ts_exit = if WHICH == TLS {
        tls_exit
    } else {
        // SAFETY: helper without preconditions.
        unsafe { bpf_ktime_get_boot_ns() }
    };
    w.st = conn.h2[d];
    w.iv_idx = 0;
    w.iv_start = 0;
    w.iv_base = 0;
    w.iv_len = 0;
    if w.iov != 0 {
        // SAFETY: the first struct iovec, read from user memory.
        if let Ok(v) = unsafe { bpf_probe_read_user(w.buf as *const [u64; 2]) } {
            w.iv_base = v[0];
            w.iv_len = v[1];
        }
    }
    // The event header first: every event this walk sends shares it (only `captured` and
    // `len` differ, set as each goes out).
    // SAFETY: the scratch buffer is larger than the header and 8-byte aligned.
    let header = unsafe { &mut *(buf.as_mut_ptr() as *mut DataHeader) };
    header.kind = if WHICH == TLS {
        EVENT_TLS_DATA
    } else {
        EVENT_DATA
    };
    header.direction = args.direction;
    header.pid = tgid;
    header.tid = pid_tgid as u32;
    header.fd = args.fd;
    header.sk = args.sk;
    header.ts_enter = args.ts_enter;
    header.ts_exit = w.ts_exit;
    header.role = conn.role;
    header.layout = LAYOUT_H2_CHUNKS;
    header.tuple = conn.tuple;
    header.comm = bpf_get_current_comm().unwrap_or_default();
    header.wire = agent_common::WireCtx::default();
    // A frame header cut by the previous syscall: its remaining bytes come first.
    if w.st.have > 0 {
        finish_header(w, buf.as_mut_ptr());
    }
    // SAFETY: the step finds its state in the per-CPU map.
    unsafe {
        bpf_loop(
            H2_WALK_STEPS,
            step::<WHICH> as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    if w.off < w.moved {
        // More frames than steps: the rest is passed over, and where the next frame starts
        // is unknown (assumed to be the next syscall's start; userspace checks and realigns).
        w.gap += (w.moved - w.off) as u32;
        w.off = w.moved;
        w.st = H2Walk::default();
        count(CNT_H2_WALK_INCOMPLETE);
    }
    if w.full != 0 {
        count(CNT_H2_CHUNKS_FULL);
    }
    conn.h2[d] = w.st;
    send(w, buf.as_mut_ptr());
}

/// Sends the event built so far: the records of the syscall's bytes from `ev_off` to the
/// walk's offset. The next event (if the walk goes on) starts there, with an empty record.
#[inline(always)]
fn send(w: &mut Walk, buf: *mut u8) {
    close_record(w, buf);
    // SAFETY: the slot starts with the event header, written before the walk.
    let header = unsafe { &mut *(buf as *mut DataHeader) };
    header.captured = w.out;
    header.len = w.off - w.ev_off;
    header.lost = crate::maps::losses(&header.pid);
    let mut total = w.out as u64;
    if total > MAX_PAYLOAD as u64 {
        total = MAX_PAYLOAD as u64;
    }
    // SAFETY: `total` is bounded by the scratch size; the map pointer is the ring buffer.
    let ret = unsafe {
        bpf_ringbuf_output(
            core::ptr::addr_of!(EVENTS) as *mut _,
            buf as *mut _,
            DATA_HEADER_SIZE as u64 + total,
            crate::maps::ring_flags(),
        )
    };
    if ret < 0 {
        count(CNT_RINGBUF_FULL);
    }
    w.ev_off = w.off;
    w.out = REC;
    w.rec = 0;
    w.data = 0;
    w.gap = 0;
}

/// The payload area (records) of the walk's scratch slot.
#[inline(always)]
fn area(w: &Walk) -> Option<*mut u8> {
    let s = SCRATCH.get_ptr_mut(w.slot)?;
    // SAFETY: the payload area lies within the scratch value.
    Some(unsafe { (*s).buf.as_mut_ptr().add(DATA_HEADER_SIZE) })
}

/// Writes the open record's header.
#[inline(always)]
fn close_record(w: &Walk, buf: *mut u8) {
    // SAFETY: the offset is masked into the payload area, which has room for 8 more bytes.
    unsafe {
        let rec = core::ptr::read_volatile(&w.rec) as usize & MASK;
        let at = buf.add(DATA_HEADER_SIZE + rec);
        core::ptr::write_unaligned(at as *mut u32, w.data);
        core::ptr::write_unaligned(at.add(4) as *mut u32, w.gap);
    }
}

/// Up to `n` bytes at the walk's offset go to the event: the run contiguous in user memory
/// there (one iovec's worth), as far as it fits; the bytes walked (0 only when `n` is).
#[inline(always)]
fn keep(w: &mut Walk, buf: *mut u8, n: u32) -> u32 {
    if n == 0 {
        return 0;
    }
    if w.gap > 0 {
        // Data after a gap: a new record.
        close_record(w, buf);
        w.rec = w.out;
        w.out += REC;
        w.data = 0;
        w.gap = 0;
    }
    let (addr, avail) = locate(w, w.off);
    if avail == 0 {
        // Unreadable from here: passed over.
        w.full = 1;
        w.gap += n;
        w.off += n as u64;
        return n;
    }
    let run = if (n as u64) < avail { n } else { avail as u32 };
    let room = (MAX_PAYLOAD as u32).saturating_sub(w.out);
    let take = bounded::<MAX_PAYLOAD>(if run < room { run } else { room });
    let mut got = 0;
    if take > 0 {
        // SAFETY: reading a field of `w` (volatile, so that the mask below is kept).
        let at = unsafe { core::ptr::read_volatile(&w.out) } as usize & MASK;
        // SAFETY: a masked offset and `take` <= MAX_PAYLOAD lie within the payload area.
        let dst = unsafe { buf.add(DATA_HEADER_SIZE + at) };
        // SAFETY: the helper faults safely on bad user memory.
        if unsafe { raw_read_user(dst as *mut _, take, addr as *const _) } < 0 {
            count(CNT_READ_FAULT);
        } else {
            got = take;
        }
    }
    w.out += got;
    w.data += got;
    if got < run {
        w.full = 1;
        w.gap += run - got;
    }
    w.off += run as u64;
    run
}

/// The `n` (<= 9) bytes at the walk's offset, already read into `src`, go to the event.
#[inline(always)]
fn keep_bytes(w: &mut Walk, buf: *mut u8, src: *const u8, n: u32) {
    if w.gap > 0 {
        close_record(w, buf);
        w.rec = w.out;
        w.out += REC;
        w.data = 0;
        w.gap = 0;
    }
    let n = n & 15;
    if w.out + 16 > MAX_PAYLOAD as u32 {
        w.full = 1;
        w.gap += n;
        w.off += n as u64;
        return;
    }
    // SAFETY: reading a field of `w` (volatile, so that the mask below is kept).
    let at = unsafe { core::ptr::read_volatile(&w.out) } as usize & MASK;
    // SAFETY: 16 bytes at a masked offset lie in the payload area; `src` has 16 readable bytes.
    unsafe { core::ptr::copy_nonoverlapping(src, buf.add(DATA_HEADER_SIZE + at), 16) };
    w.out += n;
    w.data += n;
    w.off += n as u64;
}

/// `n` bytes at the walk's offset are passed over.
#[inline(always)]
fn pass(w: &mut Walk, n: u32) {
    w.gap += n;
    w.off += n as u64;
}

/// Moves the iovec cursor towards the walk's offset, over at most `IOVEC_STEPS` vectors (a
/// frame passed over may span hundreds); false while the offset lies further on, so that the
/// next step goes on from there instead of taking the offset for unreadable.
#[inline(always)]
fn seek(w: &mut Walk) -> bool {
    if w.iov == 0 {
        return true;
    }
    let mut i = 0;
    while i < IOVEC_STEPS {
        if w.off < w.iv_start || w.off - w.iv_start < w.iv_len || w.iv_idx + 1 >= w.count {
            // There, or `locate` reports it unreadable.
            return true;
        }
        // SAFETY: struct iovec { void *iov_base; size_t iov_len; } read from user memory.
        match unsafe { bpf_probe_read_user((w.buf + (w.iv_idx + 1) * 16) as *const [u64; 2]) } {
            Ok(v) => {
                w.iv_start += w.iv_len;
                w.iv_idx += 1;
                w.iv_base = v[0];
                w.iv_len = v[1];
            }
            Err(_) => return true,
        }
        i += 1;
    }
    false
}

/// The user address of syscall offset `off` and the bytes contiguous from there. Offsets only
/// grow during a walk, so iovecs are read one by one as the cursor passes them.
#[inline(always)]
fn locate(w: &mut Walk, off: u64) -> (u64, u64) {
    if w.iov == 0 {
        return (w.buf + off, w.moved.saturating_sub(off));
    }
    let mut i = 0;
    while i < IOVEC_STEPS {
        if off < w.iv_start {
            return (0, 0);
        }
        if off - w.iv_start < w.iv_len {
            return (
                w.iv_base + (off - w.iv_start),
                w.iv_len - (off - w.iv_start),
            );
        }
        w.iv_start += w.iv_len;
        w.iv_idx += 1;
        if w.iv_idx >= w.count {
            return (0, 0);
        }
        // SAFETY: struct iovec { void *iov_base; size_t iov_len; } read from user memory.
        match unsafe { bpf_probe_read_user((w.buf + w.iv_idx * 16) as *const [u64; 2]) } {
            Ok(v) => {
                w.iv_base = v[0];
                w.iv_len = v[1];
            }
            Err(_) => return (0, 0),
        }
        i += 1;
    }
    (0, 0)
}

/// `n` as a helper's size argument the verifier can bound: at most `CAP` (0 if more). The
/// volatile read keeps the compiler from folding the check into an earlier one.
#[inline(always)]
fn bounded<const CAP: usize>(n: u32) -> u32 {
    // SAFETY: reading a local.
    let n = unsafe { core::ptr::read_volatile(&n) } & (2 * CAP as u32 - 1);
    if n > CAP as u32 {
        0
    } else {
        n
    }
}

/// Copies `n` bytes (at most `CAP`, a power of two) of the syscall's buffer at offset `off` to
/// `base + at`, where `base` has room for `2 * CAP` bytes, in at most two pieces (a run that
/// crosses one iovec boundary); the bytes copied. Every destination offset is masked below
/// `CAP` where it is used (volatile reads keep the compiler from dropping a mask as redundant).
#[inline(always)]
fn read_user<const CAP: usize>(w: &mut Walk, off: u64, base: *mut u8, at: u32, n: u32) -> u32 {
    let n = if n as usize > CAP { CAP as u32 } else { n };
    let (addr, avail) = locate(w, off);
    let first = if (n as u64) < avail { n } else { avail as u32 };
    let first = if first as usize > CAP {
        CAP as u32
    } else {
        first
    };
    if first == 0 {
        return 0;
    }
    // SAFETY: reading locals.
    let o = unsafe { core::ptr::read_volatile(&at) } as usize & (CAP - 1);
    let size = bounded::<CAP>(first);
    // SAFETY: offset < CAP and `size` <= CAP: within `2 * CAP`; the helper faults safely.
    if unsafe { raw_read_user(base.add(o) as *mut _, size, addr as *const _) } < 0 {
        count(CNT_READ_FAULT);
        return 0;
    }
    if first >= n {
        return first;
    }
    let (addr, avail) = locate(w, off + first as u64);
    let rest = n - first;
    let second = if (rest as u64) < avail {
        rest
    } else {
        avail as u32
    };
    let second = if second as usize > CAP {
        CAP as u32
    } else {
        second
    };
    if second == 0 {
        return first;
    }
    let at2 = at + first;
    // SAFETY: reading a local.
    let o = unsafe { core::ptr::read_volatile(&at2) } as usize & (CAP - 1);
    let size = bounded::<CAP>(second);
    // SAFETY: offset < CAP and `size` <= CAP: within `2 * CAP`.
    if unsafe { raw_read_user(base.add(o) as *mut _, size, addr as *const _) } < 0 {
        count(CNT_READ_FAULT);
        return first;
    }
    first + second
}

/// What to keep and pass over of a frame of `len` payload bytes and type `kind`.
#[inline(always)]
fn plan(st: &mut H2Walk, len: u32, kind: u8) {
    let keep = kept(len, kind);
    st.keep = keep;
    st.skip = len - keep;
}

/// The payload bytes kept of a frame of `len` bytes and type `kind`.
#[inline(always)]
fn kept(len: u32, kind: u8) -> u32 {
    match kind {
        // HEADERS, RST_STREAM, SETTINGS, PUSH_PROMISE, GOAWAY, CONTINUATION: whole.
        0x1 | 0x3 | 0x4 | 0x5 | 0x7 | 0x9 => len,
        // DATA: a gRPC message prefix.
        0x0 => {
            if len < 5 {
                len
            } else {
                5
            }
        }
        _ => 0,
    }
}

/// Length and type from a frame header's first 8 bytes (little-endian word).
#[inline(always)]
fn len_kind(word: u64) -> (u32, u8) {
    let b = word.to_le_bytes();
    ((b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32, b[3])
}

/// Completes a frame header the previous syscall cut (`st.have` bytes held). The bytes are
/// joined as words (shifts, no variable indexes into the stack, which the verifier refuses).
#[inline(always)]
fn finish_header(w: &mut Walk, buf: *mut u8) {
    // 1 to 8 bytes are held (a mask of 7 would read 8 as 0 and take the next syscall's first
    // bytes for a header: the frame alignment would be lost).
    let have = w.st.have as u64 & 15;
    if have > 8 {
        w.st = H2Walk::default();
        return;
    }
    let need = FRAME_HEADER as u64 - have;
    let n = if need < w.moved { need } else { w.moved };
    let mut tmp = [0u8; 32];
    let got = read_user::<16>(w, w.off, tmp.as_mut_ptr(), 0, n as u32) as u64;
    keep_bytes(w, buf, tmp.as_ptr(), n as u32);
    if got < n {
        w.st = H2Walk::default();
        return;
    }
    let held = u64::from_le_bytes([
        w.st.hdr[0],
        w.st.hdr[1],
        w.st.hdr[2],
        w.st.hdr[3],
        w.st.hdr[4],
        w.st.hdr[5],
        w.st.hdr[6],
        w.st.hdr[7],
    ]);
    let more = u64::from_le_bytes([
        tmp[0], tmp[1], tmp[2], tmp[3], tmp[4], tmp[5], tmp[6], tmp[7],
    ]);
    // The first 8 header bytes as a word: `have` of them held, the rest just read (all 8 held:
    // the word is the held one; a shift by 64 would be none).
    let word = if have >= 8 {
        held
    } else {
        let shift = 8 * have;
        (held & ((1u64 << shift) - 1)) | (more << shift)
    };
    if have + n < FRAME_HEADER as u64 {
        // Still cut (a syscall of a few bytes): hold what there is.
        w.st.hdr[..8].copy_from_slice(&word.to_le_bytes());
        w.st.have = (have + n) as u32;
        return;
    }
    w.st.have = 0;
    let (len, kind) = len_kind(word);
    plan(&mut w.st, len, kind);
}

extern "C" fn step<const WHICH: u32>(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(wp) = H2_WALKS.get_ptr_mut(WHICH) else {
        return 1;
    };
    // SAFETY: this CPU's live map value.
    let w = unsafe { &mut *wp };
    if w.off >= w.moved {
        return 1;
    }
    let Some(payload) = area(w) else {
        return 1;
    };
    // `keep` and `close_record` address the slot from its start.
    // SAFETY: the payload area starts DATA_HEADER_SIZE bytes into the slot.
    let buf = unsafe { payload.sub(DATA_HEADER_SIZE) };
    let left = w.moved - w.off;
    let left = if left > u32::MAX as u64 {
        u32::MAX
    } else {
        left as u32
    };
    if (w.st.keep > 0 || w.st.skip == 0) && !seek(w) {
        // Bytes to read lie beyond the vectors this step went over: the next step goes on.
        return 0;
    }
    if w.st.keep > 0 {
        let n = if w.st.keep < left { w.st.keep } else { left };
        let walked = keep(w, buf, n);
        w.st.keep -= if walked < n { walked } else { n };
        return 0;
    }
    if w.st.skip > 0 {
        let n = if w.st.skip < left { w.st.skip } else { left };
        w.st.skip -= n;
        pass(w, n);
        return 0;
    }
    // A frame header starts here.
    let mut tmp = [0u8; 32];
    let n = if left < FRAME_HEADER {
        left
    } else {
        FRAME_HEADER
    };
    let got = read_user::<16>(w, w.off, tmp.as_mut_ptr(), 0, n);
    if got < n {
        pass(w, left);
        return 1;
    }
    let (len, kind) = len_kind(u64::from_le_bytes([
        tmp[0], tmp[1], tmp[2], tmp[3], tmp[4], tmp[5], tmp[6], tmp[7],
    ]));
    // A frame starts here: if its header and what it keeps would not fit in the event's room,
    // the event goes out now and the frame starts the next one, so that no frame header is
    // ever left out (userspace would lose the frame alignment).
    let keeps = if n < FRAME_HEADER { 0 } else { kept(len, kind) };
    let need = (2 * REC + FRAME_HEADER) as u64 + keeps as u64;
    if w.out > REC && w.out as u64 + need > MAX_PAYLOAD as u64 {
        send(w, buf);
    }
    keep_bytes(w, buf, tmp.as_ptr(), n);
    if n < FRAME_HEADER {
        // Cut by the end of the syscall: the rest comes with the next one.
        w.st.hdr[..8].copy_from_slice(&tmp[..8]);
        w.st.have = n;
        return 1;
    }
    plan(&mut w.st, len, kind);
    0
}
