//! One HTTP/2 connection, both directions: frames walked across segments (and across the bytes
//! the kernel did not copy), header blocks decoded per direction, and one exchange per stream:
//! from the request's HEADERS to the response's END_STREAM, a RST_STREAM, a GOAWAY that leaves
//! it out, or the connection's end.
use crate::fast::HashMap;

use bytes::Bytes;

use super::{
    frame::{self, FrameHeader},
    hpack::{Decoder, Field},
};
use crate::protocol::{
    http1::{Exchange, Framing, RequestHead, ResponseHead, Side},
    Dir, Segment,
};

/// Streams open at once on one connection (peers usually allow 100 to 1,000); beyond it the
/// oldest is dropped, and counted.
pub const MAX_STREAMS: usize = 1024;
/// The largest frame kept whole (HEADERS, CONTINUATION, SETTINGS, RST_STREAM, GOAWAY) and the
/// largest header block: beyond them the block is lost and the table resynchronises.
pub const MAX_WHOLE_FRAME: usize = 64 << 10;

/// How a stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The response's END_STREAM.
    Complete,
    /// RST_STREAM with this error code.
    Reset(u32),
    /// A GOAWAY (with this error code) whose last stream id is below this stream's: the server
    /// never processed it.
    GoAway(u32),
    /// The connection ended first.
    Closed,
}

/// gRPC's part of an exchange (`content-type: application/grpc*`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grpc {
    /// `grpc-status` from the trailers (or a trailers-only response).
    pub status: Option<u32>,
    /// Messages each way (`None`: a message prefix fell in bytes the kernel did not copy).
    pub requests: Option<u32>,
    pub responses: Option<u32>,
}

/// What an HTTP/2 exchange adds to the HTTP/1 fields (`Exchange::h2`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct H2Info {
    pub stream: u32,
    pub scheme: Option<String>,
    pub end: StreamEnd,
    pub grpc: Option<Grpc>,
    /// Header fields that referred to table entries from before the agent saw the connection.
    pub unresolved: u32,
}

/// A request stream that opened (its HEADERS written by this process as the client, or read
/// as the server), drained by the tracker to choose its ids while it is open: a client's for
/// its callee on this host to take (`trace_context::h2_stitch`), a server's for the calls it
/// makes to name (`trace_context::h2_owner`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub side: Side,
    pub stream: u32,
    pub start_ns: u64,
    /// The request's own valid `traceparent` (a client's callee follows that instead).
    pub traceparent: Option<crate::trace_context::TraceParent>,
}

/// Counters of one connection, drained by the tracker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct H2Stats {
    pub unresolved_fields: u64,
    pub alignment_lost: u64,
    pub streams_dropped: u64,
    pub orphan_frames: u64,
    pub malformed_blocks: u64,
    /// Streams whose end may have gone unseen when the connection ended: no exchange.
    pub ends_unseen: u64,
}

/// Counting gRPC messages through DATA bytes: a 5-byte prefix (flag, length), then the message.
#[derive(Clone, Copy, Debug, Default)]
struct Messages {
    count: u32,
    left: u64,
    prefix: [u8; 5],
    have: usize,
    lost: bool,
}

impl Messages {
    fn bytes(&mut self, mut b: &[u8]) {
        while !b.is_empty() && !self.lost {
            if self.left > 0 {
                let n = (self.left as usize).min(b.len());
                self.left -= n as u64;
                b = &b[n..];
                continue;
            }
            self.prefix[self.have] = b[0];
            self.have += 1;
            b = &b[1..];
            if self.have == 5 {
                self.have = 0;
                self.count += 1;
                let p = self.prefix;
                self.left = u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as u64;
            }
        }
    }

    /// `n` bytes the kernel did not copy: fine inside a message, lost if a prefix was in them.
    fn gap(&mut self, n: u64) {
        if self.have == 0 && n <= self.left {
            self.left -= n;
        } else if n > 0 {
            self.lost = true;
        }
    }

    fn total(&self) -> Option<u32> {
        (!self.lost).then_some(self.count)
    }
}

#[derive(Debug, Default)]
struct Stream {
    request: Vec<Field>,
    response: Option<Vec<Field>>,
    trailers: Option<Vec<Field>>,
    start_ns: u64,
    unresolved: u32,
    /// Messages client to server, server to client.
    msgs: [Messages; 2],
    /// Arrival order, for dropping the oldest.
    seq: u64,
    /// Some of the server's frames since the request went unseen (its direction was not
    /// aligned): the stream's end may have been missed, so it cannot end as "closed".
    blind: bool,
}

#[derive(Debug)]
struct Direction {
    /// Whether frame boundaries are known (lost when an uncopied gap spans one).
    aligned: bool,
    /// Client-preface bytes still to pass.
    preface: usize,
    /// An incomplete frame that must be seen whole (or an incomplete frame header).
    carry: Vec<u8>,
    /// Payload bytes of the current frame to pass over.
    skip: u64,
    /// The DATA frame being passed over: its stream and whether it ends the stream.
    data: Option<(u32, bool)>,
    hpack: Decoder,
    /// A header block waiting for CONTINUATION frames: stream, END_STREAM, fragments.
    block: Option<(u32, bool, Vec<u8>)>,
}

impl Direction {
    fn new(from_start: bool) -> Self {
        Direction {
            aligned: from_start,
            preface: 0,
            carry: Vec::new(),
            skip: 0,
            data: None,
            hpack: if from_start {
                Decoder::new()
            } else {
                Decoder::mid_stream()
            },
            block: None,
        }
    }
}

/// Both directions of one HTTP/2 connection.
#[derive(Debug)]
pub struct Http2Conn {
    /// The direction the client writes in (ingress for a server), once known.
    client: Option<Dir>,
    dirs: [Direction; 2],
    streams: HashMap<u32, Stream>,
    seq: u64,
    stats: H2Stats,
    /// Streams opened since the last `take_opened` (at most `MAX_STREAMS`).
    opened: Vec<Opened>,
    /// Seen from its preface, every frame in place, no stream dropped: every request that
    /// opened on it is known.
    whole: bool,
}

impl Http2Conn {
    /// A connection seen from its start: its client preface went in direction `client`.
    pub fn from_preface(client: Dir) -> Self {
        let mut c = Self::with(true);
        c.client = Some(client);
        c.whole = true;
        c.dirs[client as usize].preface = frame::PREFACE.len();
        c
    }

    /// A connection recognised in its middle (by [`frame::is_midstream_http2`]): each direction
    /// aligns on its next segment that is whole frames, and table entries from before are
    /// unknown.
    pub fn mid_stream() -> Self {
        Self::with(false)
    }

    fn with(from_start: bool) -> Self {
        Http2Conn {
            client: None,
            dirs: [Direction::new(from_start), Direction::new(from_start)],
            streams: HashMap::default(),
            seq: 0,
            stats: H2Stats::default(),
            opened: Vec::new(),
            whole: false,
        }
    }

    /// The request streams this process opened as the client since the last call.
    pub fn take_opened(&mut self) -> Vec<Opened> {
        std::mem::take(&mut self.opened)
    }

    pub fn take_stats(&mut self) -> H2Stats {
        std::mem::take(&mut self.stats)
    }

    /// Whether frame boundaries in `dir` are known.
    pub fn aligned(&self, dir: Dir) -> bool {
        self.dirs[dir as usize].aligned
    }

    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// Whether every request that opened on this connection was seen (from its preface, no
    /// frame passed over unaligned, no stream dropped for room): then `open_streams` is exact.
    pub fn whole(&self) -> bool {
        self.whole
    }

    /// The side the traced process is on, once a header block has shown it.
    pub fn side(&self) -> Option<Side> {
        self.client.map(|c| match c {
            Dir::Egress => Side::Client,
            Dir::Ingress => Side::Server,
        })
    }

    pub fn feed(&mut self, dir: Dir, seg: Segment, out: &mut Vec<Exchange>) {
        let d = dir as usize;
        let mut missing = seg.len.saturating_sub(seg.data.len() as u64);
        let mut data = seg.data;
        if self.dirs[d].preface > 0 {
            let n = self.dirs[d].preface.min(data.len());
            let at = frame::PREFACE.len() - self.dirs[d].preface;
            if data[..n] != frame::PREFACE[at..at + n] {
                self.lose(dir, "not the client preface");
                return;
            }
            self.dirs[d].preface -= n;
            data = &data[n..];
        }
        if !self.dirs[d].aligned {
            if missing > 0 || !tiles(data) {
                return;
            }
            self.dirs[d].aligned = true;
        }
        // An incomplete frame from the last segment continues here.
        let joined;
        let buf = if self.dirs[d].carry.is_empty() {
            data
        } else {
            let mut c = std::mem::take(&mut self.dirs[d].carry);
            c.extend_from_slice(data);
            joined = c;
            &joined[..]
        };
        let mut pos = 0;
        while pos < buf.len() && self.dirs[d].aligned {
            if self.dirs[d].skip > 0 {
                let n = (self.dirs[d].skip as usize).min(buf.len() - pos);
                self.data_bytes(dir, Some(&buf[pos..pos + n]), n as u64, &seg, out);
                pos += n;
                continue;
            }
            let rest = &buf[pos..];
            if rest.len() < frame::HEADER_LEN {
                self.dirs[d].carry = rest.to_vec();
                break;
            }
            let raw = &rest[..frame::HEADER_LEN];
            let Some(h) = FrameHeader::parse(raw).filter(|_| FrameHeader::is_strictly_valid(raw))
            else {
                // Not a frame where one must start.
                tracing::debug!(?dir, at = pos, len = buf.len(), missing, raw = ?raw, "no frame header");
                self.lose(dir, "no frame header where one must start");
                break;
            };
            let len = h.len as usize;
            match h.kind {
                frame::HEADERS
                | frame::CONTINUATION
                | frame::RST_STREAM
                | frame::GOAWAY
                | frame::SETTINGS
                    if len <= MAX_WHOLE_FRAME =>
                {
                    if rest.len() < frame::HEADER_LEN + len {
                        self.dirs[d].carry = rest.to_vec();
                        break;
                    }
                    let payload = &rest[frame::HEADER_LEN..frame::HEADER_LEN + len];
                    self.frame(dir, &h, payload, &seg, out);
                    pos += frame::HEADER_LEN + len;
                }
                frame::HEADERS | frame::CONTINUATION => {
                    // Too large to keep: whatever its block inserted is lost.
                    self.stats.malformed_blocks += 1;
                    self.desync(dir);
                    self.dirs[d].skip = h.len as u64;
                    pos += frame::HEADER_LEN;
                }
                frame::DATA => {
                    pos += frame::HEADER_LEN;
                    let from_client = self.client == Some(dir);
                    if h.has(frame::PADDED) {
                        if let Some(s) = self.streams.get_mut(&h.stream) {
                            s.msgs[!from_client as usize].lost = true;
                        }
                    }
                    self.dirs[d].data = Some((h.stream, h.has(frame::END_STREAM)));
                    self.dirs[d].skip = h.len as u64;
                    if h.len == 0 {
                        self.data_bytes(dir, None, 0, &seg, out);
                    }
                }
                _ => {
                    self.dirs[d].skip = h.len as u64;
                    pos += frame::HEADER_LEN;
                }
            }
        }
        // Bytes that moved but were not copied.
        if missing > 0 && self.dirs[d].aligned {
            if !self.dirs[d].carry.is_empty() {
                // The rest of a frame needed whole is in the gap: lost, and with it any table
                // insertion it made.
                let carry = std::mem::take(&mut self.dirs[d].carry);
                match FrameHeader::parse(&carry) {
                    Some(h)
                        if (h.len as usize + frame::HEADER_LEN - carry.len()) as u64 <= missing =>
                    {
                        if matches!(h.kind, frame::HEADERS | frame::CONTINUATION) {
                            self.stats.malformed_blocks += 1;
                            self.desync(dir);
                        }
                        missing -= (h.len as usize + frame::HEADER_LEN - carry.len()) as u64;
                    }
                    _ => {
                        self.lose(dir, "an incomplete frame header before a gap");
                        return;
                    }
                }
            }
            if self.dirs[d].skip > 0 {
                let n = self.dirs[d].skip.min(missing);
                self.data_bytes(dir, None, n, &seg, out);
                missing -= n;
            }
            if missing > 0 {
                tracing::debug!(?dir, missing, "bytes passed over beyond the frame");
                self.lose(dir, "a gap beyond the frame being passed over");
            }
        }
    }

    /// `n` payload bytes passed over in direction `dir` (`bytes` when copied); a DATA frame's
    /// bytes count gRPC messages, and its END_STREAM takes effect once they are all passed.
    fn data_bytes(
        &mut self,
        dir: Dir,
        bytes: Option<&[u8]>,
        n: u64,
        seg: &Segment,
        out: &mut Vec<Exchange>,
    ) {
        let d = dir as usize;
        self.dirs[d].skip -= n;
        let Some((stream, end)) = self.dirs[d].data else {
            return;
        };
        let from_client = self.client == Some(dir);
        if let Some(s) = self.streams.get_mut(&stream) {
            let m = &mut s.msgs[!from_client as usize];
            match bytes {
                Some(b) => m.bytes(b),
                None => m.gap(n),
            }
        }
        if self.dirs[d].skip == 0 {
            self.dirs[d].data = None;
            if end && self.client.is_some() && !from_client {
                self.finish(stream, StreamEnd::Complete, seg.end_ns, out);
            }
        }
    }

    /// A frame seen whole.
    fn frame(
        &mut self,
        dir: Dir,
        h: &FrameHeader,
        payload: &[u8],
        seg: &Segment,
        out: &mut Vec<Exchange>,
    ) {
        let d = dir as usize;
        match h.kind {
            frame::HEADERS => {
                let Ok(r) = frame::headers_fragment(h, payload) else {
                    self.stats.malformed_blocks += 1;
                    self.desync(dir);
                    return;
                };
                let fragment = &payload[r];
                if h.has(frame::END_HEADERS) {
                    self.block(dir, h.stream, h.has(frame::END_STREAM), fragment, seg, out);
                } else {
                    self.dirs[d].block =
                        Some((h.stream, h.has(frame::END_STREAM), fragment.to_vec()));
                }
            }
            frame::CONTINUATION => match self.dirs[d].block.take() {
                Some((stream, end, mut block))
                    if stream == h.stream && block.len() + payload.len() <= MAX_WHOLE_FRAME =>
                {
                    block.extend_from_slice(payload);
                    if h.has(frame::END_HEADERS) {
                        self.block(dir, stream, end, &block, seg, out);
                    } else {
                        self.dirs[d].block = Some((stream, end, block));
                    }
                }
                _ => {
                    // A CONTINUATION of a block not seen (or too large): its insertions are lost.
                    self.stats.malformed_blocks += 1;
                    self.desync(dir);
                }
            },
            frame::RST_STREAM => {
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                self.finish(h.stream, StreamEnd::Reset(code), seg.end_ns, out);
            }
            frame::GOAWAY => {
                let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                    & 0x7fff_ffff;
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                // Only the server's GOAWAY names client streams it will not process.
                if self.client.is_some() && self.client != Some(dir) {
                    let left_out: Vec<u32> =
                        self.streams.keys().copied().filter(|&s| s > last).collect();
                    for s in left_out {
                        self.finish(s, StreamEnd::GoAway(code), seg.end_ns, out);
                    }
                }
            }
            _ => {}
        }
    }

    /// A complete header block of `stream`, from direction `dir`.
    fn block(
        &mut self,
        dir: Dir,
        stream: u32,
        end_stream: bool,
        block: &[u8],
        seg: &Segment,
        out: &mut Vec<Exchange>,
    ) {
        let d = dir as usize;
        let mut fields = Vec::new();
        let stats = match self.dirs[d]
            .hpack
            .decode(&Bytes::copy_from_slice(block), &mut fields)
        {
            Ok(s) => s,
            Err(_) => {
                // The decoder lost sync by itself; this block's fields are not trusted.
                self.stats.malformed_blocks += 1;
                return;
            }
        };
        self.stats.unresolved_fields += stats.unresolved as u64;
        if self.client.is_none() {
            // A connection picked up in its middle: the block's pseudo-headers say who is who.
            if value(&fields, ":method").is_some() {
                self.client = Some(dir);
            } else if value(&fields, ":status").is_some() {
                self.client = Some(other(dir));
            } else {
                return;
            }
        }
        if self.client == Some(dir) {
            if self.streams.contains_key(&stream) || stream.is_multiple_of(2) {
                return; // the client's trailers, or not a client stream
            }
            if self.streams.len() >= MAX_STREAMS {
                if let Some(oldest) = self
                    .streams
                    .iter()
                    .min_by_key(|(_, s)| s.seq)
                    .map(|(k, _)| *k)
                {
                    self.streams.remove(&oldest);
                    self.stats.streams_dropped += 1;
                    self.whole = false;
                }
            }
            self.seq += 1;
            if self.opened.len() < MAX_STREAMS {
                self.opened.push(Opened {
                    side: if dir == Dir::Egress {
                        Side::Client
                    } else {
                        Side::Server
                    },
                    stream,
                    start_ns: seg.start_ns,
                    traceparent: value(&fields, "traceparent")
                        .and_then(crate::trace_context::TraceParent::parse),
                });
            } else {
                // Its ids are not chosen while it is open: nothing links to it.
                self.whole = false;
            }
            let blind = !self.dirs[other(dir) as usize].aligned;
            self.streams.insert(
                stream,
                Stream {
                    request: fields,
                    start_ns: seg.start_ns,
                    unresolved: stats.unresolved as u32,
                    seq: self.seq,
                    blind,
                    ..Stream::default()
                },
            );
            return;
        }
        let Some(s) = self.streams.get_mut(&stream) else {
            self.stats.orphan_frames += 1;
            return;
        };
        s.unresolved += stats.unresolved as u32;
        if s.response.is_none() {
            let informational = value(&fields, ":status")
                .and_then(|v| v.parse::<u16>().ok())
                .is_some_and(|c| (100..200).contains(&c));
            if informational {
                return;
            }
            s.response = Some(fields);
        } else {
            s.trailers = Some(fields);
        }
        if end_stream {
            self.finish(stream, StreamEnd::Complete, seg.end_ns, out);
        }
    }

    /// The stream is over: its exchange goes out.
    fn finish(&mut self, stream: u32, end: StreamEnd, end_ns: u64, out: &mut Vec<Exchange>) {
        let (Some(side), Some(s)) = (self.side(), self.streams.remove(&stream)) else {
            return;
        };
        out.push(exchange(side, stream, s, end, end_ns));
    }

    /// The connection ended: streams still open end with it.
    pub fn close(&mut self, end_ns: u64, out: &mut Vec<Exchange>) {
        let mut open: Vec<u32> = self.streams.keys().copied().collect();
        open.sort_unstable();
        for s in open {
            if self.streams.get(&s).is_some_and(|s| s.blind) {
                self.streams.remove(&s);
                self.stats.ends_unseen += 1;
            } else {
                self.finish(s, StreamEnd::Closed, end_ns, out);
            }
        }
    }

    /// Frame boundaries in `dir` are unknown from here (and so are table positions).
    fn lose(&mut self, dir: Dir, why: &'static str) {
        let d = &mut self.dirs[dir as usize];
        if d.aligned {
            self.stats.alignment_lost += 1;
            self.whole = false;
            tracing::debug!(
                ?dir,
                why,
                skip = d.skip,
                carry = d.carry.len(),
                "HTTP/2 frame alignment lost"
            );
        }
        d.aligned = false;
        d.carry.clear();
        d.skip = 0;
        d.data = None;
        self.desync(dir);
        if self.client.is_some_and(|c| c != dir) {
            // The server's frames are unseen from here: open streams may end unseen.
            for s in self.streams.values_mut() {
                s.blind = true;
            }
        }
    }

    /// A header block in `dir` was lost: no table position there can be trusted.
    fn desync(&mut self, dir: Dir) {
        let d = &mut self.dirs[dir as usize];
        d.block = None;
        d.hpack.lose_sync();
    }
}

fn other(dir: Dir) -> Dir {
    match dir {
        Dir::Ingress => Dir::Egress,
        Dir::Egress => Dir::Ingress,
    }
}

/// Whether `data` is whole, strictly valid frames that tile it exactly (where a direction of a
/// connection already known to be HTTP/2 may align).
fn tiles(data: &[u8]) -> bool {
    let mut pos = 0;
    while pos < data.len() {
        let raw = &data[pos..];
        if !FrameHeader::is_strictly_valid(raw) {
            return false;
        }
        let Some(h) = FrameHeader::parse(raw) else {
            return false;
        };
        pos += frame::HEADER_LEN + h.len as usize;
    }
    pos == data.len() && !data.is_empty()
}

/// The value of the first field named `name` whose value is known.
fn value<'a>(fields: &'a [Field], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|f| f.name_str() == Some(name))
        .and_then(Field::value_str)
}

fn exchange(side: Side, stream: u32, s: Stream, end: StreamEnd, end_ns: u64) -> Exchange {
    let req = &s.request;
    let own = |n: &str| value(req, n).map(str::to_owned);
    let content_type = value(req, "content-type").unwrap_or("");
    let status_fields = s.trailers.as_ref().or(s.response.as_ref());
    let grpc = content_type.starts_with("application/grpc").then(|| Grpc {
        status: status_fields
            .and_then(|f| value(f, "grpc-status"))
            .and_then(|v| v.parse().ok()),
        requests: s.msgs[0].total(),
        responses: s.msgs[1].total(),
    });
    let status = s
        .response
        .as_ref()
        .and_then(|f| value(f, ":status"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Exchange {
        side,
        request: RequestHead {
            method: own(":method").unwrap_or_default(),
            target: own(":path").unwrap_or_default(),
            minor_version: 1,
            host: own(":authority").or_else(|| own("host")),
            user_agent: own("user-agent"),
            traceparent: own("traceparent"),
            tracestate: own("tracestate"),
            framing: Framing::None,
        },
        response: ResponseHead {
            status,
            minor_version: 1,
            framing: Framing::None,
        },
        start_ns: s.start_ns,
        end_ns: end_ns.max(s.start_ns),
        ctx: None,
        h2: Some(Box::new(H2Info {
            stream,
            scheme: own(":scheme"),
            end,
            grpc,
            unresolved: s.unresolved,
        })),
    }
}

#[cfg(test)]
mod tests;
