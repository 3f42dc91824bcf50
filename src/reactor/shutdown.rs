//! Stopping gracefully: the [`ShutdownHandle`], signals, and the drain that spreads the
//! 1001 closes over `shutdown_drain` so ten thousand clients do not reconnect at once.
//!
//! Order: stop accepting (both listeners close, the socket file goes); execute every publish
//! line already received, budget or not; drop connections still in their request; close
//! open WebSockets in batches, one per tick, over the drain window; arm the
//! `shutdown_timeout` deadline. The loop ends once every connection is gone, or at the
//! deadline.

use std::io;
use std::sync::Arc;

use mio::Waker;

use super::timer::Tick;
use super::{Server, TimerEvent};
use crate::error::Close;

/// Asks a running [`Server`] to shut down gracefully, from any thread.
#[derive(Clone)]
pub struct ShutdownHandle(pub(super) Arc<Waker>);

impl ShutdownHandle {
    /// Starts the graceful shutdown, as SIGTERM would.
    ///
    /// # Errors
    /// The wake-up could not be delivered (the server is gone).
    pub fn shutdown(&self) -> io::Result<()> {
        self.0.wake()
    }
}

impl Server {
    pub(super) fn on_signal(&mut self, now: Tick) {
        let Some(signals) = &mut self.signals else {
            return;
        };
        if signals.pending().count() == 0 {
            return;
        }
        if self.shutting_down {
            log::warn!("second signal: exiting now");
            self.finished = true;
        } else {
            self.begin_shutdown(now);
        }
    }

    pub(super) fn begin_shutdown(&mut self, now: Tick) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        log::info!(
            "shutting down: {} connection(s)",
            self.fanout.metrics().connections
        );
        if let Some(mut listening) = self.listening.take() {
            listening.deregister(self.poll.registry());
        }
        for key in self
            .publishers
            .iter()
            .map(|(key, _)| key)
            .collect::<Vec<_>>()
        {
            // Every line already received is delivered, budget or not: pass after pass.
            loop {
                self.paused_publishers.clear();
                self.fanout.refill_budget();
                self.on_publisher_ready(key);
                if self.paused_publishers.is_empty() {
                    break;
                }
                self.close_slow_consumers(now);
                self.flush_dirty(now);
            }
            if self.publishers.contains(key) {
                self.drop_publisher(key);
            }
        }
        let mut open = Vec::new();
        for key in self.fanout.clients().keys() {
            let client = self.fanout.clients().live(key);
            if client.is_handshaking() {
                self.drop_client(key);
            } else if !client.is_draining() {
                open.push(key);
            }
        }
        // Spread the 1001s over the drain window: one batch per tick, as many ticks as the
        // window holds but no more batches than connections, so a few connections close at
        // once and ten thousand reconnect over the whole window instead of in one storm.
        let ticks = self.ticks.ticks_in(self.config.drain_window()).max(1) as usize;
        let per_batch = open.len().div_ceil(ticks).max(1);
        for (i, key) in open.into_iter().enumerate() {
            let batch = (i / per_batch) as u64;
            if batch == 0 {
                self.close_client(key, Close::Shutdown, now);
            } else {
                self.arm(key, now.after(batch));
            }
        }
        let deadline = now.after(self.ticks.ticks_in(self.config.shutdown_timeout));
        self.timers.insert(deadline, TimerEvent::ShutdownDeadline);
    }
}
