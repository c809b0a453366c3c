//! Export settings from the standard OpenTelemetry environment variables.
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// `None`: print to the console (or discard, with `discard`).
    pub endpoint: Option<Endpoint>,
    /// `OTEL_TRACES_EXPORTER=none`: build spans, count them, send them nowhere.
    pub discard: bool,
    pub batch: BatchConfig,
}

#[derive(Clone, Debug)]
pub struct Endpoint {
    pub protocol: Protocol,
    /// Full URL the request goes to (`.../v1/traces` for HTTP).
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    /// `OTEL_EXPORTER_OTLP_COMPRESSION=gzip`.
    pub gzip: bool,
    pub tls: TlsFiles,
    /// Largest encoded export request; bigger batches go as several requests
    /// (`BEHOLDER_EXPORT_MAX_BYTES`; default 4 MiB less a margin, a collector's default limit).
    pub max_request_bytes: usize,
}

/// PEM files for TLS to the backend (`OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE`, `..._CLIENT_CERTIFICATE`,
/// `..._CLIENT_KEY`).
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// CA certificate(s) trusted for the backend, besides the public roots.
    pub ca: Option<std::path::PathBuf>,
    pub client_cert: Option<std::path::PathBuf>,
    pub client_key: Option<std::path::PathBuf>,
}

/// What the spans waiting for export may hold: far above 8192 ordinary spans (about 2 KiB each),
/// far below the DaemonSet's memory limit.
pub const DEFAULT_SPAN_QUEUE_BYTES: usize = 64 << 20;

/// 4 MiB (the gRPC default message limit of a collector) less room for framing.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = (4 << 20) - (64 << 10);

#[derive(Clone, Debug)]
pub struct BatchConfig {
    pub max_queue: usize,
    /// Bytes the queued spans may hold (`BEHOLDER_SPAN_QUEUE_MAX_BYTES`, default 64 MiB).
    pub max_queue_bytes: usize,
    pub max_batch: usize,
    pub delay: Duration,
    /// How long one batch is retried while the backend is unavailable.
    pub retry_for: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}={value:?} is not a supported protocol: use grpc or http/protobuf")]
    Protocol { var: &'static str, value: String },
    #[error("{var}={value:?} is not a URL with an http:// or https:// scheme and a host")]
    Url { var: &'static str, value: String },
    #[error("{var}={value:?} is not a whole number of {unit}")]
    Number {
        var: &'static str,
        value: String,
        unit: &'static str,
    },
    #[error("OTEL_TRACES_EXPORTER={0:?} is not supported: use otlp, console or none")]
    Exporter(String),
    #[error("OTEL_EXPORTER_OTLP_HEADERS entry {0:?} is not key=value")]
    Header(String),
    #[error("{var}={value:?}: expected gzip or none")]
    Compression { var: &'static str, value: String },
    #[error("{var}={value:?}: expected true or false")]
    Bool { var: &'static str, value: String },
    #[error(
        "{0} is set but {1} is not: a client certificate needs its key, and a key its certificate"
    )]
    ClientPair(&'static str, &'static str),
}

fn var(
    env: &dyn Fn(&str) -> Option<String>,
    specific: &'static str,
    general: &'static str,
) -> Option<(&'static str, String)> {
    env(specific)
        .filter(|v| !v.trim().is_empty())
        .map(|v| (specific, v))
        .or_else(|| {
            env(general)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (general, v))
        })
}

fn number(
    env: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
    default: u64,
    unit: &'static str,
) -> Result<u64, ConfigError> {
    match env(name).filter(|v| !v.trim().is_empty()) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| ConfigError::Number {
            var: name,
            value: v,
            unit,
        }),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl ExportConfig {
    pub fn from_env() -> Result<ExportConfig, ConfigError> {
        Self::from_lookup(&|k| std::env::var(k).ok())
    }

    /// Reads the variables through `env` (tests pass a map).
    pub fn from_lookup(env: &dyn Fn(&str) -> Option<String>) -> Result<ExportConfig, ConfigError> {
        let batch = BatchConfig {
            max_queue: number(env, "OTEL_BSP_MAX_QUEUE_SIZE", 8192, "spans")?.max(1) as usize,
            max_queue_bytes: number(
                env,
                "BEHOLDER_SPAN_QUEUE_MAX_BYTES",
                DEFAULT_SPAN_QUEUE_BYTES as u64,
                "bytes",
            )?
            .max(64 << 10) as usize,
            max_batch: number(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, "spans")?.max(1) as usize,
            // 1 s rather than the SDK's 5 s: traces of observed traffic show up promptly.
            delay: Duration::from_millis(number(
                env,
                "OTEL_BSP_SCHEDULE_DELAY",
                1000,
                "milliseconds",
            )?),
            retry_for: Duration::from_secs(60),
        };
        let exporter = env("OTEL_TRACES_EXPORTER")
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty());
        let early = |discard| ExportConfig {
            endpoint: None,
            discard,
            batch: batch.clone(),
        };
        match exporter.as_deref() {
            None | Some("otlp") => {}
            Some("console") => return Ok(early(false)),
            Some("none") => return Ok(early(true)),
            Some(other) => return Err(ConfigError::Exporter(other.to_owned())),
        }
        let protocol = match var(
            env,
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ) {
            None => Protocol::HttpProtobuf,
            Some((_, v)) if v.trim() == "grpc" => Protocol::Grpc,
            Some((_, v)) if v.trim() == "http/protobuf" => Protocol::HttpProtobuf,
            Some((var, value)) => return Err(ConfigError::Protocol { var, value }),
        };
        let insecure = match var(
            env,
            "OTEL_EXPORTER_OTLP_TRACES_INSECURE",
            "OTEL_EXPORTER_OTLP_INSECURE",
        ) {
            None => false,
            Some((var, value)) => match value.trim().to_ascii_lowercase().as_str() {
                "true" => true,
                "false" => false,
                _ => return Err(ConfigError::Bool { var, value }),
            },
        };
        // A gRPC endpoint without a scheme: TLS unless OTEL_EXPORTER_OTLP_INSECURE=true.
        let scheme = |var: &'static str, v: &str| {
            let v = v.trim();
            if protocol == Protocol::Grpc && !v.contains("://") {
                let s = if insecure { "http" } else { "https" };
                check_url(var, &format!("{s}://{v}"))
            } else {
                check_url(var, v)
            }
        };
        let url = if let Some(v) =
            env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").filter(|v| !v.trim().is_empty())
        {
            // Signal-specific endpoints are used as they are.
            Some(scheme("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &v)?)
        } else if let Some(v) = env("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|v| !v.trim().is_empty())
        {
            let base = scheme("OTEL_EXPORTER_OTLP_ENDPOINT", &v)?;
            Some(match protocol {
                Protocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
                Protocol::Grpc => base,
            })
        } else if exporter.as_deref() == Some("otlp") {
            // Explicitly asked for OTLP with no endpoint: the spec's local default.
            Some(match protocol {
                Protocol::HttpProtobuf => "http://localhost:4318/v1/traces".to_owned(),
                Protocol::Grpc => "http://localhost:4317".to_owned(),
            })
        } else {
            None
        };
        let Some(url) = url else {
            return Ok(ExportConfig {
                endpoint: None,
                discard: false,
                batch,
            });
        };
        let mut headers = Vec::new();
        if let Some((_, h)) = var(
            env,
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ) {
            for pair in h.split(',').filter(|p| !p.trim().is_empty()) {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| ConfigError::Header(pair.to_owned()))?;
                headers.push((
                    percent_decode(k.trim()).to_ascii_lowercase(),
                    percent_decode(v.trim()),
                ));
            }
        }
        let timeout_ms = match var(
            env,
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ) {
            None => 10_000,
            Some((var, value)) => value.trim().parse().map_err(|_| ConfigError::Number {
                var,
                value,
                unit: "milliseconds",
            })?,
        };
        let gzip = match var(
            env,
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ) {
            None => false,
            Some((var, value)) => match value.trim().to_ascii_lowercase().as_str() {
                "gzip" => true,
                "none" => false,
                _ => return Err(ConfigError::Compression { var, value }),
            },
        };
        let path = |specific, general| {
            var(env, specific, general).map(|(_, v)| std::path::PathBuf::from(v.trim()))
        };
        let tls = TlsFiles {
            ca: path(
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CERTIFICATE",
            ),
            client_cert: path(
                "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            ),
            client_key: path(
                "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
                "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            ),
        };
        match (&tls.client_cert, &tls.client_key) {
            (Some(_), None) => {
                return Err(ConfigError::ClientPair(
                    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                    "OTEL_EXPORTER_OTLP_CLIENT_KEY",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::ClientPair(
                    "OTEL_EXPORTER_OTLP_CLIENT_KEY",
                    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                ))
            }
            _ => {}
        }
        let max_request_bytes = number(
            env,
            "BEHOLDER_EXPORT_MAX_BYTES",
            DEFAULT_MAX_REQUEST_BYTES as u64,
            "bytes",
        )?
        .max(1024) as usize;
        Ok(ExportConfig {
            endpoint: Some(Endpoint {
                protocol,
                url,
                headers,
                timeout: Duration::from_millis(timeout_ms),
                gzip,
                tls,
                max_request_bytes,
            }),
            discard: false,
            batch,
        })
    }
}

fn check_url(var: &'static str, v: &str) -> Result<String, ConfigError> {
    let bad = || ConfigError::Url {
        var,
        value: v.to_owned(),
    };
    let rest = v
        .strip_prefix("http://")
        .or_else(|| v.strip_prefix("https://"))
        .ok_or_else(bad)?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad());
    }
    Ok(v.to_owned())
}

/// Host and port of an endpoint URL, for excluding its traffic from tracing.
pub fn host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let authority = authority
        .rsplit_once('@')
        .map(|(_, a)| a)
        .unwrap_or(authority);
    let default = if scheme == "https" { 443 } else { 80 };
    if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once(']')?;
        return Some((
            h.to_owned(),
            p.strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .unwrap_or(default),
        ));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), p.parse().ok()?)),
        None => Some((authority.to_owned(), default)),
    }
}

/// An endpoint URL as it may appear in a log line or an error: credentials as
/// `REDACTED:REDACTED@`, secret-looking query values redacted.
pub fn display_url(url: &str) -> String {
    crate::span::redact::UrlPolicy::default().full_url(url, "", "http")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn cfg(vars: &[(&str, &str)]) -> Result<ExportConfig, ConfigError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ExportConfig::from_lookup(&|k| m.get(k).cloned())
    }

    #[test]
    fn console_by_default() {
        assert!(cfg(&[]).unwrap().endpoint.is_none());
        let none = cfg(&[
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
        ])
        .unwrap();
        assert!(none.discard && none.endpoint.is_none());
        let otlp = cfg(&[("OTEL_TRACES_EXPORTER", "otlp")])
            .unwrap()
            .endpoint
            .unwrap();
        assert_eq!(otlp.url, "http://localhost:4318/v1/traces");
        assert!(cfg(&[("OTEL_TRACES_EXPORTER", "zipkin")]).is_err());
    }

    #[test]
    fn endpoints() {
        let c = cfg(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")])
            .unwrap()
            .endpoint
            .unwrap();
        assert_eq!(
            (c.protocol, c.url.as_str()),
            (Protocol::HttpProtobuf, "http://collector:4318/v1/traces")
        );
        let c = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap()
        .endpoint
        .unwrap();
        assert_eq!(
            (c.protocol, c.url.as_str()),
            (Protocol::Grpc, "http://c:4317")
        );
        let c = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:1"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://x/custom"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Authorization=Bearer%20abc, x-tenant = t1",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ])
        .unwrap()
        .endpoint
        .unwrap();
        assert_eq!(c.url, "https://x/custom");
        assert_eq!(
            display_url("https://user:pw@collector:4318/v1/traces?api_key=k"),
            "https://REDACTED:REDACTED@collector:4318/v1/traces?api_key=REDACTED"
        );
        assert_eq!(
            c.headers,
            vec![
                ("authorization".into(), "Bearer abc".into()),
                ("x-tenant".into(), "t1".into())
            ]
        );
        assert_eq!(c.timeout, Duration::from_millis(2500));
    }

    #[test]
    fn garbage_is_reported() {
        for vars in [
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")][..],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
            ],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
            ],
            &[("OTEL_BSP_MAX_QUEUE_SIZE", "-1")],
        ] {
            let e = cfg(vars).unwrap_err().to_string();
            assert!(e.contains("OTEL_"), "{e}");
        }
    }

    #[test]
    fn compression_tls_and_schemeless_grpc() {
        let c = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/ca.pem"),
            ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", "/etc/c.pem"),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/etc/k.pem"),
        ])
        .unwrap()
        .endpoint
        .unwrap();
        assert_eq!(c.url, "https://collector:4317");
        assert!(c.gzip);
        assert_eq!(
            c.tls.ca.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(
            c.tls.client_cert.as_deref(),
            Some(std::path::Path::new("/etc/c.pem"))
        );
        assert_eq!(c.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
        let c = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_INSECURE", "true"),
        ])
        .unwrap()
        .endpoint
        .unwrap();
        assert_eq!(c.url, "http://collector:4317");
        assert!(!c.gzip);
        for vars in [
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli"),
            ][..],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("OTEL_EXPORTER_OTLP_INSECURE", "maybe"),
            ],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/k.pem"),
            ],
        ] {
            let e = cfg(vars).unwrap_err().to_string();
            assert!(e.contains("OTEL_"), "{e}");
        }
    }

    #[test]
    fn host_ports() {
        assert_eq!(
            host_port("http://127.0.0.1:4318/v1/traces"),
            Some(("127.0.0.1".into(), 4318))
        );
        assert_eq!(host_port("https://x"), Some(("x".into(), 443)));
        assert_eq!(host_port("http://[::1]:4317"), Some(("::1".into(), 4317)));
    }
}
