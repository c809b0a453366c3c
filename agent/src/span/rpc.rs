//! gRPC exchanges (HTTP/2 with `content-type: application/grpc*`) as RPC spans.
//!
//! Names follow the OpenTelemetry RPC semantic conventions as published on
//! opentelemetry.io/docs/specs/semconv/rpc (the stabilised set that replaced v1.37.0's): span
//! name and `rpc.method` = the fully-qualified `package.Service/Method` (`_OTHER` when the path
//! is unknown), `rpc.system.name` = `grpc`, `rpc.response.status_code` = the status's name,
//! `server.address`/`server.port`, `error.type` on failure, `network.protocol.{name,version}`.
//! Span status: on SERVER spans an error only for UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED,
//! INTERNAL, UNAVAILABLE and DATA_LOSS; on CLIENT spans for any status but OK, and for a call
//! that ended without one (reset, refused by GOAWAY, connection closed).
use super::{KeyValue, Kind, Status, Value};
use crate::protocol::http2::{Grpc, StreamEnd};

/// gRPC status names by code (grpc/doc/statuscodes.md).
const STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Server-side errors (the rest are the client's doing).
const SERVER_ERRORS: [u32; 6] = [2, 4, 12, 13, 14, 15];

pub fn status_name(code: u32) -> std::borrow::Cow<'static, str> {
    STATUS_NAMES
        .get(code as usize)
        .map_or_else(|| code.to_string().into(), |s| (*s).into())
}

/// HTTP/2 error codes (RFC 9113 section 7), for `error.type` of a reset stream.
pub fn h2_error_name(code: u32) -> String {
    const NAMES: [&str; 14] = [
        "NO_ERROR",
        "PROTOCOL_ERROR",
        "INTERNAL_ERROR",
        "FLOW_CONTROL_ERROR",
        "SETTINGS_TIMEOUT",
        "STREAM_CLOSED",
        "FRAME_SIZE_ERROR",
        "REFUSED_STREAM",
        "CANCEL",
        "COMPRESSION_ERROR",
        "CONNECT_ERROR",
        "ENHANCE_YOUR_CALM",
        "INADEQUATE_SECURITY",
        "HTTP_1_1_REQUIRED",
    ];
    NAMES
        .get(code as usize)
        .map_or_else(|| format!("0x{code:x}"), |s| (*s).to_owned())
}

/// Why a stream that carried no status ended, for `error.type` (low cardinality).
pub fn end_error(end: StreamEnd) -> Option<String> {
    match end {
        StreamEnd::Complete => None,
        StreamEnd::Reset(code) => Some(h2_error_name(code)),
        StreamEnd::GoAway(_) => Some("GOAWAY".into()),
        StreamEnd::Closed => Some("connection_closed".into()),
    }
}

/// `package.Service/Method` from a gRPC path, `_OTHER` when it is not one.
pub fn method(path: &str) -> &str {
    match path.strip_prefix('/') {
        Some(m) if m.contains('/') && !m.ends_with('/') => m,
        _ => "_OTHER",
    }
}

/// The RPC attributes of a gRPC exchange, its name and its status.
pub fn attributes(
    path: &str,
    grpc: &Grpc,
    end: StreamEnd,
    kind: Kind,
    attrs: &mut Vec<KeyValue>,
) -> (String, Status) {
    let m = method(path);
    attrs.push(KeyValue::new("rpc.system.name", Value::Str("grpc".into())));
    attrs.push(KeyValue::new("rpc.method", Value::Str(m.to_owned().into())));
    let (sent, received) = match kind {
        Kind::Client => (grpc.requests, grpc.responses),
        Kind::Server => (grpc.responses, grpc.requests),
    };
    if let Some(n) = sent {
        attrs.push(KeyValue::new(
            "beholder.rpc.messages_sent",
            Value::Int(n as i64),
        ));
    }
    if let Some(n) = received {
        attrs.push(KeyValue::new(
            "beholder.rpc.messages_received",
            Value::Int(n as i64),
        ));
    }
    let error = match grpc.status {
        Some(code) => {
            attrs.push(KeyValue::new(
                "rpc.response.status_code",
                Value::Str(status_name(code)),
            ));
            let error = match kind {
                Kind::Server => SERVER_ERRORS.contains(&code),
                Kind::Client => code != 0,
            };
            error.then(|| status_name(code))
        }
        // No status: the call was cut short (or its trailers went unseen).
        None => end_error(end).map(Into::into),
    };
    let status = match error {
        Some(e) => {
            attrs.push(KeyValue::new("error.type", Value::Str(e)));
            Status::Error
        }
        None => Status::Unset,
    };
    (m.to_owned(), status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr<'a>(a: &'a [KeyValue], k: &str) -> Option<&'a Value> {
        a.iter().find(|kv| kv.key == k).map(|kv| &kv.value)
    }

    fn grpc(status: Option<u32>) -> Grpc {
        Grpc {
            status,
            requests: Some(1),
            responses: Some(3),
        }
    }

    #[test]
    fn names_and_statuses_follow_the_rpc_conventions() {
        let mut a = Vec::new();
        let (name, status) = attributes(
            "/shop.v1.Catalog/List",
            &grpc(Some(0)),
            StreamEnd::Complete,
            Kind::Client,
            &mut a,
        );
        assert_eq!(name, "shop.v1.Catalog/List");
        assert_eq!(status, Status::Unset);
        assert_eq!(
            attr(&a, "rpc.system.name"),
            Some(&Value::Str("grpc".into()))
        );
        assert_eq!(
            attr(&a, "rpc.response.status_code"),
            Some(&Value::Str("OK".into()))
        );
        assert_eq!(attr(&a, "beholder.rpc.messages_sent"), Some(&Value::Int(1)));
        assert_eq!(
            attr(&a, "beholder.rpc.messages_received"),
            Some(&Value::Int(3))
        );
        assert_eq!(attr(&a, "error.type"), None);
    }

    #[test]
    fn not_found_is_an_error_for_the_client_only() {
        for (kind, error) in [(Kind::Client, true), (Kind::Server, false)] {
            let mut a = Vec::new();
            let (_, status) =
                attributes("/a.B/C", &grpc(Some(5)), StreamEnd::Complete, kind, &mut a);
            assert_eq!(status == Status::Error, error, "{kind:?}");
            assert_eq!(
                attr(&a, "error.type").is_some(),
                error,
                "{kind:?}: error.type only on failure"
            );
        }
        // UNAVAILABLE is the server's error too.
        let mut a = Vec::new();
        let (_, status) = attributes(
            "/a.B/C",
            &grpc(Some(14)),
            StreamEnd::Complete,
            Kind::Server,
            &mut a,
        );
        assert_eq!(status, Status::Error);
        assert_eq!(
            attr(&a, "error.type"),
            Some(&Value::Str("UNAVAILABLE".into()))
        );
    }

    #[test]
    fn a_call_cut_short_says_how() {
        let mut a = Vec::new();
        let (_, status) = attributes(
            "/a.B/C",
            &grpc(None),
            StreamEnd::Reset(8),
            Kind::Server,
            &mut a,
        );
        assert_eq!(status, Status::Error);
        assert_eq!(attr(&a, "error.type"), Some(&Value::Str("CANCEL".into())));
        assert_eq!(attr(&a, "rpc.response.status_code"), None);
    }

    #[test]
    fn a_path_that_is_not_a_method_is_other() {
        assert_eq!(method("/pkg.Svc/Do"), "pkg.Svc/Do");
        assert_eq!(method(""), "_OTHER");
        assert_eq!(method("/health"), "_OTHER");
        assert_eq!(method("/pkg.Svc/"), "_OTHER");
    }
}
