//! The OTEL_* configuration: any values of the variables the agent reads give either a
//! setting or a clear error naming a variable, never a panic.
#![no_main]
use agent::{export::config::ExportConfig, sampling::Sampler, span::limits::Limits};
use libfuzzer_sys::fuzz_target;

const VARS: [&str; 16] = [
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_INSECURE",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_SCHEDULE_DELAY",
    "BEHOLDER_EXPORT_MAX_BYTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
];

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // Values separated by NUL, in the order of VARS; missing ones are unset.
    let values: Vec<&str> = s.split('\0').collect();
    let get = |k: &str| {
        VARS.iter()
            .position(|v| *v == k)
            .and_then(|i| values.get(i))
            .map(|v| v.to_string())
    };
    match ExportConfig::from_lookup(&get) {
        Ok(c) => {
            if let Some(ep) = c.endpoint {
                assert!(ep.url.starts_with("http://") || ep.url.starts_with("https://"));
                assert!(ep.max_request_bytes >= 1024);
            }
        }
        Err(e) => {
            let m = e.to_string();
            assert!(m.contains("OTEL_") || m.contains("BEHOLDER_"), "{m}");
        }
    }
    let _ = Sampler::from_values(get("OTEL_TRACES_SAMPLER"), get("OTEL_TRACES_SAMPLER_ARG"));
    let _ = Limits::from_values(
        get("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT"),
        None,
        None,
        None,
    );
});
