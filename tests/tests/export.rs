//! Export that a bad batch cannot stop, against the test receiver acting as a strict backend:
//! size limits (HTTP 413, gRPC RESOURCE_EXHAUSTED), throttling with a requested delay
//! (`Retry-After`, `RetryInfo`), gzip, TLS with the receiver's own CA and client certificates,
//! and redirects. nginx is the only selected process; each request's query string pads its
//! server span to a known size.
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use tests::{
    agent::{final_counters, Agent, Export},
    free_port,
    pki::Pki,
    programs::{run, Nginx},
    receiver::{Options, Receiver, TlsFiles},
    wait_until,
};

const NGINX: &str = "    location = /hello { return 200 \"hello\\n\"; }\n";

fn nginx() -> Nginx {
    Nginx::start(free_port(), NGINX)
}

/// `n` requests from hey with a query string of `pad` bytes.
fn hey(nginx: &Nginx, n: usize, pad: usize) {
    let before = nginx.access_log_lines();
    run(Command::new("hey")
        .args([
            "-n",
            &n.to_string(),
            // hey gives each worker n / c requests.
            "-c",
            if n.is_multiple_of(2) { "2" } else { "1" },
            &format!(
                "http://127.0.0.1:{}/hello?pad={}",
                nginx.port,
                "x".repeat(pad)
            ),
        ])
        .stdout(Stdio::null()));
    // nginx logs a request just after answering it.
    wait_until(Duration::from_secs(5), "nginx to log every request", || {
        nginx.access_log_lines() == before + n
    });
}

fn server_spans(rx: &Receiver) -> usize {
    rx.spans().iter().filter(|s| s.kind() == "server").count()
}

fn wait_spans(rx: &Receiver, n: usize) {
    wait_until(
        Duration::from_secs(30),
        &format!("{n} server spans"),
        || server_spans(rx) >= n,
    );
}

fn start(export: Export<'_>, env: &[(&str, &str)]) -> Agent {
    Agent::start_env(export, &["--exe", "*/nginx"], env)
}

/// A batch larger than `BEHOLDER_EXPORT_MAX_BYTES` goes as several requests; one the backend
/// still refuses as too large (413) is sent again in two halves, which it accepts. No span is
/// lost and no request exceeds the configured size.
#[test]
fn oversized_requests_are_split_and_every_span_arrives() {
    let rx = Receiver::start_with(Options {
        max_request_bytes: Some(48_000),
        ..Options::default()
    });
    let n = nginx();
    let agent = start(
        Export::Http(&rx),
        &[
            ("BEHOLDER_EXPORT_MAX_BYTES", "96000"),
            ("OTEL_BSP_SCHEDULE_DELAY", "1500"),
        ],
    );
    hey(&n, 400, 1000);
    wait_spans(&rx, 400);
    let (_, err) = agent.stop();
    let c = final_counters(&err);
    let attempts = rx.attempts();
    let refused: Vec<_> = attempts.iter().filter(|a| !a.accepted).collect();
    println!(
        "{} requests, {} refused; sizes {:?}",
        attempts.len(),
        refused.len(),
        attempts.iter().map(|a| a.bytes).collect::<Vec<_>>()
    );
    assert_eq!(server_spans(&rx), 400, "every span exactly once");
    assert!(
        attempts.iter().all(|a| a.bytes <= 96_000),
        "a request over the limit"
    );
    assert!(
        !refused.is_empty(),
        "the receiver never refused: the test proves nothing"
    );
    assert!(refused.iter().all(|a| a.bytes > 48_000));
    assert!(
        c.get("export_requests_split").copied().unwrap_or(0) >= 1,
        "{c:?}"
    );
    assert_eq!(c.get("spans_export_failed"), None, "{c:?}");
}

/// A request refused as too large is split once; halves refused again are dropped and counted,
/// never split or retried further (gRPC RESOURCE_EXHAUSTED without RetryInfo).
#[test]
fn a_request_refused_again_is_dropped_never_looped() {
    let rx = Receiver::start_with(Options {
        max_request_bytes: Some(4_000),
        ..Options::default()
    });
    let n = nginx();
    // One batch: every span arrives within the (long) schedule delay.
    let agent = start(Export::Grpc(&rx), &[("OTEL_BSP_SCHEDULE_DELAY", "4000")]);
    hey(&n, 40, 1000);
    wait_until(Duration::from_secs(20), "three export attempts", || {
        rx.attempts().len() >= 3
    });
    std::thread::sleep(Duration::from_secs(3));
    let (_, err) = agent.stop();
    let c = final_counters(&err);
    let attempts = rx.attempts();
    let sizes: Vec<usize> = attempts.iter().map(|a| a.bytes).collect();
    assert_eq!(
        attempts.len(),
        3,
        "the batch, then its two halves, and nothing more: {sizes:?}"
    );
    assert!(attempts.iter().all(|a| !a.accepted));
    assert!(sizes[1] < sizes[0] && sizes[2] < sizes[0], "{sizes:?}");
    assert_eq!(server_spans(&rx), 0);
    assert_eq!(c.get("spans_export_failed").copied(), Some(40), "{c:?}");
}

/// A backend that throttles the first request asking for 2 s, over `protocol`: the agent
/// waits that long before retrying, every request is gzip-compressed, and every span arrives.
fn throttled_once_with_gzip(protocol: &str) {
    let rx = Receiver::start_with(Options {
        throttle_first: 1,
        retry_delay: Duration::from_secs(2),
        ..Options::default()
    });
    let n = nginx();
    let export = if protocol == "grpc" {
        Export::Grpc(&rx)
    } else {
        Export::Http(&rx)
    };
    let agent = start(export, &[("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")]);
    hey(&n, 20, 10);
    wait_spans(&rx, 20);
    agent.stop();
    let a = rx.attempts();
    assert!(a.len() >= 2 && !a[0].accepted && a[1].accepted, "{a:?}");
    let waited = a[1].at - a[0].at;
    assert!(
        waited >= Duration::from_millis(1900),
        "{protocol}: retried after {waited:?}, asked 2 s"
    );
    assert!(a.iter().all(|x| x.gzip), "{a:?}");
    assert_eq!(server_spans(&rx), 20);
}

/// HTTP: 429 with `Retry-After: 2`.
#[test]
fn http_retry_after_and_gzip() {
    throttled_once_with_gzip("http");
}

/// gRPC: RESOURCE_EXHAUSTED with `RetryInfo` is throttling, retried after the delay it carries.
#[test]
fn grpc_retry_info_and_gzip() {
    throttled_once_with_gzip("grpc");
}

/// TLS to a backend with its own CA that requires a client certificate: both protocols
/// deliver with OTEL_EXPORTER_OTLP_CERTIFICATE, _CLIENT_CERTIFICATE and _CLIENT_KEY; without
/// the client certificate nothing is delivered and the failure is reported.
#[test]
fn tls_with_own_ca_and_client_certificate() {
    let pki = Pki::new("export");
    let rx = Receiver::start_with(Options {
        tls: Some(TlsFiles {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_ca: Some(pki.ca.clone()),
        }),
        ..Options::default()
    });
    let n = nginx();
    let (ca, cert, key) = (
        pki.ca.display().to_string(),
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string(),
    );
    let grpc = format!("https://{}", rx.grpc);
    let http = format!("https://{}", rx.http);
    for (endpoint, protocol) in [(&grpc, "grpc"), (&http, "http/protobuf")] {
        let before = server_spans(&rx);
        let agent = start(
            Export::Console,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca),
                ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &cert),
                ("OTEL_EXPORTER_OTLP_CLIENT_KEY", &key),
            ],
        );
        hey(&n, 10, 10);
        wait_spans(&rx, before + 10);
        agent.stop();
        assert_eq!(server_spans(&rx), before + 10, "{protocol}");
    }
    // The CA but no client certificate: the receiver refuses the handshake.
    let before = server_spans(&rx);
    let agent = start(
        Export::Console,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &http),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca),
        ],
    );
    hey(&n, 5, 10);
    wait_until(
        Duration::from_secs(20),
        "an export failure in the log",
        || agent.stderr().contains("cannot export spans"),
    );
    agent.stop();
    assert_eq!(server_spans(&rx), before);
}

/// A backend that redirects: the agent does not follow (the configured headers, often
/// credentials, would go along), says why, and the redirect's target never hears from it.
#[test]
fn redirects_are_not_followed() {
    let target = Receiver::start();
    let rx = Receiver::start_with(Options {
        redirect_to: Some(target.http),
        ..Options::default()
    });
    let n = nginx();
    let agent = start(
        Export::Http(&rx),
        &[("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer secret")],
    );
    hey(&n, 5, 10);
    wait_until(
        Duration::from_secs(20),
        "the redirect refusal in the log",
        || agent.stderr().contains("redirects are not followed"),
    );
    let (_, err) = agent.stop();
    assert!(target.attempts().is_empty());
    assert_eq!(target.export_requests(), 0);
    assert!(!err.contains("Bearer secret"), "a credential in the log");
    let c = final_counters(&err);
    assert!(
        c.get("spans_export_failed").copied().unwrap_or(0) >= 5,
        "{c:?}"
    );
}
