//! An OTLP trace receiver on the official protocol definitions (`opentelemetry-proto`): gRPC
//! through the generated `TraceServiceServer`, HTTP/protobuf by decoding the same messages.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, service::service_fn, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::any_value::Value,
    trace::v1::Span,
};
use prost::Message;
use tonic_types::StatusExt;

/// A received span with its resource, flattened for assertions.
#[derive(Clone, Debug)]
pub struct RSpan {
    pub span: Span,
    pub resource: HashMap<String, String>,
    pub attrs: HashMap<String, String>,
}

impl RSpan {
    pub fn attr(&self, k: &str) -> Option<&str> {
        self.attrs.get(k).map(String::as_str)
    }
    pub fn res(&self, k: &str) -> Option<&str> {
        self.resource.get(k).map(String::as_str)
    }
    /// Panics, naming the span as `what`, unless every attribute in `want` has its value.
    pub fn assert_attrs(&self, want: &[(&str, &str)], what: &str) {
        for (k, v) in want {
            assert_eq!(self.attr(k), Some(*v), "{k} of {what}");
        }
    }
    pub fn kind(&self) -> &'static str {
        match self.span.kind {
            2 => "server",
            3 => "client",
            _ => "other",
        }
    }
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    pub fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(
            self.span
                .end_time_unix_nano
                .saturating_sub(self.span.start_time_unix_nano),
        )
    }
    pub fn status_code(&self) -> i32 {
        self.span.status.as_ref().map(|s| s.code).unwrap_or(0)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn value(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// One export request as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub at: std::time::Instant,
    /// Encoded protobuf size (after decompression).
    pub bytes: usize,
    pub gzip: bool,
    pub accepted: bool,
}

/// What the receiver answers a request.
enum Verdict {
    Accept,
    TooLarge,
    Throttle(Duration),
}

#[derive(Clone, Default)]
struct Store {
    spans: Arc<Mutex<Vec<RSpan>>>,
    requests: Arc<Mutex<u64>>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    max_request_bytes: Option<usize>,
    throttle_first: u32,
    retry_delay: Duration,
    /// Spans by `service.name/kind`, kept even when spans are not stored.
    counts: Arc<Mutex<std::collections::BTreeMap<String, u64>>>,
    keep: bool,
    delay: Duration,
}

impl Store {
    fn add(&self, req: ExportTraceServiceRequest) {
        *self.requests.lock().expect("lock") += 1;
        {
            let mut counts = self.counts.lock().expect("lock");
            for rs in &req.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                    .map(|a| value(&a.value))
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for span in &ss.spans {
                        let kind = match span.kind {
                            2 => "server",
                            3 => "client",
                            _ => "other",
                        };
                        *counts.entry(format!("{service}/{kind}")).or_default() += 1;
                    }
                }
            }
        }
        if !self.keep {
            return;
        }
        let mut out = self.spans.lock().expect("lock");
        for rs in req.resource_spans {
            let resource: HashMap<String, String> = rs
                .resource
                .map(|r| {
                    r.attributes
                        .iter()
                        .map(|a| (a.key.clone(), value(&a.value)))
                        .collect()
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let attrs = span
                        .attributes
                        .iter()
                        .map(|a| (a.key.clone(), value(&a.value)))
                        .collect();
                    out.push(RSpan {
                        span,
                        resource: resource.clone(),
                        attrs,
                    });
                }
            }
        }
    }
}

impl Store {
    /// Logs a request and decides its answer: refused while the first `throttle_first` are
    /// throttled, or when larger than `max_request_bytes`.
    fn judge(&self, bytes: usize, gzip: bool) -> Verdict {
        let mut log = self.attempts.lock().expect("lock");
        let v = if (log.len() as u32) < self.throttle_first {
            Verdict::Throttle(self.retry_delay)
        } else if self.max_request_bytes.is_some_and(|m| bytes > m) {
            Verdict::TooLarge
        } else {
            Verdict::Accept
        };
        log.push(Attempt {
            at: std::time::Instant::now(),
            bytes,
            gzip,
            accepted: matches!(v, Verdict::Accept),
        });
        v
    }

    /// `service/kind count` lines, for `GET /count`.
    fn count_text(&self) -> String {
        self.counts
            .lock()
            .expect("lock")
            .iter()
            .map(|(k, v)| format!("{k} {v}\n"))
            .collect()
    }
}

/// How a receiver runs.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// 0: any free port.
    pub grpc_port: u16,
    pub http_port: u16,
    /// Answer each export only after this long (a slow backend).
    pub delay: Duration,
    /// Count spans without keeping them (benchmarks).
    pub count_only: bool,
    /// Refuse larger requests (HTTP 413, gRPC RESOURCE_EXHAUSTED), as a collector's size
    /// limit does.
    pub max_request_bytes: Option<usize>,
    /// Throttle the first this many requests (HTTP 429 with `Retry-After`, gRPC
    /// RESOURCE_EXHAUSTED with `RetryInfo`), asking for `retry_delay` (whole seconds for HTTP).
    pub throttle_first: u32,
    pub retry_delay: Duration,
    /// Serve both endpoints over TLS with this server certificate and key (PEM files), and
    /// require a client certificate issued by `client_ca` when set.
    pub tls: Option<TlsFiles>,
    /// Answer every HTTP export with a 307 redirect to this address.
    pub redirect_to: Option<SocketAddr>,
}

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: Option<std::path::PathBuf>,
}

/// The HTTP side's TLS acceptor.
fn tls_acceptor(t: &TlsFiles) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert)
        .expect("server cert")
        .map(|c| c.expect("server cert"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(&t.key).expect("server key");
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("tls versions");
    let cfg = match &t.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).expect("client ca") {
                roots.add(c.expect("client ca")).expect("client ca");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    }
    .with_single_cert(certs, key)
    .expect("server tls config");
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        tokio::time::sleep(self.delay).await;
        let gzip = request
            .metadata()
            .get("grpc-encoding")
            .is_some_and(|v| v.as_bytes() == b"gzip");
        match self.judge(request.get_ref().encoded_len(), gzip) {
            Verdict::Accept => {}
            Verdict::TooLarge => {
                return Err(tonic::Status::resource_exhausted(
                    "grpc: received message larger than max",
                ))
            }
            Verdict::Throttle(d) => {
                return Err(tonic::Status::with_error_details(
                    tonic::Code::ResourceExhausted,
                    "throttled",
                    tonic_types::ErrorDetails::with_retry_info(Some(d)),
                ))
            }
        }
        self.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

pub struct Receiver {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    store: Store,
    _rt: tokio::runtime::Runtime,
}

impl Receiver {
    /// Starts both endpoints on loopback, on a runtime of their own.
    pub fn start() -> Receiver {
        Self::start_with(Options::default())
    }

    pub fn start_with(o: Options) -> Receiver {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let store = Store {
            keep: !o.count_only,
            delay: o.delay,
            max_request_bytes: o.max_request_bytes,
            throttle_first: o.throttle_first,
            retry_delay: o.retry_delay,
            ..Store::default()
        };
        let (grpc, http) = rt.block_on(async {
            let g = tokio::net::TcpListener::bind(("127.0.0.1", o.grpc_port))
                .await
                .expect("bind grpc");
            let h = tokio::net::TcpListener::bind(("127.0.0.1", o.http_port))
                .await
                .expect("bind http");
            (g, h)
        });
        let (grpc_addr, http_addr) = (
            grpc.local_addr().expect("addr"),
            http.local_addr().expect("addr"),
        );
        let s = store.clone();
        let grpc_tls = o.tls.as_ref().map(|t| {
            let read = |p: &std::path::Path| std::fs::read(p).expect("tls file");
            let mut c = tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(read(&t.cert), read(&t.key)),
            );
            if let Some(ca) = &t.client_ca {
                c = c.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)));
            }
            c
        });
        rt.spawn(async move {
            let mut b = tonic::transport::Server::builder();
            if let Some(tls) = grpc_tls {
                b = b.tls_config(tls).expect("grpc tls");
            }
            b.add_service(
                TraceServiceServer::new(s)
                    .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                    .max_decoding_message_size(256 << 20),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc))
            .await
            .expect("grpc receiver");
        });
        let acceptor = o.tls.as_ref().map(tls_acceptor);
        let redirect_to = o.redirect_to;
        let s = store.clone();
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = http.accept().await else {
                    continue;
                };
                let s = s.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let s = s.clone();
                        async move {
                            if req.uri().path() == "/count" {
                                return Ok(Response::new(Full::new(Bytes::from(s.count_text()))));
                            }
                            tokio::time::sleep(s.delay).await;
                            let ok_path = req.uri().path() == "/v1/traces";
                            let ct = req
                                .headers()
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            let gzip = req
                                .headers()
                                .get("content-encoding")
                                .is_some_and(|v| v.as_bytes() == b"gzip");
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let body = if gzip {
                                gunzip(&body)
                            } else {
                                Some(body.to_vec())
                            };
                            let mut extra = None;
                            let status = if let Some(to) = redirect_to {
                                extra = Some(("location", format!("http://{to}/v1/traces")));
                                307
                            } else if !ok_path {
                                404
                            } else if ct != "application/x-protobuf" {
                                415
                            } else if let Some(body) = body {
                                match s.judge(body.len(), gzip) {
                                    Verdict::TooLarge => 413,
                                    Verdict::Throttle(d) => {
                                        extra = Some(("retry-after", d.as_secs().to_string()));
                                        429
                                    }
                                    Verdict::Accept => {
                                        match ExportTraceServiceRequest::decode(body.as_ref()) {
                                            Ok(r) => {
                                                s.add(r);
                                                200
                                            }
                                            Err(_) => 400,
                                        }
                                    }
                                }
                            } else {
                                400
                            };
                            let body = ExportTraceServiceResponse {
                                partial_success: None,
                            }
                            .encode_to_vec();
                            let mut rb = Response::builder()
                                .status(status)
                                .header("content-type", "application/x-protobuf");
                            if let Some((k, v)) = extra {
                                rb = rb.header(k, v);
                            }
                            Ok::<_, std::convert::Infallible>(
                                rb.body(Full::new(Bytes::from(body))).expect("response"),
                            )
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        Receiver {
            grpc: grpc_addr,
            http: http_addr,
            store,
            _rt: rt,
        }
    }

    pub fn spans(&self) -> Vec<RSpan> {
        self.store.spans.lock().expect("lock").clone()
    }

    /// Spans received by `service.name/kind`.
    pub fn counts(&self) -> std::collections::BTreeMap<String, u64> {
        self.store.counts.lock().expect("lock").clone()
    }

    /// Every export request, accepted or refused, in order.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.store.attempts.lock().expect("lock").clone()
    }

    pub fn export_requests(&self) -> u64 {
        *self.store.requests.lock().expect("lock")
    }

    /// Spans matching `f`, once at least `n` of them arrived (panics after `timeout`).
    pub fn wait_for(
        &self,
        n: usize,
        timeout: Duration,
        what: &str,
        f: impl Fn(&RSpan) -> bool,
    ) -> Vec<RSpan> {
        let mut got = Vec::new();
        let end = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < end {
            got = self.spans().into_iter().filter(|s| f(s)).collect();
            if got.len() >= n {
                return got;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out waiting for {n} {what}; got {}: {:#?}",
            got.len(),
            got.iter()
                .map(|s| (&s.span.name, s.kind(), &s.attrs))
                .collect::<Vec<_>>()
        );
    }
}

fn gunzip(data: &[u8]) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}
