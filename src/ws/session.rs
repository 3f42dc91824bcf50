//! One open WebSocket's requests: a message in, a [`Verdict`] out. It checks the rate limit,
//! parses the request, and applies permissions, `max_subscriptions` and token refreshes, but
//! touches no socket, channel or other connection: the fan-out carries the verdict out.
//!
//! Invariants: every message counts toward the rate limit, protocol Pings included; a
//! message over the limit is dropped with a `rate_limited` error naming its channel and id,
//! and `rate_limit_strikes` drops in a row close the connection; `subscriptions` holds each
//! channel at most once.

use crate::auth::jwt::{Identity, Verifier};
use crate::auth::ratelimit::{Rate, TokenBucket};
use crate::base::channel::{Backfill, ChannelName};
use crate::base::ids::{AckKey, ChannelId};
use crate::base::time::Tick;
use crate::error::Close;
use crate::fanout::hub::Hub;
use crate::ws::wire::{self, ErrorCode, Rejection, Request, RequestId, Subscribing};

/// What a client sent, as the connection parsed it.
#[derive(Debug)]
pub enum Inbound {
    /// A text message.
    Text(tungstenite::Utf8Bytes),
    /// A binary message (refused with an error reply).
    Binary,
    /// A protocol Ping (already answered): it counts toward the message rate limit.
    Ping,
}

/// The settings requests are judged by.
#[derive(Clone, Copy)]
pub struct Rules<'a> {
    /// Messages per second and burst (`rate_limit`, `rate_burst`).
    pub rate: Rate,
    /// `rate_limit`, for the error text.
    pub rate_limit: f64,
    /// `rate_burst`, for the error text.
    pub rate_burst: u32,
    /// `rate_limit_strikes`.
    pub strikes: u32,
    /// `max_subscriptions`.
    pub max_subscriptions: usize,
    /// Verifies refreshed tokens; `None` with authentication off.
    pub verifier: Option<&'a Verifier>,
}

/// What to do about one message.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Nothing (a protocol Ping within the limit).
    Nothing,
    /// Answer with an `error`; the connection stays open.
    Reject(Rejection),
    /// A batch: each verdict in turn, each answered on its own.
    Many(Vec<Verdict>),
    /// Join `channel` (again, possibly), reply `subscribed`, then what `since` missed or the
    /// latest `rewind` events.
    Subscribe {
        /// The channel.
        channel: ChannelName,
        /// Where a resuming client stopped, and the latest events it wants.
        backfill: Backfill,
        /// Echoed.
        id: Option<RequestId>,
    },
    /// Leave `channel` (if subscribed) and reply `unsubscribed`.
    Unsubscribe {
        /// The channel.
        channel: ChannelName,
        /// Echoed.
        id: Option<RequestId>,
    },
    /// Reply `pong`.
    Pong {
        /// Echoed.
        id: Option<RequestId>,
    },
    /// The page acknowledged these events of `channel`.
    Ack {
        /// The channel.
        channel: ChannelName,
        /// The seqs.
        seqs: Vec<u64>,
    },
    /// Answer how many are on presence channel `channel` (which the token allows).
    PresenceStats {
        /// The channel.
        channel: ChannelName,
        /// Echoed.
        id: Option<RequestId>,
    },
    /// The token was refreshed: adopt `identity` and reply `refreshed`.
    Refresh {
        /// The new token's identity (same user).
        identity: Identity,
        /// Echoed.
        id: Option<RequestId>,
    },
    /// End the connection.
    Close(Close),
}

/// The per-connection state requests depend on, apart from the socket and its framing.
#[derive(Debug)]
pub struct Session {
    subscriptions: Vec<ChannelId>,
    /// Client messages allowed (`rate_limit`, `rate_burst`).
    messages: TokenBucket,
    /// Messages dropped by the limit since the bucket was last full.
    strikes: u32,
    /// The authenticated user and when their token expires; `None` with auth off.
    auth: Option<Box<(Identity, Tick)>>,
    /// Acknowledged events this connection was sent and has not acked (some may be stale:
    /// counted already).
    awaiting: Vec<AckKey>,
}

impl Session {
    /// A session opened at `now`, with a full message bucket.
    pub fn new(rate: Rate, now: Tick) -> Session {
        Session {
            subscriptions: Vec::new(),
            messages: TokenBucket::full(rate, now),
            strikes: 0,
            auth: None,
            awaiting: Vec::new(),
        }
    }

    /// Judges one message. `hub` tells whether a channel is one this session already has.
    pub fn on_message(
        &mut self,
        message: Inbound,
        rules: &Rules<'_>,
        hub: &Hub,
        now: Tick,
    ) -> Verdict {
        // Parsed before the rate limit so that a dropped request's error names its channel
        // and id; a message is at most `max_message_size` and a pass reads a bounded amount.
        let request = match message {
            Inbound::Text(text) => Some(wire::parse_request(&text)),
            Inbound::Binary => Some(Err(Rejection::new(
                ErrorCode::BinaryNotSupported,
                "binary frames are not supported; send JSON in text frames",
            ))),
            Inbound::Ping => None,
        };
        self.charge_and_judge(request, rules, hub, now)
    }

    /// Judges a request that did not come as a message (an event stream's channels), charged
    /// to the message budget as if it had.
    pub fn on_request(
        &mut self,
        request: Request,
        rules: &Rules<'_>,
        hub: &Hub,
        now: Tick,
    ) -> Verdict {
        self.charge_and_judge(Some(Ok(request)), rules, hub, now)
    }

    /// Charges `request` (`None`: a protocol Ping) to the rate limit, then judges it.
    fn charge_and_judge(
        &mut self,
        request: Option<Result<Request, Rejection>>,
        rules: &Rules<'_>,
        hub: &Hub,
        now: Tick,
    ) -> Verdict {
        // A batch costs one message per `BATCH_PER_MESSAGE` channels; a refused one takes
        // nothing, and is refused whole.
        let cost = match &request {
            Some(Ok(request)) => request.cost(),
            _ => 1,
        };
        if !self.admit(rules.rate, now, cost) {
            if self.strikes >= rules.strikes {
                return Verdict::Close(Close::RateLimited);
            }
            // A protocol Ping has no request to answer; it only counts.
            let Some(request) = request else {
                return Verdict::Nothing;
            };
            let (channel, id) = match &request {
                Ok(request) => request.channel_and_id(),
                Err(rejection) => (rejection.channel.as_deref(), rejection.id.as_ref()),
            };
            let message = format!(
                "more than {} messages per second (burst {}); message dropped",
                rules.rate_limit, rules.rate_burst
            );
            return Verdict::Reject(Rejection {
                channel: channel.map(str::to_string),
                id: id.cloned(),
                ..Rejection::new(ErrorCode::RateLimited, message)
            });
        }
        match request {
            None => Verdict::Nothing,
            Some(Err(rejection)) => Verdict::Reject(rejection),
            Some(Ok(request)) => self.judge(request, rules, hub),
        }
    }

    fn judge(&self, request: Request, rules: &Rules<'_>, hub: &Hub) -> Verdict {
        let reject = |code, message: String, channel: Option<&ChannelName>, id| {
            Verdict::Reject(Rejection {
                channel: channel.map(|c| c.as_str().to_string()),
                id,
                ..Rejection::new(code, message)
            })
        };
        match request {
            Request::Subscribe {
                channel,
                backfill,
                id,
            } => self.judge_subscribe(channel, backfill, id, rules, hub, &mut Vec::new()),
            Request::SubscribeMany { entries, id } => {
                // Counted as they are judged, so the batch cannot pass max_subscriptions.
                let mut joining = Vec::new();
                let judge = |entry: Result<Subscribing, Rejection>| match entry {
                    Ok(Subscribing { channel, backfill }) => {
                        let id = id.clone();
                        self.judge_subscribe(channel, backfill, id, rules, hub, &mut joining)
                    }
                    Err(rejection) => Verdict::Reject(rejection),
                };
                Verdict::Many(entries.into_iter().map(judge).collect())
            }
            Request::Unsubscribe { channel, id } => Verdict::Unsubscribe { channel, id },
            Request::UnsubscribeMany { entries, id } => {
                let judge = |entry: Result<ChannelName, Rejection>| match entry {
                    Ok(channel) => Verdict::Unsubscribe {
                        channel,
                        id: id.clone(),
                    },
                    Err(rejection) => Verdict::Reject(rejection),
                };
                Verdict::Many(entries.into_iter().map(judge).collect())
            }
            Request::Ping { id } => Verdict::Pong { id },
            Request::Ack { channel, seqs } => Verdict::Ack { channel, seqs },
            Request::PresenceStats { channel, id } => {
                if self
                    .identity()
                    .is_some_and(|(who, _)| !who.may_subscribe(channel.as_str()))
                {
                    let message = "your token does not allow this channel";
                    let refused =
                        Rejection::on_channel(ErrorCode::Forbidden, message, &channel, id);
                    Verdict::Reject(refused)
                } else {
                    Verdict::PresenceStats { channel, id }
                }
            }
            Request::Refresh { token, id } => {
                let (Some(verifier), Some((current, _))) = (rules.verifier, self.identity()) else {
                    let message = "authentication is off: there is nothing to refresh".into();
                    return reject(ErrorCode::InvalidMessage, message, None, id);
                };
                match verifier.verify(&token) {
                    Ok(identity) if identity.user == current.user => {
                        Verdict::Refresh { identity, id }
                    }
                    Ok(_) => {
                        let message = "the token is for another user".into();
                        reject(ErrorCode::InvalidToken, message, None, id)
                    }
                    Err(why) => reject(ErrorCode::InvalidToken, why, None, id),
                }
            }
        }
    }

    /// Charges one message to the rate limit; false when it is over.
    /// A subscribe, allowed by the token and `max_subscriptions`; `joining` lists the
    /// channels new to this session that the same message subscribed before it.
    fn judge_subscribe(
        &self,
        channel: ChannelName,
        backfill: Backfill,
        id: Option<RequestId>,
        rules: &Rules<'_>,
        hub: &Hub,
        joining: &mut Vec<ChannelName>,
    ) -> Verdict {
        let name = channel.as_str();
        let refuse = |code, message: String, channel: &ChannelName, id| {
            Verdict::Reject(Rejection::on_channel(code, message, channel, id))
        };
        if self
            .identity()
            .is_some_and(|(who, _)| !who.may_subscribe(name))
        {
            let message = "your token does not allow this channel".into();
            return refuse(ErrorCode::Forbidden, message, &channel, id);
        }
        let has = hub
            .find(name)
            .is_some_and(|c| self.subscriptions.contains(&c))
            || joining.contains(&channel);
        if !has {
            if self.subscriptions.len() + joining.len() >= rules.max_subscriptions {
                let max = rules.max_subscriptions;
                let message = format!("at most {max} subscriptions per connection");
                return refuse(ErrorCode::TooManySubscriptions, message, &channel, id);
            }
            joining.push(channel.clone());
        }
        Verdict::Subscribe {
            channel,
            backfill,
            id,
        }
    }

    fn admit(&mut self, rate: Rate, now: Tick, cost: usize) -> bool {
        if self.messages.is_full(rate, now) {
            self.strikes = 0;
        }
        let admitted = self.messages.try_take_n(rate, now, cost);
        if !admitted {
            self.strikes += 1;
        }
        admitted
    }

    /// The channels subscribed to.
    pub fn subscriptions(&self) -> &[ChannelId] {
        &self.subscriptions
    }

    /// Records a subscription (once).
    pub fn add_subscription(&mut self, channel: ChannelId) {
        if !self.subscriptions.contains(&channel) {
            self.subscriptions.push(channel);
        }
    }

    /// Forgets a subscription; false if there was none.
    pub fn remove_subscription(&mut self, channel: ChannelId) -> bool {
        let found = self.subscriptions.iter().position(|c| *c == channel);
        found
            .map(|pos| self.subscriptions.swap_remove(pos))
            .is_some()
    }

    /// Takes every subscription, as the session ends.
    pub fn take_subscriptions(&mut self) -> Vec<ChannelId> {
        std::mem::take(&mut self.subscriptions)
    }

    /// Waits for this connection's ack of `key`, unless it already awaits `max` live ones
    /// (`is_live` tells those whose report is not made yet); false then.
    pub fn await_ack(&mut self, key: AckKey, max: usize, is_live: impl Fn(AckKey) -> bool) -> bool {
        if self.awaiting.len() >= max {
            self.awaiting.retain(|k| is_live(*k));
            if self.awaiting.len() >= max {
                return false;
            }
        }
        self.awaiting.push(key);
        true
    }

    /// Stops waiting for `key`; false when it was not awaited here.
    pub fn take_ack(&mut self, key: AckKey) -> bool {
        let found = self.awaiting.iter().position(|k| *k == key);
        found.map(|at| self.awaiting.swap_remove(at)).is_some()
    }

    /// Takes every ack still awaited, as the session ends.
    pub fn take_awaiting(&mut self) -> Vec<AckKey> {
        std::mem::take(&mut self.awaiting)
    }

    /// The authenticated user and their token's expiry tick.
    pub fn identity(&self) -> Option<&(Identity, Tick)> {
        self.auth.as_deref()
    }

    /// Records who the client is and when its token expires.
    pub fn set_identity(&mut self, identity: Identity, expires: Tick) {
        self.auth = Some(Box::new((identity, expires)));
    }

    /// Takes the identity, as the session ends.
    pub fn take_identity(&mut self) -> Option<Identity> {
        self.auth.take().map(|auth| auth.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::jwt::JwtKey;
    use crate::base::ids::ConnId;
    use std::time::Duration;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn rules(verifier: Option<&Verifier>) -> Rules<'_> {
        Rules {
            rate: Rate::new(10.0, 3.0, 0.01),
            rate_limit: 10.0,
            rate_burst: 3,
            strikes: 2,
            max_subscriptions: 2,
            verifier,
        }
    }

    fn text(json: &str) -> Inbound {
        Inbound::Text(json.to_string().into())
    }

    fn code(verdict: &Verdict) -> Option<ErrorCode> {
        match verdict {
            Verdict::Reject(rejection) => Some(rejection.code),
            _ => None,
        }
    }

    fn token(sub: &str, channels: &[&str]) -> String {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let claims = serde_json::json!({"sub": sub, "exp": exp, "channels": channels});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    #[test]
    fn a_flood_is_dropped_with_errors_naming_the_request_then_closed() {
        let hub = Hub::new();
        let rules = rules(None);
        let mut session = Session::new(rules.rate, Tick(0));
        let ping = r#"{"type":"subscribe","channel":"a","id":7}"#;
        for _ in 0..3 {
            let verdict = session.on_message(text(ping), &rules, &hub, Tick(0));
            assert!(matches!(verdict, Verdict::Subscribe { .. }), "{verdict:?}");
        }
        let Verdict::Reject(dropped) = session.on_message(text(ping), &rules, &hub, Tick(0)) else {
            panic!("the fourth message is over the burst");
        };
        assert_eq!(dropped.code, ErrorCode::RateLimited);
        assert_eq!(dropped.channel.as_deref(), Some("a"));
        assert_eq!(dropped.id, Some(serde_json::json!(7)));
        assert_eq!(
            session.on_message(Inbound::Ping, &rules, &hub, Tick(0)),
            Verdict::Close(Close::RateLimited),
            "protocol Pings count too: the second strike closes"
        );
    }

    #[test]
    fn a_client_that_calms_down_starts_its_strikes_afresh() {
        let hub = Hub::new();
        let rules = rules(None);
        let mut session = Session::new(rules.rate, Tick(0));
        for _ in 0..4 {
            session.on_message(Inbound::Ping, &rules, &hub, Tick(0));
        }
        // 30 ticks at 10/s refill the bucket of 3: full again, the strike is forgiven.
        let ping = text(r#"{"type":"ping","id":1}"#);
        assert_eq!(
            session.on_message(ping, &rules, &hub, Tick(30)),
            Verdict::Pong {
                id: Some(serde_json::json!(1))
            }
        );
        for _ in 0..2 {
            session.on_message(Inbound::Ping, &rules, &hub, Tick(30));
        }
        assert_eq!(
            session.on_message(Inbound::Ping, &rules, &hub, Tick(30)),
            Verdict::Nothing,
            "one strike since calming down"
        );
    }

    #[test]
    fn max_subscriptions_counts_distinct_channels() {
        let mut hub = Hub::new();
        let rate = Rate::new(1000.0, 1000.0, 0.01);
        let rules = Rules {
            rate,
            ..rules(None)
        };
        let mut session = Session::new(rate, Tick(0));
        let conn = ConnId {
            key: 0,
            generation: 1,
        };
        for name in ["a", "b"] {
            let (id, _) = hub.subscribe(&ChannelName::parse(name).unwrap(), conn);
            session.add_subscription(id);
        }
        let again = text(r#"{"type":"subscribe","channel":"a"}"#);
        assert!(matches!(
            session.on_message(again, &rules, &hub, Tick(0)),
            Verdict::Subscribe { .. }
        ));
        let third = text(r#"{"type":"subscribe","channel":"c"}"#);
        assert_eq!(
            code(&session.on_message(third, &rules, &hub, Tick(0))),
            Some(ErrorCode::TooManySubscriptions)
        );
        assert_eq!(
            code(&session.on_message(Inbound::Binary, &rules, &hub, Tick(0))),
            Some(ErrorCode::BinaryNotSupported)
        );
    }

    #[test]
    fn permissions_and_refreshes_follow_the_token() {
        let hub = Hub::new();
        let verifier = Verifier::new(&JwtKey::Secret(SECRET.to_vec()), Duration::ZERO).unwrap();
        let rate = Rate::new(1000.0, 1000.0, 0.01);
        let rules = Rules {
            rate,
            ..rules(Some(&verifier))
        };
        let mut session = Session::new(rate, Tick(0));
        let alice = verifier.verify(&token("alice", &["project:*"])).unwrap();
        session.set_identity(alice, Tick(100));
        let judge = |session: &mut Session, json: &str| {
            session.on_message(text(json), &rules, &hub, Tick(0))
        };
        assert!(matches!(
            judge(
                &mut session,
                r#"{"type":"subscribe","channel":"project:1"}"#
            ),
            Verdict::Subscribe { .. }
        ));
        assert!(matches!(
            judge(
                &mut session,
                r#"{"type":"subscribe","channel":"user:alice"}"#
            ),
            Verdict::Subscribe { .. }
        ));
        assert_eq!(
            code(&judge(
                &mut session,
                r#"{"type":"subscribe","channel":"order:1"}"#
            )),
            Some(ErrorCode::Forbidden)
        );
        let refresh = |t: String| format!(r#"{{"type":"refresh","token":"{t}"}}"#);
        let verdict = judge(&mut session, &refresh(token("alice", &[])));
        assert!(matches!(verdict, Verdict::Refresh { .. }), "{verdict:?}");
        assert_eq!(
            code(&judge(&mut session, &refresh(token("bob", &[])))),
            Some(ErrorCode::InvalidToken)
        );
        assert_eq!(
            code(&judge(&mut session, &refresh("garbage".into()))),
            Some(ErrorCode::InvalidToken)
        );
        let open = rules.verifier.map(|_| Rules {
            verifier: None,
            ..rules
        });
        let mut anonymous = Session::new(rate, Tick(0));
        let verdict = anonymous.on_message(
            text(&refresh(token("a", &[]))),
            &open.unwrap(),
            &hub,
            Tick(0),
        );
        assert_eq!(
            code(&verdict),
            Some(ErrorCode::InvalidMessage),
            "auth is off"
        );
    }
}
