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

/// How the CLIENT spans in `spans` join the request their process was serving (in-process
/// linking): a client span with a parent must say `process`, and its parent must be a SERVER
/// span in `spans` of the same process and trace, named `parent_name` (`None`: named as the
/// call, a proxy's), open when the call was
/// made (the call starts inside it), with the same gRPC status (the middle tiers driven here
/// pass their callee's status on). Returns (client spans so linked, client spans left without a
/// parent because their owner was `ambiguous`, client spans with no parent and method `none`).
pub fn in_process(spans: &[RSpan], parent_name: Option<&str>) -> (usize, usize, usize) {
    let servers: std::collections::HashMap<String, &RSpan> = spans
        .iter()
        .filter(|s| s.kind() == "server")
        .map(|s| (s.span_id(), s))
        .collect();
    let (mut linked, mut ambiguous, mut roots) = (0, 0, 0);
    for c in spans.iter().filter(|s| s.kind() == "client") {
        let name = &c.span.name;
        let method = c.attr("beholder.link.method");
        let parent = c.parent_id();
        if parent.is_empty() {
            match method {
                Some("ambiguous") => ambiguous += 1,
                Some("none") => roots += 1,
                m => panic!("{name}: no parent, link method {m:?}"),
            }
            continue;
        }
        assert_eq!(method, Some("process"), "{name}: linked in-process");
        let s = servers
            .get(&parent)
            .unwrap_or_else(|| panic!("{name}: parent {parent} is no server span"));
        assert_eq!(s.trace_id(), c.trace_id(), "{name}: the request's trace");
        assert_eq!(
            s.res("process.pid"),
            c.res("process.pid"),
            "{name}: a request of the process that made the call"
        );
        assert_eq!(
            s.span.name.as_str(),
            parent_name.unwrap_or(name),
            "{name}: the request that makes calls"
        );
        assert!(
            s.span.start_time_unix_nano <= c.span.start_time_unix_nano
                && c.span.start_time_unix_nano <= s.span.end_time_unix_nano,
            "{name}: made while its parent was open"
        );
        assert_eq!(
            s.attr("rpc.response.status_code"),
            c.attr("rpc.response.status_code"),
            "{name}: the status its parent passed on"
        );
        linked += 1;
    }
    (linked, ambiguous, roots)
}
