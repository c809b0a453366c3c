//! Traces that join up across services that know nothing about tracing: a real chain of curl,
//! nginx, Python, Node and nginx again, with the agent injecting `traceparent` on the wire.
use std::{
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use tests::{
    agent::{final_counters, Agent, Export},
    chain::{by_path, check_trace, wait_chains, Chain, Layout, CHAIN_BODY, LEAF, NODE},
    free_port,
    programs::Proc,
    receiver::{RSpan, Receiver},
    require_root, wait_port,
};

/// Runs `threads` clients at once, each sending `per_thread` requests with unique paths
/// `/{prefix}/{thread}/{i}` through `send`; returns the paths.
fn concurrent(
    threads: usize,
    per_thread: usize,
    prefix: &str,
    send: impl Fn(&str) + Send + Sync + 'static,
) -> Vec<String> {
    let send = Arc::new(send);
    let paths = Arc::new(Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let send = send.clone();
            let paths = paths.clone();
            let prefix = prefix.to_owned();
            std::thread::spawn(move || {
                for i in 0..per_thread {
                    let p = format!("/{prefix}/{t}/{i}");
                    send(&p);
                    paths.lock().unwrap().push(p);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
    let v = paths.lock().unwrap().clone();
    v
}

/// Checks every path's trace; returns the failures.
fn failures(rx: &Receiver, paths: &[String], root_parent: &str) -> Vec<String> {
    let m = by_path(&rx.spans());
    paths
        .iter()
        .filter_map(|p| {
            let spans = m.get(p).cloned().unwrap_or_default();
            check_trace(p, &spans, root_parent).err()
        })
        .collect()
}

/// Under concurrency the event-loop hops (nginx, Node) may have several requests open when they
/// call out: those calls get no parent, never a wrong one. Every stitched hop links exactly.
fn assert_never_wrong(rx: &Receiver, paths: &[String], what: &str) {
    wait_chains(rx, paths, Duration::from_secs(30));
    let m = by_path(&rx.spans());
    let mut linked = 0;
    let bad: Vec<String> = paths
        .iter()
        .filter_map(|p| {
            let spans = m.get(p).cloned().unwrap_or_default();
            match tests::chain::check_honest(p, &spans) {
                Ok(n) => {
                    linked += n;
                    None
                }
                Err(e) => Some(e),
            }
        })
        .collect();
    println!(
        "{what}: {linked} of {} in-process hops linked, the rest without a parent; 0 wrong",
        3 * paths.len()
    );
    assert!(
        bad.is_empty(),
        "{} of {} requests have a wrong or missing link; first: {:#?}",
        bad.len(),
        paths.len(),
        &bad[..bad.len().min(3)]
    );
}

fn assert_all_linked(rx: &Receiver, paths: &[String]) {
    wait_chains(rx, paths, Duration::from_secs(30));
    let bad = failures(rx, paths, "");
    assert!(
        bad.is_empty(),
        "{} of {} requests did not give one complete, correctly linked trace; first: {:#?}",
        bad.len(),
        paths.len(),
        &bad[..bad.len().min(3)]
    );
}

/// The default carrier changes no byte: no header was inserted, rewritten or replaced.
fn assert_no_bytes_written(c: &std::collections::HashMap<String, u64>) {
    for k in [
        "kernel_traceparent_inserted",
        "kernel_traceparent_rewritten",
        "kernel_traceparent_replaced",
    ] {
        assert_eq!(c.get(k).copied().unwrap_or(0), 0, "{k}: {c:?}");
    }
    assert!(
        c.contains_key("ring_events"),
        "final counters missing: {c:?}"
    );
}

#[test]
fn chain_sequential_requests_are_one_trace_each() {
    require_root();
    let rx = Receiver::start();
    let agent = Agent::start(Export::Grpc(&rx), &[]);
    let chain = Chain::start(Layout::local());
    let paths: Vec<String> = (0..20).map(|i| format!("/seq/{i}")).collect();
    for p in &paths {
        assert_eq!(chain.curl(p, &[]), CHAIN_BODY);
    }
    assert_all_linked(&rx, &paths);
    let traces: std::collections::HashSet<String> = paths
        .iter()
        .map(|p| by_path(&rx.spans())[p][0].trace_id())
        .collect();
    assert_eq!(traces.len(), paths.len(), "one distinct trace per request");
    let (_, err) = agent.stop();
    let c = final_counters(&err);
    // Every hop (curl, nginx, python, node) was stitched, and no byte was written on the wire.
    assert!(
        c.get("kernel_stitch_claimed").copied().unwrap_or(0) >= 80,
        "{c:?}"
    );
    assert_no_bytes_written(&c);
}

#[test]
fn chain_concurrent_clients_get_complete_traces() {
    require_root();
    let rx = Receiver::start();
    let agent = Agent::start(Export::Grpc(&rx), &[]);
    let chain = Arc::new(Chain::start(Layout::local()));
    let c2 = chain.clone();
    let paths = concurrent(10, 30, "conc", move |p| {
        assert_eq!(c2.curl(p, &[]), CHAIN_BODY);
    });
    assert_eq!(paths.len(), 300);
    assert_never_wrong(&rx, &paths, "10 concurrent clients through the chain");
    agent.stop();
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct NetnsPair {
    a: String,
    b: String,
}

impl NetnsPair {
    fn new() -> NetnsPair {
        let tag = std::process::id() % 100_000;
        let (a, b) = (format!("bhA{tag}"), format!("bhB{tag}"));
        let sh = |cmd: &str| {
            let st = Command::new("sh").args(["-c", cmd]).status().expect("sh");
            assert!(st.success(), "{cmd} failed");
        };
        let _ = Command::new("ip").args(["netns", "del", &a]).status();
        let _ = Command::new("ip").args(["netns", "del", &b]).status();
        sh(&format!("ip netns add {a} && ip netns add {b}"));
        sh(&format!(
            "ip link add va{tag} netns {a} type veth peer name vb{tag} netns {b} && \
             ip -n {a} addr add 10.231.0.1/24 dev va{tag} && ip -n {b} addr add 10.231.0.2/24 dev vb{tag} && \
             ip -n {a} link set va{tag} up && ip -n {b} link set vb{tag} up && \
             ip -n {a} link set lo up && ip -n {b} link set lo up"
        ));
        NetnsPair { a, b }
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

#[test]
fn chain_across_two_network_namespaces() {
    require_root();
    let ns = NetnsPair::new();
    let rx = Receiver::start();
    let agent = Agent::start(Export::Grpc(&rx), &[]);
    let chain = Arc::new(Chain::start(Layout {
        front_ns: Some(ns.a.clone()),
        back_ns: Some(ns.b.clone()),
        back_ip: "10.231.0.2".into(),
    }));
    let mut paths: Vec<String> = (0..10).map(|i| format!("/ns/{i}")).collect();
    for p in &paths {
        assert_eq!(chain.curl(p, &[]), CHAIN_BODY);
    }
    let c2 = chain.clone();
    paths.extend(concurrent(10, 5, "nsc", move |p| {
        assert_eq!(c2.curl(p, &[]), CHAIN_BODY);
    }));
    assert_never_wrong(&rx, &paths, "chain across two namespaces");
    // The proxy's upstream really crossed the veth pair.
    let spans = rx.spans();
    let up = spans
        .iter()
        .find(|s| {
            s.attr("url.path") == Some("/ns/0")
                && s.kind() == "client"
                && s.res("service.name") == Some(tests::chain::PROXY)
        })
        .expect("proxy client span");
    assert_eq!(up.attr("network.peer.address"), Some("10.231.0.2"));
    agent.stop();
}

/// `--inject tcp-option` across the veth pair: the proxy's requests to the other namespace carry
/// their context in a TCP option (the sender drops its own record once the option is written),
/// and the receiver's kernel records it for the backend; every request links exactly.
#[test]
fn tcp_option_carries_context_across_two_namespaces() {
    require_root();
    let ns = NetnsPair::new();
    let rx = Receiver::start();
    let agent = Agent::start(Export::Grpc(&rx), &["--inject", "tcp-option"]);
    let chain = Arc::new(Chain::start(Layout {
        front_ns: Some(ns.a.clone()),
        back_ns: Some(ns.b.clone()),
        back_ip: "10.231.0.2".into(),
    }));
    let mut paths: Vec<String> = (0..10).map(|i| format!("/opt/{i}")).collect();
    for p in &paths {
        assert_eq!(chain.curl(p, &[]), CHAIN_BODY);
    }
    let c2 = chain.clone();
    paths.extend(concurrent(10, 5, "optc", move |p| {
        assert_eq!(c2.curl(p, &[]), CHAIN_BODY);
    }));
    assert_never_wrong(&rx, &paths, "chain across two namespaces, TCP option");
    let (_, err) = agent.stop();
    let c = final_counters(&err);
    let get = |k: &str| c.get(k).copied().unwrap_or(0);
    // Exactly one hop per request crosses the veth pair, and only that hop uses the option.
    assert_eq!(get("kernel_tcpopt_written"), paths.len() as u64, "{c:?}");
    assert_eq!(get("kernel_tcpopt_received"), paths.len() as u64, "{c:?}");
    assert_eq!(get("kernel_tcpopt_claimed"), paths.len() as u64, "{c:?}");
    assert_eq!(get("kernel_tcpopt_no_room"), 0, "{c:?}");
    assert_no_bytes_written(&c);
}

/// The option path alone over loopback (the test aid puts the option on loopback connections
/// too): every hop of the chain is linked through an option, none through a local record.
#[test]
fn tcp_option_alone_links_every_hop_of_the_chain() {
    require_root();
    let rx = Receiver::start();
    let agent = Agent::start_env(
        Export::Grpc(&rx),
        &["--inject", "tcp-option"],
        &[("BEHOLDER_TCP_OPTION_LOOPBACK", "true")],
    );
    let chain = Arc::new(Chain::start(Layout::local()));
    let c2 = chain.clone();
    let paths = concurrent(1, 50, "optl", move |p| {
        assert_eq!(c2.curl(p, &[]), CHAIN_BODY);
    });
    assert_all_linked(&rx, &paths);
    let (_, err) = agent.stop();
    let c = final_counters(&err);
    let get = |k: &str| c.get(k).copied().unwrap_or(0);
    // Four hops a request (curl, nginx, python, node); each claim came from an option.
    let hops = 4 * paths.len() as u64;
    assert!(get("kernel_tcpopt_claimed") >= hops, "{c:?}");
    assert_eq!(
        get("kernel_tcpopt_claimed"),
        get("kernel_stitch_claimed"),
        "{c:?}"
    );
    assert_no_bytes_written(&c);
}

#[test]
fn incoming_traceparent_valid_garbage_and_unsampled() {
    require_root();
    let rx = Receiver::start();
    let agent = Agent::start(Export::Grpc(&rx), &[]);
    let chain = Chain::start(Layout::local());
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let valid = format!("traceparent: 00-{trace}-{parent}-01");
    assert_eq!(
        chain.curl("/tp/valid", &[&valid, "tracestate: congo=t61rcWkgMzE"]),
        CHAIN_BODY
    );
    assert_eq!(
        chain.curl("/tp/garbage", &["traceparent: 00-not-a-trace-01"]),
        CHAIN_BODY
    );
    assert_eq!(
        chain.curl(
            "/tp/zeros",
            &["traceparent: 00-00000000000000000000000000000000-0000000000000000-01"]
        ),
        CHAIN_BODY
    );
    let unsampled = format!("traceparent: 00-{trace}-{parent}-00");
    assert_eq!(chain.curl("/tp/unsampled", &[&unsampled]), CHAIN_BODY);
    assert_eq!(chain.curl("/tp/after", &[]), CHAIN_BODY);
    let paths = ["/tp/valid", "/tp/garbage", "/tp/zeros", "/tp/after"].map(String::from);
    wait_chains(&rx, &paths, Duration::from_secs(20));
    let m = by_path(&rx.spans());
    let got = check_trace("/tp/valid", &m["/tp/valid"], parent).expect("valid context continued");
    assert_eq!(got, trace, "the caller's trace id is kept along the chain");
    let curl_span = m["/tp/valid"]
        .iter()
        .find(|s| s.kind() == "client" && s.res("service.name") == Some("curl"))
        .unwrap();
    assert_eq!(curl_span.span.trace_state, "congo=t61rcWkgMzE");
    for p in ["/tp/garbage", "/tp/zeros"] {
        let t = check_trace(p, &m[p], "").unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(t, "00000000000000000000000000000000");
    }
    check_trace("/tp/after", &m["/tp/after"], "").unwrap();
    // Not sampled upstream: nothing of that request is exported, at any hop.
    assert!(
        !m.contains_key("/tp/unsampled"),
        "unsampled request exported: {:?}",
        m.get("/tp/unsampled").map(|v| v.len())
    );
    let (_, err) = agent.stop();
    let c = final_counters(&err);
    // Garbage and all-zero headers were not rewritten: the stitched context started new traces.
    assert!(
        c.get("kernel_stitch_claimed").copied().unwrap_or(0) >= 20,
        "{c:?}"
    );
    assert_no_bytes_written(&c);
    assert!(c.get("spans_unsampled").copied().unwrap_or(0) >= 8, "{c:?}");
}

#[test]
fn sampling_ratio_keeps_whole_traces_only() {
    require_root();
    let rx = Receiver::start();
    let agent = Agent::start_env(
        Export::Grpc(&rx),
        &[],
        &[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ],
    );
    let chain = Arc::new(Chain::start(Layout::local()));
    let c2 = chain.clone();
    let paths = concurrent(1, 200, "smp", move |p| {
        assert_eq!(c2.curl(p, &[]), CHAIN_BODY);
    });
    std::thread::sleep(Duration::from_secs(4));
    let (_, err) = agent.stop();
    let m = by_path(&rx.spans());
    let kept: Vec<&String> = paths.iter().filter(|p| m.contains_key(*p)).collect();
    let partial: Vec<String> = kept
        .iter()
        .filter_map(|p| check_trace(p, &m[*p], "").err())
        .collect();
    let ratio = kept.len() as f64 / paths.len() as f64;
    println!(
        "sampling 0.25: kept {} of {} traces ({ratio:.3})",
        kept.len(),
        paths.len()
    );
    assert!(partial.is_empty(), "partial traces: {partial:#?}");
    // Binomial(200, 0.25): 50 ± 6; this window is over 3 standard deviations wide.
    assert!((0.13..=0.38).contains(&ratio), "kept ratio {ratio}");
    let c = final_counters(&err);
    let unsampled = c.get("spans_unsampled").copied().unwrap_or(0);
    assert_eq!(
        unsampled as usize,
        (paths.len() - kept.len()) * 8,
        "every span of an unsampled trace is counted, none exported"
    );
}

/// Node's event loop handles many requests on one thread and forwards no header. Under 10
/// concurrent clients the loop's thread often has several requests open, which is no evidence
/// of which one a call belongs to: such calls get no parent (`ambiguous`), never a wrong one.
/// Every call links to the request open when it was made when that was the only one, and every
/// leaf request is exactly its call's child (stitching). The share linked is measured.
#[test]
fn node_linking_accuracy_under_concurrency() {
    require_root();
    let rx = Receiver::start();
    let agent = Agent::start(Export::Grpc(&rx), &[]);
    let leaf_port = free_port();
    let node_port = free_port();
    let chain_leaf =
        tests::programs::Nginx::start(leaf_port, "    location / { return 200 \"leaf\\n\"; }");
    let _node = Proc::spawn(
        Command::new("node")
            .arg(tests::fixture("chain_node.js"))
            .args([
                "127.0.0.1",
                &node_port.to_string(),
                &format!("http://127.0.0.1:{leaf_port}"),
            ])
            .env("OTEL_SERVICE_NAME", NODE),
    );
    wait_port(node_port);
    let paths = concurrent(10, 30, "node", move |p| {
        let out = tests::programs::curl(&[&format!("http://127.0.0.1:{node_port}{p}")]);
        assert_eq!(out, "node[leaf]\n");
    });
    std::thread::sleep(Duration::from_secs(3));
    agent.stop();
    drop(chain_leaf);
    let m = by_path(&rx.spans());
    let (mut linked, mut unlinked, mut unclassified, mut wrong) = (0, 0, 0, 0);
    for p in &paths {
        let spans = m.get(p).cloned().unwrap_or_default();
        let one = |svc: &str, kind: &str| -> RSpan {
            let v: Vec<&RSpan> = spans
                .iter()
                .filter(|s| s.res("service.name") == Some(svc) && s.kind() == kind)
                .collect();
            assert_eq!(v.len(), 1, "{p}: one {kind} span of {svc}");
            v[0].clone()
        };
        let (server, client) = (one(NODE, "server"), one(NODE, "client"));
        let leaf = spans
            .iter()
            .find(|s| s.kind() == "server" && s.res("service.name") != Some(NODE))
            .unwrap_or_else(|| panic!("{p}: leaf span"));
        assert_eq!(
            leaf.parent_id(),
            client.span_id(),
            "{p}: leaf is the call's child"
        );
        assert_eq!(leaf.trace_id(), client.trace_id());
        let method = client.attr("beholder.link.method").unwrap_or("");
        if client.parent_id().is_empty() {
            // "unclassified": the call came before the agent had looked at node's executable
            // (it exec'd a moment before the first requests), so its thread was no evidence yet.
            assert!(
                matches!(method, "ambiguous" | "none" | "unclassified"),
                "{p}: {method}"
            );
            unlinked += 1;
            unclassified += usize::from(method == "unclassified");
        } else if client.parent_id() == server.span_id() && client.trace_id() == server.trace_id() {
            assert_eq!(method, "thread", "{p}");
            linked += 1;
        } else {
            wrong += 1;
        }
    }
    let _ = LEAF;
    println!(
        "node linking under 10 concurrent clients: {linked}/{} linked, {unlinked} ambiguous or \
         unlinked ({unclassified} before node was classified), {wrong} wrong",
        paths.len(),
    );
    assert_eq!(wrong, 0, "a wrong parent is worse than none");
    // Only the first burst can come before the classifier has judged node (milliseconds
    // after its exec); a process left unclassified for good would leave every call unlinked.
    assert!(
        unclassified * 10 <= paths.len(),
        "{unclassified} of {} calls found node unclassified",
        paths.len()
    );
}
