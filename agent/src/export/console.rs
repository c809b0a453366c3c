//! Readable span output for when no backend is configured.
use std::io::Write;

use crate::{
    span::{Kind, Span, Status, Value},
    trace_context::w3c::hex,
};

pub fn format_span(s: &Span) -> String {
    let kind = match s.kind {
        Kind::Server => "SERVER",
        Kind::Client => "CLIENT",
    };
    let get = |k: &str| match s.attr(k) {
        Some(Value::Str(v)) => v.to_string(),
        Some(Value::Int(i)) => i.to_string(),
        None => "-".into(),
    };
    let ms = (s.end_unix_ns.saturating_sub(s.start_unix_ns)) as f64 / 1e6;
    let status = if s.status == Status::Error {
        " ERROR"
    } else {
        ""
    };
    // An RPC span is named by its method and answers with a status name; HTTP by path and code.
    let (target, code) = match s.attr("rpc.method") {
        Some(_) => (String::new(), get("rpc.response.status_code")),
        None => (
            format!(" {}", get("url.path")),
            get("http.response.status_code"),
        ),
    };
    let mut out = format!(
        "{kind} {name}{target} -> {code}{status}  {ms:.3} ms  [{svc} pid {pid}]\n    trace_id={trace} span_id={span} parent_id={parent}\n   ",
        name = s.name,
        svc = s.resource.service_name,
        pid = s.resource.attributes.iter().find(|a| a.key == "process.pid").map(|a| match &a.value {
            Value::Int(i) => i.to_string(),
            Value::Str(v) => v.to_string(),
        }).unwrap_or_default(),
        trace = hex(&s.trace_id),
        span = hex(&s.span_id),
        parent = s.parent_span_id.map(|p| hex(&p)).unwrap_or_else(|| "-".into()),
    );
    for a in &s.attributes {
        let v = match &a.value {
            Value::Str(v) => format!("{v:?}"),
            Value::Int(i) => i.to_string(),
        };
        out.push_str(&format!(" {}={v}", a.key));
    }
    out.push('\n');
    out
}

pub fn print(spans: &[Span]) {
    let mut stdout = std::io::stdout().lock();
    for s in spans {
        let _ = stdout.write_all(format_span(s).as_bytes());
    }
    let _ = stdout.flush();
}
