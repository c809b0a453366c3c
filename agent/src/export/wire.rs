//! Our spans written straight into OTLP protobuf bytes (`ExportTraceServiceRequest`), field by
//! field with prost's wire primitives, for the export hot path.
//!
//! Why by hand: the `opentelemetry-proto` message types own every string and byte vector, so
//! going through them costs a copy and an allocation for each attribute key and value of every
//! span (about twenty per span), then a walk over them to encode. Here each span is sized once
//! and written once from the strings it holds. The field numbers are those of
//! opentelemetry-proto's `trace.proto` and `common.proto`; a golden test decodes what this writes
//! with the crate's own types and compares it with `encode::request`, the type-based conversion.
use std::sync::Arc;

use crate::fast::HashMap;

use prost::{
    encoding::{encode_key, encode_varint, encoded_len_varint, WireType},
    Message,
};

use crate::{
    process::Resource,
    span::{KeyValue, Kind, Span, Status, Value},
};

/// Bytes of a field's key (every tag used here is below 16: one byte).
const KEY: usize = 1;
/// `Span.flags` has tag 16: a two-byte key.
const FLAGS_KEY: usize = 2;

fn delimited_len(len: usize) -> usize {
    KEY + encoded_len_varint(len as u64) + len
}

fn str_len(s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        delimited_len(s.len())
    }
}

fn put_delimited(tag: u32, len: usize, buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

fn put_str(tag: u32, s: &str, buf: &mut Vec<u8>) {
    if !s.is_empty() {
        put_delimited(tag, s.len(), buf);
        buf.extend_from_slice(s.as_bytes());
    }
}

fn put_bytes(tag: u32, b: &[u8], buf: &mut Vec<u8>) {
    if !b.is_empty() {
        put_delimited(tag, b.len(), buf);
        buf.extend_from_slice(b);
    }
}

fn put_fixed64(tag: u32, v: u64, buf: &mut Vec<u8>) {
    if v != 0 {
        encode_key(tag, WireType::SixtyFourBit, buf);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

fn put_uint(tag: u32, v: u64, buf: &mut Vec<u8>) {
    if v != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(v, buf);
    }
}

/// `AnyValue`: a oneof, so written even when the value is the default.
fn any_len(v: &Value) -> usize {
    match v {
        Value::Str(s) => delimited_len(s.len()),
        Value::Int(i) => KEY + encoded_len_varint(*i as u64),
    }
}

fn put_any(v: &Value, buf: &mut Vec<u8>) {
    match v {
        Value::Str(s) => {
            put_delimited(1, s.len(), buf);
            buf.extend_from_slice(s.as_bytes());
        }
        Value::Int(i) => {
            encode_key(3, WireType::Varint, buf);
            encode_varint(*i as u64, buf);
        }
    }
}

/// `KeyValue { key = 1, value = 2 (AnyValue) }`.
fn kv_len(a: &KeyValue) -> usize {
    str_len(&a.key) + delimited_len(any_len(&a.value))
}

fn put_kv(a: &KeyValue, buf: &mut Vec<u8>) {
    put_str(1, &a.key, buf);
    put_delimited(2, any_len(&a.value), buf);
    put_any(&a.value, buf);
}

fn flags(s: &Span) -> u32 {
    // Low byte: W3C trace flags; bits 8-9: parent-is-remote known, and true when there is a
    // parent.
    s.flags as u32 | 0x100 | if s.parent_span_id.is_some() { 0x200 } else { 0 }
}

fn kind(s: &Span) -> u64 {
    // `SpanKind`: SERVER = 2, CLIENT = 3.
    match s.kind {
        Kind::Server => 2,
        Kind::Client => 3,
    }
}

fn status_code(s: &Span) -> u64 {
    // `Status.StatusCode`: UNSET = 0, ERROR = 2.
    match s.status {
        Status::Unset => 0,
        Status::Error => 2,
    }
}

fn status_len(s: &Span) -> usize {
    let code = status_code(s);
    if code == 0 {
        0
    } else {
        KEY + encoded_len_varint(code)
    }
}

/// Bytes of one encoded `Span` message (without its field key and length).
pub fn span_len(s: &Span) -> usize {
    let mut n = delimited_len(16) + delimited_len(8);
    n += str_len(&s.trace_state);
    if s.parent_span_id.is_some() {
        n += delimited_len(8);
    }
    n += FLAGS_KEY + 4;
    n += str_len(&s.name);
    n += KEY + encoded_len_varint(kind(s));
    if s.start_unix_ns != 0 {
        n += KEY + 8;
    }
    if s.end_unix_ns != 0 {
        n += KEY + 8;
    }
    n += s
        .attributes
        .iter()
        .map(|a| delimited_len(kv_len(a)))
        .sum::<usize>();
    if s.dropped_attributes_count != 0 {
        n += KEY + encoded_len_varint(s.dropped_attributes_count as u64);
    }
    n + delimited_len(status_len(s))
}

/// Writes one `Span` message of `span_len(s)` bytes.
fn put_span(s: &Span, buf: &mut Vec<u8>) {
    put_bytes(1, &s.trace_id, buf);
    put_bytes(2, &s.span_id, buf);
    put_str(3, &s.trace_state, buf);
    if let Some(p) = &s.parent_span_id {
        put_bytes(4, p, buf);
    }
    put_str(5, &s.name, buf);
    encode_key(6, WireType::Varint, buf);
    encode_varint(kind(s), buf);
    put_fixed64(7, s.start_unix_ns, buf);
    put_fixed64(8, s.end_unix_ns, buf);
    for a in &s.attributes {
        put_delimited(9, kv_len(a), buf);
        put_kv(a, buf);
    }
    put_uint(10, s.dropped_attributes_count as u64, buf);
    put_delimited(15, status_len(s), buf);
    put_uint(3, status_code(s), buf);
    // Fields go in tag order, as prost writes them: `flags` (16) last.
    encode_key(16, WireType::ThirtyTwoBit, buf);
    buf.extend_from_slice(&flags(s).to_le_bytes());
}

/// What a resource's group writes besides its spans, encoded once per request: the `Resource`
/// and the `InstrumentationScope` messages (through the crate's types: a few per request).
struct Group {
    resource: Vec<u8>,
    scope: Vec<u8>,
}

impl Group {
    fn new(r: &Resource) -> Group {
        let resource = super::encode::resource(r).encode_to_vec();
        let scope = super::encode::scope().encode_to_vec();
        Group { resource, scope }
    }

    /// Bytes of the `ScopeSpans` message holding spans of these (already delimited) sizes.
    fn scope_spans_len(&self, spans: usize) -> usize {
        delimited_len(self.scope.len()) + spans + str_len(super::encode::SCHEMA_URL)
    }

    /// Bytes of the `ResourceSpans` message holding spans of these (already delimited) sizes.
    fn resource_spans_len(&self, spans: usize) -> usize {
        delimited_len(self.resource.len()) + delimited_len(self.scope_spans_len(spans))
    }
}

/// Bytes a resource's group adds to a request besides its spans, at most (its length prefixes
/// counted at their widest).
pub fn group_overhead(r: &Resource) -> usize {
    let g = Group::new(r);
    g.resource_spans_len(0) + 2 * (KEY + 5)
}

/// The spans as one encoded `ExportTraceServiceRequest`, one `ResourceSpans` per resource (in
/// order of first appearance), each span's encoded size given in `sizes`.
pub fn request(spans: &[Span], sizes: &[usize]) -> Vec<u8> {
    // Spans by resource, in order.
    let mut groups: Vec<(Group, Vec<usize>, usize)> = Vec::new();
    let mut index: HashMap<*const Resource, usize> = HashMap::default();
    for (i, s) in spans.iter().enumerate() {
        let g = *index.entry(Arc::as_ptr(&s.resource)).or_insert_with(|| {
            groups.push((Group::new(&s.resource), Vec::new(), 0));
            groups.len() - 1
        });
        groups[g].1.push(i);
        groups[g].2 += delimited_len(sizes[i]);
    }
    let total: usize = groups
        .iter()
        .map(|(g, _, n)| delimited_len(g.resource_spans_len(*n)))
        .sum();
    let mut buf = Vec::with_capacity(total);
    for (g, members, n) in &groups {
        // ResourceSpans { resource = 1, scope_spans = 2 }
        put_delimited(1, g.resource_spans_len(*n), &mut buf);
        put_delimited(1, g.resource.len(), &mut buf);
        buf.extend_from_slice(&g.resource);
        // ScopeSpans { scope = 1, spans = 2, schema_url = 3 }
        put_delimited(2, g.scope_spans_len(*n), &mut buf);
        put_delimited(1, g.scope.len(), &mut buf);
        buf.extend_from_slice(&g.scope);
        for &i in members {
            put_delimited(2, sizes[i], &mut buf);
            let at = buf.len();
            put_span(&spans[i], &mut buf);
            debug_assert_eq!(buf.len() - at, sizes[i]);
        }
        put_str(3, super::encode::SCHEMA_URL, &mut buf);
    }
    debug_assert_eq!(buf.len(), total);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::test_span;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

    fn varied(i: usize) -> Span {
        let mut s = test_span(i);
        if i % 2 == 1 {
            s.parent_span_id = Some([7; 8]);
            s.kind = Kind::Client;
            s.status = Status::Error;
            s.trace_state = "k=v".into();
        }
        if i.is_multiple_of(3) {
            s.dropped_attributes_count = 300;
            s.start_unix_ns = 0;
        }
        s.attributes
            .push(KeyValue::new("n", Value::Int(-(i as i64))));
        s.attributes
            .push(KeyValue::new("e", Value::Str(String::new().into())));
        s.attributes.push(KeyValue::new("z", Value::Int(0)));
        s.attributes
            .push(KeyValue::new("b", Value::Str("borrowed".into())));
        s.attributes.push(KeyValue::new(
            "long",
            Value::Str("x".repeat(200 * i).into()),
        ));
        s
    }

    #[test]
    fn decodes_as_the_type_based_conversion_gives() {
        // Several resources, interleaved: the groups keep their spans in order.
        let mut spans: Vec<Span> = (0..12).map(varied).collect();
        let shared = spans[0].resource.clone();
        for s in spans.iter_mut().step_by(3) {
            s.resource = shared.clone();
        }
        let sizes: Vec<usize> = spans.iter().map(span_len).collect();
        let bytes = request(&spans, &sizes);
        let got = ExportTraceServiceRequest::decode(bytes.as_slice()).expect("decodes");
        let want = super::super::encode::request(&spans);
        assert!(got == want, "decoded request differs");
        // And byte for byte as prost writes the crate's types.
        assert!(bytes == want.encode_to_vec(), "bytes differ");
    }

    #[test]
    fn sizes_are_exact() {
        for i in 0..20 {
            let s = varied(i);
            let mut buf = Vec::new();
            put_span(&s, &mut buf);
            assert_eq!(buf.len(), span_len(&s), "span {i}");
        }
    }
}
