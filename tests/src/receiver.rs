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

#[derive(Clone, Default)]
struct Store {
    spans: Arc<Mutex<Vec<RSpan>>>,
    requests: Arc<Mutex<u64>>,
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
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        tokio::time::sleep(self.delay).await;
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
        rt.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(s))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc))
                .await
                .expect("grpc receiver");
        });
        let s = store.clone();
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = http.accept().await else {
                    continue;
                };
                let s = s.clone();
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
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let status = if !ok_path {
                                404
                            } else if ct != "application/x-protobuf" {
                                415
                            } else {
                                match ExportTraceServiceRequest::decode(body.as_ref()) {
                                    Ok(r) => {
                                        s.add(r);
                                        200
                                    }
                                    Err(_) => 400,
                                }
                            };
                            let body = ExportTraceServiceResponse {
                                partial_success: None,
                            }
                            .encode_to_vec();
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header("content-type", "application/x-protobuf")
                                    .body(Full::new(Bytes::from(body)))
                                    .expect("response"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
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
