//! Ring buffer reader: wakes on `AsyncFd` readiness, drains every item, decodes it into an owned
//! event and hands it to the tracker without ever blocking.
use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

use bytes::BytesMut;

use super::{
    budget::ByteBudget,
    event::{Batch, KernelEvent, BATCH},
};
use crate::telemetry::Metrics;

/// The tracker's queue: batches of events, bounded in events and in payload bytes.
pub struct Events {
    pub tx: mpsc::Sender<Batch>,
    /// Events queued (a count, in a budget's clothes).
    pub items: Arc<ByteBudget>,
    pub bytes: Arc<ByteBudget>,
}

pub async fn run(
    ring: RingBuf<MapData>,
    events: Events,
    execs: std::sync::mpsc::SyncSender<u32>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut q = Queue {
        events: &events,
        execs: &execs,
        metrics: &metrics,
        arena: BytesMut::new(),
        batch: Vec::new(),
        dropped: Dropped::default(),
    };
    // SAFETY: the ring buffer owns its fd and keeps it open for as long as the AsyncFd lives.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // The kernel wakes us only when 64 KiB are pending; this tick picks up the rest promptly.
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => drain(fd.get_mut(), &mut q),
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut q);
                guard.clear_ready();
            }
            _ = stop.changed() => {
                // Take what the kernel already produced, then stop.
                drain(fd.get_mut(), &mut q);
                return Ok(());
            }
        }
    }
}

/// Where drained events go: the tracker's channel, in batches, bounded in events and bytes.
struct Queue<'a> {
    events: &'a Events,
    /// `exec`s, for the runtime classifier (bounded; one that does not fit is still found by
    /// its next sweep).
    execs: &'a std::sync::mpsc::SyncSender<u32>,
    metrics: &'a Metrics,
    arena: BytesMut,
    batch: Batch,
    dropped: Dropped,
}

/// Processes a data or close event of which was dropped here: their later data events say so
/// (`DataHeader::lost`), as the kernel's do for what it failed to send, so that nothing is
/// inferred from what they did unseen (`trace_context::h2_owner`).
#[derive(Default)]
struct Dropped {
    pids: crate::fast::HashSet<u32>,
    /// More processes than `MAX_DROPPED` lost events: every one is taken to have.
    all: bool,
}

/// Processes remembered as having had events dropped here.
const MAX_DROPPED: usize = 16_384;

impl Dropped {
    fn note(&mut self, ev: &KernelEvent) {
        let pid = match ev {
            KernelEvent::Data { header, .. } => header.pid,
            KernelEvent::Close(c) => c.pid,
            KernelEvent::Exec(_) | KernelEvent::Netns { .. } => return,
        };
        if self.pids.len() >= MAX_DROPPED && !self.pids.contains(&pid) {
            self.all = true;
        } else {
            self.pids.insert(pid);
        }
    }

    fn mark(&self, ev: &mut KernelEvent) {
        if let KernelEvent::Data { header, .. } = ev {
            if self.all || self.pids.contains(&header.pid) {
                header.lost = header.lost.saturating_add(1);
            }
        }
    }
}

impl Queue<'_> {
    /// Adds an event to the batch if both budgets have room for it (counted otherwise).
    fn push(&mut self, mut ev: KernelEvent) {
        let n = ev.bytes();
        if !self.events.items.try_take(1) {
            self.metrics.events_channel_full.inc();
            self.dropped.note(&ev);
        } else if !self.events.bytes.try_take(n) {
            self.events.items.release(1);
            self.metrics.events_bytes_full.inc();
            self.dropped.note(&ev);
        } else {
            self.dropped.mark(&mut ev);
            self.batch.push(ev);
            if self.batch.len() >= BATCH {
                self.send();
            }
        }
    }

    /// Hands the batch to the tracker.
    fn send(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        if let Err(e) = self.events.tx.try_send(batch) {
            // Only when the tracker is gone, or holds as many batches as the channel takes.
            let batch = match e {
                mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b) => b,
            };
            let bytes: usize = batch.iter().map(KernelEvent::bytes).sum();
            self.events.items.release(batch.len());
            self.events.bytes.release(bytes);
            self.metrics.events_channel_full.inc_by(batch.len() as u64);
            for ev in &batch {
                self.dropped.note(ev);
            }
        }
    }
}

fn drain(ring: &mut RingBuf<MapData>, q: &mut Queue<'_>) {
    let metrics = q.metrics;
    while let Some(item) = ring.next() {
        metrics.ring_events.inc();
        match KernelEvent::decode_in(&item, &mut q.arena) {
            Ok(KernelEvent::Exec(pid)) => {
                if q.execs.try_send(pid).is_err() {
                    metrics.runtime_exec_queue_full.inc();
                }
                if let Some(netns) = crate::process::netns_of(pid) {
                    q.push(KernelEvent::Netns { pid, netns });
                }
            }
            Ok(ev) => q.push(ev),
            Err(e) => {
                metrics.ring_decode_errors.inc();
                tracing::debug!("bad ring item: {e}");
            }
        }
    }
    q.send();
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::{CloseEvent, DataHeader};

    fn data(pid: u32) -> KernelEvent {
        KernelEvent::Data {
            header: DataHeader {
                pid,
                ..DataHeader::default()
            },
            payload: bytes::Bytes::new(),
        }
    }

    fn lost(ev: &KernelEvent) -> u64 {
        match ev {
            KernelEvent::Data { header, .. } => header.lost,
            _ => 0,
        }
    }

    #[test]
    fn a_process_whose_event_was_dropped_says_so_in_its_later_events() {
        let mut d = Dropped::default();
        d.note(&KernelEvent::Close(CloseEvent {
            pid: 7,
            ..CloseEvent::default()
        }));
        let (mut seven, mut eight) = (data(7), data(8));
        d.mark(&mut seven);
        d.mark(&mut eight);
        assert_eq!((lost(&seven), lost(&eight)), (1, 0));
        // Beyond the processes it remembers, every process is taken to have lost events.
        for pid in 0..MAX_DROPPED as u32 {
            d.note(&data(1000 + pid));
        }
        assert_eq!(lost(&eight), 0);
        d.mark(&mut eight);
        assert_eq!(lost(&eight), 1);
    }
}
