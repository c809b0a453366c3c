//! Export: a bounded queue, batches bounded in size and time, retry with backoff while the
//! backend is unavailable, and every dropped span counted.
pub mod config;
pub mod console;
pub mod encode;
pub mod queue;
pub mod transport;
pub mod wire;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    sync::{watch, Semaphore},
    time::Instant,
};

pub use self::queue::{Full, SpanReceiver, SpanSender};
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

/// The queue in front of the exporter, bounded in spans and bytes; `try_send` never blocks the
/// pipeline.
pub fn queue(cfg: &ExportConfig) -> (SpanSender, SpanReceiver) {
    queue::bounded(cfg.batch.max_queue, cfg.batch.max_queue_bytes)
}

/// Batches exported at once: enough to keep up with bursts while one request is in flight.
const MAX_IN_FLIGHT: u32 = 4;

/// Runs until the queue's senders are all dropped, then flushes what is left (bounded by
/// `final_flush`) and returns.
pub async fn run(
    mut rx: SpanReceiver,
    sink: Sink,
    cfg: ExportConfig,
    metrics: Arc<Metrics>,
    final_flush: Duration,
    stop: watch::Receiver<bool>,
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
        pending: Arc::new(AtomicU64::new(0)),
        stop,
        sink,
    };
    let mut deadline = Instant::now() + cfg.batch.delay;
    loop {
        tokio::select! {
            next = rx.recv(max.saturating_sub(batch.len())) => match next {
                Some(spans) => {
                    batch.extend(spans);
                    if batch.len() >= max {
                        exporter.flush_full(&mut batch, max, cfg.batch.retry_for).await;
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
    // Shutdown (the agent's stop signal already told requests being retried to stop retrying: a
    // backend that is down now is not waited for): everything still queued gets one attempt, in
    // batches, within the final-flush budget.
    let stop = Instant::now() + final_flush;
    while let Some(spans) = rx.try_recv(max.saturating_sub(batch.len())) {
        batch.extend(spans);
        if batch.len() >= max {
            exporter
                .flush_full(
                    &mut batch,
                    max,
                    stop.saturating_duration_since(Instant::now()),
                )
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
    // Spans of requests still in flight are lost with the process: counted, never silent.
    let lost = exporter.pending.swap(0, Ordering::AcqRel);
    if lost > 0 {
        tracing::warn!(
            spans = lost,
            "export requests still in flight at exit: spans dropped"
        );
        exporter.metrics.spans_export_failed.inc_by(lost);
    }
}

struct Exporter {
    max_request_bytes: usize,
    metrics: Arc<Metrics>,
    failing: Arc<AtomicBool>,
    in_flight: Arc<Semaphore>,
    /// Spans in requests handed to sender tasks and not yet accounted for.
    pending: Arc<AtomicU64>,
    /// The agent's stop signal: sender tasks stop retrying once it is set.
    stop: watch::Receiver<bool>,
    sink: Sink,
}

impl Exporter {
    /// Exports the batch in batches of `max` spans while it holds that many (the rest waits
    /// for more, or for the schedule delay).
    async fn flush_full(&self, batch: &mut Vec<Span>, max: usize, retry_for: Duration) {
        while batch.len() >= max {
            let rest = batch.split_off(max);
            self.flush(batch, retry_for).await;
            *batch = rest;
        }
    }

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
            let (pending, stopping) = (self.pending.clone(), self.stop.clone());
            pending.fetch_add(n, Ordering::AcqRel);
            tokio::spawn(async move {
                let ctx = SendCtx {
                    metrics: &metrics,
                    failing: &failing,
                    stopping,
                };
                send_with_retry(transport, req, n, retry_for, ctx).await;
                pending.fetch_sub(n, Ordering::AcqRel);
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
/// What a sender task shares with the exporter.
struct SendCtx<'a> {
    metrics: &'a Metrics,
    failing: &'a AtomicBool,
    /// Becomes true at shutdown: no more retries.
    stopping: watch::Receiver<bool>,
}

async fn send_with_retry(
    mut transport: Transport,
    req: bytes::Bytes,
    n: u64,
    retry_for: Duration,
    mut ctx: SendCtx<'_>,
) {
    let (metrics, failing) = (ctx.metrics, ctx.failing);
    let give_up = Instant::now() + retry_for;
    let mut todo = vec![(req, n, true)];
    while let Some((req, n, may_split)) = todo.pop() {
        let mut backoff = Duration::from_millis(100);
        loop {
            match transport.send(&req).await {
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
                    if Instant::now() + wait >= give_up || *ctx.stopping.borrow() {
                        tracing::warn!(spans = n, "dropping a batch: {e}");
                        metrics.spans_export_failed.inc_by(n);
                        break;
                    }
                    if !failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!("cannot export spans ({e}); retrying with backoff, the agent keeps tracing and counts what it must drop");
                    }
                    metrics.export_retries.inc();
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        // Shutdown: the next failure drops the batch instead of waiting.
                        _ = ctx.stopping.wait_for(|s| *s) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(SendError::TooLarge(e)) if may_split => {
                    match encode::split_encoded(&req) {
                        Some(((a, na), (b, nb))) => {
                            tracing::warn!(spans = n, "{e}; sending it again in two halves");
                            metrics.export_requests_split.inc();
                            todo.push((b, nb, false));
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
