//! HTTP/1.x: pairs requests with responses on one connection, in both roles, with keep-alive and
//! pipelining. Pure and synchronous.
mod chunked;
mod head;
mod message;
#[cfg(test)]
mod tests;

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use agent_common::WireCtx;

pub use head::{parse_request, Framing, HeadParse, RequestHead, RequestKind, ResponseHead};
use message::{Event, Sink, StreamParser};

use super::{Dir, Segment};

/// Requests waiting for their response on one connection (pipelining depth).
pub const MAX_PENDING: usize = 64;

/// Which end of the exchange the traced process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// A request and its response, with the times a span needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub side: Side,
    pub request: RequestHead,
    pub response: ResponseHead,
    /// First request byte (read for a server, written for a client).
    pub start_ns: u64,
    /// Last response byte (written for a server, read for a client).
    pub end_ns: u64,
    /// The kernel's trace context for the request, when its head started a segment.
    pub ctx: Option<WireCtx>,
    /// HTTP/2 only: the stream, how it ended, and gRPC's part.
    pub h2: Option<Box<crate::protocol::http2::H2Info>>,
}

/// What went wrong on a connection, for the agent's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub skipped_bytes: u64,
    pub orphan_responses: u64,
    pub unanswered_requests: u64,
    pub pending_overflow: u64,
    /// Requests dropped because bytes that may hold their response were never seen (`lost`).
    pub responses_unseen: u64,
    /// Incomplete heads given up because every connection's together reached the budget.
    pub head_budget_drops: u64,
}

/// One byte budget for the incomplete heads of all connections (each is also capped at
/// `MAX_HEAD`): thousands of connections that send a long head slowly cannot hold more.
#[derive(Debug)]
pub struct HeadBudget {
    used: AtomicUsize,
    limit: usize,
}

impl HeadBudget {
    pub fn new(limit: usize) -> Arc<HeadBudget> {
        Arc::new(HeadBudget {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
struct Pairing {
    side: Option<Side>,
    pending: VecDeque<(RequestHead, u64, Option<WireCtx>)>,
    /// How many of the newest `pending` heads `new_server_heads` has not visited yet.
    unvisited: usize,
    dir: Option<Dir>,
    /// Kernel context of the latest segment that started a request, per direction, until a
    /// request head completes and takes it (a head may span segments).
    ctx: [Option<WireCtx>; 2],
    out: Vec<Exchange>,
    stats: Stats,
    /// A response read before any request was pending, and when it ended: its request's event
    /// may still come (its writer was preempted between sending and the probe that reports
    /// the write, while the response came back on another CPU).
    early: Option<(ResponseHead, u64)>,
    new_request: bool,
    budget: Option<Arc<HeadBudget>>,
}

impl Pairing {
    /// Keeps a client's response that came before any request (see `early`); an older one
    /// kept is an orphan for good.
    fn early_response(&mut self, head: ResponseHead, end_ns: u64) {
        if self.early.replace((head, end_ns)).is_some() {
            self.stats.orphan_responses += 1;
        }
    }
}

impl Sink for Pairing {
    fn answers(&mut self) -> RequestKind {
        match self.pending.front().map(|(r, _, _)| r.method.as_str()) {
            Some("HEAD") => RequestKind::Head,
            Some("CONNECT") => RequestKind::Connect,
            _ => RequestKind::Normal,
        }
    }

    fn event(&mut self, event: Event) {
        let dir = self.dir.unwrap_or(Dir::Ingress);
        match event {
            Event::Request { head, start_ns } => {
                let side = if dir == Dir::Ingress {
                    Side::Server
                } else {
                    Side::Client
                };
                if self.side.is_some_and(|s| s != side) {
                    return; // a request in the response direction: not HTTP we can pair
                }
                self.side = Some(side);
                if let Some((response, end_ns)) = self.early.take() {
                    // Sent before that response ended, with nothing else waiting: its request.
                    if side == Side::Client && self.pending.is_empty() && start_ns < end_ns {
                        let ctx = self.ctx[dir as usize].take();
                        self.out.push(Exchange {
                            side,
                            request: head,
                            response,
                            start_ns,
                            end_ns,
                            ctx,
                            h2: None,
                        });
                        self.new_request = true;
                        return;
                    }
                    self.stats.orphan_responses += 1;
                }
                if self.pending.len() == MAX_PENDING {
                    self.pending.pop_front();
                    self.stats.pending_overflow += 1;
                }
                let ctx = self.ctx[dir as usize].take();
                self.pending.push_back((head, start_ns, ctx));
                self.unvisited = (self.unvisited + 1).min(self.pending.len());
                self.new_request = true;
            }
            Event::Response { head, end_ns, .. } => {
                if (100..200).contains(&head.status) && head.status != 101 {
                    return; // informational: the final response follows
                }
                let Some(side) = self.side else {
                    if dir == Dir::Ingress {
                        self.early_response(head, end_ns);
                    } else {
                        self.stats.orphan_responses += 1;
                    }
                    return;
                };
                let expected = if side == Side::Server {
                    Dir::Egress
                } else {
                    Dir::Ingress
                };
                if dir != expected {
                    self.stats.orphan_responses += 1;
                    return;
                }
                // A response whose last byte moved before the request's first one answers
                // something else (a stream picked up mid-exchange): never a span that ends
                // before it starts.
                if self
                    .pending
                    .front()
                    .is_some_and(|(_, start, _)| end_ns < *start)
                {
                    self.stats.orphan_responses += 1;
                    return;
                }
                self.unvisited = self.unvisited.min(self.pending.len().saturating_sub(1));
                match self.pending.pop_front() {
                    Some((request, start_ns, ctx)) => self.out.push(Exchange {
                        side,
                        request,
                        response: head,
                        start_ns,
                        end_ns,
                        ctx,
                        h2: None,
                    }),
                    None if side == Side::Client => self.early_response(head, end_ns),
                    None => self.stats.orphan_responses += 1,
                }
            }
        }
    }

    fn skipped(&mut self, bytes: u64) {
        self.stats.skipped_bytes += bytes;
    }

    fn may_hold(&mut self, bytes: usize) -> bool {
        let Some(b) = &self.budget else {
            return true;
        };
        let ok = b.used() + bytes <= b.limit;
        if !ok {
            self.stats.head_budget_drops += 1;
        }
        ok
    }
}

/// Both directions of one connection.
#[derive(Debug, Default)]
pub struct Http1Conn {
    ingress: StreamParser,
    egress: StreamParser,
    pairing: Pairing,
    /// Bytes of incomplete heads this connection has counted in the budget.
    held: usize,
}

impl Http1Conn {
    /// Whether an HTTP/1 request has been seen (the connection speaks HTTP/1).
    pub fn decided(&self) -> bool {
        self.pairing.side.is_some()
    }
}

impl Drop for Http1Conn {
    fn drop(&mut self) {
        if let Some(b) = &self.pairing.budget {
            b.used.fetch_sub(self.held, Ordering::Relaxed);
        }
    }
}

impl Http1Conn {
    /// A connection whose incomplete heads count against `budget`.
    pub fn with_budget(budget: Arc<HeadBudget>) -> Http1Conn {
        let mut c = Http1Conn::default();
        c.pairing.budget = Some(budget);
        c
    }

    /// Brings the budget up to date with what the parsers hold now.
    fn account(&mut self) {
        let now = self.ingress.held() + self.egress.held();
        if let Some(b) = &self.pairing.budget {
            if now > self.held {
                b.used.fetch_add(now - self.held, Ordering::Relaxed);
            } else {
                b.used.fetch_sub(self.held - now, Ordering::Relaxed);
            }
        }
        self.held = now;
    }

    /// Feeds one syscall's bytes; completed exchanges are appended to `out`.
    pub fn feed(&mut self, dir: Dir, seg: Segment<'_>, out: &mut Vec<Exchange>) {
        self.pairing.dir = Some(dir);
        self.pairing.new_request = false;
        if seg.ctx.is_some() {
            self.pairing.ctx[dir as usize] = seg.ctx;
        }
        let (this, other) = match dir {
            Dir::Ingress => (&mut self.ingress, &mut self.egress),
            Dir::Egress => (&mut self.egress, &mut self.ingress),
        };
        this.feed(seg, &mut self.pairing);
        // A new request ends a response whose framing was lost.
        if self.pairing.new_request && other.needs_flush() && self.pairing.pending.len() > 1 {
            self.pairing.dir = Some(opposite(dir));
            other.flush(&mut self.pairing);
        }
        if self.ingress.is_tunnel() || self.egress.is_tunnel() {
            self.ingress.enter_tunnel();
            self.egress.enter_tunnel();
        }
        self.account();
        out.append(&mut self.pairing.out);
    }

    /// `bytes` moved in `dir` that nobody saw, the last of them at `at_ns` (a Go TLS read that
    /// began before its probes were attached, `agent-ebpf/src/gotls.rs`). Lost between
    /// messages in the response direction, they may hold the response of the oldest pending
    /// request, if that was sent before: that request is given no span, so that the next
    /// response is never paired with it. Inside a message they are a gap like a truncated
    /// capture's.
    pub fn lost(&mut self, dir: Dir, bytes: u64, at_ns: u64, out: &mut Vec<Exchange>) {
        let between = match dir {
            Dir::Ingress => self.ingress.between_messages(),
            Dir::Egress => self.egress.between_messages(),
        };
        let seg = Segment {
            data: &[],
            len: bytes,
            start_ns: at_ns,
            end_ns: at_ns,
            ctx: None,
        };
        self.feed(dir, seg, out);
        let answers = matches!(
            (self.pairing.side, dir),
            (Some(Side::Client), Dir::Ingress) | (Some(Side::Server), Dir::Egress)
        );
        let p = &mut self.pairing;
        let before = p
            .pending
            .front()
            .is_some_and(|(_, start, _)| *start < at_ns);
        if between && answers && before && p.pending.pop_front().is_some() {
            p.stats.responses_unseen += 1;
            p.unvisited = p.unvisited.min(p.pending.len());
        }
    }

    /// The connection closed (or went idle for good): ends until-close responses.
    pub fn close(&mut self, out: &mut Vec<Exchange>) {
        for dir in [Dir::Ingress, Dir::Egress] {
            self.pairing.dir = Some(dir);
            match dir {
                Dir::Ingress => self.ingress.flush(&mut self.pairing),
                Dir::Egress => self.egress.flush(&mut self.pairing),
            }
        }
        self.pairing.stats.unanswered_requests += self.pairing.pending.len() as u64;
        self.pairing.pending.clear();
        if self.pairing.early.take().is_some() {
            self.pairing.stats.orphan_responses += 1;
        }
        self.pairing.unvisited = 0;
        self.account();
        out.append(&mut self.pairing.out);
    }

    /// Takes the counters gathered since the last call.
    pub fn take_stats(&mut self) -> Stats {
        std::mem::take(&mut self.pairing.stats)
    }

    /// Shows `f` each server request head once, as soon as it is parsed, with the context the
    /// kernel decided for it (None when the kernel could not read the head in one piece; `f` may
    /// then give it one).
    pub fn new_server_heads(&mut self, mut f: impl FnMut(&RequestHead, &mut Option<WireCtx>)) {
        let p = &mut self.pairing;
        let n = std::mem::take(&mut p.unvisited);
        if p.side != Some(Side::Server) {
            return;
        }
        let skip = p.pending.len().saturating_sub(n);
        for (head, _, ctx) in p.pending.iter_mut().skip(skip) {
            f(head, ctx);
        }
    }

    /// Requests waiting for their response.
    pub fn pending(&self) -> usize {
        self.pairing.pending.len()
    }

    pub fn side(&self) -> Option<Side> {
        self.pairing.side
    }
}

fn opposite(dir: Dir) -> Dir {
    match dir {
        Dir::Ingress => Dir::Egress,
        Dir::Egress => Dir::Ingress,
    }
}
