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

/// The tracker's end: spans are admitted one by one (each against both bounds, so what does
/// not fit is refused and counted at once) and handed over in batches (`flush`), one channel
/// send and one wakeup of the exporter for many spans.
pub struct SpanSender {
    tx: mpsc::UnboundedSender<Vec<(Span, usize)>>,
    spans: Arc<ByteBudget>,
    budget: Arc<ByteBudget>,
    pending: Vec<(Span, usize)>,
}

pub struct SpanReceiver {
    rx: mpsc::UnboundedReceiver<Vec<(Span, usize)>>,
    spans: Arc<ByteBudget>,
    budget: Arc<ByteBudget>,
}

/// Spans handed over at once at most (`SpanSender::try_send` flushes when this many wait).
const HAND_OVER: usize = 256;

/// A queue of at most `spans` spans holding at most `bytes` bytes (`Span::approx_bytes`),
/// counting those admitted but not yet handed over. The channel itself is unbounded: the two
/// budgets bound what it holds.
pub fn bounded(spans: usize, bytes: usize) -> (SpanSender, SpanReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let count = Arc::new(ByteBudget::new(spans.max(1)));
    let budget = Arc::new(ByteBudget::new(bytes));
    (
        SpanSender {
            tx,
            spans: count.clone(),
            budget: budget.clone(),
            pending: Vec::new(),
        },
        SpanReceiver {
            rx,
            spans: count,
            budget,
        },
    )
}

impl SpanSender {
    /// Admits `span` without waiting (handed over at the next `flush`); the span is dropped
    /// when either bound is reached.
    pub fn try_send(&mut self, span: Span) -> Result<(), Full> {
        let n = span.approx_bytes();
        if !self.spans.try_take(1) {
            return Err(Full::Spans);
        }
        if !self.budget.try_take(n) {
            self.spans.release(1);
            return Err(Full::Bytes);
        }
        self.pending.push((span, n));
        if self.pending.len() >= HAND_OVER {
            self.flush();
        }
        Ok(())
    }

    /// Hands the admitted spans to the exporter.
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.pending);
        if let Err(mpsc::error::SendError(batch)) = self.tx.send(batch) {
            // The exporter is gone (the agent is stopping): nothing will take them.
            self.spans.release(batch.len());
            self.budget.release(batch.iter().map(|(_, n)| n).sum());
        }
    }
}

impl SpanReceiver {
    fn release(&self, batch: Vec<(Span, usize)>) -> Vec<Span> {
        self.spans.release(batch.len());
        self.budget.release(batch.iter().map(|(_, n)| n).sum());
        batch.into_iter().map(|(s, _)| s).collect()
    }

    /// The next batch of spans, once the tracker hands one over.
    pub async fn recv(&mut self) -> Option<Vec<Span>> {
        let batch = self.rx.recv().await?;
        Some(self.release(batch))
    }

    pub fn try_recv(&mut self) -> Option<Vec<Span>> {
        let batch = self.rx.try_recv().ok()?;
        Some(self.release(batch))
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
        let (mut tx, mut rx) = bounded(3, 2 * one + one / 2);
        assert_eq!(tx.try_send(test_span(0)), Ok(()));
        assert_eq!(tx.try_send(test_span(0)), Ok(()));
        assert_eq!(tx.try_send(test_span(0)), Err(Full::Bytes));
        // Admitted spans count before they are handed over.
        assert_eq!(rx.bytes(), 2 * one);
        assert!(rx.try_recv().is_none());
        tx.flush();
        assert_eq!(rx.recv().await.map(|b| b.len()), Some(2));
        assert_eq!(rx.bytes(), 0);
        assert_eq!(tx.try_send(test_span(0)), Ok(()));
        assert_eq!(rx.bytes(), one);

        // A span with a 1 MiB attribute does not fit where small ones do.
        let mut big = test_span(0);
        big.attributes.push(KeyValue::new(
            "url.full",
            Value::Str("x".repeat(1 << 20).into()),
        ));
        assert!(big.approx_bytes() > 1 << 20);
        assert_eq!(tx.try_send(big), Err(Full::Bytes));

        let (mut tx, _rx) = bounded(1, usize::MAX);
        assert_eq!(tx.try_send(test_span(0)), Ok(()));
        assert_eq!(tx.try_send(test_span(0)), Err(Full::Spans));
        // Handed over, still queued: still counted.
        tx.flush();
        assert_eq!(tx.try_send(test_span(0)), Err(Full::Spans));
    }
}
