//! Our span model: built from observed traffic, not from SDK tracer calls.
mod build;
pub mod limits;
pub mod redact;
mod rpc;

use std::{borrow::Cow, sync::Arc};

pub use build::build_span;

use crate::process::Resource;

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A string: constants (method names, schemes, versions) borrowed, never allocated.
    Str(Cow<'static, str>),
    Int(i64),
}

#[derive(Clone, Debug, PartialEq)]
pub struct KeyValue {
    pub key: Cow<'static, str>,
    pub value: Value,
}

impl KeyValue {
    pub fn new(key: &'static str, value: Value) -> Self {
        KeyValue {
            key: Cow::Borrowed(key),
            value,
        }
    }
    pub fn owned(key: String, value: Value) -> Self {
        KeyValue {
            key: Cow::Owned(key),
            value,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Server,
    Client,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Unset,
    Error,
}

#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub trace_state: String,
    pub flags: u8,
    pub name: String,
    pub kind: Kind,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attributes: Vec<KeyValue>,
    /// Attributes left out by the count limit (`span::limits`).
    pub dropped_attributes_count: u32,
    pub status: Status,
    pub resource: Arc<Resource>,
}

impl Span {
    /// Memory the span holds: its struct and what its strings own (the resource is shared by the
    /// process's spans and not counted). What the export queue's byte budget charges.
    pub fn approx_bytes(&self) -> usize {
        let owned = |c: &Cow<'static, str>| match c {
            Cow::Borrowed(_) => 0,
            Cow::Owned(s) => s.capacity(),
        };
        let attrs: usize = self
            .attributes
            .iter()
            .map(|a| {
                owned(&a.key)
                    + match &a.value {
                        Value::Str(s) => owned(s),
                        Value::Int(_) => 0,
                    }
            })
            .sum();
        std::mem::size_of::<Span>()
            + self.name.capacity()
            + self.trace_state.capacity()
            + self.attributes.capacity() * std::mem::size_of::<KeyValue>()
            + attrs
    }

    pub fn attr(&self, key: &str) -> Option<&Value> {
        self.attributes
            .iter()
            .find(|a| a.key == key)
            .map(|a| &a.value)
    }
}

/// A server span of one of three processes, with a few attributes (unit tests of the exporter).
#[cfg(test)]
pub fn test_span(i: usize) -> Span {
    let resource = Arc::new(Resource {
        service_name: format!("svc{}", i % 3),
        attributes: vec![KeyValue::new(
            "service.name",
            Value::Str(format!("svc{}", i % 3).into()),
        )],
    });
    Span {
        trace_id: [i as u8 + 1; 16],
        span_id: [i as u8 + 1; 8],
        parent_span_id: None,
        trace_state: String::new(),
        flags: 1,
        name: format!("GET /items/{i}"),
        kind: Kind::Server,
        start_unix_ns: 1,
        end_unix_ns: 2,
        attributes: vec![KeyValue::new(
            "url.path",
            Value::Str(format!("/items/{i}").into()),
        )],
        dropped_attributes_count: 0,
        status: Status::Unset,
        resource,
    }
}
