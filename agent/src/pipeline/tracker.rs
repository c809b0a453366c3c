//! Connection tracker: routes each kernel event to its connection's parser, turns completed
//! exchanges into spans, and forgets connections on close or after they go idle.
use std::{sync::Arc, time::Duration};

use crate::fast::{HashMap, HashSet};

use agent_common::{DataHeader, WireCtx, DIR_INGRESS, ROLE_CLIENT, ROLE_SERVER, WIRE_SERVER};
use tokio::sync::mpsc;

use super::{
    budget::ByteBudget,
    discovery::Snapshot,
    event::{endpoints, Batch, Endpoints, KernelEvent},
};
use crate::{
    clock::Clock,
    process::{ProcessCache, Resource},
    protocol::{
        http1::{Exchange, HeadBudget, Http1Conn, Side},
        http2::{frame, Http2Conn, Opened},
        Dir, Segment,
    },
    sampling::Sampler,
    span::{build_span, limits::Limits, redact::UrlPolicy},
    telemetry::Metrics,
    trace_context::{
        h2_owner::{self, Open, Owner, Owners, Report},
        h2_stitch::{self, ConnKey, H2Stitch},
        h2_wait::H2Wait,
        link::{decide, random_span_id, server_ctx, Decision, Registry},
        TraceParent,
    },
};
use rand::Rng;

/// Connections followed at once; events of further connections are dropped and counted.
pub const MAX_CONNS: usize = 65_536;

/// Bytes of incomplete request/response heads held across all connections (each is also
/// capped at `MAX_HEAD`, 16 KiB).
pub const HEAD_BUDGET: usize = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ConnId {
    pid: u32,
    fd: u32,
    sk: u64,
}

struct Conn {
    http: Http1Conn,
    /// Set once the connection shows it speaks HTTP/2; then it alone parses.
    h2: Option<Box<Http2Conn>>,
    ends: Endpoints,
    resource: Arc<Resource>,
    /// The side the socket's origin says this process is on (accept/connect, or /proc).
    expected: Option<Side>,
    last_boot_ns: u64,
    /// The network namespace of the process (read once the connection shows HTTP/2, for
    /// same-host stitching on loopback).
    netns: Option<u64>,
    /// Picked up in its middle (open before the agent, or its first bytes were missed): a
    /// request may be open on it that was never seen.
    prior: bool,
    /// What it last told of the requests its process serves (`h2_owner`).
    reported: Report,
}

/// The records of an HTTP/2 event (`LAYOUT_H2_CHUNKS`): each a run of kept bytes and the
/// number of bytes passed over after it.
fn h2_chunks(mut p: &[u8]) -> impl Iterator<Item = (&[u8], u32)> {
    std::iter::from_fn(move || {
        let head = p.get(..agent_common::H2_CHUNK_HEADER)?;
        let data = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
        let gap = u32::from_le_bytes(head[4..8].try_into().ok()?);
        let rest = &p[agent_common::H2_CHUNK_HEADER..];
        let data = data.min(rest.len());
        let (d, r) = rest.split_at(data);
        p = r;
        Some((d, gap))
    })
}

impl Conn {
    /// What this connection tells of the requests its process serves, as the server.
    fn report(&self) -> Report {
        let side = self.h2.as_ref().and_then(|h| h.side()).or(self.expected);
        match (&self.h2, side) {
            (Some(h2), Some(Side::Server)) => Report {
                open: h2.open_streams() as u32,
                blind: self.prior || !h2.whole(),
            },
            (None, Some(Side::Server)) => Report {
                open: self.http.pending() as u32,
                blind: self.prior,
            },
            // Either side: what was missed may be a request open.
            (_, None) => Report {
                open: 0,
                blind: self.prior,
            },
            (_, Some(Side::Client)) => Report::default(),
        }
    }

    /// Tells `owners` what changed since the last report.
    fn report_to(&mut self, owners: &mut Owners, pid: u32) {
        let now = self.report();
        owners.adjust(pid, self.reported, now);
        self.reported = now;
    }

    /// This connection as both of its ends name it, this process being on `side`.
    fn stitch_key(&self, side: Side) -> Option<ConnKey> {
        ConnKey::new(
            side == Side::Client,
            (self.ends.local, self.ends.local_port),
            (self.ends.peer, self.ends.peer_port),
            self.netns,
        )
    }

    /// The connection ended: what is still open ends with it.
    fn close(&mut self, out: &mut Vec<Exchange>) {
        match &mut self.h2 {
            Some(h2) => h2.close(self.last_boot_ns, out),
            None => self.http.close(out),
        }
    }
}

pub struct Tracker {
    /// Boot-time ns from which every data program is attached.
    attached_ns: u64,
    conns: HashMap<ConnId, Conn>,
    processes: ProcessCache,
    preexisting: Snapshot,
    idle: Duration,
    exchanges: Vec<Exchange>,
    head_budget: Arc<HeadBudget>,
    /// Network namespaces of processes as they `exec`'d, for those gone before their
    /// connections are reached (bounded by `MAX_CONNS`; the oldest go first).
    netns: HashMap<u32, u64>,
    netns_order: std::collections::VecDeque<u32>,
    /// Connections an event of which was ignored as begun before the programs were attached
    /// (at most `MAX_CONNS`; beyond it, their process is taken to have lost events).
    early: HashSet<ConnId>,
    out: Output,
}

/// A completed server exchange held for its caller's record (`h2_wait`), with what its span
/// needs of its connection.
struct Held {
    ex: Exchange,
    pid: u32,
    ends: Endpoints,
    resource: Arc<Resource>,
}

/// What turning exchanges into spans needs, apart from the connections themselves.
struct Output {
    clock: Clock,
    metrics: Arc<Metrics>,
    spans: crate::export::SpanSender,
    sampler: Sampler,
    registry: Registry,
    h2_stitch: H2Stitch,
    /// Server streams on this host whose caller's record may still be on its way.
    h2_wait: H2Wait<Held>,
    /// The requests each process serves, for its HTTP/2 calls' parents.
    owners: Owners,
    urls: UrlPolicy,
    limits: Limits,
}

impl Tracker {
    pub fn new(
        metrics: Arc<Metrics>,
        spans: crate::export::SpanSender,
        preexisting: Snapshot,
        sampler: Sampler,
        (urls, limits): (UrlPolicy, Limits),
    ) -> Tracker {
        Tracker {
            attached_ns: 0,
            conns: HashMap::default(),
            processes: ProcessCache::new(),
            preexisting,
            idle: Duration::from_secs(60),
            exchanges: Vec::new(),
            head_budget: HeadBudget::new(HEAD_BUDGET),
            netns: HashMap::default(),
            netns_order: std::collections::VecDeque::new(),
            early: HashSet::default(),
            out: Output {
                clock: Clock::sample(),
                metrics,
                spans,
                sampler,
                registry: Registry::default(),
                h2_stitch: H2Stitch::default(),
                h2_wait: H2Wait::default(),
                owners: Owners::default(),
                urls,
                limits,
            },
        }
    }

    /// Ignores the data of syscalls that began before `boot_ns`, when the kernel programs were
    /// still being attached one after another: such a syscall may be seen in one direction and
    /// its answer not in the other (a request whose response was missed would shift every
    /// later pairing on a keep-alive connection: wrong durations and statuses, and the last
    /// exchanges never complete).
    pub fn attached_at(mut self, boot_ns: u64) -> Tracker {
        self.attached_ns = boot_ns;
        self
    }

    /// Consumes events until the channel closes, sweeping idle connections now and then; gives
    /// each batch's events and bytes back to the channel's budgets once handled.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<Batch>,
        budgets: (Arc<ByteBudget>, Arc<ByteBudget>),
    ) {
        let (items, bytes) = budgets;
        let mut sweep = tokio::time::interval(Duration::from_secs(5));
        let mut held = tokio::time::interval(Duration::from_millis(250));
        held.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                batch = events.recv() => match batch {
                    Some(batch) => {
                        let (k, mut n) = (batch.len(), 0);
                        for ev in batch {
                            n += ev.bytes();
                            self.handle(ev);
                        }
                        items.release(k);
                        bytes.release(n);
                    }
                    None => break,
                },
                _ = sweep.tick() => {
                    self.out.clock = Clock::sample();
                    self.sweep(Clock::boot_now_ns());
                }
                // No event came to move the held streams' time on: the clock does, with a
                // margin for events still queued.
                _ = held.tick(), if !self.out.h2_wait.is_empty() => {
                    self.out.release_held(Clock::boot_now_ns().saturating_sub(1_000_000_000));
                }
            }
            // The spans of what was just handled go to the exporter together.
            self.out.spans.flush();
        }
        self.out.release_held(u64::MAX);
        self.out.spans.flush();
        // Requests still waiting for their response: they get no span, and are counted.
        let pending: usize = self.conns.values().map(|c| c.http.pending()).sum();
        self.out.metrics.http_pending_at_exit.inc_by(pending as u64);
    }

    pub fn handle(&mut self, ev: KernelEvent) {
        match ev {
            KernelEvent::Data { header, payload } => self.data(&header, &payload),
            KernelEvent::Exec(_) => {}
            KernelEvent::Netns { pid, netns } => {
                if self.netns.insert(pid, netns).is_none() {
                    self.netns_order.push_back(pid);
                    if self.netns_order.len() > MAX_CONNS {
                        if let Some(old) = self.netns_order.pop_front() {
                            self.netns.remove(&old);
                            self.out.metrics.netns_records_evicted.inc();
                        }
                    }
                }
            }
            KernelEvent::Close(c) => {
                let id = ConnId {
                    pid: c.pid,
                    fd: c.fd,
                    sk: c.sk,
                };
                self.early.remove(&id);
                if let Some(mut conn) = self.conns.remove(&id) {
                    self.out.ended(&mut self.exchanges, id, &mut conn);
                }
            }
        }
    }

    fn data(&mut self, h: &DataHeader, payload: &[u8]) {
        // Every event the kernel sent before this one has been handled.
        self.out.release_held(h.ts_exit);
        if h.lost != 0 {
            // Some of what this process did was not seen (`h2_owner`).
            self.out.owners.lost(h.pid);
        }
        if h.ts_enter < self.attached_ns {
            // Begun while the programs were still being attached (see `attached_at`).
            self.out.metrics.events_before_attach.inc();
            // What it carried (a request read, maybe) was not seen: its connection is picked
            // up in its middle.
            let id = ConnId {
                pid: h.pid,
                fd: h.fd,
                sk: h.sk,
            };
            if self.early.len() < MAX_CONNS {
                self.early.insert(id);
            } else if !self.early.contains(&id) {
                self.out.owners.lost(h.pid);
            }
            return;
        }
        let id = ConnId {
            pid: h.pid,
            fd: h.fd,
            sk: h.sk,
        };
        if !self.conns.contains_key(&id) {
            if self.conns.len() >= MAX_CONNS {
                self.out.metrics.tracker_conns_full.inc();
                self.out.owners.lost(h.pid);
                return;
            }
            let ends = endpoints(&h.tuple);
            let expected = match h.role {
                ROLE_SERVER => Some(Side::Server),
                ROLE_CLIENT => Some(Side::Client),
                _ => self.preexisting.side_of(&ends),
            };
            let resource = self.processes.resource(h.pid, &h.comm);
            // A socket whose origin the kernel saw is followed from its first byte, unless
            // some of its first bytes went by while the programs were being attached.
            let prior = !matches!(h.role, ROLE_SERVER | ROLE_CLIENT) || self.early.remove(&id);
            self.conns.insert(
                id,
                Conn {
                    http: Http1Conn::with_budget(self.head_budget.clone()),
                    h2: None,
                    ends,
                    resource,
                    expected,
                    last_boot_ns: h.ts_exit,
                    netns: None,
                    prior,
                    reported: Report::default(),
                },
            );
        }
        let netns_seen = self.netns.get(&h.pid).copied();
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if h.kind == agent_common::EVENT_TLS_DATA {
            // Plaintext from the TLS library: the kernel never sends this socket's ciphertext.
            conn.ends.tls = true;
        }
        let dir = if h.direction == DIR_INGRESS {
            Dir::Ingress
        } else {
            Dir::Egress
        };
        // Bytes count as received when the read returns, and as sent when the write starts.
        let start_ns = if dir == Dir::Ingress {
            h.ts_exit
        } else {
            h.ts_enter
        };
        let ctx = (h.wire.kind != agent_common::WIRE_NONE).then_some(h.wire);
        let seg = Segment {
            data: payload,
            len: h.len,
            start_ns,
            end_ns: h.ts_exit,
            ctx,
        };
        if h.layout == agent_common::LAYOUT_LOST {
            // Bytes nobody saw (`agent-ebpf/src/gotls.rs`): a gap at this point of the stream.
            tracing::debug!(
                pid = h.pid,
                fd = h.fd,
                sk = h.sk,
                len = h.len,
                at = h.ts_exit,
                "bytes read before the probes, never seen"
            );
            if let Some(h2) = &mut conn.h2 {
                h2.feed(dir, Segment { data: &[], ..seg }, &mut self.exchanges);
            } else {
                conn.http.lost(dir, h.len, h.ts_exit, &mut self.exchanges);
            }
            conn.report_to(&mut self.out.owners, h.pid);
            conn.last_boot_ns = h.ts_exit;
            if !self.exchanges.is_empty() {
                self.emit(id);
            }
            return;
        }
        if h.layout == agent_common::LAYOUT_H2_CHUNKS {
            // The kernel walked HTTP/2 frames: records of kept bytes and passed-over gaps.
            let h2 = conn.h2.get_or_insert_with(|| {
                self.out.metrics.http2_connections.inc();
                conn.netns = crate::process::netns_of(h.pid).or(netns_seen);
                let opens = payload
                    .get(agent_common::H2_CHUNK_HEADER..)
                    .is_some_and(|d| d.starts_with(frame::PREFACE));
                Box::new(if opens {
                    Http2Conn::from_preface(dir)
                } else {
                    Http2Conn::mid_stream()
                })
            });
            let was_aligned = h2.aligned(dir);
            for (data, gap) in h2_chunks(payload) {
                let seg = Segment {
                    data,
                    len: data.len() as u64 + gap as u64,
                    ..seg
                };
                h2.feed(dir, seg, &mut self.exchanges);
            }
            if was_aligned && !h2.aligned(dir) {
                // What the kernel sent (kept bytes, passed over), to tell whose walk went wrong.
                let records: Vec<(usize, u32, String)> = h2_chunks(payload)
                    .map(|(d, g)| {
                        let head: String = d.iter().take(12).map(|b| format!("{b:02x}")).collect();
                        (d.len(), g, head)
                    })
                    .collect();
                tracing::debug!(
                    pid = h.pid,
                    tid = h.tid,
                    fd = h.fd,
                    comm = %String::from_utf8_lossy(&h.comm),
                    ?dir,
                    len = h.len,
                    ?records,
                    "HTTP/2 event that lost alignment"
                );
            }
            conn.report_to(&mut self.out.owners, h.pid);
            self.out.h2_opened(conn, id);
            conn.last_boot_ns = h.ts_exit;
            if !self.exchanges.is_empty() {
                self.emit(id);
            }
            return;
        }
        if conn.h2.is_none() && !conn.http.decided() {
            if payload.starts_with(frame::PREFACE) {
                conn.h2 = Some(Box::new(Http2Conn::from_preface(dir)));
            } else if seg.len == payload.len() as u64 && frame::is_midstream_http2(payload) {
                conn.h2 = Some(Box::new(Http2Conn::mid_stream()));
            }
            if conn.h2.is_some() {
                self.out.metrics.http2_connections.inc();
                conn.netns = crate::process::netns_of(h.pid).or(netns_seen);
            }
        }
        if let Some(h2) = &mut conn.h2 {
            h2.feed(dir, seg, &mut self.exchanges);
            conn.report_to(&mut self.out.owners, h.pid);
            self.out.h2_opened(conn, id);
        } else {
            conn.http.feed(dir, seg, &mut self.exchanges);
            conn.report_to(&mut self.out.owners, h.pid);
        }
        if dir == Dir::Ingress && conn.h2.is_none() {
            let out = &mut self.out;
            let (sampler, registry, owners) = (&out.sampler, &mut out.registry, &mut out.owners);
            let mut full = 0;
            conn.http.new_server_heads(|head, ctx| {
                let w = *ctx.get_or_insert_with(|| server_ctx(head, sampler));
                let header = head.traceparent.as_deref().and_then(TraceParent::parse);
                registry.server_started(h.pid, &w, header.as_ref());
                // Named for the HTTP/2 calls its process makes while it is open (`h2_owner`).
                let open = Open {
                    ctx: w,
                    provisional: false,
                    committed: false,
                    key: None,
                    start_ns: h.ts_exit,
                };
                if !owners.opened(h.pid, h.sk, h2_owner::http1_key(&w), open) {
                    full += 1;
                }
            });
            out.metrics.http2_owner_full.inc_by(full);
        }
        conn.last_boot_ns = h.ts_exit;
        if !self.exchanges.is_empty() {
            self.emit(id);
        }
    }

    fn emit(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(&id) {
            self.out.spans_for(&mut self.exchanges, id, conn);
        }
    }

    /// Forgets connections idle for longer than the idle timeout (their process may have exited
    /// without `close`), ending until-close responses first.
    pub fn sweep(&mut self, now_boot_ns: u64) {
        let idle_ns = self.idle.as_nanos() as u64;
        let stale: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| now_boot_ns.saturating_sub(c.last_boot_ns) > idle_ns)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(mut conn) = self.conns.remove(&id) {
                self.out.metrics.conns_evicted_idle.inc();
                self.out.ended(&mut self.exchanges, id, &mut conn);
            }
        }
    }

    pub fn conns(&self) -> usize {
        self.conns.len()
    }
}

impl Output {
    /// Chooses the ids of the request streams a connection just opened, while they are open:
    /// a server stream's, for the calls its process makes to name (`h2_owner`); a client
    /// stream's, for its callee on this host to take (`h2_stitch`).
    fn h2_opened(&mut self, conn: &mut Conn, id: ConnId) {
        let Some(h2) = conn.h2.as_mut() else {
            return;
        };
        for o in h2.take_opened() {
            match o.side {
                Side::Server => self.server_opened(conn, id, o),
                Side::Client => self.client_opened(conn, id.pid, o),
            }
        }
    }

    /// A server stream opened: its ids, from its own `traceparent`, else from its caller's
    /// record on this host, else a new trace (provisional: a caller's record may still come).
    fn server_opened(&mut self, conn: &Conn, id: ConnId, o: Opened) {
        if conn.expected == Some(Side::Client) {
            // A request read on a socket this process connected: not served here.
            return;
        }
        let mut rng = rand::rng();
        let span = random_span_id(&mut rng);
        let key = conn.stitch_key(Side::Server);
        let stitched = || WireCtx {
            kind: WIRE_SERVER,
            span_id: span,
            ..WireCtx::default()
        };
        let (ctx, provisional) = match o.traceparent {
            Some(tp) => (
                WireCtx {
                    trace_id: tp.trace_id,
                    parent_id: tp.parent_id,
                    flags: self.sampler.sample(&tp.trace_id, Some(tp.sampled())) as u8,
                    ..stitched()
                },
                false,
            ),
            None => {
                match key.and_then(|k| self.h2_stitch.server_ctx(&k, o.stream, o.start_ns, span)) {
                    Some(ctx) => (ctx, false),
                    None => {
                        let trace_id: [u8; 16] = rng.random();
                        let flags = self.sampler.sample(&trace_id, None) as u8;
                        (
                            WireCtx {
                                trace_id,
                                flags,
                                ..stitched()
                            },
                            true,
                        )
                    }
                }
            }
        };
        if !provisional {
            // A call that forwards the context it received names this span (`link::Registry`).
            self.registry
                .server_started(id.pid, &ctx, o.traceparent.as_ref());
        }
        let open = Open {
            ctx,
            provisional,
            committed: false,
            key,
            start_ns: o.start_ns,
        };
        if !self.owners.opened(id.pid, id.sk, o.stream, open) {
            self.metrics.http2_owner_full.inc();
        }
    }

    /// A client stream opened with no context of its own: its span's ids, with the one
    /// request its process has open as parent (`h2_owner`), recorded for its callee on this
    /// host; a callee's server end that came first and waited takes them now.
    fn client_opened(&mut self, conn: &Conn, pid: u32, o: Opened) {
        if o.traceparent.is_some() {
            // The callee and this span follow the program's own context.
            return;
        }
        let Some(key) = conn.stitch_key(Side::Client) else {
            return;
        };
        let mut rng = rand::rng();
        // The owner's caller may have been seen since the owner opened: its ids settle first.
        let mut unsettled = false;
        if let Some((sk, stream, open)) = self.owners.provisional_sole(pid) {
            let settled = open.key.and_then(|k| {
                self.h2_stitch
                    .server_ctx(&k, stream, open.start_ns, open.ctx.span_id)
            });
            if let Some(ctx) = settled {
                self.owners.settle(pid, sk, stream, ctx);
                self.registry.server_started(pid, &ctx, None);
            } else {
                // Its caller's write may not be seen yet (the two ends' events race on two
                // CPUs): taking the provisional ids now would cut the request off its caller's
                // trace for good, so the call gets no parent.
                unsettled = true;
            }
        }
        let span = random_span_id(&mut rng);
        let new = |rng: &mut rand::rngs::ThreadRng, sampler: &Sampler| {
            let trace_id: [u8; 16] = rng.random();
            h2_stitch::client_ctx(trace_id, span, sampler.sample(&trace_id, None))
        };
        let owner = if unsettled {
            self.metrics.http2_links_unsettled.inc();
            Owner::Ambiguous
        } else {
            self.owners.owner(pid, span)
        };
        let ctx = match owner {
            Owner::Sole(ctx) => {
                self.metrics.http2_links_process.inc();
                ctx
            }
            Owner::None => new(&mut rng, &self.sampler),
            Owner::Ambiguous => {
                if !unsettled {
                    self.metrics.http2_links_ambiguous.inc();
                }
                h2_owner::ambiguous(new(&mut rng, &self.sampler))
            }
        };
        if !self.h2_stitch.opened(key, o.stream, o.start_ns, ctx) {
            self.metrics.http2_stitch_full.inc();
        }
        if let Some(mut held) = self.h2_wait.take(&key, o.stream) {
            // Its server end came first and waited: it takes this call as its parent.
            let span = random_span_id(&mut rng);
            held.ex.ctx = self
                .h2_stitch
                .server_ctx(&key, o.stream, held.ex.start_ns, span);
            if held.ex.ctx.is_some() {
                self.metrics.http2_stitched_late.inc();
            }
            self.queue(&held.ex, held.pid, &held.ends, held.resource);
        }
    }

    /// Spans of the held server streams whose wait ended by `now_ns`: they had no caller on
    /// this host.
    fn release_held(&mut self, now_ns: u64) {
        if self.h2_wait.is_empty() {
            return;
        }
        for held in self.h2_wait.due(now_ns) {
            self.queue(&held.ex, held.pid, &held.ends, held.resource);
        }
    }

    /// The ids an HTTP/2 exchange was given out of band: a client stream's, recorded when it
    /// opened; a server stream's, from its caller's record on this host. The connection of a
    /// server stream whose caller's record is not (yet) there.
    fn h2_ctx(&mut self, ex: &mut Exchange, conn: &Conn, opened: Option<Open>) -> Option<ConnKey> {
        let (Some(h2), None) = (&ex.h2, ex.ctx) else {
            return None;
        };
        if let Some(o) = opened.filter(|o| !o.provisional || o.committed) {
            // Chosen when it opened, and final: its calls named it.
            ex.ctx = Some(o.ctx);
            return None;
        }
        let key = conn.stitch_key(ex.side)?;
        ex.ctx = match ex.side {
            Side::Client => self.h2_stitch.client_ended(&key, h2.stream, ex.end_ns),
            Side::Server => {
                let own = ex
                    .request
                    .traceparent
                    .as_deref()
                    .and_then(TraceParent::parse);
                if own.is_some() {
                    return None;
                }
                let span = random_span_id(&mut rand::rng());
                self.h2_stitch
                    .server_ctx(&key, h2.stream, ex.start_ns, span)
            }
        };
        (ex.side == Side::Server && ex.ctx.is_none()).then_some(key)
    }

    /// Builds the exchange's span, if sampled, and queues it for export.
    fn queue(&mut self, ex: &Exchange, pid: u32, ends: &Endpoints, resource: Arc<Resource>) {
        let metrics = &self.metrics;
        match decide(ex, pid, &self.registry, &self.sampler) {
            Decision::Unsampled => {
                metrics.spans_unsampled.inc();
            }
            Decision::Sampled(ids) => {
                let clock = self.clock;
                let mut span =
                    build_span(ex, ends, resource, ids, &self.urls, |t| clock.to_unix_ns(t));
                self.limits.apply(&mut span);
                metrics.spans_created.inc();
                match self.spans.try_send(*span) {
                    Ok(()) => {}
                    Err(crate::export::Full::Spans) => {
                        metrics.spans_queue_full.inc();
                    }
                    Err(crate::export::Full::Bytes) => {
                        metrics.spans_queue_bytes_full.inc();
                    }
                }
            }
        }
    }

    /// The connection ended: what was open on it becomes spans, and its stitching records go.
    fn ended(&mut self, exchanges: &mut Vec<Exchange>, id: ConnId, conn: &mut Conn) {
        conn.close(exchanges);
        self.spans_for(exchanges, id, conn);
        self.owners.adjust(id.pid, conn.reported, Report::default());
        conn.reported = Report::default();
        self.owners.conn_ended(id.pid, id.sk);
        if conn.h2.as_ref().and_then(|h| h.side()) == Some(Side::Client) {
            if let Some(key) = conn.stitch_key(Side::Client) {
                self.h2_stitch.conn_ended(&key);
            }
        }
    }

    /// Turns the connection's completed exchanges into spans and queues them; one place for both
    /// live traffic and connections that end.
    fn spans_for(&mut self, exchanges: &mut Vec<Exchange>, id: ConnId, conn: &mut Conn) {
        let pid = id.pid;
        for mut ex in exchanges.drain(..) {
            let opened = match (&ex.h2, ex.side, &ex.ctx) {
                (Some(h2), Side::Server, _) => self.owners.ended(pid, id.sk, h2.stream),
                (None, Side::Server, Some(w)) => {
                    self.owners.ended(pid, id.sk, h2_owner::http1_key(w));
                    None
                }
                _ => None,
            };
            if conn.expected.is_some_and(|s| s != ex.side) {
                // A request seen in the wrong direction for this socket: not a real exchange.
                self.metrics.http_orphan_responses.inc();
                continue;
            }
            if let Some(key) = self.h2_ctx(&mut ex, conn, opened) {
                let stream = ex.h2.as_ref().map_or(0, |h| h.stream);
                let held = Held {
                    ex,
                    pid,
                    ends: conn.ends,
                    resource: conn.resource.clone(),
                };
                match self.h2_wait.hold(key, stream, held.ex.end_ns, held) {
                    Ok(()) => continue,
                    Err(held) => {
                        self.metrics.http2_wait_full.inc();
                        ex = held.ex;
                    }
                }
            }
            self.queue(&ex, pid, &conn.ends, conn.resource.clone());
        }
        let metrics = &self.metrics;
        if let Some(h2) = &mut conn.h2 {
            let s = h2.take_stats();
            metrics.http2_unresolved_fields.inc_by(s.unresolved_fields);
            metrics.http2_alignment_lost.inc_by(s.alignment_lost);
            metrics.http2_streams_dropped.inc_by(s.streams_dropped);
            metrics.http2_orphan_frames.inc_by(s.orphan_frames);
            metrics.http2_malformed_blocks.inc_by(s.malformed_blocks);
            metrics.http2_ends_unseen.inc_by(s.ends_unseen);
        }
        let s = conn.http.take_stats();
        metrics.http_skipped_bytes.inc_by(s.skipped_bytes);
        metrics.http_orphan_responses.inc_by(s.orphan_responses);
        metrics.http_responses_unseen.inc_by(s.responses_unseen);
        metrics
            .http_unanswered_requests
            .inc_by(s.unanswered_requests);
        metrics.http_pending_overflow.inc_by(s.pending_overflow);
        metrics.http_head_budget_drops.inc_by(s.head_budget_drops);
    }
}

#[cfg(test)]
mod tests;
