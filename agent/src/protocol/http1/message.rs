//! One direction of an HTTP/1.x connection: finds message heads and skips bodies, across any
//! split of the bytes into syscalls, with gaps where the kernel copied only a prefix.
use super::{
    chunked::ChunkState,
    head::{self, Framing, HeadParse, RequestHead, RequestKind, ResponseHead},
};
use crate::protocol::Segment;

/// A head larger than this is not HTTP we can follow; the stream resynchronises.
pub const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug)]
pub enum Event {
    /// A request head was read completely; `start_ns` is when its first byte moved.
    Request { head: RequestHead, start_ns: u64 },
    /// A response ended (head and body); `end_ns` is when its last byte moved.
    Response { head: ResponseHead, end_ns: u64 },
}

/// Where parsed messages go, and what a response answers.
pub trait Sink {
    fn answers(&mut self) -> RequestKind;
    fn event(&mut self, event: Event);
    /// Bytes skipped because the stream could not be followed (mid-message start, garbage).
    fn skipped(&mut self, _bytes: u64) {}
    /// Whether `bytes` more of an incomplete head may be kept in memory (a global budget across
    /// connections); false gives the head up.
    fn may_hold(&mut self, _bytes: usize) -> bool {
        true
    }
}

/// Whether the bytes from `from` on (with three before it) can end a head: a blank line, `\n\n`
/// or `\n\r\n`. Until one arrives a head cannot be complete, so a head that arrives in many
/// pieces is scanned once, not parsed again for each piece.
fn may_end_head(buf: &[u8], from: usize) -> bool {
    let tail = &buf[from.saturating_sub(3)..];
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

#[derive(Debug)]
struct Open {
    head: ResponseHead,
    end_ns: u64,
}

#[derive(Debug)]
enum State {
    /// Between messages. Unsynced: look for a message start at segment boundaries only.
    Idle {
        synced: bool,
    },
    Head {
        buf: Vec<u8>,
        start_ns: u64,
    },
    Body {
        open: Option<Open>,
        left: u64,
    },
    Chunked {
        open: Option<Open>,
        chunk: ChunkState,
    },
    UntilClose {
        open: Open,
    },
    /// Lost the body framing; the response ends before the next response head, a new request,
    /// or close.
    Drain {
        open: Open,
    },
    Tunnel,
}

#[derive(Debug)]
pub struct StreamParser {
    state: State,
}

impl Default for StreamParser {
    fn default() -> Self {
        StreamParser {
            state: State::Idle { synced: false },
        }
    }
}

impl StreamParser {
    /// Between messages: what comes next starts one, or is not HTTP.
    pub fn between_messages(&self) -> bool {
        matches!(self.state, State::Idle { .. })
    }

    pub fn feed(&mut self, seg: Segment<'_>, sink: &mut impl Sink) {
        let mut data = seg.data;
        let mut gap = seg.len.saturating_sub(seg.data.len() as u64);
        let mut at_segment_start = true;
        loop {
            let state = std::mem::replace(&mut self.state, State::Idle { synced: false });
            self.state = match state {
                State::Tunnel => {
                    self.state = State::Tunnel;
                    return;
                }
                State::Idle { synced } => {
                    if synced {
                        // Stray CRLFs between messages are allowed (RFC 9112 2.2).
                        let blank = data
                            .iter()
                            .take_while(|b| matches!(b, b'\r' | b'\n'))
                            .count();
                        data = &data[blank..];
                    }
                    if data.is_empty() {
                        // A gap between messages may hide a message start.
                        self.state = State::Idle {
                            synced: synced && gap == 0,
                        };
                        if gap > 0 {
                            sink.skipped(gap);
                        }
                        return;
                    }
                    let plausible = head::plausible_request(data) || head::plausible_response(data);
                    if plausible && (synced || at_segment_start) {
                        State::Head {
                            buf: Vec::new(),
                            start_ns: seg.start_ns,
                        }
                    } else {
                        sink.skipped(data.len() as u64 + gap);
                        self.state = State::Idle { synced: false };
                        return;
                    }
                }
                State::Head { mut buf, start_ns } => {
                    let old = buf.len();
                    let parsed = if old == 0 {
                        parse_head(data, sink)
                    } else {
                        let add = data.len().min(MAX_HEAD + 1 - old.min(MAX_HEAD));
                        if !sink.may_hold(add) {
                            sink.skipped(old as u64 + data.len() as u64 + gap);
                            self.state = State::Idle { synced: false };
                            return;
                        }
                        buf.reserve_exact(add);
                        buf.extend_from_slice(&data[..add]);
                        if may_end_head(&buf, old) {
                            parse_head(&buf, sink)
                        } else {
                            Parsed::Partial
                        }
                    };
                    match parsed {
                        Parsed::Complete(h, n) => {
                            data = &data[n - old..];
                            at_segment_start = false;
                            self.begin(h, start_ns, seg.end_ns, sink)
                        }
                        Parsed::Partial if gap == 0 && old + data.len() <= MAX_HEAD => {
                            if old == 0 {
                                if !sink.may_hold(data.len()) {
                                    sink.skipped(data.len() as u64);
                                    self.state = State::Idle { synced: false };
                                    return;
                                }
                                buf.reserve_exact(data.len());
                                buf.extend_from_slice(data);
                            }
                            self.state = State::Head { buf, start_ns };
                            return;
                        }
                        Parsed::Partial | Parsed::Invalid => {
                            sink.skipped(data.len() as u64 + gap);
                            self.state = State::Idle { synced: false };
                            return;
                        }
                    }
                }
                State::Body { mut open, left } => {
                    let take = left.min(data.len() as u64);
                    data = &data[take as usize..];
                    let mut left = left - take;
                    if data.is_empty() {
                        let skip = left.min(gap);
                        left -= skip;
                        gap -= skip;
                    }
                    if left == 0 {
                        self.finish(open.take(), seg.end_ns, sink);
                        at_segment_start = false;
                        State::Idle { synced: true }
                    } else {
                        if let Some(o) = open.as_mut() {
                            o.end_ns = seg.end_ns;
                        }
                        self.state = State::Body { open, left };
                        return;
                    }
                }
                State::Chunked {
                    mut open,
                    mut chunk,
                } => {
                    let used = chunk.feed(data);
                    match used {
                        Ok(n) => data = &data[n..],
                        Err(_) => {
                            self.state = lost(open, seg.end_ns);
                            return;
                        }
                    }
                    if chunk == ChunkState::Done {
                        self.finish(open.take(), seg.end_ns, sink);
                        at_segment_start = false;
                        State::Idle { synced: true }
                    } else {
                        if chunk.skip(gap).is_err() {
                            self.state = lost(open, seg.end_ns);
                            return;
                        }
                        if let Some(o) = open.as_mut() {
                            o.end_ns = seg.end_ns;
                        }
                        self.state = State::Chunked { open, chunk };
                        return;
                    }
                }
                State::UntilClose { mut open } => {
                    open.end_ns = seg.end_ns;
                    self.state = State::UntilClose { open };
                    return;
                }
                State::Drain { mut open } => {
                    if at_segment_start && head::plausible_response(data) {
                        let end = open.end_ns;
                        sink.event(Event::Response {
                            head: open.head,
                            end_ns: end,
                        });
                        State::Idle { synced: false }
                    } else {
                        open.end_ns = seg.end_ns;
                        self.state = State::Drain { open };
                        return;
                    }
                }
            };
        }
    }

    /// Ends a response whose end cannot be seen in its own bytes (until-close framing, or lost
    /// framing) at the last byte seen. Called on close, idle expiry, or a new request.
    pub fn flush(&mut self, sink: &mut impl Sink) {
        match std::mem::replace(&mut self.state, State::Idle { synced: false }) {
            State::UntilClose { open } | State::Drain { open } => {
                sink.event(Event::Response {
                    head: open.head,
                    end_ns: open.end_ns,
                });
            }
            other => self.state = other,
        }
    }

    /// Whether the stream holds a response that only `flush` can end.
    pub fn needs_flush(&self) -> bool {
        matches!(self.state, State::UntilClose { .. } | State::Drain { .. })
    }

    fn begin(&mut self, h: HeadKind, start_ns: u64, end_ns: u64, sink: &mut impl Sink) -> State {
        match h {
            HeadKind::Request(head) => {
                let framing = head.framing;
                sink.event(Event::Request { head, start_ns });
                match framing {
                    Framing::Length(n) => State::Body {
                        open: None,
                        left: n,
                    },
                    Framing::Chunked => State::Chunked {
                        open: None,
                        chunk: ChunkState::default(),
                    },
                    _ => State::Idle { synced: true },
                }
            }
            HeadKind::Response(head) => {
                let framing = head.framing;
                let open = Open { head, end_ns };
                match framing {
                    Framing::Length(n) => State::Body {
                        open: Some(open),
                        left: n,
                    },
                    Framing::Chunked => State::Chunked {
                        open: Some(open),
                        chunk: ChunkState::default(),
                    },
                    Framing::UntilClose => State::UntilClose { open },
                    Framing::Tunnel => {
                        self.finish(Some(open), end_ns, sink);
                        State::Tunnel
                    }
                    Framing::None => {
                        self.finish(Some(open), end_ns, sink);
                        State::Idle { synced: true }
                    }
                }
            }
        }
    }

    fn finish(&mut self, open: Option<Open>, end_ns: u64, sink: &mut impl Sink) {
        if let Some(o) = open {
            sink.event(Event::Response {
                head: o.head,
                end_ns,
            });
        }
    }

    /// Bytes of an incomplete head held in memory.
    pub fn held(&self) -> usize {
        match &self.state {
            State::Head { buf, .. } => buf.capacity(),
            _ => 0,
        }
    }

    /// Whether this direction stopped speaking HTTP.
    pub fn is_tunnel(&self) -> bool {
        matches!(self.state, State::Tunnel)
    }

    pub fn enter_tunnel(&mut self) {
        self.state = State::Tunnel;
    }
}

fn lost(open: Option<Open>, end_ns: u64) -> State {
    match open {
        Some(mut o) => {
            o.end_ns = end_ns;
            State::Drain { open: o }
        }
        None => State::Idle { synced: false },
    }
}

enum HeadKind {
    Request(RequestHead),
    Response(ResponseHead),
}

enum Parsed {
    Complete(HeadKind, usize),
    Partial,
    Invalid,
}

fn parse_head(buf: &[u8], sink: &mut impl Sink) -> Parsed {
    if head::plausible_response(buf) {
        match head::parse_response(buf, sink.answers()) {
            HeadParse::Complete(h, n) => Parsed::Complete(HeadKind::Response(h), n),
            HeadParse::Partial => Parsed::Partial,
            HeadParse::Invalid => Parsed::Invalid,
        }
    } else if head::plausible_request(buf) {
        match head::parse_request(buf) {
            HeadParse::Complete(h, n) => Parsed::Complete(HeadKind::Request(h), n),
            HeadParse::Partial => Parsed::Partial,
            HeadParse::Invalid => Parsed::Invalid,
        }
    } else {
        Parsed::Invalid
    }
}
