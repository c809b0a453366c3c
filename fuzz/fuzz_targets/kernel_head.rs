//! The kernel's head scan (`agent_common::head_scan`, the code the eBPF programs run) against
//! httparse and the userspace parser, on arbitrary bytes. Both decide where a head ends, how
//! long its body is and which trace context it carries, so wherever the kernel decides, it must
//! decide as userspace does; it may only abstain (a head it cannot follow).
//!
//! Input: one filler byte (what the kernel's buffer holds past the copied bytes), then the bytes.
#![no_main]
use agent::{
    protocol::http1::{parse_request, Framing, HeadParse},
    trace_context::w3c::TraceParent,
};
use agent_common::{
    head_scan::{
        host::{parse_traceparent, read_head, request_line_end, Padded},
        opening, starts_with_method, Opening,
    },
    MAX_PAYLOAD,
};
use libfuzzer_sys::fuzz_target;

/// Everything the kernel decides about `bytes`.
#[derive(Debug, PartialEq, Eq)]
struct Decisions {
    opening: Opening,
    method: bool,
    line_end: usize,
    head_end: usize,
    content_length: Option<u64>,
    body_unknown: bool,
    traceparent: Option<([u8; 16], [u8; 8], u8)>,
}

fn decide(bytes: &[u8], filler: u8) -> Decisions {
    let buf = Padded { bytes, filler };
    let len = bytes.len();
    let line_end = request_line_end(&buf, len);
    let mut d = Decisions {
        opening: opening(&buf, len),
        method: starts_with_method(&buf, len),
        line_end,
        head_end: 0,
        content_length: None,
        body_unknown: false,
        traceparent: None,
    };
    if line_end != 0 {
        let h = read_head(&buf, line_end, len);
        d.head_end = h.end;
        d.content_length = h.content_length;
        d.body_unknown = h.body_unknown;
        d.traceparent = (h.traceparent != 0)
            .then(|| parse_traceparent(&buf, h.traceparent, len))
            .flatten()
            .map(|t| (t.trace_id, t.parent_id, t.flags));
    }
    d
}

fuzz_target!(|data: &[u8]| {
    let Some((&filler, bytes)) = data.split_first() else {
        return;
    };
    let bytes = &bytes[..bytes.len().min(MAX_PAYLOAD)];
    let d = decide(bytes, filler);
    // No decision depends on bytes the kernel did not copy.
    for other in [filler ^ 0xff, b'\r', b'\n', b' ', b'0'] {
        assert_eq!(
            d,
            decide(bytes, other),
            "decisions depend on bytes past the copy"
        );
    }
    // A request line the kernel accepts starts with a method, and the opening check agrees.
    if d.line_end != 0 {
        assert!(d.method);
        assert_eq!(d.opening, Opening::Request);
    }
    if d.method {
        assert_eq!(d.opening, Opening::Request);
    }
    if d.line_end == 0 || d.head_end == 0 {
        return; // the kernel abstains
    }
    let HeadParse::Complete(head, n) = parse_request(bytes) else {
        return; // userspace makes no span of it
    };
    assert_eq!(
        d.head_end, n,
        "kernel and httparse end the head at different bytes"
    );
    if !d.body_unknown {
        let kernel = d.content_length.unwrap_or(0);
        match head.framing {
            Framing::Length(n) => assert_eq!(kernel, n, "body lengths differ"),
            Framing::None => assert_eq!(kernel, 0, "the kernel sees a body userspace does not"),
            Framing::Chunked => panic!("chunked body the kernel does not know of"),
            Framing::UntilClose | Framing::Tunnel => {}
        }
    }
    let user = head
        .traceparent
        .as_deref()
        .and_then(TraceParent::parse)
        .map(|t| (t.trace_id, t.parent_id, t.flags));
    let user_v00 = head
        .traceparent
        .as_deref()
        .is_some_and(|v| v.trim().starts_with("00-"));
    if d.traceparent.is_some() || user_v00 {
        assert_eq!(
            d.traceparent, user,
            "the kernel and userspace read different contexts"
        );
    }
});
