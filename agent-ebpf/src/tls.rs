//! OpenSSL: the plaintext of a TLS connection, from the library's own calls.
//!
//! - `SSL_read`/`SSL_write` (and the `_ex` forms) are probed at entry and return. The entry
//!   notes the call on its thread (`TLS_CALLS`): the `SSL *`, the plaintext buffer and where the
//!   byte count goes.
//! - A syscall the call makes on a TCP socket (the library's socket BIO reading or writing
//!   records) binds the `SSL *` to that socket (`bind`, from `sock::on_syscall`). The
//!   connection becomes `VERDICT_TLS`: its ciphertext is never copied or parsed from then on.
//!   `SSL_set_fd` binds too; `SSL_free` unbinds.
//! - At return, the bytes the call moved are sent to userspace as `EVENT_TLS_DATA`, with the
//!   connection's socket, addresses and role, exactly as a plaintext syscall's would be. A read
//!   served from the library's buffer (no syscall) uses the `SSL *`'s last binding.
//! - A connection whose plaintext opens with the HTTP/2 preface is walked frame by frame, as a
//!   plaintext HTTP/2 connection's syscalls are: the return probe tail-calls the walker
//!   (`h2walk`) on the call's buffer, so no body byte is copied however large the frames.
//! - A call with no binding at all (a memory BIO: Node's TLSWrap, gRPC core, Python's
//!   `MemoryBIO`) sends nothing and is counted (`CNT_TLS_UNBOUND`). A call whose own syscall
//!   bound it (`TLS_BOUND`) keeps that socket if the binding is removed before it returns (a
//!   close on another thread), and is counted (`CNT_TLS_AFTER_CLOSE`) if the socket is gone.
//!
//! Probes are attached per selected process; each program checks the selection again (a pid
//! reused by an unselected process before userspace detaches).
use agent_common::{
    head_scan, ConnInfo, DataHeader, H2Walk, IoArgs, TaskKey, TlsCall, TlsSock, BUF_PLAIN,
    CNT_H2_WALK_INCOMPLETE, CNT_RINGBUF_FULL, CNT_STATE_MAP_FULL, CNT_TLS_AFTER_CLOSE,
    CNT_TLS_CLAIM_DROPPED, CNT_TLS_UNBOUND, CNT_TRUNCATED, DATA_HEADER_SIZE, DIR_EGRESS,
    DIR_HANDSHAKE, DIR_INGRESS, EVENT_TLS_DATA, H2_PREFACE_LEN, LAYOUT_LOST, LAYOUT_PREFIX,
    MAX_PAYLOAD, PROTO_H2, PROTO_HTTP1, ROLE_SERVER, ROLE_UNKNOWN, RUNTIME_TOKIO, TLS_BOUND,
    TLS_BUSY, TLS_NO_FD, VERDICT_IGNORE, VERDICT_TLS, VERDICT_TRACE, WIRE_NONE,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user,
        generated::{bpf_ktime_get_boot_ns, bpf_ringbuf_output},
    },
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};

use crate::{
    capture::copy_plain,
    maps::{
        conn_key, count, global, process_traced, scratch, CONNS, EVENTS, GO_TLS_CALLS, GO_TLS_LOST,
        PAYLOAD_LIMIT, TLS_CALLS, TLS_H2_WALK, TLS_SOCKS,
    },
    propagate::{self, head, inflight, stitch, task::runtime_of, TLS_SLOT},
};

const MASK: usize = MAX_PAYLOAD - 1;
/// TLS records walked in one read for a stitching context.
const MAX_RECORDS: u32 = 8;

#[inline(always)]
pub(crate) fn ssl_key(tgid: u32, ssl: u64) -> TaskKey {
    TaskKey {
        ptr: ssl,
        tgid,
        _pad: 0,
    }
}

/// `SSL_read(ssl, buf, num)` / `SSL_write(ssl, buf, num)`, and the `_ex` forms with a fourth
/// argument, `size_t *readbytes` / `*written`.
#[inline(always)]
fn enter(ctx: &ProbeContext, dir: u32, ex: bool) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !process_traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    // SAFETY: a uprobe's context is the probed task's user registers (System V ABI arguments).
    if dir == DIR_HANDSHAKE && TLS_CALLS.get_ptr(&pid_tgid).is_some() {
        // Inside a read or write that runs the handshake itself: that call binds.
        return 0;
    }
    let (ssl, buf, len, out) = unsafe {
        let r = &*ctx.regs;
        (r.rdi, r.rsi, r.rdx, if ex { r.rcx } else { 0 })
    };
    let call = TlsCall {
        ssl,
        buf,
        out,
        // `int num` in the plain calls: the upper half of the register is undefined.
        len: if ex {
            len
        } else {
            len as u32 as i32 as i64 as u64
        },
        state: 0,
        _pad: 0,
        wire: agent_common::WireCtx::default(),
        // SAFETY: helper without preconditions.
        ts_enter: unsafe { bpf_ktime_get_boot_ns() },
        fd: TLS_NO_FD,
        dir,
        ts_io: 0,
        g: 0,
        lost: 0,
        lost_ts: 0,
        sk: 0,
    };
    if TLS_CALLS.insert(&pid_tgid, &call, 0).is_err() {
        count(CNT_STATE_MAP_FULL);
    }
    0
}

#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_INGRESS, false)
}

#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_EGRESS, false)
}

#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_INGRESS, true)
}

#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_EGRESS, true)
}

/// `SSL_do_handshake(ssl)` (also what `SSL_accept`/`SSL_connect` run): its syscalls bind the
/// `SSL *` to its socket before any plaintext moves, so that the connection's first bytes (a
/// ClientHello) are never looked at as plaintext, and a request record read along with the
/// handshake's last record (nginx reads ahead) is found (`bind`).
#[uprobe]
pub fn ssl_do_handshake(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_HANDSHAKE, false)
}

#[uretprobe]
pub fn ssl_handshake_ret(_ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: copied out of this thread's live map value.
    if TLS_CALLS.get_ptr(&pid_tgid).map(|c| unsafe { (*c).dir }) == Some(DIR_HANDSHAKE) {
        let _ = TLS_CALLS.remove(&pid_tgid);
    }
    0
}

/// `SSL_set_fd(ssl, fd)`: the socket this `SSL *` will use.
#[uprobe]
pub fn ssl_set_fd(ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !process_traced(tgid) {
        return 0;
    }
    // SAFETY: as in `enter`.
    let (ssl, fd) = unsafe { ((*ctx.regs).rdi, (*ctx.regs).rsi as u32) };
    set_fd(tgid, ssl, fd);
    0
}

/// Records that `ssl` uses socket `fd`, keeping any context its reads brought in.
#[inline(always)]
fn set_fd(tgid: u32, ssl: u64, fd: u32) -> Option<&'static mut TlsSock> {
    let key = ssl_key(tgid, ssl);
    if let Some(t) = TLS_SOCKS.get_ptr_mut(&key) {
        // SAFETY: live map value.
        let t = unsafe { &mut *t };
        if t.fd != fd {
            t.fd = fd;
            t.claimed = 0;
        }
        return Some(t);
    }
    let t = TlsSock {
        fd,
        claimed: 0,
        claim: agent_common::WireCtx::default(),
    };
    if TLS_SOCKS.insert(&key, &t, 0).is_err() {
        count(CNT_STATE_MAP_FULL);
        return None;
    }
    // SAFETY: the value just inserted.
    TLS_SOCKS.get_ptr_mut(&key).map(|t| unsafe { &mut *t })
}

/// Makes a traced connection's socket a TLS one: its ciphertext is never copied from now on.
/// One ignored as not HTTP (its first bytes were a ClientHello) or as not wanted (port filter,
/// exporter endpoints) is told apart by its addresses. From here, `opening` means that the
/// client's first plaintext (an HTTP/2 preface or not) is still to come, on a connection seen
/// from its start: the handshake binds before any plaintext moves.
#[inline(always)]
pub fn adopt(c: &mut ConnInfo) {
    if c.verdict == VERDICT_TLS {
        return;
    }
    let wanted = c.verdict == VERDICT_TRACE
        || (c.verdict == VERDICT_IGNORE && c.tuple.family != 0 && crate::sock::wanted(&c.tuple));
    c.verdict = if wanted { VERDICT_TLS } else { VERDICT_IGNORE };
    c.opening = (wanted && c.role != ROLE_UNKNOWN && c.proto == PROTO_HTTP1) as u32;
}

/// The client's first plaintext on a connection seen from its start: the HTTP/2 preface makes
/// it one whose frames are walked from here on (`h2walk`).
#[inline(always)]
fn opening(c: &mut ConnInfo, call: &TlsCall, moved: u64) {
    if c.opening == 0 || (c.role == ROLE_SERVER) != (call.dir == DIR_INGRESS) {
        return;
    }
    c.opening = 0;
    if moved < H2_PREFACE_LEN as u64 {
        return;
    }
    // SAFETY: user memory through the fault-tolerant helper.
    let Ok(words) = (unsafe { bpf_probe_read_user(call.buf as *const [u64; 3]) }) else {
        return;
    };
    if head_scan::is_h2_preface_words(words, moved as usize) {
        c.proto = PROTO_H2;
        c.h2 = [H2Walk::default(); 2];
        c.h2[(call.dir & 1) as usize].keep = H2_PREFACE_LEN;
    }
}

/// `SSL_free(ssl)`: the address may hold another connection's `SSL` next.
#[uprobe]
pub fn ssl_free(ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: as in `enter`.
    let ssl = unsafe { (*ctx.regs).rdi };
    let _ = TLS_SOCKS.remove(&ssl_key(tgid, ssl));
    0
}

/// A syscall on TCP socket `sk` during thread `pid_tgid`'s OpenSSL call: the call's `SSL *`
/// uses this socket. The connection's ciphertext is not traced from here on (this syscall's
/// included); its plaintext is, if the connection is one the agent traces at all.
///
/// A read of `ret` bytes on a server connection is also where requests from a traced client
/// on this host arrive: the records it brought in are walked, and the context the client
/// recorded at a record's first byte (`stitch::tls_sending`) is kept for the next request head
/// this `SSL *` returns.
#[inline(always)]
pub fn bind(io: &mut IoArgs, pid_tgid: u64, sk: u64, ret: i32, flags: u32) {
    let Some(call) = call_on(pid_tgid, io.fd) else {
        return;
    };
    let tgid = (pid_tgid >> 32) as u32;
    call.fd = io.fd;
    call.state |= TLS_BOUND;
    if ret > 0 {
        // SAFETY: helper without preconditions.
        call.ts_io = unsafe { bpf_ktime_get_boot_ns() };
    }
    let sock = set_fd(tgid, call.ssl, io.fd);
    let Some(c) = CONNS.get_ptr_mut(&conn_key(tgid, io.fd)) else {
        return;
    };
    // SAFETY: live map value, used in place.
    let c = unsafe { &mut *c };
    if c.sk != sk {
        return;
    }
    adopt(c);
    io.verdict = c.verdict;
    if ret > 0 && c.verdict == VERDICT_TLS && call.dir < DIR_HANDSHAKE {
        // Its plaintext is owed to this connection: a close before the call returns waits.
        c.tls_busy[(call.dir & 1) as usize] = 1;
        call.sk = sk;
        call.state |= TLS_BUSY;
    }
    if c.verdict != VERDICT_TLS || c.role != ROLE_SERVER || io.direction != DIR_INGRESS {
        return;
    }
    let (Some(sock), Some(seq)) = (sock, stitch::first_read(sk, ret, flags)) else {
        return;
    };
    if io.buf_kind != BUF_PLAIN {
        return;
    }
    match walk_records(io.buf, ret, seq, &c.tuple, &mut sock.claim) {
        0 => {} // an earlier read's context, if any, still waits for its head
        1 => sock.claimed = 1,
        _ => sock.claimed = 0, // several requests began here: which head gets which is unknown
    }
}

/// The TLS call in flight that a syscall of thread `pid_tgid` on socket `fd` belongs to. An
/// OpenSSL call runs on its thread from entry to return. A Go call (`gotls`) belongs to its
/// goroutine, which may have parked and resumed on another thread: it is found by the
/// goroutine running now, and counts only for a syscall on its own socket.
#[inline(always)]
pub fn call_on(pid_tgid: u64, fd: u32) -> Option<&'static mut TlsCall> {
    if let Some(call) = TLS_CALLS.get_ptr_mut(&pid_tgid) {
        // SAFETY: this thread's live map value.
        return Some(unsafe { &mut *call });
    }
    let tgid = (pid_tgid >> 32) as u32;
    if runtime_of(tgid) != Some(agent_common::RUNTIME_GO) {
        return None;
    }
    let g = crate::regs::user_r14()?;
    let call = GO_TLS_CALLS.get_ptr_mut(&ssl_key(tgid, g))?;
    // SAFETY: the goroutine's live map value.
    let call = unsafe { &mut *call };
    (call.fd == fd).then_some(call)
}

/// Walks the TLS records a read of `ret` bytes at `buf` brought in (the first at sequence
/// number `seq`) and takes the stitching context recorded at a record's first byte into
/// `claim`. Returns how many records had one. Out of line: the socket tracepoint's stack has
/// no room for it.
#[inline(never)]
fn walk_records(
    buf: u64,
    ret: i32,
    seq: u32,
    t: &agent_common::ConnTuple,
    claim: &mut agent_common::WireCtx,
) -> u32 {
    let mut found = 0u32;
    let mut off: u32 = 0;
    let mut i = 0;
    while i < MAX_RECORDS {
        if off as i64 + 5 > ret as i64 {
            break;
        }
        // SAFETY: user memory through the fault-tolerant helper.
        let Ok(h) = (unsafe { bpf_probe_read_user((buf + off as u64) as *const [u8; 5]) }) else {
            break;
        };
        // A TLS record header: content type 20 to 23, version 3.x.
        if !(20..=23).contains(&h[0]) || h[1] != 3 {
            break;
        }
        if h[0] == 23 && stitch::claim_at(seq.wrapping_add(off), t, claim) {
            found += 1;
        }
        off += 5 + u16::from_be_bytes([h[3], h[4]]) as u32;
        i += 1;
    }
    found
}

/// `SSL_read`/`SSL_write` returned an `int` in `eax` (the upper half of `rax` is undefined):
/// the count of bytes moved, or <= 0.
#[uretprobe]
pub fn ssl_ret(ctx: RetProbeContext) -> u32 {
    let ret = ctx.ret::<u64>() as i32;
    let walk = leave(if ret > 0 { ret as u64 } else { 0 }, false);
    walk_h2(&ctx, walk);
    0
}

/// `SSL_read_ex`/`SSL_write_ex` returned the `int` 1 on success, with the count (a `size_t`)
/// at the fourth argument.
#[uretprobe]
pub fn ssl_ex_ret(ctx: RetProbeContext) -> u32 {
    let ret = ctx.ret::<u64>() as i32;
    let walk = leave((ret == 1) as u64, true);
    walk_h2(&ctx, walk);
    0
}

/// An HTTP/2 connection's call (`leave` put it in `TLS_WALK_IO`): the walker of its direction
/// copies its frames. If the tail call fails, nothing of this call is copied (and the walk
/// stays where it was: userspace sees the frame alignment lost, and counts it).
#[inline(always)]
pub fn walk_h2<C: EbpfContext>(ctx: &C, walk: Option<u32>) {
    if let Some(dir) = walk {
        // SAFETY: the array holds probe programs of this type.
        let _ = unsafe { TLS_H2_WALK.tail_call(ctx, dir) };
        count(CNT_H2_WALK_INCOMPLETE);
        crate::h2walk::settle_tls();
    }
}

/// Sends what the call moved (`emit`), or returns its direction when its connection speaks
/// HTTP/2 and the frame walker is to copy it.
#[inline(always)]
fn leave(ok: u64, ex: bool) -> Option<u32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let call = TLS_CALLS.get_ptr(&pid_tgid)?;
    // SAFETY: this thread's live map value, copied before removal.
    let call = unsafe { *call };
    let _ = TLS_CALLS.remove(&pid_tgid);
    let moved = if ok == 0 {
        0
    } else if ex {
        // SAFETY: user memory through the fault-tolerant helper.
        unsafe { bpf_probe_read_user(call.out as *const u64) }.unwrap_or(0)
    } else {
        ok
    };
    complete(&call, pid_tgid, moved)
}

/// `finish`, then `settle` unless the frame walker is to copy the call (it settles).
#[inline(always)]
pub fn complete(call: &TlsCall, pid_tgid: u64, moved: u64) -> Option<u32> {
    let walk = finish(call, pid_tgid, moved);
    if walk.is_none() && call.state & TLS_BUSY != 0 {
        settle((pid_tgid >> 32) as u32, call.fd, call.sk, call.dir);
    }
    walk
}

/// A TLS call that marked connection `fd` (socket `sk`) busy in direction `dir` has sent what
/// it moved: the mark goes, and a close that waited for it (`ConnInfo::closing`) happens now.
#[inline(always)]
pub fn settle(tgid: u32, fd: u32, sk: u64, dir: u32) {
    let Some(c) = CONNS.get_ptr_mut(&conn_key(tgid, fd)) else {
        return;
    };
    // SAFETY: live map value, used in place.
    let c = unsafe { &mut *c };
    if c.sk != sk {
        return;
    }
    c.tls_busy[(dir & 1) as usize] = 0;
    if c.closing != 0 && (c.tls_busy[0] | c.tls_busy[1]) == 0 {
        let (verdict, ts) = (c.verdict, c.closing);
        crate::conn::close(tgid, fd, sk, verdict, ts);
    }
}

/// Sends what a call moved (`moved` bytes, > 0) on its connection, or returns its direction
/// when the connection speaks HTTP/2 (see `leave`). Shared by OpenSSL's return probes and Go's
/// (`gotls`, `call.g != 0`).
#[inline(always)]
pub fn finish(call: &TlsCall, pid_tgid: u64, moved: u64) -> Option<u32> {
    if moved == 0 {
        return None;
    }
    let tgid = (pid_tgid >> 32) as u32;
    let (fd, claim) = match TLS_SOCKS.get_ptr_mut(&ssl_key(tgid, call.ssl)) {
        Some(sock) => {
            // SAFETY: live map value.
            let sock = unsafe { &mut *sock };
            // Bound by a syscall of this call, else earlier (a read served from the library's
            // buffer). A Go call's socket, read from its `tls.Conn`, counts once a syscall of
            // its goroutine on that socket bound it.
            if call.g != 0 && sock.fd != call.fd {
                count(CNT_TLS_UNBOUND);
                return None;
            }
            let fd = if call.fd != TLS_NO_FD {
                call.fd
            } else {
                sock.fd
            };
            // A context brought in for the next request head goes to this read's data, or
            // nowhere.
            let mut claim = None;
            if call.dir == DIR_INGRESS && sock.claimed != 0 {
                sock.claimed = 0;
                claim = Some(sock.claim);
            }
            (fd, claim)
        }
        // Closed on another thread or goroutine (`SSL_free`, `(*Conn).Close`) after this
        // call's own syscall moved its bytes: the socket is the one that syscall used.
        None if call.state & TLS_BOUND != 0 && call.fd != TLS_NO_FD => (call.fd, None),
        None => {
            count(CNT_TLS_UNBOUND);
            return None;
        }
    };
    let Some(conn) = CONNS.get_ptr_mut(&conn_key(tgid, fd)) else {
        // The call's socket is known (its own syscall, or the binding a syscall made): it is
        // gone only if it was closed since (a read served from the library's buffer, returning
        // after another thread or goroutine closed the connection). Its close has been told
        // to userspace and its spans are ended.
        count(CNT_TLS_AFTER_CLOSE);
        return None;
    };
    // SAFETY: live map value, used in place.
    let conn = unsafe { &mut *conn };
    if call.state & TLS_BUSY != 0 && conn.sk != call.sk {
        // The fd number names another socket now: this call's connection was closed.
        count(CNT_TLS_AFTER_CLOSE);
        return None;
    }
    if conn.verdict != VERDICT_TLS && conn.sk != 0 {
        // Bound by `SSL_set_fd` or an earlier call, never by a syscall in a read or write.
        adopt(conn);
    }
    if conn.verdict != VERDICT_TLS {
        return None;
    }
    if call.lost != 0 {
        let counter = tell_lost(pid_tgid, fd, conn, call.lost, call.lost_ts);
        if counter != SENT {
            // Counted here, not in `tell_lost`: its frame has no room for counting beside
            // the frames of the return probes that call it (512 bytes in all).
            count(counter);
        }
        let _ = GO_TLS_LOST.remove(&ssl_key(tgid, call.g));
    }
    opening(conn, call, moved);
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // A write's bytes left when its last syscall sent them; a read's are the caller's now.
    let ts_exit = if call.dir == DIR_EGRESS && call.ts_io != 0 {
        call.ts_io
    } else {
        now
    };
    if conn.proto == PROTO_H2 {
        let w = crate::h2walk::TLS_WALK_IO.get_ptr_mut(0)?;
        // SAFETY: this CPU's live map value, read by the walker this program tail-calls.
        let w = unsafe { &mut *w };
        w.ts_exit = ts_exit;
        let io = &mut w.io;
        io.buf = call.buf;
        io.count = moved;
        io.ts_enter = call.ts_enter;
        io.sk = conn.sk;
        io.fd = fd;
        io.buf_kind = BUF_PLAIN;
        io.direction = call.dir;
        io.verdict = VERDICT_TLS;
        w.settle = call.state & TLS_BUSY != 0;
        return Some(call.dir);
    }
    emit(call, pid_tgid, fd, conn, (moved, ts_exit), claim);
    None
}

#[inline(always)]
fn emit(
    call: &TlsCall,
    pid_tgid: u64,
    fd: u32,
    conn: &ConnInfo,
    (moved, ts_exit): (u64, u64),
    claim: Option<agent_common::WireCtx>,
) {
    let Some(scratch) = scratch(TLS_SLOT) else {
        return;
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
    let captured = copy_plain(payload, call.buf, want as usize);
    // SAFETY: the scratch buffer is larger than the header and 8-byte aligned.
    let header = unsafe { &mut *(buf.as_mut_ptr() as *mut DataHeader) };
    fill(
        header,
        (pid_tgid, fd, call.dir),
        conn,
        (moved, captured as u32),
        (call.ts_enter, ts_exit),
        LAYOUT_PREFIX,
    );
    // The same in-process evidence as a plaintext connection's (`capture::emit_data`): a
    // request read opens on its thread (or task), a response written closes it, and a request
    // written takes its owner. Same-host stitching works on the ciphertext's sequence numbers:
    // a write starting a request head records its context where its first record starts, and
    // a read whose first syscall starts there returns that head.
    let wire = &mut header.wire;
    if call.dir == DIR_INGRESS {
        let tgid = (pid_tgid >> 32) as u32;
        let g = match runtime_of(tgid) {
            _ if call.g != 0 => call.g,
            Some(RUNTIME_TOKIO) => crate::propagate::tokio::polling(pid_tgid),
            _ => 0,
        };
        let mut used = false;
        let opened = propagate::server_request::<TLS_SLOT>(
            payload,
            captured,
            pid_tgid,
            (g, conn.sk),
            header.ts_exit,
            wire,
            |w| match claim {
                Some(c) => {
                    w.trace_id = c.trace_id;
                    w.parent_id = c.parent_id;
                    w.flags = c.flags;
                    used = true;
                    true
                }
                None => false,
            },
        );
        if claim.is_some() && !used {
            // The read brought a request's first record but returned no request line (Go's
            // server reads one byte ahead while a handler runs): its span gets no parent.
            count(CNT_TLS_CLAIM_DROPPED);
        }
        if !opened && head::starts_with_status(payload, captured) {
            propagate::response_read(tgid, fd);
        }
    } else if call.wire.kind != WIRE_NONE {
        // Decided when its first record was sent (`stitch::tls_sending`).
        *wire = call.wire;
    } else if head::starts_with_status(payload, captured) {
        inflight::close(conn.sk);
    } else if head::starts_with_method(payload, captured) {
        propagate::linked(pid_tgid, fd, wire);
    }
    let total = if captured == MAX_PAYLOAD {
        (DATA_HEADER_SIZE + MAX_PAYLOAD) as u64
    } else {
        (DATA_HEADER_SIZE + (captured & MASK)) as u64
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
}

/// Tells userspace that `bytes` were read on connection `conn` (socket `fd`) of this process
/// without being seen (`LAYOUT_LOST`), the last of them at `now`: a Go read begun before the
/// probes (`gotls`). The header
/// is assembled in the scratch slot `emit` uses next (the stack has no room for it). Returns
/// `SENT`, or the counter to move (a plain `u32`: a `Result` would be a sixth argument, which
/// BPF calls cannot pass).
#[inline(never)]
fn tell_lost(pid_tgid: u64, fd: u32, conn: &ConnInfo, bytes: u64, now: u64) -> u32 {
    let scratch = match crate::maps::try_scratch(TLS_SLOT) {
        Ok(s) => s,
        Err(counter) => return counter,
    };
    let buf = scratch.buf();
    // SAFETY: the scratch buffer is larger than the header and 8-byte aligned.
    let header = unsafe { &mut *(buf.as_mut_ptr() as *mut DataHeader) };
    fill(
        header,
        (pid_tgid, fd, DIR_INGRESS),
        conn,
        (bytes, 0),
        (now, now),
        LAYOUT_LOST,
    );
    // SAFETY: the header lies in the scratch buffer; the map pointer is the ring buffer.
    let ret = unsafe {
        bpf_ringbuf_output(
            core::ptr::addr_of!(EVENTS) as *mut _,
            buf.as_mut_ptr() as *mut _,
            DATA_HEADER_SIZE as u64,
            crate::maps::ring_flags(),
        )
    };
    if ret < 0 {
        return CNT_RINGBUF_FULL;
    }
    SENT
}

/// `tell_lost`'s event went out.
const SENT: u32 = u32::MAX;

/// A TLS event's header for connection `conn`: `(moved, captured)` bytes between `times`.
#[inline(always)]
fn fill(
    header: &mut DataHeader,
    (pid_tgid, fd, dir): (u64, u32, u32),
    conn: &ConnInfo,
    (moved, captured): (u64, u32),
    (ts_enter, ts_exit): (u64, u64),
    layout: u32,
) {
    header.kind = EVENT_TLS_DATA;
    header.direction = dir;
    header.pid = (pid_tgid >> 32) as u32;
    header.tid = pid_tgid as u32;
    header.fd = fd;
    header.captured = captured;
    header.sk = conn.sk;
    header.len = moved;
    header.ts_enter = ts_enter;
    header.ts_exit = ts_exit;
    header.role = conn.role;
    header.layout = layout;
    header.tuple = conn.tuple;
    // Written by the helper in place: a copy through the stack spills byte by byte, and
    // `tell_lost`'s frame has no room for that.
    // SAFETY: `comm` is 16 writable bytes of the header; the helper fills them (zeroed on
    // error).
    unsafe {
        aya_ebpf::helpers::generated::bpf_get_current_comm(
            header.comm.as_mut_ptr() as *mut core::ffi::c_void,
            header.comm.len() as u32,
        )
    };
    header.wire = agent_common::WireCtx::default();
    header.lost = crate::maps::losses(&header.pid);
}
