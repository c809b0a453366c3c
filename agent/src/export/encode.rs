//! Our spans to OTLP protobuf messages, one `ResourceSpans` per traced process.
use std::{collections::HashMap, sync::Arc};

use bytes::Bytes;

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue as PKeyValue},
    resource::v1::Resource as PResource,
    trace::v1::{
        span::SpanKind, status::StatusCode, ResourceSpans, ScopeSpans, Span as PSpan,
        Status as PStatus,
    },
};

use crate::span::{KeyValue, Kind, Span, Status, Value};

fn kv(a: &KeyValue) -> PKeyValue {
    let value = match &a.value {
        Value::Str(s) => any_value::Value::StringValue(s.to_string()),
        Value::Int(i) => any_value::Value::IntValue(*i),
    };
    PKeyValue {
        key: a.key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn span(s: &Span) -> PSpan {
    PSpan {
        trace_id: s.trace_id.to_vec(),
        span_id: s.span_id.to_vec(),
        trace_state: s.trace_state.clone(),
        parent_span_id: s.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
        // Low byte: W3C trace flags; bits 8-9: parent-is-remote known, and true when there is a parent.
        flags: s.flags as u32 | 0x100 | if s.parent_span_id.is_some() { 0x200 } else { 0 },
        name: s.name.clone(),
        kind: match s.kind {
            Kind::Server => SpanKind::Server,
            Kind::Client => SpanKind::Client,
        } as i32,
        start_time_unix_nano: s.start_unix_ns,
        end_time_unix_nano: s.end_unix_ns,
        attributes: s.attributes.iter().map(kv).collect(),
        dropped_attributes_count: s.dropped_attributes_count,
        status: Some(PStatus {
            message: String::new(),
            code: match s.status {
                Status::Unset => StatusCode::Unset,
                Status::Error => StatusCode::Error,
            } as i32,
        }),
        ..Default::default()
    }
}

/// The schema of the attribute names the spans use.
pub const SCHEMA_URL: &str = "https://opentelemetry.io/schemas/1.26.0";

pub fn resource(r: &crate::process::Resource) -> PResource {
    PResource {
        attributes: r.attributes.iter().map(kv).collect(),
        ..Default::default()
    }
}

pub fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "beholder.http".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

fn resource_spans(r: &crate::process::Resource, spans: Vec<PSpan>) -> ResourceSpans {
    ResourceSpans {
        resource: Some(resource(r)),
        scope_spans: vec![ScopeSpans {
            scope: Some(scope()),
            spans,
            schema_url: SCHEMA_URL.into(),
        }],
        schema_url: String::new(),
    }
}

/// The spans as one export request, grouped by resource (in order of first appearance),
/// through opentelemetry-proto's types: the oracle of `wire`, which the exporter uses.
pub fn request(spans: &[Span]) -> ExportTraceServiceRequest {
    let mut groups: Vec<(Arc<crate::process::Resource>, Vec<PSpan>)> = Vec::new();
    let mut index: HashMap<*const crate::process::Resource, usize> = HashMap::new();
    for s in spans {
        let i = *index.entry(Arc::as_ptr(&s.resource)).or_insert_with(|| {
            groups.push((s.resource.clone(), Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(span(s));
    }
    ExportTraceServiceRequest {
        resource_spans: groups
            .into_iter()
            .map(|(r, spans)| resource_spans(&r, spans))
            .collect(),
    }
}

/// Spans in an export request.
pub fn span_count(req: &ExportTraceServiceRequest) -> u64 {
    req.resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len() as u64)
        .sum()
}

/// The batch encoded as export requests of at most `max_bytes` each (halving until they fit; a
/// single span bigger than that still goes alone), with their span counts. Each span is sized
/// once and written once, straight from its fields (`wire`), and retries resend the same bytes.
pub fn requests(spans: &[Span], max_bytes: usize) -> Vec<(Bytes, u64)> {
    let sizes: Vec<usize> = spans.iter().map(super::wire::span_len).collect();
    let mut out = Vec::new();
    let mut todo = Vec::new();
    todo.push(0..spans.len());
    while let Some(r) = todo.pop() {
        if r.len() > 1 && estimate(&spans[r.clone()], &sizes[r.clone()]) > max_bytes {
            let mid = r.start + r.len() / 2;
            todo.push(mid..r.end);
            todo.push(r.start..mid);
        } else if !r.is_empty() {
            let body = super::wire::request(&spans[r.clone()], &sizes[r.clone()]);
            out.push((Bytes::from(body), r.len() as u64));
        }
    }
    out
}

/// An upper bound of the encoded size of a request of these spans (of these sizes).
fn estimate(spans: &[Span], sizes: &[usize]) -> usize {
    let mut seen: Vec<*const crate::process::Resource> = Vec::new();
    // Each span's key and length prefix, at their widest.
    let mut total: usize = sizes.iter().map(|n| n + 6).sum();
    for s in spans {
        let p = Arc::as_ptr(&s.resource);
        if !seen.contains(&p) {
            seen.push(p);
            total += super::wire::group_overhead(&s.resource);
        }
    }
    total
}

/// As `split`, for an encoded request (a backend refused it as too large, which is rare):
/// the halves encoded, with their span counts; `None` for a single span or bytes that are not
/// a request.
pub fn split_encoded(req: &Bytes) -> Option<((Bytes, u64), (Bytes, u64))> {
    let req: ExportTraceServiceRequest = prost::Message::decode(req.as_ref()).ok()?;
    let (a, b) = split(req)?;
    let enc = |r: ExportTraceServiceRequest| {
        let n = span_count(&r);
        (Bytes::from(prost::Message::encode_to_vec(&r)), n)
    };
    Some((enc(a), enc(b)))
}

/// Splits an export request into two with half of its spans each (resources and scopes kept
/// with their spans); `None` for a single span.
pub fn split(
    req: ExportTraceServiceRequest,
) -> Option<(ExportTraceServiceRequest, ExportTraceServiceRequest)> {
    let total = span_count(&req);
    if total < 2 {
        return None;
    }
    let mut left_budget = total / 2;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for rs in req.resource_spans {
        let (resource, schema_url) = (rs.resource, rs.schema_url);
        let (mut sa, mut sb) = (Vec::new(), Vec::new());
        for mut ss in rs.scope_spans {
            let take = (left_budget as usize).min(ss.spans.len());
            left_budget -= take as u64;
            let rest = ss.spans.split_off(take);
            if !rest.is_empty() {
                sb.push(ScopeSpans {
                    spans: rest,
                    scope: ss.scope.clone(),
                    schema_url: ss.schema_url.clone(),
                });
            }
            if !ss.spans.is_empty() {
                sa.push(ss);
            }
        }
        if !sa.is_empty() {
            a.push(ResourceSpans {
                scope_spans: sa,
                resource: resource.clone(),
                schema_url: schema_url.clone(),
            });
        }
        if !sb.is_empty() {
            b.push(ResourceSpans {
                scope_spans: sb,
                resource,
                schema_url,
            });
        }
    }
    Some((
        ExportTraceServiceRequest { resource_spans: a },
        ExportTraceServiceRequest { resource_spans: b },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::test_span;

    #[test]
    fn requests_fit_the_limit_and_keep_every_span() {
        let spans = || (0..100).map(test_span).collect::<Vec<Span>>();
        let whole = prost::Message::encoded_len(&request(&spans()));
        let parts = requests(&spans(), whole / 5);
        assert!(parts.len() >= 5, "{}", parts.len());
        assert_eq!(parts.iter().map(|(_, n)| n).sum::<u64>(), 100);
        let mut names = Vec::new();
        for (body, n) in &parts {
            assert!(body.len() <= whole / 5, "{} > {}", body.len(), whole / 5);
            let r: ExportTraceServiceRequest =
                prost::Message::decode(body.as_ref()).expect("decodes");
            assert_eq!(span_count(&r), *n);
            for rs in &r.resource_spans {
                assert!(rs.resource.is_some());
                names.extend(
                    rs.scope_spans
                        .iter()
                        .flat_map(|s| &s.spans)
                        .map(|s| s.name.clone()),
                );
            }
        }
        // Every span once, in order within each resource.
        let mut want: Vec<String> = spans().into_iter().map(|s| s.name).collect();
        names.sort();
        want.sort();
        assert_eq!(names, want);
        // One request when it fits, the same bytes as encoding the batch whole.
        let one = requests(&spans(), usize::MAX);
        assert_eq!(one.len(), 1);
        assert!(
            one[0].0.as_ref() == prost::Message::encode_to_vec(&request(&spans())).as_slice(),
            "bytes differ"
        );
        // A span bigger than the limit still goes, alone.
        assert_eq!(requests(&spans()[..1], 10).len(), 1);
        assert_eq!(requests(&spans()[..3], 10).len(), 3);
    }

    #[test]
    fn spans_encode_as_the_conventions_say() {
        let s = test_span(3);
        let (name, attrs) = (s.name.clone(), s.attributes.len());
        let r = request(std::slice::from_ref(&s));
        let p = &r.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(p.name, name);
        assert_eq!(p.attributes.len(), attrs);
        assert_eq!(p.trace_id.len(), 16);
        assert_eq!(p.span_id.len(), 8);
        // Parent-is-remote known (bit 8); the test span has no parent (bit 9 clear).
        assert_eq!(p.flags & 0x300, 0x100);
    }

    #[test]
    fn split_halves_across_resources() {
        let spans: Vec<Span> = (0..7).map(test_span).collect();
        let req = request(&spans);
        let resources = req.resource_spans.len();
        let (a, b) = split(req).expect("split");
        assert_eq!((span_count(&a), span_count(&b)), (3, 4));
        for r in a.resource_spans.iter().chain(&b.resource_spans) {
            assert!(r.resource.is_some());
            assert!(r
                .scope_spans
                .iter()
                .all(|s| s.scope.is_some() && !s.spans.is_empty()));
        }
        assert!(a.resource_spans.len() + b.resource_spans.len() >= resources);
        assert!(split(request(&spans[..1])).is_none());
    }
}
