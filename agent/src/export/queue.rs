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
    /// The hand-over being taken apart: its spans still count against both budgets until the
    /// exporter takes them, so what waits outside the queue is one export batch at most.
    current: std::vec::IntoIter<(Span, usize)>,
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
            current: Vec::new().into_iter(),
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
    /// Takes up to `limit` spans off the current hand-over and out of both budgets.
    fn take(&mut self, limit: usize) -> Vec<Span> {
        let mut bytes = 0;
        let out: Vec<Span> = self
            .current
            .by_ref()
            .take(limit.max(1))
            .map(|(s, n)| {
                bytes += n;
                s
            })
            .collect();
        self.spans.release(out.len());
        self.budget.release(bytes);
        out
    }

    /// Up to `limit` spans (at least one), waiting for the tracker to hand some over when none
    /// are left. Cancel-safe: nothing is taken before the channel yields.
    pub async fn recv(&mut self, limit: usize) -> Option<Vec<Span>> {
        if self.current.len() == 0 {
            self.current = self.rx.recv().await?.into_iter();
        }
        Some(self.take(limit))
    }

    /// Up to `limit` spans (at least one) without waiting.
    pub fn try_recv(&mut self, limit: usize) -> Option<Vec<Span>> {
        if self.current.len() == 0 {
            self.current = self.rx.try_recv().ok()?.into_iter();
        }
        Some(self.take(limit))
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
        assert!(rx.try_recv(8).is_none());
        tx.flush();
        // Taken one at a time, the second still counts while the first is exported.
        assert_eq!(rx.recv(1).await.map(|b| b.len()), Some(1));
        assert_eq!(rx.bytes(), one);
        assert_eq!(rx.try_recv(8).map(|b| b.len()), Some(1));
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
