//! Our spans to OTLP protobuf messages, one `ResourceSpans` per traced process.
use std::{collections::HashMap, sync::Arc};

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
        Value::Str(s) => any_value::Value::StringValue(s.clone()),
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
            .map(|(r, spans)| ResourceSpans {
                resource: Some(PResource {
                    attributes: r.attributes.iter().map(kv).collect(),
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "beholder.http".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: "https://opentelemetry.io/schemas/1.26.0".into(),
                }],
                schema_url: String::new(),
            })
            .collect(),
    }
}

/// The batch as export requests of at most `max_bytes` encoded each (halving until they fit; a
/// single span bigger than that still goes alone), with their span counts.
pub fn requests(spans: &[Span], max_bytes: usize) -> Vec<(ExportTraceServiceRequest, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![spans];
    while let Some(part) = todo.pop() {
        let req = request(part);
        if part.len() > 1 && prost::Message::encoded_len(&req) > max_bytes {
            let (a, b) = part.split_at(part.len() / 2);
            todo.push(b);
            todo.push(a);
        } else if !part.is_empty() {
            out.push((req, part.len() as u64));
        }
    }
    out
}

/// Spans in an export request.
pub fn span_count(req: &ExportTraceServiceRequest) -> u64 {
    req.resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len() as u64)
        .sum()
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
        let spans: Vec<Span> = (0..100).map(test_span).collect();
        let whole = prost::Message::encoded_len(&request(&spans));
        let parts = requests(&spans, whole / 5);
        assert!(parts.len() >= 5, "{}", parts.len());
        assert_eq!(parts.iter().map(|(_, n)| n).sum::<u64>(), 100);
        for (r, n) in &parts {
            assert!(prost::Message::encoded_len(r) <= whole / 5);
            assert_eq!(span_count(r), *n);
        }
        // Order kept: the first request starts with the first span.
        let first = &parts[0].0.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(first.name, spans[0].name);
        assert_eq!(requests(&spans, usize::MAX).len(), 1);
        // A span bigger than the limit still goes, alone.
        assert_eq!(requests(&spans[..1], 10).len(), 1);
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
