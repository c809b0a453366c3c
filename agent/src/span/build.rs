//! An HTTP exchange becomes a span: kind, name, stable HTTP semantic-convention attributes,
//! status and trace context.
use std::{borrow::Cow, net::IpAddr, sync::Arc};

use super::{
    redact::{parse_target, UrlPolicy},
    KeyValue, Kind, Span, Status, Value,
};
use crate::{
    pipeline::event::Endpoints,
    process::Resource,
    protocol::http1::{Exchange, Side},
    trace_context::link::Ids,
};

const KNOWN_METHODS: [&str; 9] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
];

/// Splits a Host header into host and port.
fn split_host(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        if let Some((h, p)) = rest.split_once(']') {
            return (h, p.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (host, None),
    }
}

/// The address as text. IPv4 is written here digit by digit: `to_string` runs the formatting
/// machinery four times per address, twice per span, about 4% of the agent's CPU under load.
fn ip_str(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut s = String::with_capacity(15);
    for (i, o) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        if o >= 100 {
            s.push(char::from(b'0' + o / 100));
        }
        if o >= 10 {
            s.push(char::from(b'0' + o / 10 % 10));
        }
        s.push(char::from(b'0' + o % 10));
    }
    s
}

/// The span of one exchange, with the ids `trace_context::link` decided.
pub fn build_span(
    ex: &Exchange,
    ends: &Endpoints,
    resource: Arc<Resource>,
    ids: Ids,
    urls: &UrlPolicy,
    to_unix: impl Fn(u64) -> u64,
) -> Box<Span> {
    let req = &ex.request;
    let Ids {
        trace_id,
        span_id,
        parent_span_id,
        flags,
        trace_state,
        link,
    } = ids;

    let known_method = KNOWN_METHODS.iter().find(|m| **m == req.method).copied();
    let known = known_method.is_some();
    let method = known_method.unwrap_or("_OTHER");
    // An absolute-form target (sent to a forward proxy) gives only its path here: scheme, host
    // and any credentials never go into `url.path`.
    let target = parse_target(&req.target);
    let path = target.path;
    let status = ex.response.status;
    // The version actually spoken: a 1.1 client talking to a 1.0 server speaks 1.0.
    let version = match &ex.h2 {
        Some(_) => "2",
        None if req.minor_version.min(ex.response.minor_version) == 0 => "1.0",
        None => "1.1",
    };
    let grpc = ex.h2.as_ref().and_then(|h| h.grpc.as_ref().map(|g| (h, g)));
    let scheme: &str = match ex.h2.as_ref().and_then(|h| h.scheme.as_deref()) {
        Some(s) => s,
        None if ends.tls => "https",
        None => "http",
    };
    // The scheme as an attribute value: the two usual ones borrowed.
    let scheme_value: Cow<'static, str> = match scheme {
        "http" => "http".into(),
        "https" => "https".into(),
        other => other.to_owned().into(),
    };
    let mut attrs = Vec::with_capacity(14);
    if grpc.is_none() {
        attrs.push(KeyValue::new(
            "http.request.method",
            Value::Str(method.into()),
        ));
        if !known {
            attrs.push(KeyValue::new(
                "http.request.method_original",
                Value::Str(req.method.clone().into()),
            ));
        }
        attrs.push(KeyValue::new(
            "url.path",
            Value::Str(path.to_owned().into()),
        ));
        attrs.push(KeyValue::new("url.scheme", Value::Str(scheme_value)));
        if status != 0 {
            attrs.push(KeyValue::new(
                "http.response.status_code",
                Value::Int(status as i64),
            ));
        }
    } else {
        attrs.push(KeyValue::new(
            "network.protocol.name",
            Value::Str("http".into()),
        ));
        attrs.push(KeyValue::new("network.transport", Value::Str("tcp".into())));
    }
    attrs.push(KeyValue::new(
        "beholder.link.method",
        Value::Str(link.as_str().into()),
    ));
    attrs.push(KeyValue::new(
        "network.protocol.version",
        Value::Str(version.into()),
    ));
    if let Some(h2) = ex.h2.as_ref().filter(|h| h.unresolved > 0) {
        // Header fields that named table entries from before the agent saw the connection.
        attrs.push(KeyValue::new(
            "beholder.http2.unresolved_fields",
            Value::Int(h2.unresolved as i64),
        ));
    }
    attrs.push(KeyValue::new(
        "network.peer.address",
        Value::Str(ip_str(ends.peer).into()),
    ));
    attrs.push(KeyValue::new(
        "network.peer.port",
        Value::Int(ends.peer_port as i64),
    ));
    let host = req.host.as_deref().map(split_host);
    let kind = match ex.side {
        Side::Server => {
            let (addr, port) = match host {
                Some((h, p)) if !h.is_empty() => (h.to_owned(), p.unwrap_or(ends.local_port)),
                _ => (ip_str(ends.local), ends.local_port),
            };
            attrs.push(KeyValue::new("server.address", Value::Str(addr.into())));
            attrs.push(KeyValue::new("server.port", Value::Int(port as i64)));
            attrs.push(KeyValue::new(
                "client.address",
                Value::Str(ip_str(ends.peer).into()),
            ));
            if grpc.is_none() {
                if let Some(q) = target.query.and_then(|q| urls.query(q)) {
                    attrs.push(KeyValue::new(
                        "url.query",
                        Value::Str(q.into_owned().into()),
                    ));
                }
            }
            Kind::Server
        }
        Side::Client => {
            let addr = match host {
                Some((h, _)) if !h.is_empty() => h.to_owned(),
                _ => ip_str(ends.peer),
            };
            if grpc.is_none() {
                let authority = req
                    .host
                    .clone()
                    .unwrap_or_else(|| format!("{}:{}", ends.peer, ends.peer_port));
                attrs.push(KeyValue::new(
                    "url.full",
                    Value::Str(urls.full_url(&req.target, &authority, scheme).into()),
                ));
            }
            attrs.push(KeyValue::new("server.address", Value::Str(addr.into())));
            attrs.push(KeyValue::new(
                "server.port",
                Value::Int(ends.peer_port as i64),
            ));
            Kind::Client
        }
    };
    if let Some(ua) = &req.user_agent {
        attrs.push(KeyValue::new(
            "user_agent.original",
            Value::Str(ua.clone().into()),
        ));
    }
    let (name, span_status) = match grpc {
        Some((h2, g)) => super::rpc::attributes(&req.target, g, h2.end, kind, &mut attrs),
        None => {
            let error = match kind {
                Kind::Server => status >= 500,
                Kind::Client => status >= 400,
            };
            // An HTTP/2 stream cut short has no status code: its end says what happened.
            let cut = ex
                .h2
                .as_ref()
                .filter(|_| status == 0)
                .and_then(|h| super::rpc::end_error(h.end));
            let error_type = match cut {
                Some(e) => Some(e),
                None => error.then(|| status.to_string()),
            };
            let failed = error_type.is_some();
            if let Some(e) = error_type {
                attrs.push(KeyValue::new("error.type", Value::Str(e.into())));
            }
            let name = if known {
                req.method.clone()
            } else {
                "HTTP".into()
            };
            (name, if failed { Status::Error } else { Status::Unset })
        }
    };
    let start = to_unix(ex.start_ns);
    let end = to_unix(ex.end_ns).max(start);
    Box::new(Span {
        trace_id,
        span_id,
        parent_span_id,
        trace_state,
        flags,
        name,
        kind,
        start_unix_ns: start,
        end_unix_ns: end,
        attributes: attrs,
        dropped_attributes_count: 0,
        status: span_status,
        resource,
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        protocol::http1::{Framing, RequestHead, ResponseHead},
        sampling::Sampler,
        trace_context::link::{decide, Decision, Registry},
    };

    #[test]
    fn addresses_read_as_the_standard_library_writes_them() {
        for a in [
            [0, 0, 0, 0],
            [127, 0, 0, 1],
            [10, 9, 99, 100],
            [255, 255, 255, 255],
            [192, 168, 1, 10],
            [1, 20, 200, 101],
        ] {
            let ip = IpAddr::V4(Ipv4Addr::from(a));
            assert_eq!(ip_str(ip), ip.to_string());
        }
        let v6: IpAddr = "fd00::1:2".parse().unwrap();
        assert_eq!(ip_str(v6), "fd00::1:2");
    }

    fn exchange(side: Side, status: u16, tp: Option<&str>) -> Exchange {
        Exchange {
            side,
            request: RequestHead {
                method: "GET".into(),
                target: "/api/users/42?q=1".into(),
                minor_version: 1,
                host: Some("shop.local:8080".into()),
                user_agent: Some("curl/7.88.1".into()),
                traceparent: tp.map(Into::into),
                tracestate: Some("vendor=x".into()),
                framing: Framing::None,
            },
            response: ResponseHead {
                status,
                minor_version: 1,
                framing: Framing::None,
            },
            start_ns: 1_000,
            end_ns: 5_000,
            ctx: None,
            h2: None,
        }
    }

    fn ends() -> Endpoints {
        Endpoints {
            local: Ipv4Addr::new(127, 0, 0, 1).into(),
            local_port: 8080,
            peer: Ipv4Addr::new(127, 0, 0, 2).into(),
            peer_port: 50000,
            tls: false,
        }
    }

    fn resource() -> Arc<Resource> {
        Arc::new(Resource {
            service_name: "svc".into(),
            attributes: vec![],
        })
    }

    fn span(ex: &Exchange) -> Span {
        match decide(ex, 1, &Registry::default(), &Sampler::default()) {
            Decision::Sampled(ids) => {
                *build_span(ex, &ends(), resource(), ids, &UrlPolicy::default(), |t| {
                    t + 10
                })
            }
            Decision::Unsampled => panic!("unexpectedly unsampled"),
        }
    }

    #[test]
    fn server_span() {
        let s = span(&exchange(Side::Server, 503, None));
        assert_eq!(s.name, "GET");
        assert_eq!(s.kind, Kind::Server);
        assert_eq!(s.status, Status::Error);
        assert_eq!((s.start_unix_ns, s.end_unix_ns), (1_010, 5_010));
        assert_eq!(s.parent_span_id, None);
        assert_eq!(s.trace_state, "");
        assert_eq!(
            s.attr("url.path"),
            Some(&Value::Str("/api/users/42".into()))
        );
        assert_eq!(
            s.attr("server.address"),
            Some(&Value::Str("shop.local".into()))
        );
        assert_eq!(s.attr("server.port"), Some(&Value::Int(8080)));
        assert_eq!(
            s.attr("client.address"),
            Some(&Value::Str("127.0.0.2".into()))
        );
        assert_eq!(s.attr("http.response.status_code"), Some(&Value::Int(503)));
        assert_eq!(
            s.attr("user_agent.original"),
            Some(&Value::Str("curl/7.88.1".into()))
        );
    }

    #[test]
    fn client_span_and_status() {
        let s = span(&exchange(Side::Client, 404, None));
        assert_eq!(s.kind, Kind::Client);
        assert_eq!(s.status, Status::Error);
        assert_eq!(
            s.attr("url.full"),
            Some(&Value::Str(
                "http://shop.local:8080/api/users/42?q=1".into()
            ))
        );
        assert_eq!(s.attr("server.port"), Some(&Value::Int(50000)));
        let ok = span(&exchange(Side::Server, 404, None));
        assert_eq!(ok.status, Status::Unset);
    }

    #[test]
    fn honours_traceparent() {
        let s = span(&exchange(
            Side::Server,
            200,
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ));
        assert_eq!(
            crate::trace_context::w3c::hex(&s.trace_id),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(
            s.parent_span_id.map(|p| crate::trace_context::w3c::hex(&p)),
            Some("b7ad6b7169203331".into())
        );
        assert_eq!(s.trace_state, "vendor=x");
        let unsampled = exchange(
            Side::Server,
            200,
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),
        );
        assert!(matches!(
            decide(&unsampled, 1, &Registry::default(), &Sampler::default()),
            Decision::Unsampled
        ));
        let garbage = span(&exchange(Side::Server, 200, Some("00-zzzz")));
        assert_eq!(garbage.parent_span_id, None);
        assert_ne!(garbage.trace_id, [0; 16]);
    }
}
