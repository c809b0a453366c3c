//! Serves the agent's counters in Prometheus text format.
use std::{net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{body::Bytes, service::service_fn, Response};
use hyper_util::rt::TokioIo;

use crate::telemetry::Metrics;

pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("metrics endpoint {addr} unavailable ({e}); counters are still logged at exit. Use --metrics-addr to pick another address");
            return;
        }
    };
    tracing::info!("agent metrics at http://{addr}/metrics");
    let registry = Arc::new(metrics.registry());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req| {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut body, &registry);
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(body)))
                            .unwrap_or_default(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
