//! Ring buffer reader: wakes on `AsyncFd` readiness, drains every item, decodes it into an owned
//! event and hands it to the tracker without ever blocking.
use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

use super::event::KernelEvent;
use crate::telemetry::Metrics;

pub async fn run(
    ring: RingBuf<MapData>,
    events: mpsc::Sender<KernelEvent>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd and keeps it open for as long as the AsyncFd lives.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // The kernel wakes us only when 64 KiB are pending; this tick picks up the rest promptly.
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => drain(fd.get_mut(), &events, &metrics),
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &events, &metrics);
                guard.clear_ready();
            }
            _ = stop.changed() => {
                // Take what the kernel already produced, then stop.
                drain(fd.get_mut(), &events, &metrics);
                return Ok(());
            }
        }
    }
}

fn drain(ring: &mut RingBuf<MapData>, events: &mpsc::Sender<KernelEvent>, metrics: &Metrics) {
    while let Some(item) = ring.next() {
        metrics.ring_events.inc();
        match KernelEvent::decode(&item) {
            Ok(ev) => {
                if events.try_send(ev).is_err() {
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
