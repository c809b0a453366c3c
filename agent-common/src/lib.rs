//! Types shared between the kernel programs (`agent-ebpf`) and the userspace agent.
//!
//! Every type is `#[repr(C)]`, `Copy`, fixed-size with explicit padding, and checked at compile
//! time so both sides cannot drift.
#![no_std]

pub mod head_scan;
#[cfg(feature = "user")]
mod user;

/// Largest payload prefix the kernel can copy per syscall. Power of two: the kernel masks offsets
/// with `MAX_PAYLOAD - 1` to prove bounds to the verifier.
pub const MAX_PAYLOAD: usize = 8192;
/// Default payload prefix per syscall: enough for request/response heads, including a
/// `traceparent` that follows 1.5 KiB of other headers.
pub const DEFAULT_PAYLOAD_LIMIT: u32 = 4096;
/// At most this many iovecs are copied from a `readv`/`writev`/`sendmsg`/`recvmsg`.
pub const MAX_IOVECS: u32 = 8;

/// Ring buffer item kinds (first `u32` of every item).
pub const EVENT_DATA: u32 = 1;
pub const EVENT_CLOSE: u32 = 2;
/// A traced process `exec`'d (`ExecEvent`): its runtime is to be classified again, now.
pub const EVENT_EXEC: u32 = 3;
/// Plaintext of a TLS connection from an OpenSSL call: a `DataHeader` and payload like
/// `EVENT_DATA`'s (`len` counts plaintext bytes, the times are the call's).
pub const EVENT_TLS_DATA: u32 = 4;

/// An `EVENT_EXEC` ring item.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ExecEvent {
    pub kind: u32,
    pub pid: u32,
}

/// Direction of a data event, seen from the traced process.
pub const DIR_INGRESS: u32 = 0;
pub const DIR_EGRESS: u32 = 1;

/// Connection role learned from the syscall that created the socket.
pub const ROLE_UNKNOWN: u32 = 0;
pub const ROLE_SERVER: u32 = 1;
pub const ROLE_CLIENT: u32 = 2;

/// Filter switches (global `FILTER_FLAGS`).
pub const FILTER_PIDS: u32 = 1;
pub const FILTER_PORTS: u32 = 2;

/// Map names, shared so both sides cannot drift.
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_PIDS: &str = "TRACED_PIDS";
pub const MAP_PORTS: &str = "TRACED_PORTS";
pub const MAP_EXCLUDED: &str = "EXCLUDED_ENDPOINTS";
pub const MAP_CONNS: &str = "CONNS";
/// How each process's runtime maps requests to threads (`RUNTIME_*`), by tgid.
pub const MAP_RUNTIMES: &str = "PROC_RUNTIME";
pub const MAP_SOCKS: &str = "OUT_SOCKS";

/// Kernel counters: indices into the per-CPU `COUNTERS` array. Each is something that could not
/// be sent or tracked; userspace sums the CPUs and exposes them under the given names.
pub const CNT_RINGBUF_FULL: u32 = 0;
pub const CNT_ACTIVE_IO_FULL: u32 = 1;
pub const CNT_CLOSE_RINGBUF_FULL: u32 = 2;
pub const CNT_READ_FAULT: u32 = 3;
pub const CNT_TRUNCATED: u32 = 4;
pub const CNT_CONNS_FULL: u32 = 5;
/// `traceparent` inserted into an outgoing request that had none.
pub const CNT_TP_INSERTED: u32 = 6;
/// Parent id of an outgoing request's own `traceparent` rewritten to the agent's client span.
pub const CNT_TP_REWRITTEN: u32 = 7;
/// An outgoing request's invalid `traceparent` value replaced by a valid one.
pub const CNT_TP_REPLACED: u32 = 8;
/// Outgoing request left untouched: its head was not whole in the first write, or too long.
pub const CNT_TP_SKIPPED_HEAD: u32 = 9;
/// Outgoing request left untouched: the kernel refused to grow or linearise the message.
pub const CNT_TP_FAILED: u32 = 10;
/// Outgoing connection not followed for injection: the socket map is full.
pub const CNT_SOCKHASH_FULL: u32 = 11;
/// An incoming request head did not fit in one read: its context is decided in userspace, and
/// calls it makes are not linked to it in the kernel.
pub const CNT_SERVER_HEAD_SPLIT: u32 = 12;
/// An outgoing connection left the socket map after a large send (no more injection on it).
pub const CNT_SOCK_RELEASED: u32 = 13;
/// An outgoing request's context recorded for a receiver on this host (same-host stitching).
pub const CNT_STITCH_MARKED: u32 = 14;
/// An incoming request found the context its sender recorded on this host.
pub const CNT_STITCH_CLAIMED: u32 = 15;
/// A stitching record could not be stored (the kernel refused the insert): that request's
/// receiver will not find its caller.
pub const CNT_STITCH_FULL: u32 = 16;
/// A per-CPU scratch buffer was in use by a preempted program: that event was not captured.
pub const CNT_SCRATCH_BUSY: u32 = 17;
/// A process on the allow-list exited: its pid left the list (a reused pid is never traced).
pub const CNT_PID_EXITED: u32 = 18;
/// An insert into a bounded trace-context state map was refused (a `connect` in flight, the
/// request a thread handles, a socket between `connect` and "established"): that request's
/// in-process link, or that connection's header injection, is lost.
pub const CNT_STATE_MAP_FULL: u32 = 19;
/// A request's context written into a TCP option on its first segment (`--inject tcp-option`).
pub const CNT_TCPOPT_WRITTEN: u32 = 20;
/// A request's first segment had no room for the option (its payload plus the option exceeds
/// the MSS, or SACK blocks fill the option space): that request goes without.
pub const CNT_TCPOPT_NO_ROOM: u32 = 21;
/// A context received in a TCP option and recorded for the reader.
pub const CNT_TCPOPT_RECEIVED: u32 = 22;
/// A reader claimed a context that came in a TCP option (`received - claimed`: options whose
/// request no traced reader took, e.g. the server is not selected).
pub const CNT_TCPOPT_CLAIMED: u32 = 23;
/// LRU maps whose evictions are counted (index into `LRU_LIVE` and the counters from
/// `CNT_LRU_EVICTED`): an entry of any of them evicted while still needed loses data (a
/// connection's spans, a link, body tracking).
pub const LRU_CONNS: u32 = 0;
pub const LRU_STITCH: u32 = 1;
pub const LRU_SERVER_REQS: u32 = 2;
pub const LRU_THREAD_REQS: u32 = 3;
pub const LRU_CONNECT_REFS: u32 = 4;
pub const LRU_BODY_LEFT: u32 = 5;
pub const LRU_LARGE_SENDS: u32 = 6;
pub const LRU_CONNECTING: u32 = 7;
pub const LRU_GO_REQ_OWNER: u32 = 8;
pub const LRU_TASK_WRITING: u32 = 9;
pub const LRU_MAPS: u32 = 10;
/// Names of the LRU maps, by `LRU_*` index.
pub const LRU_MAP_NAMES: [&str; LRU_MAPS as usize] = [
    "CONNS",
    "STITCH",
    "SERVER_REQS",
    "THREAD_REQS",
    "CONNECT_REFS",
    "BODY_LEFT",
    "LARGE_SENDS",
    "CONNECTING",
    "GO_REQ_OWNER",
    "TASK_WRITING",
];
/// First of the `LRU_MAPS` counters of new entries that went into a full LRU map, each of which
/// evicted the least recently used entry (counted from the map's live-entry estimate).
pub const CNT_LRU_EVICTED: u32 = 24;
/// Where the eviction counters of LRU maps 8 and up start (the first eight come before).
pub const CNT_LRU_EVICTED_MORE: u32 = 37;

/// The eviction counter of LRU map `which` (`LRU_*`).
#[inline(always)]
pub const fn lru_evicted_counter(which: u32) -> u32 {
    if which < 8 {
        CNT_LRU_EVICTED + which
    } else {
        CNT_LRU_EVICTED_MORE + which - 8
    }
}
/// Connections seen from their start whose client's first bytes were not an HTTP request
/// (TLS, a database protocol): the kernel copies nothing more of them.
pub const CNT_CONNS_NOT_HTTP: u32 = 32;
/// Outgoing requests sent by a thread with several requests open (an event loop): left without
/// an in-thread parent rather than given a guessed one.
pub const CNT_LINK_AMBIGUOUS: u32 = 33;
/// Outgoing requests of processes whose runtime runs tasks on several threads (Go, tokio's
/// multi-thread scheduler, .NET): left without an in-thread parent, since the thread is no
/// evidence there.
pub const CNT_LINK_RUNTIME: u32 = 34;
/// Outgoing requests of processes the agent had not classified yet (exec'd a moment ago, or
/// new since the last scan): left without an in-thread parent.
pub const CNT_LINK_UNCLASSIFIED: u32 = 35;
/// Outgoing requests linked to their owner by the runtime's task identity (Go goroutines,
/// Python asyncio tasks).
pub const CNT_LINK_TASK: u32 = 36;
/// Outgoing requests sent by a Python asyncio task that no evidence ties to a request (created
/// before the agent attached, or by code no request caused): left without a parent.
pub const CNT_LINK_TASK_UNBOUND: u32 = 42;
/// OpenSSL calls that moved plaintext but whose socket is unknown: no syscall during the call
/// and no earlier binding (a memory BIO, as Node's and gRPC core's are, or a connection whose
/// calls all began before the agent): nothing of them is sent.
pub const CNT_TLS_UNBOUND: u32 = 43;
/// Go `crypto/tls` calls on a connection that is not a TCP socket the agent knows the layout
/// of (`net.Conn` wrapped by the program, or a Go release whose `netFD` layout differs): nothing
/// of them is sent.
pub const CNT_GO_TLS_UNKNOWN_CONN: u32 = 44;
/// A TLS server read that brought in the first record of a request a traced client on this
/// host marked, but returned no request line (Go's server reads one byte ahead while a handler
/// runs, splitting the next head): that request's span gets no parent.
pub const CNT_TLS_CLAIM_DROPPED: u32 = 45;
/// TLS calls whose socket was known (bound by their own syscall or an earlier one) but closed
/// by the time they returned (another thread or goroutine closed the connection, and the fd
/// number names another socket, or the call made no syscall of its own): the connection and
/// its spans have ended, so nothing of the call is sent.
pub const CNT_TLS_AFTER_CLOSE: u32 = 46;
/// TLS writes whose syscalls sent bytes but whose return was never reached: the thread was
/// ended (its process exited) in between, before the call's plaintext went out. A short-lived
/// client preempted there loses its request this way, and its span with it.
pub const CNT_TLS_WRITES_CUT_BY_EXIT: u32 = 47;
/// Size of the kernel's counter array: room for counters yet to come without a layout change.
pub const NUM_COUNTERS: u32 = 48;
const _: () = assert!(COUNTER_NAMES.len() <= NUM_COUNTERS as usize);
pub const COUNTER_NAMES: [&str; 48] = [
    "kernel_ringbuf_full_events",
    "kernel_inflight_syscall_map_full",
    "kernel_close_ringbuf_full_events",
    "kernel_payload_read_faults",
    "kernel_payload_truncated",
    "kernel_conn_map_full",
    "kernel_traceparent_inserted",
    "kernel_traceparent_rewritten",
    "kernel_traceparent_replaced",
    "kernel_traceparent_skipped_split_head",
    "kernel_traceparent_failed",
    "kernel_sockhash_full",
    "kernel_server_head_split",
    "kernel_sockets_released_large_send",
    "kernel_stitch_marked",
    "kernel_stitch_claimed",
    "kernel_stitch_map_full",
    "kernel_scratch_busy",
    "kernel_pid_exited",
    "kernel_state_map_full",
    "kernel_tcpopt_written",
    "kernel_tcpopt_no_room",
    "kernel_tcpopt_received",
    "kernel_tcpopt_claimed",
    "kernel_lru_evicted_conns",
    "kernel_lru_evicted_stitch",
    "kernel_lru_evicted_server_reqs",
    "kernel_lru_evicted_thread_reqs",
    "kernel_lru_evicted_connect_refs",
    "kernel_lru_evicted_body_left",
    "kernel_lru_evicted_large_sends",
    "kernel_lru_evicted_connecting",
    "kernel_conns_not_http",
    "kernel_link_ambiguous",
    "kernel_link_runtime",
    "kernel_link_unclassified",
    "kernel_link_task",
    "kernel_lru_evicted_go_req_owner",
    "kernel_lru_evicted_go_writing",
    "kernel_exec_ringbuf_full_events",
    "kernel_h2_walk_incomplete",
    "kernel_h2_chunks_full",
    "kernel_link_task_unbound",
    "kernel_tls_unbound",
    "kernel_go_tls_unknown_conn",
    "kernel_tls_claims_dropped",
    "kernel_tls_after_close",
    "kernel_tls_writes_cut_by_exit",
];
/// An `exec` whose event did not fit in the ring buffer (the process is still classified by the
/// next periodic sweep).
pub const CNT_EXEC_RINGBUF_FULL: u32 = 39;
/// An HTTP/2 syscall with more frames than the walk's steps: the rest was passed over (the
/// frame boundaries there are unknown; userspace realigns).
pub const CNT_H2_WALK_INCOMPLETE: u32 = 40;
/// An HTTP/2 syscall whose kept frame bytes did not all fit in one event: the rest was passed
/// over (a header block lost: userspace resynchronises its table).
pub const CNT_H2_CHUNKS_FULL: u32 = 41;
const _: () = assert!((lru_evicted_counter(LRU_MAPS - 1) as usize) < COUNTER_NAMES.len());
const _: () = assert!(lru_evicted_counter(LRU_MAPS - 1) < CNT_EXEC_RINGBUF_FULL);

/// Addresses of one TCP connection, seen from the traced process. IPv4 addresses occupy the
/// first four bytes of the 16-byte fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnTuple {
    pub local_addr: [u8; 16],
    pub peer_addr: [u8; 16],
    pub local_port: u16,
    pub peer_port: u16,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<ConnTuple>() == 40);

/// Header of an `EVENT_DATA` ring item; `captured` payload bytes follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DataHeader {
    pub kind: u32,
    pub direction: u32,
    /// Thread group id (the process id users see).
    pub pid: u32,
    pub tid: u32,
    pub fd: u32,
    /// Payload bytes that follow the header (a prefix of what the syscall moved).
    pub captured: u32,
    /// Kernel `struct sock` address: identity of the connection while it lives.
    pub sk: u64,
    /// Bytes the syscall moved.
    pub len: u64,
    /// `bpf_ktime_get_boot_ns` at syscall entry and exit.
    pub ts_enter: u64,
    pub ts_exit: u64,
    pub role: u32,
    /// `LAYOUT_PREFIX`: the payload is the syscall's first `captured` bytes. `LAYOUT_H2_CHUNKS`:
    /// records `[u32 data][u32 gap][data bytes]`, each `data` bytes of the stream followed by
    /// `gap` bytes the kernel passed over, in order, covering the whole syscall.
    pub layout: u32,
    pub tuple: ConnTuple,
    /// The task's `comm`: names the process when it has exited before userspace looks at /proc.
    pub comm: [u8; 16],
    /// Trace context the kernel decided for a request that starts in this event.
    pub wire: WireCtx,
    /// Events of this process the kernel failed to send before this one (`LOSSES`): nonzero
    /// says some of what it did was not seen.
    pub lost: u64,
}
pub const LAYOUT_PREFIX: u32 = 0;
pub const LAYOUT_H2_CHUNKS: u32 = 1;
/// No payload: `len` bytes moved in this direction that no probe saw (a Go TLS read that began
/// before its probes were attached), sent when the connection is next read.
pub const LAYOUT_LOST: u32 = 2;
/// Bytes of a chunk record's header (`LAYOUT_H2_CHUNKS`).
pub const H2_CHUNK_HEADER: usize = 8;
pub const DATA_HEADER_SIZE: usize = core::mem::size_of::<DataHeader>();
const _: () = assert!(DATA_HEADER_SIZE == 168);

/// What the kernel did with the trace context of a request that starts in a data event.
pub const WIRE_NONE: u8 = 0;
/// Incoming request: the server span's context (`span_id` = server span, `parent_id` = the
/// incoming `traceparent`'s parent id, zero when there was none).
pub const WIRE_SERVER: u8 = 1;
/// Outgoing request: a `traceparent` with `trace_id`/`span_id` (the client span) was inserted.
pub const WIRE_INSERTED: u8 = 2;
/// Outgoing request: the request's own `traceparent` had its parent id rewritten to `span_id`.
pub const WIRE_REWRITTEN: u8 = 3;
/// Outgoing request: the request's invalid `traceparent` value was replaced.
pub const WIRE_REPLACED: u8 = 4;
/// Outgoing request, not modified: only the in-process link is known (`span_id` zero).
pub const WIRE_LINKED: u8 = 5;
/// Outgoing request without a valid `traceparent` of its own: the client span's context
/// (`span_id`, `parent_id` = the in-process owner) was recorded out of band for the receiver
/// (same-host stitching); no byte on the wire changed.
pub const WIRE_CARRIED: u8 = 6;
/// Outgoing request with a valid `traceparent` of its own (the program propagates, or a proxy
/// forwards): the client span keeps its trace id, and was recorded out of band like `WIRE_CARRIED`.
pub const WIRE_CARRIED_FWD: u8 = 7;

/// How trace context travels between processes (global `INJECT_MODE`).
/// Nothing: spans link inside each process, and across services that propagate it themselves.
pub const INJECT_OFF: u32 = 0;
/// Same-host stitching: the kernel records each outgoing request's context by connection and
/// TCP sequence number, and the receiving side on this host claims it. No byte changes.
pub const INJECT_STITCH: u32 = 1;
/// Stitching, plus a `traceparent` header written into outgoing HTTP/1.x requests of selected
/// processes by `sk_msg` (opt-in: the socket map path is not safe for every program).
pub const INJECT_HEADER: u32 = 2;
/// Stitching, plus the context in an experimental TCP option (RFC 6994, kind 254) on the first
/// segment of each request a selected process sends to another host, for the agent there.
pub const INJECT_TCPOPT: u32 = 3;

/// The TCP option: kind, length (all that timestamps leave of the 40 option bytes), and the
/// 16-bit experiment ids that tell a sampled context from an unsampled one.
pub const TCPOPT_KIND: u8 = 254;
pub const TCPOPT_LEN: usize = 28;
pub const TCPOPT_EXID_SAMPLED: u16 = 0xbe01;
pub const TCPOPT_EXID_UNSAMPLED: u16 = 0xbe00;
/// `WireCtx::via` of a stitching record that arrived in a TCP option.
pub const WIRE_VIA_TCPOPT: u8 = 1;

/// Key of the same-host stitching map: one request start, by its connection seen from the client
/// side (IPv4 and v4-mapped addresses both in the first four bytes) and the TCP sequence number
/// of the request's first byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowSeq {
    pub client_addr: [u8; 16],
    pub server_addr: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub seq: u32,
}
const _: () = assert!(core::mem::size_of::<FlowSeq>() == 40);

/// Trace context attached to a data event by the kernel. For outgoing requests, `parent_id` is
/// the server span the process was handling when it sent the request (zero: none).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireCtx {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_id: [u8; 8],
    pub kind: u8,
    /// W3C trace flags as decided (bit 0: sampled).
    pub flags: u8,
    /// `WIRE_VIA_TCPOPT` for a stitching record that arrived in a TCP option.
    pub via: u8,
    /// `LINK_*`: how an outgoing request's in-process owner was decided.
    pub link: u8,
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<WireCtx>() == 40);

/// `WireCtx::link` of an outgoing request: no request was open on the sending thread.
pub const LINK_NONE: u8 = 0;
/// Exactly one request was open on the sending thread (or on the thread that connected): it
/// is the owner.
pub const LINK_THREAD: u8 = 1;
/// Several requests were open on the sending thread (an event loop): no owner is guessed.
pub const LINK_AMBIGUOUS: u8 = 2;
/// The process's runtime moves work between threads (`RUNTIME_TASKS`): no owner is taken from
/// the thread.
pub const LINK_RUNTIME: u8 = 3;
/// The process's runtime is not known yet (`RUNTIME_PENDING` or absent): no owner is taken.
pub const LINK_UNCLASSIFIED: u8 = 4;
/// The runtime's own task identity names the owner (uprobes): the Go goroutine that read the
/// request called `http.Transport.roundTrip` for the request being written, or the Python
/// asyncio task sending it was created or woken for that request.
pub const LINK_TASK: u8 = 5;
/// HTTP/2 (userspace): the one request its process had open when the call's HEADERS were
/// written is the owner (`agent/src/trace_context/h2_owner.rs`).
pub const LINK_PROCESS: u8 = 6;

/// Whether a kernel counter means a data or close event was not sent (or not whole): each
/// such count also moves the process's loss count, which its later events carry
/// (`DataHeader::lost`).
pub const fn loses_events(index: u32) -> bool {
    matches!(
        index,
        CNT_RINGBUF_FULL
            | CNT_ACTIVE_IO_FULL
            | CNT_CLOSE_RINGBUF_FULL
            | CNT_READ_FAULT
            | CNT_SCRATCH_BUSY
            | CNT_H2_WALK_INCOMPLETE
            | CNT_H2_CHUNKS_FULL
    )
}

/// `PROC_RUNTIME` values: what a thread is evidence of in that process.
/// Not classified yet (set by the kernel at `exec`; userspace classifies it).
pub const RUNTIME_PENDING: u8 = 0;
/// A thread runs one request's work at a time while it has one open (threaded servers, and
/// single-threaded event loops: Node, Python asyncio, nginx): the thread rule applies.
pub const RUNTIME_THREADS: u8 = 1;
/// Tasks migrate between threads and hand I/O to other tasks (Go's goroutines, tokio's
/// multi-thread scheduler, .NET's thread pool, Erlang): the thread says nothing.
pub const RUNTIME_TASKS: u8 = 2;
/// Go: tasks as above, and the current goroutine is in `r14` (Go's register ABI on x86_64, Go
/// 1.17 and later), so uprobes on `net/http` can tell which goroutine works for which request.
pub const RUNTIME_GO: u8 = 3;
/// tokio: tasks as above; where its binary keeps its symbols, uprobes on its task polls and
/// its channels tell which task works for which request (`propagate::tokio`).
pub const RUNTIME_TOKIO: u8 = 4;

/// tokio (`propagate::tokio`): the functions probed, by demangled path (every instance of
/// these generic functions): `raw::poll(header)` runs one poll of a task (entry and return),
/// `list::Tx<T>::push(&self, value)` sends on an mpsc channel, `list::Rx<T>::pop(&mut self,
/// tx)` receives from one, `OwnedTasks<S>::bind_inner(&self, task, notified)` binds a task
/// just spawned (present in tokio 1.54, tested; a build without it is followed without spawns).
pub const TOKIO_POLL_PATH: &str = "tokio::runtime::task::raw::poll";
pub const TOKIO_PUSH_PATH: &str = "tokio::sync::mpsc::list::Tx<T>::push";
pub const TOKIO_POP_PATH: &str = "tokio::sync::mpsc::list::Rx<T>::pop";
pub const TOKIO_SPAWN_PATH: &str = "tokio::runtime::task::list::OwnedTasks<S>::bind_inner";
pub const TOKIO_POLL_PROGRAM: &str = "tokio_poll";
pub const TOKIO_POLL_RET_PROGRAM: &str = "tokio_poll_ret";
pub const TOKIO_PUSH_PROGRAM: &str = "tokio_chan_push";
pub const TOKIO_POP_PROGRAM: &str = "tokio_chan_pop";
pub const TOKIO_SPAWN_PROGRAM: &str = "tokio_spawn";
/// Kernel maps: the task each thread polls (pid_tgid -> task header), and the request the
/// messages waiting in each channel were sent for (`TaskKey` of the channel -> `ChanNote`).
pub const MAP_TOKIO_POLLING: &str = "TOKIO_POLLING";
pub const MAP_TOKIO_CHANS: &str = "TOKIO_CHANS";

/// The messages waiting in one tokio channel: how many, and the request their senders worked
/// for (`at.sk` 0 when none, or when they worked for different ones).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ChanNote {
    pub at: ReqRef,
    pub waiting: u64,
}

/// A task (a Go goroutine's `g`, a Python asyncio task object) or a runtime object (`ptr` = its
/// address) in process `tgid`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TaskKey {
    pub ptr: u64,
    pub tgid: u32,
    pub _pad: u32,
}

/// A server request (`at`) a task or an outgoing request works for, noted at `ts` (boot-time
/// ns).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TaskRef {
    pub at: ReqRef,
    pub ts: u64,
}

/// The Go functions the agent probes, by symbol: `(*Transport).roundTrip(t, req)` runs in the
/// goroutine of the caller; `(*Request).write(r, ...)` in the connection's writer goroutine.
pub const GO_ROUNDTRIP_SYMBOL: &str = "net/http.(*Transport).roundTrip";
pub const GO_REQUEST_WRITE_SYMBOL: &str = "net/http.(*Request).write";
/// Their kernel programs.
pub const GO_ROUNDTRIP_PROGRAM: &str = "go_transport_roundtrip";
pub const GO_REQUEST_WRITE_PROGRAM: &str = "go_request_write";
/// `runtime.newproc1(fn, callergp, ...) *g` creates every goroutine (`go f()`): probed at its
/// entry (`rbx` = the spawning goroutine) and at each of its return instructions (`rax` = the
/// new one), never with a uretprobe (see `propagate::goroutine`).
pub const GO_NEWPROC_SYMBOL: &str = "runtime.newproc1";
pub const GO_NEWPROC_PROGRAM: &str = "go_newproc1";
pub const GO_NEWPROC_RET_PROGRAM: &str = "go_newproc1_ret";
/// Kernel map of the spawns in progress (pid_tgid -> spawning goroutine).
pub const MAP_GO_SPAWNING: &str = "GO_SPAWNING";

/// Go `crypto/tls` (`agent-ebpf/src/gotls.rs`): the methods probed, found by name in the
/// symbol table or, in a stripped binary, the `.gopclntab`.
pub const GO_TLS_READ_SYMBOL: &str = "crypto/tls.(*Conn).Read";
pub const GO_TLS_WRITE_SYMBOL: &str = "crypto/tls.(*Conn).Write";
pub const GO_TLS_CLOSE_SYMBOL: &str = "crypto/tls.(*Conn).Close";
pub const GO_TLS_READ_PROGRAM: &str = "go_tls_read";
pub const GO_TLS_WRITE_PROGRAM: &str = "go_tls_write";
/// Attached at each return instruction of `Read` and of `Write` (never a uretprobe in Go).
pub const GO_TLS_READ_RET_PROGRAM: &str = "go_tls_read_ret";
pub const GO_TLS_WRITE_RET_PROGRAM: &str = "go_tls_write_ret";
pub const GO_TLS_CLOSE_PROGRAM: &str = "go_tls_close";
/// The handshake (run by `net/http` before any read, or by the first `Read`/`Write`): its
/// syscalls bind as an OpenSSL handshake's do.
pub const GO_TLS_HANDSHAKE_SYMBOL: &str = "crypto/tls.(*Conn).handshakeContext";
pub const GO_TLS_HANDSHAKE_PROGRAM: &str = "go_tls_handshake";
pub const GO_TLS_HANDSHAKE_RET_PROGRAM: &str = "go_tls_handshake_ret";
/// Go `crypto/tls` calls in flight, by `TaskKey { ptr: g, tgid }`.
pub const MAP_GO_TLS_CALLS: &str = "GO_TLS_CALLS";
/// Bytes returned by Go `crypto/tls` reads that began before the probes, by goroutine, until
/// its next read names the connection (`LAYOUT_LOST`).
pub const MAP_GO_TLS_LOST: &str = "GO_TLS_LOST";
/// Where a `*tls.Conn`'s socket is, for Go 1.17 to 1.23 on x86-64 (checked against Go 1.19's
/// sources, and against the later ones' `internal/poll.FD`, whose `SysFile` replaced `iovecs`
/// at the same size): `tls.Conn.conn` (a `net.Conn` interface) is the first field, its data
/// word at 8 points to a `net.TCPConn`, whose first word is its `*netFD`; `netFD.pfd` is a
/// `poll.FD` with `Sysfd` at 16, followed by `family` at 56 and `sotype` at 64.
pub const GO_TLS_CONN_DATA: u64 = 8;
pub const GO_NETFD_SYSFD: u64 = 16;
pub const GO_NETFD_FAMILY: u64 = 56;

/// Python asyncio (`propagate::asyncio`): what one thread of an event loop is running, by
/// pid_tgid (kernel map `PY_THREADS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PyThread {
    /// The task whose step runs now (its `TaskObj` address), 0 in a plain callback.
    pub task: u64,
    /// The request that task works for (as its step began), `sk` 0 for none.
    pub at: ReqRef,
    /// `ThreadReqs::next` of the thread when the running callback began: a request read since
    /// then was read by this callback.
    pub start: u32,
    /// `Context.run` calls in progress (a callback may run another inside it).
    pub depth: u32,
}
/// The CPython functions the agent probes, by symbol (CPython 3.9 to 3.11): `Context.run` in the
/// interpreter (`context_run`, entry and return) runs every event-loop callback;
/// `enter_task(loop, task)` in `_asyncio` starts each step of a task; `Task.__init__` creates one;
/// `Future.set_result` wakes the task that awaits the future. `TaskWakeupDef` is the method
/// definition of a task's wake-up callback.
pub const PY_CONTEXT_RUN_SYMBOL: &str = "context_run";
pub const PY_ENTER_TASK_SYMBOL: &str = "enter_task";
pub const PY_TASK_INIT_SYMBOL: &str = "_asyncio_Task___init__";
pub const PY_SET_RESULT_SYMBOL: &str = "_asyncio_Future_set_result";
pub const PY_TASK_WAKEUP_DEF_SYMBOL: &str = "TaskWakeupDef";
/// Their kernel programs.
pub const PY_CONTEXT_RUN_PROGRAM: &str = "py_context_run";
pub const PY_CONTEXT_RUN_RET_PROGRAM: &str = "py_context_run_ret";
pub const PY_ENTER_TASK_PROGRAM: &str = "py_enter_task";
pub const PY_TASK_INIT_PROGRAM: &str = "py_task_init";
pub const PY_SET_RESULT_PROGRAM: &str = "py_future_set_result";
/// Kernel maps: threads (pid_tgid -> `PyThread`) and the request each task works for
/// (`TaskKey` -> `TaskRef`).
pub const MAP_PY_THREADS: &str = "PY_THREADS";
pub const MAP_PY_TASKS: &str = "PY_TASKS";

/// An incoming request a server connection is handling (kernel map `SERVER_REQS`, keyed by the
/// server socket). `live` drops to 0 when the response starts. `pipelined`: it arrived while the
/// connection's previous request was still open, so a read of it may also have carried that
/// one's bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerReq {
    /// `bpf_ktime_get_ns` when the request arrived: identifies it among the connection's requests.
    pub seq: u64,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
    pub live: u8,
    pub pipelined: u8,
    pub _pad: u8,
    /// The thread that read it (whose `ThreadReqs::live` counts it while `live`).
    pub tid: u32,
}
const _: () = assert!(core::mem::size_of::<ServerReq>() == 40);

/// A reference to one request of one server connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReqRef {
    pub sk: u64,
    pub seq: u64,
}

/// Requests recently read by one thread (kernel map `THREAD_REQS`, keyed by tid); the newest
/// still-live one is the request an outgoing call belongs to.
pub const THREAD_SLOTS: usize = 4;
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadReqs {
    pub refs: [ReqRef; THREAD_SLOTS],
    pub next: u32,
    pub _pad: u32,
    /// Requests this thread read that have not started their response: never fewer than the
    /// real number (a lost close leaves it high, which makes the thread ambiguous, never wrong).
    /// 64 bits: BPF has no 32-bit atomics.
    pub live: u64,
}
const _: () = assert!(core::mem::size_of::<ThreadReqs>() == 80);

/// Sampling settings as kernel globals: the decision for a new trace is
/// `(low 8 bytes of the trace id, big endian) >> 1 < SAMPLE_THRESHOLD`.
pub const SAMPLE_ALWAYS: u64 = 1 << 63;

/// An `EVENT_CLOSE` ring item: a tracked socket fd was closed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CloseEvent {
    pub kind: u32,
    pub pid: u32,
    pub fd: u32,
    pub _pad: u32,
    pub sk: u64,
    pub ts: u64,
}
const _: () = assert!(core::mem::size_of::<CloseEvent>() == 32);

/// Kernel per-connection state, keyed by `(pid << 32) | fd`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnInfo {
    /// 0 until the first data syscall names the socket.
    pub sk: u64,
    pub role: u32,
    /// 1: traced, 2: ignored (not TCP, filtered out, or the OTLP endpoint).
    pub verdict: u32,
    pub tuple: ConnTuple,
    /// 1 while a connection seen from its start (accept or connect) waits for the client's
    /// first bytes, which decide whether it is HTTP at all (`head_scan::opening`).
    pub opening: u32,
    /// `PROTO_H2` once the client's preface showed HTTP/2: the kernel then walks its frames
    /// (`agent-ebpf/src/h2walk.rs`) instead of copying a prefix of each syscall.
    pub proto: u32,
    /// Where each direction (`DIR_*`) stands in its frame stream between syscalls.
    pub h2: [H2Walk; 2],
    /// Per direction (`DIR_*`): 1 while a TLS call whose own syscall moved bytes on this
    /// socket has not returned (`tls::bind`); its plaintext is still to be sent.
    pub tls_busy: [u32; 2],
    /// When the socket was closed (0: open) while a TLS call was busy on it: the close is told
    /// to userspace once the last such call has sent its plaintext (`tls::settle`), so a gRPC
    /// server's last write, whose return runs after another goroutine closed the connection,
    /// still ends its stream. A later close of the fd number, or its reuse, closes it at once.
    pub closing: u64,
}
pub const PROTO_HTTP1: u32 = 0;
pub const PROTO_H2: u32 = 1;

/// One direction of an HTTP/2 connection between two syscalls: bytes of the current frame
/// still to come that are kept (`keep`: a whole HEADERS, CONTINUATION, SETTINGS, RST_STREAM,
/// GOAWAY or PUSH_PROMISE payload, or the first 5 bytes of a DATA payload, a gRPC message
/// prefix) and then passed over (`skip`), or the `have` bytes of a frame header cut in two.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct H2Walk {
    pub keep: u32,
    pub skip: u32,
    pub have: u32,
    pub _pad: u32,
    pub hdr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<H2Walk>() == 32);
/// The client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`), kept whole.
pub const H2_PREFACE_LEN: u32 = 24;
/// Steps of the kernel's frame walk per syscall (a frame takes up to three: header, kept
/// payload, passed-over payload, and a step more per 16 iovecs passed over); what is left
/// beyond them is passed over and counted. Enough for a 16 MiB read of 4 KiB DATA frames.
pub const H2_WALK_STEPS: u32 = 1 << 15;
/// The tail-called walkers, by direction (`DIR_INGRESS`, `DIR_EGRESS`), and their array.
pub const H2_WALK_PROGRAMS: [&str; 2] = ["h2_walk_ingress", "h2_walk_egress"];
pub const MAP_H2_WALK: &str = "H2_WALK";
/// The walkers of HTTP/2 over TLS, by direction, tail-called by the OpenSSL return probes.
pub const TLS_H2_WALK_PROGRAMS: [&str; 2] = ["h2_walk_tls_ingress", "h2_walk_tls_egress"];
pub const MAP_TLS_H2_WALK: &str = "TLS_H2_WALK";
pub const VERDICT_UNKNOWN: u32 = 0;
pub const VERDICT_TRACE: u32 = 1;
pub const VERDICT_IGNORE: u32 = 2;
/// A traced connection that an OpenSSL call was seen to use (`agent-ebpf/src/tls.rs`): its
/// ciphertext is never copied; its plaintext comes from the library's calls.
pub const VERDICT_TLS: u32 = 3;
const _: () = assert!(core::mem::size_of::<ConnInfo>() == 144);

/// Key of the excluded-endpoint map: an address and port whose traffic is never traced, on
/// either side of a connection (the OTLP backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 24);

/// Key for excluding a port on any address (a wildcard endpoint such as `0.0.0.0:4317`).
pub const ANY_ADDR: [u8; 16] = [0xff; 16];

/// How a data syscall names its buffer.
pub const BUF_PLAIN: u32 = 0;
pub const BUF_IOVEC: u32 = 1;

/// Arguments of a data syscall in flight (kernel map `ACTIVE_IO`, keyed by pid_tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IoArgs {
    /// Buffer address, or iovec array address for `BUF_IOVEC`.
    pub buf: u64,
    /// Buffer size, or iovec count for `BUF_IOVEC`.
    pub count: u64,
    pub ts_enter: u64,
    /// Socket seen by `sock:sock_{send,recv}_length` during this syscall (0: not a socket).
    pub sk: u64,
    pub fd: u32,
    pub buf_kind: u32,
    pub direction: u32,
    pub verdict: u32,
    /// Set when the context of an outgoing request in this syscall was decided (by `sk_msg` in
    /// header mode, or when the send started).
    pub wire: WireCtx,
    /// TCP sequence number of the first byte this syscall moved (valid when `IO_SEQ` is set).
    pub seq: u32,
    /// `IO_*` bits.
    pub state: u32,
    /// Go processes: the goroutine (`g`, from `r14`) that made this read on a traced socket
    /// (0: not Go, or not known).
    pub g: u64,
}
const _: () = assert!(core::mem::size_of::<IoArgs>() == 104);
/// `IoArgs::seq` is known.
pub const IO_SEQ: u32 = 1;
/// The start of this send was already looked at.
pub const IO_SEND_SEEN: u32 = 2;

/// An OpenSSL read or write in flight on a thread, from its entry to its return
/// (`agent-ebpf/src/tls.rs`), keyed by pid_tgid.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TlsCall {
    /// The `SSL *`.
    pub ssl: u64,
    /// The caller's plaintext buffer.
    pub buf: u64,
    /// `SSL_read_ex`/`SSL_write_ex`: where the byte count goes (0 for the plain calls).
    pub out: u64,
    pub ts_enter: u64,
    /// The socket a syscall during this call used (`TLS_NO_FD` until one does).
    pub fd: u32,
    /// `DIR_INGRESS` (read) or `DIR_EGRESS` (write).
    pub dir: u32,
    /// The plaintext's size (`num`).
    pub len: u64,
    /// `TLS_*` bits.
    pub state: u32,
    pub _pad: u32,
    /// A write starting a request head: its client span's context, decided when its first
    /// record was sent and recorded for same-host stitching.
    pub wire: WireCtx,
    /// When the call's last syscall on its socket moved bytes (0: none did): a write's bytes
    /// were sent then, however late its return probe runs after a preemption.
    pub ts_io: u64,
    /// Go `crypto/tls`: the goroutine making the call (0 for OpenSSL). Its socket (`fd`) is
    /// known from the `tls.Conn` at entry; a syscall binds only if made by this goroutine on
    /// that socket (`tls::call_on`).
    pub g: u64,
    /// Go: bytes that a read of this goroutine begun before the probes returned, unseen; told
    /// to userspace (`LAYOUT_LOST`) before this call's own bytes, once the call is bound.
    pub lost: u64,
    /// When the last of those reads returned.
    pub lost_ts: u64,
    /// `TLS_BUSY`: the socket whose connection waits for this call (`ConnInfo::tls_busy`).
    pub sk: u64,
}
const _: () = assert!(core::mem::size_of::<TlsCall>() == 136);
pub const TLS_NO_FD: u32 = u32::MAX;
/// The call's first send was looked at.
pub const TLS_SENT: u32 = 2;
/// A syscall of the call on its socket bound it (`tls::bind`): its `fd` is proven, even if the
/// `SSL *`'s binding goes (`SSL_free`, `(*Conn).Close` on another thread) before it returns.
pub const TLS_BOUND: u32 = 4;
/// The call's syscall moved bytes on a traced TLS connection (`TlsCall::sk`), marked busy there
/// (`ConnInfo::tls_busy`) until the call returns.
pub const TLS_BUSY: u32 = 8;
/// `TlsCall::dir` of `SSL_do_handshake`: it moves no plaintext, but its syscalls bind.
pub const DIR_HANDSHAKE: u32 = 2;

/// What the kernel knows of one `SSL *` (`TLS_SOCKS`, by `TaskKey { ptr: ssl, tgid }`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TlsSock {
    /// The socket fd it was last seen to use.
    pub fd: u32,
    /// 1 when `claim` holds the context of the request whose first record the last read
    /// brought in (same-host stitching), for the next request head the SSL returns.
    pub claimed: u32,
    pub claim: WireCtx,
}
pub const MAP_TLS_CALLS: &str = "TLS_CALLS";
/// `SSL *` to socket fd, keyed by `TaskKey { ptr: ssl, tgid }`.
pub const MAP_TLS_SOCKS: &str = "TLS_SOCKS";
/// The OpenSSL entry points probed, by symbol, with their kernel programs (entry, return).
pub const TLS_PROBES: [(&str, &str, Option<&str>); 7] = [
    ("SSL_read", "ssl_read", Some("ssl_ret")),
    ("SSL_write", "ssl_write", Some("ssl_ret")),
    ("SSL_read_ex", "ssl_read_ex", Some("ssl_ex_ret")),
    ("SSL_write_ex", "ssl_write_ex", Some("ssl_ex_ret")),
    (
        "SSL_do_handshake",
        "ssl_do_handshake",
        Some("ssl_handshake_ret"),
    ),
    ("SSL_set_fd", "ssl_set_fd", None),
    ("SSL_free", "ssl_free", None),
];

pub const MAP_ACTIVE_IO: &str = "ACTIVE_IO";
pub const MAP_ACTIVE_CONNECT: &str = "ACTIVE_CONNECT";

/// The bench's floor programs (`agent-ebpf/src/floor.rs`): a tracepoint program attached to
/// every tracepoint the agent uses, and a raw tracepoint program where its stitching one is.
pub const FLOOR_PROGRAMS: [&str; 2] = ["floor_tracepoint", "floor_raw_tracepoint"];
