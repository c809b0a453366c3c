//! Every map and load-time setting of the kernel side, in one place.
use agent_common::{
    ChanNote, ConnInfo, EndpointKey, FlowSeq, PyThread, ReqRef, ServerReq, TaskKey, TaskRef,
    ThreadReqs, WireCtx, CNT_SCRATCH_BUSY, DATA_HEADER_SIZE, INJECT_STITCH, MAX_PAYLOAD,
    NUM_COUNTERS, SAMPLE_ALWAYS,
};
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf, SockHash},
};

/// Set by userspace at load time (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
pub static AGENT_TGID: u32 = 0;
#[unsafe(no_mangle)]
pub static PAYLOAD_LIMIT: u32 = agent_common::DEFAULT_PAYLOAD_LIMIT;
#[unsafe(no_mangle)]
pub static FILTER_FLAGS: u32 = 0;

/// Sampling for traces that start here (see `agent_common::SAMPLE_ALWAYS`), and whether an
/// incoming sampled flag is followed.
#[unsafe(no_mangle)]
pub static SAMPLE_THRESHOLD: u64 = SAMPLE_ALWAYS;
#[unsafe(no_mangle)]
pub static SAMPLE_PARENT_BASED: u32 = 1;

/// How context travels between processes (`agent_common::INJECT_*`).
#[unsafe(no_mangle)]
pub static INJECT_MODE: u32 = INJECT_STITCH;
/// Offsets of `write_seq` and `copied_seq` in `struct tcp_sock`, read from the kernel's BTF by
/// userspace (0: unknown, and stitching stays off).
/// Test only: the TCP-option carrier also on loopback connections (see `propagate::tcpopt`).
#[unsafe(no_mangle)]
pub static TCPOPT_LOOPBACK: u32 = 0;
#[unsafe(no_mangle)]
pub static OFF_WRITE_SEQ: u32 = 0;
#[unsafe(no_mangle)]
pub static OFF_COPIED_SEQ: u32 = 0;

#[inline(always)]
pub fn global(v: &'static u32) -> u32 {
    // SAFETY: read of a constant the loader patched; volatile keeps the compiler from folding it.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
pub fn global64(v: &'static u64) -> u64 {
    // SAFETY: as `global`.
    unsafe { core::ptr::read_volatile(v) }
}

/// Data and close events to userspace. Userspace may resize it (`--ring-size`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Events the kernel failed to send, by process (see `count`). LRU: a process evicted starts
/// again from zero, after as many others lost events since (userspace keeps what it saw).
#[map]
pub static LOSSES: LruHashMap<u32, u64> = LruHashMap::with_max_entries(16384, 0);

/// Per-CPU counters of everything that could not be sent or tracked (see `agent_common::CNT_*`).
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

/// Arguments of a data syscall in flight, keyed by pid_tgid (saved at entry, used at exit).
#[map]
pub static ACTIVE_IO: HashMap<u64, IoArgs> = HashMap::with_max_entries(16384, 0);

/// Socket fd of a `connect` in flight, keyed by pid_tgid.
#[map]
pub static ACTIVE_CONNECT: HashMap<u64, u64> = HashMap::with_max_entries(4096, 0);

/// Known sockets keyed by `(pid << 32) | fd`: role, verdict and addresses, computed once.
/// LRU: an evicted entry is recomputed from the socket on its next syscall, so nothing is lost.
pub const CAP_CONNS: u32 = 65536;
#[map]
pub static CONNS: LruHashMap<u64, ConnInfo> = LruHashMap::with_max_entries(CAP_CONNS, 0);

/// Process allow-list, used when `FILTER_FLAGS & FILTER_PIDS`.
#[map]
pub static TRACED_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(16384, 0);

/// What a thread is evidence of in each process (`agent_common::RUNTIME_*`), by tgid:
/// userspace classifies each process from its executable and libraries; `exec` resets an entry
/// to `RUNTIME_PENDING` and exit removes it. A process without an entry gets no in-thread link.
pub const CAP_RUNTIMES: u32 = 65536;
#[map]
pub static PROC_RUNTIME: HashMap<u32, u8> = HashMap::with_max_entries(CAP_RUNTIMES, 0);

/// Port allow-list (local or peer port), used when `FILTER_FLAGS & FILTER_PORTS`.
#[map]
pub static TRACED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

/// Endpoints never traced on either side of a connection (the OTLP backend).
#[map]
pub static EXCLUDED_ENDPOINTS: HashMap<EndpointKey, u8> = HashMap::with_max_entries(64, 0);

/// Per-CPU scratch where an event is assembled before it is copied into the ring buffer
/// (slot 0, syscall tracepoints), where `sk_msg` copies an outgoing request head to read it
/// (slot 1), where the start of a send is read (slot 2, `tcp_sendmsg_locked`), and where an
/// OpenSSL return probe assembles its plaintext event (slot 3, `tls`). Programs that
/// can run in different contexts never share a slot, and each holder marks its slot busy (see
/// `scratch`). The payload area is twice the maximum so the verifier can bound `offset + len`.
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(4, 0);

/// The state of a head walk (`propagate::head`), one per scratch slot: its `bpf_loop` callback
/// finds it here rather than on the caller's stack. A scalar loaded from a map value is
/// unknown to the verifier, so the callback's state is the same at every step and it is
/// checked in a step or two; on the stack, each step's offsets were exact and the verifier
/// checked step after step (`tcp_sendmsg_locked` took 637k instructions, 1.5 s).
#[map]
pub static WALKS: PerCpuArray<WalkState> = PerCpuArray::with_max_entries(4, 0);

/// Room for the largest walk state (`head_scan::HeadWalk`, 48 bytes).
#[repr(C, align(8))]
pub struct WalkState {
    pub bytes: [u8; 64],
}

/// Where `sock::classify` builds a new connection's entry before inserting it into `CONNS`
/// (on the stack it cost 144 bytes of the 512 its program shares with its callees). Every
/// caller runs in process context with preemption off (a syscall's tracepoint, or
/// `tcp_sendmsg_locked`), and none can interrupt another on the same CPU.
#[map]
pub static CONN_NEW: PerCpuArray<agent_common::ConnInfo> = PerCpuArray::with_max_entries(1, 0);

/// OpenSSL reads and writes in flight, by pid_tgid (`tls`).
#[map]
pub static TLS_CALLS: HashMap<u64, agent_common::TlsCall> = HashMap::with_max_entries(16384, 0);

/// Go `crypto/tls` calls in flight, by `(tgid, g)` (`gotls`): a goroutine can return on
/// another thread than it entered on. Removed at return, and with its process by userspace's
/// sweep. Full: counted (`CNT_STATE_MAP_FULL`).
#[map]
pub static GO_TLS_CALLS: HashMap<TaskKey, agent_common::TlsCall> =
    HashMap::with_max_entries(16384, 0);

/// Bytes that Go `crypto/tls` reads begun before the probes returned, and when the last one
/// did, by `(tgid, g)`, until the goroutine's next read names their connection (`gotls`).
#[map]
pub static GO_TLS_LOST: HashMap<TaskKey, [u64; 2]> = HashMap::with_max_entries(4096, 0);

/// The socket each `SSL *` (or Go `*tls.Conn`) was last seen to use, and a stitching context
/// its last read brought in, by `(tgid, ssl)`: removed by `SSL_free` (`(*Conn).Close`), and
/// with its process by userspace's sweep. Full: counted (`CNT_STATE_MAP_FULL`).
#[map]
pub static TLS_SOCKS: HashMap<TaskKey, agent_common::TlsSock> = HashMap::with_max_entries(65536, 0);

/// Outgoing request starts of traced processes, by connection and TCP sequence number: the
/// context the sender's client span has, for a receiver on this host to claim (same-host
/// stitching). A claimed entry is deleted. LRU: a mark nobody claims (the receiver is on another
/// host, or not traced) ages out; `kernel_stitch_marked` - `kernel_stitch_claimed` shows them.
pub const CAP_STITCH: u32 = 65536;
#[map]
pub static STITCH: LruHashMap<FlowSeq, WireCtx> = LruHashMap::with_max_entries(CAP_STITCH, 0);

/// The request each server connection is handling, keyed by its socket. LRU: an evicted entry
/// only costs the in-process link of that request's outgoing calls.
pub const CAP_SERVER_REQS: u32 = 65536;
#[map]
pub static SERVER_REQS: LruHashMap<u64, ServerReq> =
    LruHashMap::with_max_entries(CAP_SERVER_REQS, 0);

/// Requests recently read by each thread, keyed by tid.
pub const CAP_THREAD_REQS: u32 = 16384;
#[map]
pub static THREAD_REQS: LruHashMap<u32, ThreadReqs> =
    LruHashMap::with_max_entries(CAP_THREAD_REQS, 0);

/// The request a thread was handling when it called `connect`, keyed by `(pid << 32) | fd`:
/// the owner of the first request on that connection, even if more requests arrive before the
/// connection is up (event loops).
pub const CAP_CONNECT_REFS: u32 = 16384;
#[map]
pub static CONNECT_REFS: LruHashMap<u64, ReqRef> =
    LruHashMap::with_max_entries(CAP_CONNECT_REFS, 0);

/// Request body bytes still to come on an outgoing connection, keyed by `(pid << 32) | fd`:
/// `sk_msg` never looks for a request head inside a body. `BODY_UNKNOWN` (chunked, or a head
/// split across writes): nothing is touched until the response starts.
pub const CAP_BODY_LEFT: u32 = 65536;
#[map]
pub static BODY_LEFT: LruHashMap<u64, u64> = LruHashMap::with_max_entries(CAP_BODY_LEFT, 0);
pub const BODY_UNKNOWN: u64 = u64::MAX;

/// Go (`propagate::goroutine`): the request each goroutine read last, by goroutine; the
/// request each outgoing `*http.Request` is made for, by its address; the request each writer
/// goroutine is about to send a request for. LRU: a note evicted only costs that link. The
/// first is filled inside the largest programs without the eviction estimate (see
/// `goroutine::request_read`); userspace reports when it is full.
pub const CAP_TASK_REQ: u32 = 65536;
#[map]
pub static TASK_REQ: LruHashMap<TaskKey, TaskRef> = LruHashMap::with_max_entries(CAP_TASK_REQ, 0);
pub const CAP_GO_REQ_OWNER: u32 = 16384;
#[map]
pub static GO_REQ_OWNER: LruHashMap<TaskKey, TaskRef> =
    LruHashMap::with_max_entries(CAP_GO_REQ_OWNER, 0);
pub const CAP_TASK_WRITING: u32 = 16384;
#[map]
pub static TASK_WRITING: LruHashMap<TaskKey, TaskRef> =
    LruHashMap::with_max_entries(CAP_TASK_WRITING, 0);
/// Go goroutine spawns in progress: the spawning goroutine, by the thread running
/// `runtime.newproc1` (from its entry to its return, on the thread's system stack). A plain
/// hash: every entry is consumed at the return, and userspace removes those of dead threads.
#[map]
pub static GO_SPAWNING: HashMap<u64, u64> = HashMap::with_max_entries(4096, 0);

/// Python asyncio (`propagate::asyncio`): what each event-loop thread runs, by pid_tgid, and
/// the request each task works for. LRU, filled without the eviction estimate (uprobes on hot
/// interpreter paths): an evicted entry only costs a link; userspace removes dead threads'
/// entries and reports when the task map is full.
#[map]
pub static PY_THREADS: LruHashMap<u64, PyThread> = LruHashMap::with_max_entries(16384, 0);
/// tokio (`propagate::tokio`): the task each thread polls, by pid_tgid, and what waits in each
/// channel. LRU without the eviction estimate: an evicted entry only costs a link (a channel
/// whose count is lost starts over at its next push).
#[map]
pub static TOKIO_POLLING: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16384, 0);
#[map]
pub static TOKIO_CHANS: LruHashMap<TaskKey, ChanNote> = LruHashMap::with_max_entries(16384, 0);
pub const CAP_PY_TASKS: u32 = 65536;
#[map]
pub static PY_TASKS: LruHashMap<TaskKey, TaskRef> = LruHashMap::with_max_entries(CAP_PY_TASKS, 0);

/// An outgoing connection by what both `sk_msg` and `sock_ops` can see of it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SockKey {
    pub local_port: u32,
    pub remote_port: u32,
    pub remote_ip4: u32,
    pub remote_ip6_last: u32,
}

/// Outgoing connections that sent (or announced) a large body: `sock_ops` takes them out of the
/// socket map on their next acknowledgement (see `propagate/sockops.rs`).
pub const CAP_LARGE_SENDS: u32 = 16384;
#[map]
pub static LARGE_SENDS: LruHashMap<SockKey, u8> = LruHashMap::with_max_entries(CAP_LARGE_SENDS, 0);

/// Sockets of selected processes between `connect` and "established" (header mode), by cookie.
pub const CAP_CONNECTING: u32 = 16384;
#[map]
pub static CONNECTING: LruHashMap<u64, u8> = LruHashMap::with_max_entries(CAP_CONNECTING, 0);

/// Outgoing TCP connections whose requests `sk_msg` may carry a `traceparent` in, keyed by
/// socket cookie. Closed sockets leave the map by themselves.
#[map]
pub static OUT_SOCKS: SockHash<u64> = SockHash::with_max_entries(65536, 0);

pub const SCRATCH_SIZE: usize = DATA_HEADER_SIZE + 2 * MAX_PAYLOAD;

#[repr(C, align(8))]
pub struct Scratch {
    pub buf: [u8; SCRATCH_SIZE],
    /// Non-zero while a program holds this slot.
    pub busy: u64,
}

/// Exclusive use of one per-CPU scratch slot, released when dropped.
pub struct ScratchGuard {
    s: *mut Scratch,
}

impl ScratchGuard {
    #[inline(always)]
    pub fn buf(&self) -> &mut [u8; SCRATCH_SIZE] {
        // SAFETY: the slot is ours until the guard drops.
        unsafe { &mut (*self.s).buf }
    }
}

impl Drop for ScratchGuard {
    #[inline(always)]
    fn drop(&mut self) {
        // SAFETY: live map value we marked busy.
        unsafe { core::ptr::write_volatile(&mut (*self.s).busy, 0) };
    }
}

/// Takes scratch slot `slot` of this CPU. Each slot is used from one kind of context only, and
/// programs of one kind do not nest on a CPU; should a preempted holder still have it anyway,
/// the caller gets nothing (counted) rather than a buffer another program is writing.
#[inline(always)]
pub fn scratch(slot: u32) -> Option<ScratchGuard> {
    let s = try_scratch(slot);
    if s.is_err() {
        count(CNT_SCRATCH_BUSY);
    }
    s.ok()
}

/// `scratch`, leaving the count to the caller (`Err(CNT_SCRATCH_BUSY)`): for a function out of
/// line whose callers' frames leave its own no room for counting.
#[inline(always)]
pub fn try_scratch(slot: u32) -> Result<ScratchGuard, u32> {
    let s = SCRATCH.get_ptr_mut(slot).ok_or(CNT_SCRATCH_BUSY)?;
    // SAFETY: live per-CPU map value.
    unsafe {
        if core::ptr::read_volatile(&(*s).busy) != 0 {
            return Err(CNT_SCRATCH_BUSY);
        }
        core::ptr::write_volatile(&mut (*s).busy, 1);
    }
    Ok(ScratchGuard { s })
}

pub use agent_common::{IoArgs, BUF_IOVEC, BUF_PLAIN};

/// Wake the reader only once this much is pending; below it, userspace drains on a short timer.
/// One wakeup per event would cost a context switch per syscall under load.
const WAKEUP_BYTES: u64 = 64 * 1024;
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Flags for `bpf_ringbuf_output`: batch wakeups.
#[inline(always)]
pub fn ring_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
    if agent_common::loses_events(index) {
        lose();
    }
}

/// The event lost was the current task's: its process's loss count moves.
#[inline(always)]
fn lose() {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    match LOSSES.get_ptr_mut(&tgid) {
        // SAFETY: a live map value. Not atomic: two CPUs adding at once may count one, and
        // what userspace needs is only that it is not zero.
        Some(l) => unsafe { *l += 1 },
        None => {
            let _ = LOSSES.insert(&tgid, &1, 0);
        }
    }
}

/// The loss count of the process whose pid is at `tgid`, which every data event of it
/// carries (`DataHeader::lost`). `tgid` is the header's own field, in map memory: the lookup
/// takes no room on the stack.
#[inline(always)]
pub fn losses(tgid: &u32) -> u64 {
    // SAFETY: a live map value; a 64-bit load is not torn.
    LOSSES
        .get_ptr(tgid)
        .map_or(0, |l| unsafe { core::ptr::read_volatile(l) })
}

/// Whether the calling process may be traced at all: never the agent itself, and only the
/// allow-listed processes when a pid filter is active.
#[inline(always)]
pub fn process_traced(tgid: u32) -> bool {
    if tgid == global(&AGENT_TGID) {
        return false;
    }
    if global(&FILTER_FLAGS) & agent_common::FILTER_PIDS != 0 {
        // SAFETY: value is only tested for presence.
        return unsafe { TRACED_PIDS.get(&tgid) }.is_some();
    }
    true
}

#[inline(always)]
pub fn conn_key(tgid: u32, fd: u32) -> u64 {
    ((tgid as u64) << 32) | fd as u64
}

/// An edit `sk_msg` planned for a request head (`propagate::skmsg`), handed to the edit program
/// through a tail call. `pid_tgid` names the sending thread, so a plan another task's send on
/// this CPU overwrote in between is never carried out on the wrong message.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MsgEdit {
    pub pid_tgid: u64,
    pub op: u32,
    /// Where the text goes in the message.
    pub at: u32,
    /// `EDIT_REPLACE`: length of the value being replaced.
    pub old_len: u32,
    /// Bytes of the message's head to make contiguous again after the edit.
    pub n: u32,
    pub wire: WireCtx,
    pub text: [u8; EDIT_TEXT],
}
pub const EDIT_REWRITE: u32 = 1;
pub const EDIT_INSERT: u32 = 2;
pub const EDIT_REPLACE: u32 = 3;
/// Longest text an edit writes: the whole `traceparent` header line (70 bytes).
pub const EDIT_TEXT: usize = 72;

#[map]
pub static EDIT: PerCpuArray<MsgEdit> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: the `out_msg_edit` program (set by userspace).
#[map]
pub static MSG_EDIT: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The HTTP/2 frame walkers (`h2walk`), by direction: tail-called by the data-syscall exits.
#[map]
pub static H2_WALK: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// The HTTP/2 frame walkers of TLS plaintext (`h2walk`), by direction: tail-called by the
/// OpenSSL return probes (`tls`).
#[map]
pub static TLS_H2_WALK: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// Live entries of each counted LRU map (`agent_common::LRU_*`), kept by `lru_insert` and
/// `lru_remove` and recounted by userspace on each sweep (evictions never decrement it).
#[map]
pub static LRU_LIVE: Array<u64> = Array::with_max_entries(agent_common::LRU_MAPS, 0);

/// How far below its capacity an LRU map may already evict: the kernel keeps up to 128 free
/// entries on each CPU's local list (set by userspace: 2 * 128 * CPUs).
#[unsafe(no_mangle)]
pub static LRU_SLACK: u32 = 512;

const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// Inserts or updates `k` in LRU map `which` of capacity `cap`. A new entry going into a map
/// that is full (within the per-CPU slack) evicts the least recently used one: counted.
#[inline(always)]
pub fn lru_insert<K, V>(
    map: &LruHashMap<K, V>,
    which: u32,
    cap: u32,
    k: &K,
    v: &V,
) -> Result<(), i64> {
    if map.insert(k, v, BPF_NOEXIST).is_err() {
        // Already there: an update, nothing evicted.
        return map.insert(k, v, BPF_EXIST).map_err(|e| e as i64);
    }
    let Some(live) = LRU_LIVE.get_ptr_mut(which) else {
        return Ok(());
    };
    let slack = global(&LRU_SLACK);
    let full = cap.saturating_sub(if slack < cap / 4 { slack } else { cap / 4 }) as u64;
    // SAFETY: a live array slot. Every CPU shares it and the BPF target has no atomic
    // read-modify-write in `core`, so a concurrent update can be lost: it is an estimate, and
    // userspace recounts it on every sweep.
    unsafe {
        let n = core::ptr::read_volatile(live);
        if n >= full {
            count(agent_common::lru_evicted_counter(which));
        } else {
            core::ptr::write_volatile(live, n + 1);
        }
    }
    Ok(())
}

/// Deletes `k` from LRU map `which`, keeping its live-entry estimate.
#[inline(always)]
pub fn lru_remove<K, V>(map: &LruHashMap<K, V>, which: u32, k: &K) {
    if map.remove(k).is_err() {
        return;
    }
    if let Some(live) = LRU_LIVE.get_ptr_mut(which) {
        // SAFETY: as in `lru_insert`.
        unsafe {
            let n = core::ptr::read_volatile(live);
            if n > 0 {
                core::ptr::write_volatile(live, n - 1);
            }
        }
    }
}

/// Everything a caller of `lru_insert`/`lru_remove` names, for one glob import.
pub mod lru {
    #[allow(unused_imports)]
    pub use super::{
        lru_insert, lru_remove, BODY_LEFT, CAP_BODY_LEFT, CAP_CONNECTING, CAP_CONNECT_REFS,
        CAP_CONNS, CAP_GO_REQ_OWNER, CAP_LARGE_SENDS, CAP_SERVER_REQS, CAP_STITCH,
        CAP_TASK_WRITING, CAP_THREAD_REQS, CONNECTING, CONNECT_REFS, CONNS, GO_REQ_OWNER,
        LARGE_SENDS, SERVER_REQS, STITCH, TASK_WRITING, THREAD_REQS,
    };
    pub use agent_common::{
        LRU_BODY_LEFT, LRU_CONNECTING, LRU_CONNECT_REFS, LRU_CONNS, LRU_GO_REQ_OWNER,
        LRU_LARGE_SENDS, LRU_SERVER_REQS, LRU_STITCH, LRU_TASK_WRITING, LRU_THREAD_REQS,
    };
}
