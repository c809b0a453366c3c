//! W3C `traceparent` and `tracestate`: parsing never panics; what parses formats back to the
//! canonical lowercase form, which parses to the same value; tracestate validity is stable.
#![no_main]
use agent::trace_context::{w3c::valid_tracestate, TraceParent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(tp) = TraceParent::parse(s) {
        let text = tp.format();
        assert_eq!(TraceParent::parse(&text), Some(tp), "{s:?} -> {text:?}");
        assert_eq!(text.len(), 55);
        assert_ne!(tp.trace_id, [0; 16]);
        assert_ne!(tp.parent_id, [0; 8]);
    }
    let v = valid_tracestate(s);
    if v {
        assert!(s.len() <= 512);
        assert!(s.split(',').filter(|m| !m.trim().is_empty()).count() <= 32);
    }
});
