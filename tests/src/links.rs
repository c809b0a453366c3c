//! Checks on how received spans join up: what a user looking at the traces would check.
use crate::receiver::RSpan;

/// How the SERVER spans in `spans` join their callers on this host (same-host stitching of
/// HTTP/2 streams): a server span's parent must be a CLIENT span in `spans` of the same trace
/// and name, around it in time (the call starts before the server reads it and ends after,
/// give or take 2 ms between two processes' syscalls), the parent of no other server span, and
/// the link must say `stitch`. Returns (server spans so linked, server spans without parent).
pub fn callers(spans: &[RSpan]) -> (usize, usize) {
    let clients: std::collections::HashMap<String, &RSpan> = spans
        .iter()
        .filter(|s| s.kind() == "client")
        .map(|s| (s.span_id(), s))
        .collect();
    let mut taken = std::collections::HashSet::new();
    let (mut linked, mut roots) = (0, 0);
    for s in spans.iter().filter(|s| s.kind() == "server") {
        let parent = s.parent_id();
        if parent.is_empty() {
            roots += 1;
            continue;
        }
        let name = &s.span.name;
        let c = clients
            .get(&parent)
            .unwrap_or_else(|| panic!("{name}: parent {parent} is no client span"));
        assert_eq!(c.trace_id(), s.trace_id(), "{name}: the caller's trace");
        assert_eq!(&c.span.name, name, "{name}: the caller made this call");
        assert!(
            c.span.start_time_unix_nano <= s.span.start_time_unix_nano
                && s.span.end_time_unix_nano <= c.span.end_time_unix_nano + 2_000_000,
            "{name}: the call is around the server's span"
        );
        assert_eq!(s.attr("beholder.link.method"), Some("stitch"), "{name}");
        assert!(taken.insert(parent), "{name}: one server span per call");
        linked += 1;
    }
    (linked, roots)
}
