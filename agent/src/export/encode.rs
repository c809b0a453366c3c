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
