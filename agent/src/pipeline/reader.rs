//! Ring buffer reader: wakes on `AsyncFd` readiness, drains every item, decodes it into an owned
//! event and hands it to the tracker without ever blocking.
use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

use super::{budget::ByteBudget, event::KernelEvent};
use crate::telemetry::Metrics;

pub async fn run(
    ring: RingBuf<MapData>,
    events: mpsc::Sender<KernelEvent>,
    execs: std::sync::mpsc::SyncSender<u32>,
    budget: Arc<ByteBudget>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let q = Queue {
        events: &events,
        execs: &execs,
        budget: &budget,
        metrics: &metrics,
    };
    // SAFETY: the ring buffer owns its fd and keeps it open for as long as the AsyncFd lives.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // The kernel wakes us only when 64 KiB are pending; this tick picks up the rest promptly.
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => drain(fd.get_mut(), &q),
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &q);
                guard.clear_ready();
            }
            _ = stop.changed() => {
                // Take what the kernel already produced, then stop.
                drain(fd.get_mut(), &q);
                return Ok(());
            }
        }
    }
}

/// Where drained events go: the tracker's channel, bounded in items and in bytes.
struct Queue<'a> {
    events: &'a mpsc::Sender<KernelEvent>,
    /// `exec`s, for the runtime classifier (bounded; one that does not fit is still found by
    /// its next sweep).
    execs: &'a std::sync::mpsc::SyncSender<u32>,
    budget: &'a ByteBudget,
    metrics: &'a Metrics,
}

fn drain(ring: &mut RingBuf<MapData>, q: &Queue<'_>) {
    let metrics = q.metrics;
    while let Some(item) = ring.next() {
        metrics.ring_events.inc();
        match KernelEvent::decode(&item) {
            Ok(KernelEvent::Exec(pid)) => {
                if q.execs.try_send(pid).is_err() {
                    metrics.runtime_exec_queue_full.inc();
                }
                if let Some(netns) = crate::process::netns_of(pid) {
                    if q.events
                        .try_send(KernelEvent::Netns { pid, netns })
                        .is_err()
                    {
                        metrics.events_channel_full.inc();
                    }
                }
            }
            Ok(ev) => {
                let n = ev.bytes();
                if !q.budget.try_take(n) {
                    metrics.events_bytes_full.inc();
                } else if q.events.try_send(ev).is_err() {
                    q.budget.release(n);
                    metrics.events_channel_full.inc();
                }
            }
            Err(e) => {
                metrics.ring_decode_errors.inc();
                tracing::debug!("bad ring item: {e}");
            }
        }
    }
}
