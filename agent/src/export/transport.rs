//! Sending one encoded batch: OTLP/gRPC (tonic client from `opentelemetry-proto`) or
//! OTLP/HTTP protobuf (reqwest). We build `ExportTraceServiceRequest`s ourselves rather than use
//! the `opentelemetry-otlp` SDK exporter, because our spans come from observed traffic of many
//! processes, each with its own resource, while an SDK exporter carries a single resource.
use std::str::FromStr;

use super::config::display_url;

use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_client::TraceServiceClient, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tonic::{
    metadata::{MetadataKey, MetadataValue},
    transport::{Channel, ClientTlsConfig},
};

use super::config::{Endpoint, Protocol};

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Worth retrying: the backend is down, overloaded or slow.
    #[error("backend unavailable: {0}")]
    Retryable(String),
    /// Retrying the same batch cannot help.
    #[error("backend refused the batch: {0}")]
    Permanent(String),
    #[error("invalid exporter setting: {0}")]
    Setup(String),
}

#[derive(Clone)]
pub enum Transport {
    Grpc {
        client: TraceServiceClient<Channel>,
        headers: Vec<(
            MetadataKey<tonic::metadata::Ascii>,
            MetadataValue<tonic::metadata::Ascii>,
        )>,
        timeout: std::time::Duration,
    },
    Http {
        client: reqwest::Client,
        url: String,
        headers: Vec<(String, String)>,
    },
}

impl Transport {
    pub fn new(ep: &Endpoint) -> Result<Transport, SendError> {
        match ep.protocol {
            Protocol::Grpc => {
                let mut builder = Channel::from_shared(ep.url.clone())
                    .map_err(|e| SendError::Setup(format!("{}: {e}", display_url(&ep.url))))?
                    .connect_timeout(ep.timeout)
                    .timeout(ep.timeout);
                if ep.url.starts_with("https://") {
                    builder = builder
                        .tls_config(ClientTlsConfig::new().with_webpki_roots())
                        .map_err(|e| {
                            SendError::Setup(format!("TLS for {}: {e}", display_url(&ep.url)))
                        })?;
                }
                let mut headers = Vec::new();
                for (k, v) in &ep.headers {
                    let key = MetadataKey::from_str(k)
                        .map_err(|e| SendError::Setup(format!("header {k}: {e}")))?;
                    let val = MetadataValue::from_str(v)
                        .map_err(|e| SendError::Setup(format!("header {k}: {e}")))?;
                    headers.push((key, val));
                }
                Ok(Transport::Grpc {
                    client: TraceServiceClient::new(builder.connect_lazy()),
                    headers,
                    timeout: ep.timeout,
                })
            }
            Protocol::HttpProtobuf => {
                let client = reqwest::Client::builder()
                    .timeout(ep.timeout)
                    .build()
                    .map_err(|e| SendError::Setup(e.to_string()))?;
                Ok(Transport::Http {
                    client,
                    url: ep.url.clone(),
                    headers: ep.headers.clone(),
                })
            }
        }
    }

    /// Sends one request; returns how many spans the backend rejected (partial success).
    pub async fn send(&mut self, req: ExportTraceServiceRequest) -> Result<i64, SendError> {
        match self {
            Transport::Grpc {
                client,
                headers,
                timeout,
            } => {
                let mut r = tonic::Request::new(req);
                r.set_timeout(*timeout);
                for (k, v) in headers.iter() {
                    r.metadata_mut().insert(k.clone(), v.clone());
                }
                match client.export(r).await {
                    Ok(resp) => Ok(rejected(resp.into_inner())),
                    Err(status) => {
                        use tonic::Code::*;
                        let msg = format!("gRPC {:?}: {}", status.code(), status.message());
                        match status.code() {
                            Unavailable | DeadlineExceeded | ResourceExhausted | Aborted
                            | Cancelled | OutOfRange | DataLoss | Unknown => {
                                Err(SendError::Retryable(msg))
                            }
                            _ => Err(SendError::Permanent(msg)),
                        }
                    }
                }
            }
            Transport::Http {
                client,
                url,
                headers,
            } => {
                let mut rb = client
                    .post(url.as_str())
                    .header("content-type", "application/x-protobuf")
                    .body(req.encode_to_vec());
                for (k, v) in headers.iter() {
                    rb = rb.header(k.as_str(), v.as_str());
                }
                let resp = rb.send().await.map_err(|e| {
                    // reqwest's error text names the URL: keep only ours, redacted.
                    SendError::Retryable(format!("{}: {}", display_url(url), e.without_url()))
                })?;
                let status = resp.status();
                let body = resp.bytes().await.unwrap_or_default();
                if status.is_success() {
                    return Ok(ExportTraceServiceResponse::decode(body.as_ref())
                        .map(rejected)
                        .unwrap_or(0));
                }
                let msg = format!("HTTP {status} from {}", display_url(url));
                match status.as_u16() {
                    429 | 502 | 503 | 504 => Err(SendError::Retryable(msg)),
                    _ => Err(SendError::Permanent(msg)),
                }
            }
        }
    }
}

fn rejected(resp: ExportTraceServiceResponse) -> i64 {
    match resp.partial_success {
        Some(p) if p.rejected_spans > 0 || !p.error_message.is_empty() => {
            tracing::warn!(rejected = p.rejected_spans, message = %p.error_message, "backend accepted the batch in part");
            p.rejected_spans
        }
        _ => 0,
    }
}
