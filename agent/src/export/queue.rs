//! The queue between the tracker and the exporter, bounded in spans (`OTEL_BSP_MAX_QUEUE_SIZE`)
//! and in bytes (`BEHOLDER_SPAN_QUEUE_MAX_BYTES`): a span carries what the traffic put in it (URL,
//! user agent, up to the attribute limits), so a count alone does not bound memory.
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::{pipeline::budget::ByteBudget, span::Span};

/// Why a span was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    Spans,
    Bytes,
}

pub struct SpanSender {
    tx: mpsc::Sender<(Span, usize)>,
    budget: Arc<ByteBudget>,
}

pub struct SpanReceiver {
    rx: mpsc::Receiver<(Span, usize)>,
    budget: Arc<ByteBudget>,
}

/// A queue of at most `spans` spans holding at most `bytes` bytes (`Span::approx_bytes`).
pub fn bounded(spans: usize, bytes: usize) -> (SpanSender, SpanReceiver) {
    let (tx, rx) = mpsc::channel(spans.max(1));
    let budget = Arc::new(ByteBudget::new(bytes));
    (
        SpanSender {
            tx,
            budget: budget.clone(),
        },
        SpanReceiver { rx, budget },
    )
}

impl SpanSender {
    /// Queues `span` without waiting; the span is dropped when either bound is reached.
    pub fn try_send(&self, span: Span) -> Result<(), Full> {
        let n = span.approx_bytes();
        if !self.budget.try_take(n) {
            return Err(Full::Bytes);
        }
        self.tx.try_send((span, n)).map_err(|_| {
            self.budget.release(n);
            Full::Spans
        })
    }
}

impl SpanReceiver {
    pub async fn recv(&mut self) -> Option<Span> {
        let (span, n) = self.rx.recv().await?;
        self.budget.release(n);
        Some(span)
    }

    pub fn try_recv(&mut self) -> Option<Span> {
        let (span, n) = self.rx.try_recv().ok()?;
        self.budget.release(n);
        Some(span)
    }

    /// Bytes held by queued spans.
    pub fn bytes(&self) -> usize {
        self.budget.used()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::{test_span, KeyValue, Value};

    #[tokio::test]
    async fn bounded_in_spans_and_in_bytes() {
        let one = test_span(0).approx_bytes();
        let (tx, mut rx) = bounded(3, 2 * one + one / 2);
        assert_eq!(tx.try_send(test_span(0)), Ok(()));
        assert_eq!(tx.try_send(test_span(0)), Ok(()));
        assert_eq!(tx.try_send(test_span(0)), Err(Full::Bytes));
        assert_eq!(rx.bytes(), 2 * one);
        assert!(rx.recv().await.is_some());
        assert_eq!(rx.bytes(), one);

        // A span with a 1 MiB attribute does not fit where small ones do.
        let mut big = test_span(0);
        big.attributes
            .push(KeyValue::new("url.full", Value::Str("x".repeat(1 << 20))));
        assert!(big.approx_bytes() > 1 << 20);
        assert_eq!(tx.try_send(big), Err(Full::Bytes));

        let (tx, _rx) = bounded(1, usize::MAX);
        assert_eq!(tx.try_send(test_span(0)), Ok(()));
        assert_eq!(tx.try_send(test_span(0)), Err(Full::Spans));
    }
}
