//! Export: a bounded queue, batches bounded in size and time, retry with backoff while the
//! backend is unavailable, and every dropped span counted.
pub mod config;
pub mod console;
pub mod encode;
pub mod transport;

use std::{sync::Arc, time::Duration};

use tokio::{sync::mpsc, time::Instant};

use self::{config::ExportConfig, transport::{SendError, Transport}};
use crate::{span::Span, telemetry::Metrics};

/// Where batches go.
pub enum Sink {
    Console,
    Otlp(Transport),
}

impl Sink {
    pub fn new(cfg: &ExportConfig) -> Result<Sink, SendError> {
        match &cfg.endpoint {
            None => Ok(Sink::Console),
            Some(ep) => Ok(Sink::Otlp(Transport::new(ep)?)),
        }
    }
}

/// The queue in front of the exporter; `try_send` never blocks the pipeline.
pub fn queue(cfg: &ExportConfig) -> (mpsc::Sender<Span>, mpsc::Receiver<Span>) {
    mpsc::channel(cfg.batch.max_queue)
}

/// Runs until the queue's senders are all dropped, then flushes what is left (bounded by
/// `final_flush`) and returns.
pub async fn run(mut rx: mpsc::Receiver<Span>, mut sink: Sink, cfg: ExportConfig, metrics: Arc<Metrics>, final_flush: Duration) {
    let max = cfg.batch.max_batch;
    let mut batch: Vec<Span> = Vec::with_capacity(max);
    let mut exporter = Exporter { metrics, failing: false };
    let mut deadline = Instant::now() + cfg.batch.delay;
    loop {
        tokio::select! {
            next = rx.recv() => match next {
                Some(span) => {
                    batch.push(span);
                    if batch.len() >= max {
                        exporter.flush(&mut sink, &mut batch, cfg.batch.retry_for).await;
                        deadline = Instant::now() + cfg.batch.delay;
                    }
                }
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => {
                if !batch.is_empty() {
                    exporter.flush(&mut sink, &mut batch, cfg.batch.retry_for).await;
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
            let left = stop.saturating_duration_since(Instant::now());
            exporter.flush(&mut sink, &mut batch, left).await;
        }
    }
    if !batch.is_empty() {
        let left = stop.saturating_duration_since(Instant::now());
        exporter.flush(&mut sink, &mut batch, left).await;
    }
}

struct Exporter {
    metrics: Arc<Metrics>,
    failing: bool,
}

impl Exporter {
    async fn flush(&mut self, sink: &mut Sink, batch: &mut Vec<Span>, retry_for: Duration) {
        let n = batch.len() as u64;
        let transport = match sink {
            Sink::Console => {
                console::print(batch);
                self.metrics.spans_exported.inc_by(n);
                batch.clear();
                return;
            }
            Sink::Otlp(t) => t,
        };
        let req = encode::request(batch);
        batch.clear();
        let give_up = Instant::now() + retry_for;
        let mut backoff = Duration::from_millis(100);
        loop {
            match transport.send(req.clone()).await {
                Ok(rejected) => {
                    if self.failing {
                        tracing::info!("OTLP backend reachable again; export resumed");
                        self.failing = false;
                    }
                    let rejected = (rejected.max(0) as u64).min(n);
                    self.metrics.spans_rejected.inc_by(rejected);
                    self.metrics.spans_exported.inc_by(n - rejected);
                    return;
                }
                Err(SendError::Retryable(e)) if Instant::now() + backoff < give_up => {
                    if !self.failing {
                        tracing::warn!("cannot export spans ({e}); retrying with backoff, the agent keeps tracing and counts what it must drop");
                        self.failing = true;
                    }
                    self.metrics.export_retries.inc();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::warn!(spans = n, "dropping a batch: {e}");
                    self.failing = true;
                    self.metrics.spans_export_failed.inc_by(n);
                    return;
                }
            }
        }
    }
}
