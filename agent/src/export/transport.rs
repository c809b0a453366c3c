//! Sending one encoded batch: OTLP/gRPC (tonic client from `opentelemetry-proto`) or
//! OTLP/HTTP protobuf (reqwest). We build `ExportTraceServiceRequest`s ourselves rather than use
//! the `opentelemetry-otlp` SDK exporter, because our spans come from observed traffic of many
//! processes, each with its own resource, while an SDK exporter carries a single resource.
use std::str::FromStr;

use super::config::display_url;

use bytes::{Buf, BufMut, Bytes};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use tonic::{
    codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder},
    metadata::{MetadataKey, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_types::StatusExt;

use super::config::{Endpoint, Protocol};

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Worth retrying: the backend is down, overloaded or slow; with the delay it asked for
    /// (HTTP `Retry-After`, gRPC `RetryInfo`), if any.
    #[error("backend unavailable: {0}")]
    Retryable(String, Option<std::time::Duration>),
    /// The request was too large for the backend (HTTP 413, gRPC `RESOURCE_EXHAUSTED` without
    /// `RetryInfo`): worth sending again in halves, once.
    #[error("backend refused the request as too large: {0}")]
    TooLarge(String),
    /// Retrying the same batch cannot help.
    #[error("backend refused the batch: {0}")]
    Permanent(String),
    #[error("invalid exporter setting: {0}")]
    Setup(String),
}

/// The OTLP trace export method (opentelemetry-proto's `TraceService/Export`).
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// A gRPC codec for requests encoded already (`encode::requests`): the message bytes go out as
/// they are, so a retry resends them instead of encoding a clone of the request again; the
/// response is decoded with prost as the generated client would. tonic's `ProstCodec` takes
/// only messages, hence these few lines.
#[derive(Clone, Copy, Default)]
struct Encoded;

impl Codec for Encoded {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = Encoded;
    type Decoder = Encoded;

    fn encoder(&mut self) -> Encoded {
        Encoded
    }

    fn decoder(&mut self) -> Encoded {
        Encoded
    }
}

impl Encoder for Encoded {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Encoded {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut DecodeBuf<'_>,
    ) -> Result<Option<ExportTraceServiceResponse>, tonic::Status> {
        let n = src.remaining();
        ExportTraceServiceResponse::decode(src.copy_to_bytes(n))
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("bad ExportTraceServiceResponse: {e}")))
    }
}

#[derive(Clone)]
pub enum Transport {
    Grpc {
        client: tonic::client::Grpc<Channel>,
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
        gzip: bool,
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
                    let mut tls = ClientTlsConfig::new().with_webpki_roots();
                    if let Some(ca) = &ep.tls.ca {
                        tls = tls.ca_certificate(Certificate::from_pem(read_pem(
                            "OTEL_EXPORTER_OTLP_CERTIFICATE",
                            ca,
                        )?));
                    }
                    if let (Some(c), Some(k)) = (&ep.tls.client_cert, &ep.tls.client_key) {
                        tls = tls.identity(Identity::from_pem(
                            read_pem("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", c)?,
                            read_pem("OTEL_EXPORTER_OTLP_CLIENT_KEY", k)?,
                        ));
                    }
                    builder = builder.tls_config(tls).map_err(|e| {
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
                let mut client = tonic::client::Grpc::new(builder.connect_lazy())
                    .max_encoding_message_size(usize::MAX);
                if ep.gzip {
                    client = client.send_compressed(CompressionEncoding::Gzip);
                }
                Ok(Transport::Grpc {
                    client,
                    headers,
                    timeout: ep.timeout,
                })
            }
            Protocol::HttpProtobuf => {
                // Redirects are not followed: a redirected request would carry the configured
                // headers (often credentials) to wherever the redirect points.
                let mut b = reqwest::Client::builder()
                    .timeout(ep.timeout)
                    .redirect(reqwest::redirect::Policy::none());
                if let Some(ca) = &ep.tls.ca {
                    let pem = read_pem("OTEL_EXPORTER_OTLP_CERTIFICATE", ca)?;
                    for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                        SendError::Setup(format!(
                            "OTEL_EXPORTER_OTLP_CERTIFICATE {}: {e}",
                            ca.display()
                        ))
                    })? {
                        b = b.add_root_certificate(cert);
                    }
                }
                if let (Some(c), Some(k)) = (&ep.tls.client_cert, &ep.tls.client_key) {
                    let mut pem = read_pem("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", c)?;
                    pem.push(b'\n');
                    pem.extend(read_pem("OTEL_EXPORTER_OTLP_CLIENT_KEY", k)?);
                    b = b.identity(reqwest::Identity::from_pem(&pem).map_err(|e| {
                        SendError::Setup(format!(
                            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE/_KEY {} and {}: {e}",
                            c.display(),
                            k.display()
                        ))
                    })?);
                }
                let client = b.build().map_err(|e| SendError::Setup(e.to_string()))?;
                Ok(Transport::Http {
                    client,
                    url: ep.url.clone(),
                    headers: ep.headers.clone(),
                    gzip: ep.gzip,
                })
            }
        }
    }

    /// Sends one encoded `ExportTraceServiceRequest`; returns how many spans the backend
    /// rejected (partial success). The bytes are shared, not copied, by a retry.
    pub async fn send(&mut self, req: &Bytes) -> Result<i64, SendError> {
        match self {
            Transport::Grpc {
                client,
                headers,
                timeout,
            } => {
                let mut r = tonic::Request::new(req.clone());
                r.set_timeout(*timeout);
                for (k, v) in headers.iter() {
                    r.metadata_mut().insert(k.clone(), v.clone());
                }
                if let Err(e) = client.ready().await {
                    // As the generated client reports it.
                    return Err(grpc_error(&tonic::Status::unknown(format!(
                        "Service was not ready: {e}"
                    ))));
                }
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(EXPORT_PATH);
                match client.unary(r, path, Encoded).await {
                    Ok(resp) => Ok(rejected(resp.into_inner())),
                    Err(status) => Err(grpc_error(&status)),
                }
            }
            Transport::Http {
                client,
                url,
                headers,
                gzip,
            } => {
                let mut rb = client
                    .post(url.as_str())
                    .header("content-type", "application/x-protobuf");
                rb = if *gzip {
                    rb.header("content-encoding", "gzip").body(gzip_bytes(req))
                } else {
                    rb.body(req.clone())
                };
                for (k, v) in headers.iter() {
                    rb = rb.header(k.as_str(), v.as_str());
                }
                let resp = rb.send().await.map_err(|e| {
                    // reqwest's error text names the URL: keep only ours, redacted.
                    SendError::Retryable(format!("{}: {}", display_url(url), e.without_url()), None)
                })?;
                let status = resp.status();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry_after(v, std::time::SystemTime::now()));
                let body = resp.bytes().await.unwrap_or_default();
                if status.is_success() {
                    return Ok(ExportTraceServiceResponse::decode(body.as_ref())
                        .map(rejected)
                        .unwrap_or(0));
                }
                let msg = format!("HTTP {status} from {}", display_url(url));
                match status.as_u16() {
                    413 => Err(SendError::TooLarge(msg)),
                    429 | 502 | 503 | 504 => Err(SendError::Retryable(msg, retry_after)),
                    300..=399 => Err(SendError::Permanent(format!(
                        "{msg}: redirects are not followed (they would carry the configured \
                         headers elsewhere); set the endpoint to the final URL"
                    ))),
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

/// A PEM file named by an OTEL variable, read at start-up (a clear error names both).
fn read_pem(var: &str, path: &std::path::Path) -> Result<Vec<u8>, SendError> {
    std::fs::read(path).map_err(|e| SendError::Setup(format!("{var} {}: {e}", path.display())))
}

fn gzip_bytes(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}

/// What a gRPC status means for the batch, per the OTLP specification: retryable codes (with
/// the server's `RetryInfo` delay), `RESOURCE_EXHAUSTED` without `RetryInfo` as too large, the
/// rest permanent.
fn grpc_error(status: &tonic::Status) -> SendError {
    use tonic::Code::*;
    let msg = format!("gRPC {:?}: {}", status.code(), status.message());
    let delay = status.get_details_retry_info().and_then(|r| r.retry_delay);
    match status.code() {
        ResourceExhausted if delay.is_none() => SendError::TooLarge(msg),
        // `Unknown` too: tonic reports some connection failures with it.
        Unavailable | DeadlineExceeded | ResourceExhausted | Aborted | Cancelled | OutOfRange
        | DataLoss | Unknown => SendError::Retryable(msg, delay),
        _ => SendError::Permanent(msg),
    }
}

/// An HTTP `Retry-After` value (seconds, or an HTTP date) as a delay from `now`.
fn retry_after(v: &str, now: std::time::SystemTime) -> Option<std::time::Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(std::time::Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn retry_after_values() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(retry_after("3", now), Some(Duration::from_secs(3)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(retry_after(&later, now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(retry_after("soon", now), None);
    }

    #[test]
    fn grpc_status_classes() {
        let too_big = tonic::Status::resource_exhausted("message too large");
        assert!(matches!(grpc_error(&too_big), SendError::TooLarge(_)));
        let throttled = tonic::Status::with_error_details(
            tonic::Code::ResourceExhausted,
            "slow down",
            tonic_types::ErrorDetails::with_retry_info(Some(Duration::from_secs(2))),
        );
        assert!(matches!(
            grpc_error(&throttled),
            SendError::Retryable(_, Some(d)) if d == Duration::from_secs(2)
        ));
        assert!(matches!(
            grpc_error(&tonic::Status::unavailable("down")),
            SendError::Retryable(_, None)
        ));
        assert!(matches!(
            grpc_error(&tonic::Status::invalid_argument("bad")),
            SendError::Permanent(_)
        ));
    }
}
