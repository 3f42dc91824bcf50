//! The WebSocket port's connections as the loop sees them: input (request head, then
//! frames), routing a complete request, the upgrade, each connection's one timer, slow
//! consumers, the flush and the reap. Every decision is made below (`ws::conn` for
//! deadlines and framing, `ws::session` and `fanout` for requests, `auth::admission` for
//! upgrades); this file acts on the verdicts.

use std::io;

use mio::{Interest, Registry};

use super::timer::Tick;
use super::token::{self, Source};
use super::{REFUSAL_LOG_INTERVAL, Server, TimerEvent, micros_since};
use crate::auth::admission;
use crate::base::ids::ConnId;
use crate::error::Close;
use crate::ops::assets::Asset;
use crate::ops::health::Health;
use crate::sse::{Opening, Stream};
use crate::ws::conn::{ClientConn, Deadline, Discarded, ReadEnd, Readiness, RequestOutcome};
use crate::ws::http::{self, Handshake, Refusal, Route};

impl Server {
    pub(super) fn on_client_readable(&mut self, key: usize, now: Tick) {
        let Some(mut client) = self.fanout.clients_mut().get_mut(key) else {
            return;
        };
        if client.is_handshaking() {
            match client.read_request(&self.routing) {
                RequestOutcome::Incomplete => return,
                RequestOutcome::Gone => {
                    drop(client);
                    return self.drop_client(key);
                }
                RequestOutcome::Refused(refusal) => {
                    drop(client);
                    return self.refuse(key, refusal, now);
                }
                RequestOutcome::Routed { route, rest } => {
                    drop(client);
                    if !self.route(key, route, rest, now) {
                        return;
                    }
                }
            }
        } else if client.is_draining() || client.is_event_stream() {
            // A draining peer's input, or a stream reader's (it has nothing to say; its EOF
            // is the page closing the stream), is discarded, a budget per pass.
            let (stream, id) = (client.is_event_stream(), client.id());
            let discarded = client.discard_input();
            drop(client);
            match discarded {
                Discarded::Drained => {}
                Discarded::MayHaveMore => self.ready_clients.push(id),
                Discarded::Closed => {
                    if stream {
                        self.fanout.end(key, Close::ClientClosed);
                    }
                    self.drop_client(key);
                }
            }
            return;
        } else {
            drop(client);
        }
        self.input.begin();
        // A client closed by one of its own messages (the rate limit, say) drains: its next
        // `next_message` is `None`, and the rest of this pass's input is discarded with it.
        let result = loop {
            let mut client = self.fanout.clients_mut().live_mut(key);
            match client.next_message(now, &mut self.input) {
                Ok(Some(message)) => {
                    drop(client);
                    if let Some(close) = self.fanout.on_message(key, message) {
                        self.close_client(key, close, now);
                    }
                }
                Ok(None) => break Ok(()),
                Err(end) => break Err(end),
            }
        };
        if result.is_ok() && self.input.readiness() == Readiness::MayHaveMore {
            let id = self.fanout.clients().live(key).id();
            self.ready_clients.push(id);
        }
        match result {
            Ok(()) => {}
            Err(ReadEnd::Closed) => self.close_client(key, Close::ClientClosed, now),
            Err(ReadEnd::Reset) => {
                self.fanout.end(key, Close::Reset);
                self.drop_client(key);
            }
            Err(ReadEnd::Violation(close)) => {
                let client = self.fanout.clients().live(key);
                log::warn!(
                    "conn={} from {}: closing with {close}",
                    client.id().generation,
                    client.peer()
                );
                self.close_client(key, close, now);
            }
        }
    }

    /// Answers a complete request. Returns true when the connection is now a WebSocket (whose
    /// first frames may have come with the request).
    pub(super) fn route(&mut self, key: usize, route: Route, rest: Vec<u8>, now: Tick) -> bool {
        let uptime_secs = self.uptime_secs();
        let response = match route {
            Route::Health => {
                let health = Health {
                    connections: self.fanout.metrics().connections,
                    channels: self.fanout.active_channels(),
                    uptime_secs,
                    shared: self.fanout.gauges(uptime_secs).shared,
                };
                let status = if health.is_ok() {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let headers = "Cache-Control: no-store\r\n";
                crate::base::http::response(status, headers, "application/json", &health.json())
            }
            Route::Metrics => crate::base::http::ok(
                "text/plain; version=0.0.4; charset=utf-8",
                &self
                    .fanout
                    .metrics()
                    .render(&self.fanout.gauges(uptime_secs)),
            ),
            Route::Asset {
                asset: Asset::Dashboard,
                ..
            } if self.stats.is_none() => {
                self.refuse(key, Refusal::NotFound, now);
                return false;
            }
            Route::Asset {
                asset,
                if_none_match,
            } => asset.response(if_none_match.as_deref()),
            Route::Upgrade { .. } | Route::EventStream { .. }
                if self.fanout.metrics().connections >= self.config.max_connections as u64 =>
            {
                log::warn!(
                    "max_connections ({}) reached; refusing a session",
                    self.config.max_connections
                );
                self.refuse(key, Refusal::Busy, now);
                return false;
            }
            Route::Upgrade {
                handshake,
                token,
                forwarded_for,
            } => {
                return self.admit_address(key, forwarded_for.as_deref(), now)
                    && self.open_websocket(key, &handshake, token.as_deref(), rest, now);
            }
            Route::EventStream {
                opening,
                token,
                forwarded_for,
                origin,
            } => {
                if self.admit_address(key, forwarded_for.as_deref(), now) {
                    self.open_event_stream(key, opening, token.as_deref(), origin.as_deref(), now);
                }
                return false;
            }
        };
        let mut client = self.fanout.clients_mut().live_mut(key);
        client.respond(response);
        drop(client);
        self.arm_close_deadline(key, now);
        false
    }

    pub(super) fn refuse(&mut self, key: usize, refusal: Refusal, now: Tick) {
        let mut client = self.fanout.clients_mut().live_mut(key);
        let peer = client.peer();
        log::debug!(
            "conn={} from {peer}: refused: {refusal:?}",
            client.id().generation
        );
        client.respond(refusal.response());
        drop(client);
        if let Some(advice) =
            admission::advice(&refusal, peer.ip(), self.config.connect_rate_per_ip)
            && let Some(suppressed) = self
                .refusal_log
                .admit(now, self.ticks.ticks_in(REFUSAL_LOG_INTERVAL))
        {
            let more = match suppressed {
                0 => String::new(),
                n => format!(" ({n} more refusals since the last such line)"),
            };
            log::info!("{advice}{more}");
        }
        self.fanout.metrics_mut().http_refusals += 1;
        self.arm_close_deadline(key, now);
    }

    /// Admits a new session from the client behind this connection under
    /// `connect_rate_per_ip`, or refuses it (429). True when admitted.
    fn admit_address(&mut self, key: usize, forwarded_for: Option<&str>, now: Tick) -> bool {
        let peer = self.fanout.clients().live(key).peer();
        let trusted = &self.config.trusted_proxies;
        let client = http::client_address(peer.ip(), forwarded_for, trusted);
        let admitted = self.connect_rate.admit(client, now);
        if !admitted {
            self.refuse(key, Refusal::TooManyRequests, now);
        }
        admitted
    }

    /// Opens an event stream and subscribes it to its channels. With authentication on, an
    /// invalid token or a user at `max_connections_per_user` gets an HTTP status (401, 429)
    /// instead of the stream.
    fn open_event_stream(
        &mut self,
        key: usize,
        opening: Opening,
        token: Option<&str>,
        origin: Option<&str>,
        now: Tick,
    ) {
        let rate = self.fanout.message_rate();
        let stream = Stream::new(opening.positions, origin);
        let mut client = self.fanout.clients_mut().live_mut(key);
        client.open_event_stream(stream, rate, now);
        drop(client);
        let opened = self
            .fanout
            .open(key, token)
            .err()
            .or_else(|| self.fanout.subscribe_stream(key, opening.entries));
        if let Some(close) = opened {
            return self.close_client(key, close, now);
        }
        let client = self.fanout.clients().live(key);
        log::debug!("conn={} event stream opened", client.id().generation);
        let first = client.first_deadline(now, &self.timing);
        self.arm(key, first);
    }

    /// Completes the upgrade. With authentication on, an invalid token or a user at
    /// `max_connections_per_user` is closed at once (4001, 4008) before anything else is sent.
    /// Returns true when the WebSocket is open.
    pub(super) fn open_websocket(
        &mut self,
        key: usize,
        handshake: &Handshake,
        token: Option<&str>,
        rest: Vec<u8>,
        now: Tick,
    ) -> bool {
        let rate = self.fanout.message_rate();
        let mut client = self.fanout.clients_mut().live_mut(key);
        client.upgrade(handshake, rest, self.ws_config, rate, now);
        drop(client);
        if let Err(close) = self.fanout.open(key, token) {
            self.close_client(key, close, now);
            return false;
        }
        let client = self.fanout.clients().live(key);
        log::debug!("conn={} upgraded", client.id().generation);
        let first = client.first_deadline(now, &self.timing);
        self.arm(key, first);
        true
    }

    /// Replaces the connection's timer.
    pub(super) fn arm(&mut self, key: usize, at: Tick) {
        let mut client = self.fanout.clients_mut().live_mut(key);
        let id = client.id();
        let timer = self.timers.insert(at, TimerEvent::Client(id));
        if let Some(old) = client.replace_timer(Some(timer)) {
            self.timers.cancel(old);
        }
    }

    /// Ends the client's session for `close` and gives it `close_timeout` to finish closing.
    pub(super) fn close_client(&mut self, key: usize, close: Close, now: Tick) {
        self.fanout.end(key, close);
        self.arm_close_deadline(key, now);
    }

    pub(super) fn arm_close_deadline(&mut self, key: usize, now: Tick) {
        let at = now.after(self.ticks.ticks_in(self.config.close_timeout));
        self.arm(key, at);
    }

    pub(super) fn on_client_timer(&mut self, id: ConnId, now: Tick) {
        let key = id.key as usize;
        let Some(mut client) = self.fanout.clients_mut().current(id) else {
            return;
        };
        client.replace_timer(None);
        if self.shutting_down && client.is_open() {
            // Its turn in the shutdown drain.
            drop(client);
            return self.close_client(key, Close::Shutdown, now);
        }
        let deadline = client.on_deadline(now, &self.timing);
        let peer = client.peer();
        drop(client);
        match deadline {
            Deadline::HandshakeTimeout => {
                log::debug!("conn={} from {peer}: handshake timeout", id.generation);
                self.fanout.metrics_mut().handshake_timeouts += 1;
                self.drop_client(key);
            }
            Deadline::CloseTimeout => self.drop_client(key),
            Deadline::Close(Close::SlowConsumer) => self.close_slow_consumer(key, now),
            Deadline::Close(close) => {
                log::info!("conn={} from {peer}: closing with {close}", id.generation);
                self.close_client(key, close, now);
            }
            Deadline::Next(at) => self.arm(key, at),
        }
    }

    /// Closes every dirty client that went over `max_output_buffer` or whose output has not
    /// moved for `write_stall_timeout`. Every path that queues output lists the client as
    /// dirty, so this sees every client that could have become slow in this pass.
    pub(super) fn close_slow_consumers(&mut self, now: Tick) {
        let mut i = 0;
        while let Some(&key) = self.fanout.clients().dirty().get(i) {
            i += 1;
            // `is_slow` first: it reads the connection itself, `is_open` its boxed session.
            if let Some(client) = self.fanout.clients().get(key)
                && client.is_slow(now, self.timing.write_stall)
                && client.is_open()
            {
                self.close_slow_consumer(key, now);
            }
        }
    }

    pub(super) fn close_slow_consumer(&mut self, key: usize, now: Tick) {
        let mut client = self.fanout.clients_mut().live_mut(key);
        log::warn!(
            "conn={} from {}: slow consumer, {} bytes unsent (max_output_buffer {}, \
             write_stall_timeout {:?}); closing",
            client.id().generation,
            client.peer(),
            client.queued(),
            self.config.max_output_buffer,
            self.config.write_stall_timeout
        );
        client.discard_output();
        drop(client);
        self.close_client(key, Close::SlowConsumer, now);
    }

    pub(super) fn flush_dirty(&mut self, now: Tick) {
        let registry = self.poll.registry();
        let mut dirty = std::mem::take(&mut self.flushing);
        self.fanout.clients_mut().take_dirty(&mut dirty);
        let mut broken = Vec::new();
        for &key in &dirty {
            let Some(mut client) = self.fanout.clients_mut().get_mut(key) else {
                continue;
            };
            let written = match client.flush(&mut self.gather, now) {
                Ok(written) => written,
                Err(e) => {
                    log::debug!("conn={}: write failed: {e}", client.id().generation);
                    broken.push(key);
                    continue;
                }
            };
            let latency = client
                .take_event_start()
                .map(|since| micros_since(self.started, self.clock.now()).saturating_sub(since));
            if let Some(wanted) = client.interest_change()
                && let Err(e) = set_interest(registry, &mut client, key, wanted)
            {
                log::error!("conn={}: reregister failed: {e}", client.id().generation);
                broken.push(key);
            }
            drop(client);
            let metrics = self.fanout.metrics_mut();
            metrics.bytes_written += written as u64;
            if let Some(latency) = latency {
                metrics.latency.observe(latency);
            }
        }
        self.flushing = dirty;
        for key in broken {
            self.drop_client(key);
        }
    }

    /// Deregisters and forgets a client; the only place that removes from the slab.
    pub(super) fn drop_client(&mut self, key: usize) {
        if self.fanout.clients().get(key).is_none() {
            return;
        }
        self.fanout.end(key, Close::Reset);
        let mut client = self
            .fanout
            .clients_mut()
            .remove(key)
            .expect("a live client");
        if let Some(timer) = client.replace_timer(None) {
            self.timers.cancel(timer);
        }
        let _ = self.poll.registry().deregister(client.socket());
    }
}

fn set_interest(
    registry: &Registry,
    client: &mut ClientConn,
    key: usize,
    writable: bool,
) -> io::Result<()> {
    let interest = if writable {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    registry.reregister(
        client.socket(),
        token::encode(Source::Client(key)),
        interest,
    )
}
