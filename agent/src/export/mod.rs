//! Export: a bounded queue, batches bounded in size and time, retry with backoff while the
//! backend is unavailable, and every dropped span counted.
pub mod config;
pub mod console;
pub mod encode;
pub mod transport;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    sync::{mpsc, Semaphore},
    time::Instant,
};

use self::{
    config::ExportConfig,
    transport::{SendError, Transport},
};
use crate::{span::Span, telemetry::Metrics};

/// Where batches go.
pub enum Sink {
    Console,
    Discard,
    Otlp(Box<Transport>),
}

impl Sink {
    pub fn new(cfg: &ExportConfig) -> Result<Sink, SendError> {
        match &cfg.endpoint {
            None if cfg.discard => Ok(Sink::Discard),
            None => Ok(Sink::Console),
            Some(ep) => Ok(Sink::Otlp(Box::new(Transport::new(ep)?))),
        }
    }
}

/// The queue in front of the exporter; `try_send` never blocks the pipeline.
pub fn queue(cfg: &ExportConfig) -> (mpsc::Sender<Span>, mpsc::Receiver<Span>) {
    mpsc::channel(cfg.batch.max_queue)
}

/// Batches exported at once: enough to keep up with bursts while one request is in flight.
const MAX_IN_FLIGHT: u32 = 4;

/// Runs until the queue's senders are all dropped, then flushes what is left (bounded by
/// `final_flush`) and returns.
pub async fn run(
    mut rx: mpsc::Receiver<Span>,
    sink: Sink,
    cfg: ExportConfig,
    metrics: Arc<Metrics>,
    final_flush: Duration,
) {
    let max = cfg.batch.max_batch;
    let mut batch: Vec<Span> = Vec::with_capacity(max);
    let exporter = Exporter {
        max_request_bytes: cfg
            .endpoint
            .as_ref()
            .map_or(config::DEFAULT_MAX_REQUEST_BYTES, |e| e.max_request_bytes),
        metrics,
        failing: Arc::new(AtomicBool::new(false)),
        in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize)),
        sink,
    };
    let mut deadline = Instant::now() + cfg.batch.delay;
    loop {
        tokio::select! {
            next = rx.recv() => match next {
                Some(span) => {
                    batch.push(span);
                    if batch.len() >= max {
                        exporter.flush(&mut batch, cfg.batch.retry_for).await;
                        deadline = Instant::now() + cfg.batch.delay;
                    }
                }
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => {
                if !batch.is_empty() {
                    exporter.flush(&mut batch, cfg.batch.retry_for).await;
                }
                deadline = Instant::now() + cfg.batch.delay;
            }
        }
    }
    // Shutdown: everything still queued, in batches, within the final-flush budget.
    let stop = Instant::now() + final_flush;
    while let Ok(span) = rx.try_recv() {
        batch.push(span);
        if batch.len() >= max {
            exporter
                .flush(&mut batch, stop.saturating_duration_since(Instant::now()))
                .await;
        }
    }
    if !batch.is_empty() {
        exporter
            .flush(&mut batch, stop.saturating_duration_since(Instant::now()))
            .await;
    }
    let left = stop.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
    let _ = tokio::time::timeout(left, exporter.in_flight.acquire_many(MAX_IN_FLIGHT)).await;
}

struct Exporter {
    max_request_bytes: usize,
    metrics: Arc<Metrics>,
    failing: Arc<AtomicBool>,
    in_flight: Arc<Semaphore>,
    sink: Sink,
}

impl Exporter {
    /// Hands the batch to a sender task once fewer than `MAX_IN_FLIGHT` are exporting.
    async fn flush(&self, batch: &mut Vec<Span>, retry_for: Duration) {
        let n = batch.len() as u64;
        let transport = match &self.sink {
            Sink::Console => {
                console::print(batch);
                self.metrics.spans_exported.inc_by(n);
                batch.clear();
                return;
            }
            Sink::Discard => {
                self.metrics.spans_discarded.inc_by(n);
                batch.clear();
                return;
            }
            Sink::Otlp(t) => (**t).clone(),
        };
        // Several requests when the batch encodes larger than the backend takes at once.
        let requests = encode::requests(batch, self.max_request_bytes);
        batch.clear();
        if requests.len() > 1 {
            self.metrics.export_requests_split.inc();
        }
        for (req, n) in requests {
            let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                return;
            };
            let (metrics, failing, transport) = (
                self.metrics.clone(),
                self.failing.clone(),
                transport.clone(),
            );
            tokio::spawn(async move {
                send_with_retry(transport, req, n, retry_for, &metrics, &failing).await;
                drop(permit);
            });
        }
    }
}

/// Longest wait a backend's `Retry-After`/`RetryInfo` may ask for between attempts.
const MAX_ASKED_DELAY: Duration = Duration::from_secs(30);

/// Sends one request, retrying while the backend is unavailable (after the delay it asks for,
/// or with backoff) until `retry_for` runs out. A request refused as too large is split in two
/// once, and each half sent the same way; a half refused again is dropped, never split further.
async fn send_with_retry(
    mut transport: Transport,
    req: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
    n: u64,
    retry_for: Duration,
    metrics: &Metrics,
    failing: &AtomicBool,
) {
    let give_up = Instant::now() + retry_for;
    let mut todo = vec![(req, n, true)];
    while let Some((req, n, may_split)) = todo.pop() {
        let mut backoff = Duration::from_millis(100);
        loop {
            match transport.send(req.clone()).await {
                Ok(rejected) => {
                    if failing.swap(false, Ordering::Relaxed) {
                        tracing::info!("OTLP backend reachable again; export resumed");
                    }
                    let rejected = (rejected.max(0) as u64).min(n);
                    metrics.spans_rejected.inc_by(rejected);
                    metrics.spans_exported.inc_by(n - rejected);
                    break;
                }
                Err(SendError::Retryable(e, asked)) => {
                    let wait = asked.map_or(backoff, |d| d.min(MAX_ASKED_DELAY).max(backoff));
                    if Instant::now() + wait >= give_up {
                        tracing::warn!(spans = n, "dropping a batch: {e}");
                        metrics.spans_export_failed.inc_by(n);
                        break;
                    }
                    if !failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!("cannot export spans ({e}); retrying with backoff, the agent keeps tracing and counts what it must drop");
                    }
                    metrics.export_retries.inc();
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(SendError::TooLarge(e)) if may_split => {
                    match encode::split(req) {
                        Some((a, b)) => {
                            tracing::warn!(spans = n, "{e}; sending it again in two halves");
                            metrics.export_requests_split.inc();
                            let na = encode::span_count(&a);
                            todo.push((b, n - na, false));
                            todo.push((a, na, false));
                        }
                        None => {
                            tracing::warn!(spans = n, "dropping a span too large to export: {e}");
                            metrics.spans_export_failed.inc_by(n);
                        }
                    }
                    break;
                }
                Err(e) => {
                    if !failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!("cannot export spans ({e})");
                    }
                    tracing::warn!(spans = n, "dropping a batch: {e}");
                    metrics.spans_export_failed.inc_by(n);
                    break;
                }
            }
        }
    }
}
