//! The agent's own counters: every drop, retry and parse problem is counted here and exposed in
//! Prometheus text format (`--metrics-addr`), and summarised in the log.
use std::sync::Arc;

use prometheus_client::{metrics::counter::Counter, registry::Registry};

/// One counter per kernel counter name (an array longer than 32 has no derived `Default`).
#[derive(Clone)]
pub struct KernelCounters([Counter; agent_common::COUNTER_NAMES.len()]);

impl Default for KernelCounters {
    fn default() -> Self {
        KernelCounters(std::array::from_fn(|_| Counter::default()))
    }
}

impl std::ops::Deref for KernelCounters {
    type Target = [Counter];
    fn deref(&self) -> &[Counter] {
        &self.0
    }
}

macro_rules! counters {
    ($($field:ident: $help:literal,)*) => {
        #[derive(Default, Clone)]
        pub struct Metrics {
            $(pub $field: Counter,)*
            pub kernel: KernelCounters,
        }

        impl Metrics {
            pub fn registry(&self) -> Registry {
                let mut r = Registry::with_prefix("agent");
                $(r.register(stringify!($field), $help, self.$field.clone());)*
                for (name, c) in agent_common::COUNTER_NAMES.iter().zip(self.kernel.iter()) {
                    r.register(*name, "kernel-side count (see agent-common CNT_*)", c.clone());
                }
                r
            }

            /// `(name, value)` of every counter, for logs and tests.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                let mut v = vec![$((stringify!($field), self.$field.get()),)*];
                v.extend(agent_common::COUNTER_NAMES.iter().zip(self.kernel.iter()).map(|(n, c)| (*n, c.get())));
                v
            }
        }
    };
}

counters! {
    ring_events: "kernel events read from the ring buffer",
    ring_decode_errors: "ring items that could not be decoded",
    events_channel_full: "kernel events dropped: tracker channel full",
    events_bytes_full: "kernel events dropped: the tracker channel's byte budget was spent",
    tracker_conns_full: "kernel events dropped: connection table full",
    conns_evicted_idle: "connections forgotten after being idle",
    http_skipped_bytes: "bytes skipped because a stream could not be followed",
    http_orphan_responses: "responses without a request (stream started mid-exchange)",
    http_pending_at_exit: "HTTP/1 requests still waiting for their response when the agent stopped (no span)",
    http_responses_unseen: "requests given no span because bytes that may hold their response were never seen (a Go TLS read begun before its probes were attached)",
    http_unanswered_requests: "requests whose connection ended before a response",
    http_pending_overflow: "pipelined requests dropped: too many waiting",
    http_head_budget_drops: "incomplete heads given up: all connections' head bytes reached the budget",
    spans_created: "spans built",
    spans_unsampled: "spans not recorded because their trace is not sampled",
    spans_queue_full: "spans dropped: export queue full",
    spans_queue_bytes_full: "spans dropped: the export queue's byte budget was spent",
    spans_exported: "spans accepted by the backend (or printed)",
    spans_discarded: "spans built and discarded on purpose (OTEL_TRACES_EXPORTER=none)",
    spans_export_failed: "spans dropped after export retries ran out",
    spans_rejected: "spans the backend reported as rejected (partial success)",
    export_retries: "export attempts retried",
    task_notes_map_full: "sweeps that found the kernel's goroutine and tokio task-note map full (its oldest notes were evicted: those calls get no parent)",
    runtime_exec_queue_full: "exec events the runtime classifier had no room for (the process is classified by the next sweep instead)",
    events_before_attach: "data events of syscalls that began while the agent was still attaching its kernel programs (ignored: one direction of their exchange may be missing)",
    runtime_follow_queue_full: "Go, Python, tokio and OpenSSL processes found while the agent's control loop had no room for them (their tasks or TLS calls are not followed)",
    go_not_followed: "Go processes (or, in whole-host mode, executables) that cannot be probed (unreadable, no symbols the agent needs, a failed attach, or the process limit): their calls get no in-process parent and their TLS connections no spans",
    tokio_not_followed: "tokio processes whose tasks cannot be followed (a stripped or inlined build, a failed attach, or the process limit): their calls get no parent",
    tls_not_followed: "Processes holding OpenSSL whose TLS calls cannot be probed (a failed attach, or the process limit): their encrypted traffic gives no spans",
    python_not_followed: "Python processes whose asyncio tasks cannot be followed (a stripped or unsupported interpreter, a failed attach, or the process limit): their calls keep the thread rule",
    py_task_notes_map_full: "sweeps that found the kernel's asyncio task map full (its oldest notes were evicted: those tasks' calls get no parent)",
    runtime_map_full: "attempts to record a process's runtime that found the kernel map full (retried every sweep; until then its calls get no in-thread parent)",
    export_requests_split: "batches sent as several requests (over the size limit, or refused as too large)",
    http2_connections: "connections recognised as HTTP/2 (by the client preface, or in their middle by whole valid frames)",
    http2_unresolved_fields: "HTTP/2 header fields that named table entries from before the agent saw the connection (left unknown)",
    http2_alignment_lost: "times an HTTP/2 direction lost its frame boundaries (bytes the kernel did not copy spanned one); it realigns on the next whole-frame read",
    http2_streams_dropped: "HTTP/2 streams dropped: too many open on one connection",
    http2_orphan_frames: "HTTP/2 response header blocks for streams whose request was not seen",
    http2_malformed_blocks: "HTTP/2 header blocks lost or malformed (the table resynchronises)",
    http2_ends_unseen: "HTTP/2 streams whose end may have gone unseen when their connection ended: no span",
    netns_records_evicted: "network namespaces of exec'd processes forgotten to stay within 65,536 (a client gone before its HTTP/2 connections were reached may then not be stitched on loopback)",
    http2_stitched_late: "HTTP/2 server streams on this host whose caller was seen only after they ended (a client preempted after its write), stitched after waiting for it",
    http2_wait_full: "HTTP/2 server streams on this host not held for their caller's late record (4,096 held already): they get no parent from it",
    http2_stitch_full: "HTTP/2 request streams opened while the same-host stitching table was full (65,536 open streams): their callee's span gets no parent from them",
    http2_owner_full: "server requests (HTTP/2 streams, HTTP/1 requests) read while the table of open requests was full (65,536): HTTP/2 calls their process makes meanwhile get no parent",
    http2_links_process: "HTTP/2 calls linked to the one request their process had open when they were written",
    http2_links_ambiguous: "HTTP/2 calls written while their process had several requests open, or may have had one unseen (a lost event, a connection picked up in its middle): no parent guessed",
    http2_links_unsettled: "HTTP/2 calls written while the one request their process served had no caller's record yet (a caller on this host whose write is not seen yet, or a caller the agent does not see): no parent, so that the request can still join its caller's trace",
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// Counters that stand for a lost span or event, where non-zero.
    pub fn losses(&self) -> Vec<(&'static str, u64)> {
        const LOSSES: [&str; 13] = [
            "events_channel_full",
            "events_bytes_full",
            "http_head_budget_drops",
            "tracker_conns_full",
            "spans_queue_full",
            "spans_queue_bytes_full",
            "spans_export_failed",
            "spans_rejected",
            "kernel_ringbuf_full_events",
            "kernel_inflight_syscall_map_full",
            "kernel_close_ringbuf_full_events",
            "kernel_conn_map_full",
            "http_pending_overflow",
        ];
        self.snapshot()
            .into_iter()
            .filter(|(n, v)| *v > 0 && LOSSES.contains(n))
            .collect()
    }
}
