//! The WebSocket protocol: what browsers send, what they receive. `docs/protocol.md` is the
//! human-readable contract; this module is its code.
//!
//! It parses client requests into [`Request`]s or [`Rejection`]s (which become `error`
//! replies: the connection stays open), renders replies, and builds event frames once per
//! publish. It does no I/O and never reads the clock.

use std::io::Write;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::base::channel::{Backfill, ChannelName, Since};

/// The `code` of an `error` reply. Each is a client mistake; the connection stays open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The text frame is not valid JSON.
    InvalidJson,
    /// Valid JSON, but not a request object: missing or mistyped `type`, `channel` or `id`.
    InvalidMessage,
    /// `type` names no known request.
    UnknownType,
    /// `channel` breaks the naming rules.
    InvalidChannel,
    /// Subscribing would exceed `max_subscriptions`.
    TooManySubscriptions,
    /// A binary frame: sidecast speaks JSON in text frames only.
    BinaryNotSupported,
    /// The connection sends more than `rate_limit` messages per second; this one was dropped.
    RateLimited,
    /// The token does not allow subscribing to this channel.
    Forbidden,
    /// A `refresh` carried a token that is invalid, expired, or for another user.
    InvalidToken,
    /// `presence_stats` on a channel without presence (`presence_channels`).
    NoPresence,
    /// The shared engine cannot answer now (Redis is down): try again.
    Unavailable,
}

/// A request id, echoed in the reply: a JSON number or string, kept verbatim.
pub type RequestId = Value;

/// A well-formed client request.
#[derive(Debug, PartialEq)]
pub enum Request {
    /// `{"type":"subscribe","channel":...,"since":{"seq":17,"epoch":"x7f3"},"rewind":1}`
    Subscribe {
        /// The channel to join.
        channel: ChannelName,
        /// What it missed (`since`) and the latest events it wants (`rewind`).
        backfill: Backfill,
        /// Echoed in the reply.
        id: Option<RequestId>,
    },
    /// `{"type":"subscribe","channels":["a",{"channel":"b","since":{...},"rewind":1}]}`: each
    /// channel answered on its own, so one refusal does not refuse the rest.
    SubscribeMany {
        /// Each channel asked for, or why it is refused.
        entries: Vec<Result<Subscribing, Rejection>>,
        /// Echoed in every reply.
        id: Option<RequestId>,
    },
    /// `{"type":"unsubscribe","channels":["a","b"]}`.
    UnsubscribeMany {
        /// Each channel to leave, or why it is refused.
        entries: Vec<Result<ChannelName, Rejection>>,
        /// Echoed in every reply.
        id: Option<RequestId>,
    },
    /// `{"type":"unsubscribe","channel":...}`
    Unsubscribe {
        /// The channel to leave.
        channel: ChannelName,
        /// Echoed in the reply.
        id: Option<RequestId>,
    },
    /// `{"type":"ping"}`
    Ping {
        /// Echoed in the reply.
        id: Option<RequestId>,
    },
    /// `{"type":"ack","channel":...,"seq":18}` (or `"seqs":[18,19]`): the page handled these
    /// events, which asked for acknowledgement. Never answered.
    Ack {
        /// Their channel.
        channel: ChannelName,
        /// Their seqs, at most [`MAX_ACK_BATCH`].
        seqs: Vec<u64>,
    },
    /// `{"type":"presence_stats","channel":...}`: how many members and connections a
    /// presence channel has.
    PresenceStats {
        /// The channel.
        channel: ChannelName,
        /// Echoed in the reply.
        id: Option<RequestId>,
    },
    /// `{"type":"refresh","token":...}`: extend an authenticated connection.
    Refresh {
        /// The new token.
        token: String,
        /// Echoed in the reply.
        id: Option<RequestId>,
    },
}

/// One channel of a batch `subscribe`.
#[derive(Debug, PartialEq)]
pub struct Subscribing {
    /// The channel to join.
    pub channel: ChannelName,
    /// What it missed (`since`) and the latest events it wants (`rewind`).
    pub backfill: Backfill,
}

/// Channels one batch `subscribe` or `unsubscribe` may name: the message budget charges a
/// batch one message per [`BATCH_PER_MESSAGE`] channels, and this bounds what one message
/// can make the server parse and hold.
pub const MAX_BATCH: usize = 1000;
/// Channels of a batch that cost one message of the rate limit.
pub const BATCH_PER_MESSAGE: usize = 10;
/// Seqs one `ack` message may acknowledge (one message of the rate limit).
pub const MAX_ACK_BATCH: usize = 100;

impl Request {
    /// The request's channel and id, for an error reply about it.
    pub fn channel_and_id(&self) -> (Option<&str>, Option<&RequestId>) {
        match self {
            Request::Subscribe { channel, id, .. }
            | Request::Unsubscribe { channel, id }
            | Request::PresenceStats { channel, id } => (Some(channel.as_str()), id.as_ref()),
            Request::Ack { channel, .. } => (Some(channel.as_str()), None),
            Request::SubscribeMany { id, .. }
            | Request::UnsubscribeMany { id, .. }
            | Request::Ping { id }
            | Request::Refresh { id, .. } => (None, id.as_ref()),
        }
    }

    /// How many messages of the rate limit it costs: one, or for a batch one per
    /// [`BATCH_PER_MESSAGE`] channels (rounded up).
    pub fn cost(&self) -> usize {
        match self {
            Request::SubscribeMany { entries, .. } => entries.len().div_ceil(BATCH_PER_MESSAGE),
            Request::UnsubscribeMany { entries, .. } => entries.len().div_ceil(BATCH_PER_MESSAGE),
            _ => 1,
        }
        .max(1)
    }
}

/// The `since` and `rewind` of a subscribe.
fn backfill(fields: &mut Map<String, Value>) -> Result<Backfill, &'static str> {
    let since = match fields.remove("since") {
        None | Some(Value::Null) => None,
        Some(Value::Object(mut since)) => match (since.remove("seq"), since.remove("epoch")) {
            (Some(Value::Number(seq)), Some(Value::String(epoch))) => Some(Since {
                seq: seq.as_u64().ok_or(SINCE_SHAPE)?,
                epoch,
            }),
            _ => return Err(SINCE_SHAPE),
        },
        Some(_) => return Err(SINCE_SHAPE),
    };
    let rewind = match fields.remove("rewind") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX),
            _ => return Err(REWIND_SHAPE),
        },
        Some(_) => return Err(REWIND_SHAPE),
    };
    Ok(Backfill { since, rewind })
}

const ENTRY_SHAPE: &str = "each of channels is a channel name or {\"channel\": <name>, ...}";

/// A batch entry's channel name, and its other fields: a string, or an object with
/// `channel`.
fn entry_name(
    entry: Value,
    id: &Option<RequestId>,
) -> Result<(String, Map<String, Value>), Rejection> {
    match entry {
        Value::String(name) => Ok((name, Map::new())),
        Value::Object(mut fields) => match fields.remove("channel") {
            Some(Value::String(name)) => Ok((name, fields)),
            _ => Err(Rejection {
                id: id.clone(),
                ..Rejection::new(ErrorCode::InvalidMessage, ENTRY_SHAPE)
            }),
        },
        _ => Err(Rejection {
            id: id.clone(),
            ..Rejection::new(ErrorCode::InvalidMessage, ENTRY_SHAPE)
        }),
    }
}

/// A checked channel name, or the refusal that names it.
fn checked(name: String, id: &Option<RequestId>) -> Result<ChannelName, Rejection> {
    ChannelName::parse(&name).map_err(|why| Rejection {
        code: ErrorCode::InvalidChannel,
        message: why.into(),
        channel: Some(name),
        id: id.clone(),
    })
}

/// One entry of a batch subscribe.
fn subscribing(entry: Value, id: &Option<RequestId>) -> Result<Subscribing, Rejection> {
    let (name, mut fields) = entry_name(entry, id)?;
    let backfill = backfill(&mut fields).map_err(|why| Rejection {
        code: ErrorCode::InvalidMessage,
        message: why.into(),
        channel: Some(name.clone()),
        id: id.clone(),
    })?;
    let channel = checked(name, id)?;
    Ok(Subscribing { channel, backfill })
}

/// One entry of a batch unsubscribe.
fn leaving(entry: Value, id: &Option<RequestId>) -> Result<ChannelName, Rejection> {
    let (name, _) = entry_name(entry, id)?;
    checked(name, id)
}

/// Why a request was refused: becomes an `error` reply.
#[derive(Debug, PartialEq)]
pub struct Rejection {
    /// The machine-readable code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
    /// The request's `channel`, when it had a string one.
    pub channel: Option<String>,
    /// The request's `id`, when it had a valid one.
    pub id: Option<RequestId>,
}

impl Rejection {
    /// A rejection with no channel and no id.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Rejection {
        Rejection {
            code,
            message: message.into(),
            channel: None,
            id: None,
        }
    }

    /// A rejection of a request on `channel`, echoing its `id`.
    pub fn on_channel(
        code: ErrorCode,
        message: impl Into<String>,
        channel: &ChannelName,
        id: Option<RequestId>,
    ) -> Rejection {
        Rejection {
            channel: Some(channel.as_str().to_string()),
            id,
            ..Rejection::new(code, message)
        }
    }
}

const SINCE_SHAPE: &str = "since must be {\"seq\": <number>, \"epoch\": <string>}";
const REWIND_SHAPE: &str = "rewind must be a whole number of events, at least 1";

/// Parses one text frame from a client.
///
/// # Errors
/// A [`Rejection`] describing the first problem found.
pub fn parse_request(text: &str) -> Result<Request, Rejection> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Rejection::new(ErrorCode::InvalidJson, format!("invalid JSON: {e}")))?;
    let Value::Object(mut fields) = value else {
        return Err(Rejection::new(
            ErrorCode::InvalidMessage,
            "expected a JSON object",
        ));
    };
    let id = match fields.remove("id") {
        None | Some(Value::Null) => None,
        Some(id @ (Value::Number(_) | Value::String(_))) => Some(id),
        Some(_) => {
            return Err(Rejection::new(
                ErrorCode::InvalidMessage,
                "id must be a number or a string",
            ));
        }
    };
    let channel = match fields.remove("channel") {
        Some(Value::String(channel)) => Some(channel),
        None => None,
        Some(_) => {
            let message = "channel must be a string";
            return Err(Rejection {
                id,
                ..Rejection::new(ErrorCode::InvalidMessage, message)
            });
        }
    };
    let reject = |code, message: String, channel: Option<String>, id| {
        Err(Rejection {
            code,
            message,
            channel,
            id,
        })
    };
    let kind = match fields.remove("type") {
        Some(Value::String(kind)) => kind,
        Some(_) => {
            return reject(
                ErrorCode::InvalidMessage,
                "type must be a string".into(),
                channel,
                id,
            );
        }
        None => {
            return reject(
                ErrorCode::InvalidMessage,
                "missing field type".into(),
                channel,
                id,
            );
        }
    };
    match kind.as_str() {
        "subscribe" | "unsubscribe" => {
            if let Some(list) = fields.remove("channels") {
                if channel.is_some() {
                    let message = "give channel or channels, not both".into();
                    return reject(ErrorCode::InvalidMessage, message, channel, id);
                }
                let list = match list {
                    Value::Array(list) if (1..=MAX_BATCH).contains(&list.len()) => list,
                    _ => {
                        let message = format!("channels must be an array of 1 to {MAX_BATCH}");
                        return reject(ErrorCode::InvalidMessage, message, None, id);
                    }
                };
                return Ok(if kind == "subscribe" {
                    let entries = list.into_iter().map(|e| subscribing(e, &id)).collect();
                    Request::SubscribeMany { entries, id }
                } else {
                    let entries = list.into_iter().map(|e| leaving(e, &id)).collect();
                    Request::UnsubscribeMany { entries, id }
                });
            }
            let Some(name) = channel else {
                return reject(
                    ErrorCode::InvalidMessage,
                    format!("{kind} needs a channel"),
                    None,
                    id,
                );
            };
            let channel = match ChannelName::parse(&name) {
                Ok(channel) => channel,
                Err(why) => return reject(ErrorCode::InvalidChannel, why.into(), Some(name), id),
            };
            Ok(if kind == "subscribe" {
                let backfill = match backfill(&mut fields) {
                    Ok(backfill) => backfill,
                    Err(why) => {
                        return reject(ErrorCode::InvalidMessage, why.into(), Some(name), id);
                    }
                };
                Request::Subscribe {
                    channel,
                    backfill,
                    id,
                }
            } else {
                Request::Unsubscribe { channel, id }
            })
        }
        "ping" => Ok(Request::Ping { id }),
        "ack" => {
            let seqs = match (fields.remove("seq"), fields.remove("seqs")) {
                (Some(seq), None) => seq.as_u64().map(|seq| vec![seq]),
                (None, Some(Value::Array(seqs))) if (1..=MAX_ACK_BATCH).contains(&seqs.len()) => {
                    seqs.iter().map(Value::as_u64).collect()
                }
                _ => None,
            };
            let (Some(name), Some(seqs)) = (channel, seqs) else {
                let message =
                    format!("ack needs a channel and a seq, or seqs (1 to {MAX_ACK_BATCH})");
                return reject(ErrorCode::InvalidMessage, message, None, id);
            };
            match ChannelName::parse(&name) {
                Ok(channel) => Ok(Request::Ack { channel, seqs }),
                Err(why) => reject(ErrorCode::InvalidChannel, why.into(), Some(name), id),
            }
        }
        "presence_stats" => {
            let Some(name) = channel else {
                let message = "presence_stats needs a channel".into();
                return reject(ErrorCode::InvalidMessage, message, None, id);
            };
            match ChannelName::parse(&name) {
                Ok(channel) => Ok(Request::PresenceStats { channel, id }),
                Err(why) => reject(ErrorCode::InvalidChannel, why.into(), Some(name), id),
            }
        }
        "refresh" => match fields.remove("token") {
            Some(Value::String(token)) => Ok(Request::Refresh { token, id }),
            _ => reject(
                ErrorCode::InvalidMessage,
                "refresh needs a string token".into(),
                channel,
                id,
            ),
        },
        other => reject(
            ErrorCode::UnknownType,
            format!("unknown type {other:?}"),
            channel,
            id,
        ),
    }
}

/// A message from server to client, other than events (see [`event_frame`]).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Reply<'a> {
    /// Sent once, when the WebSocket opens.
    Connected {
        /// Unique id of this connection.
        #[serde(rename = "clientId")]
        client_id: &'a str,
        /// The server's ping interval, in milliseconds.
        #[serde(rename = "heartbeatMs")]
        heartbeat_ms: u64,
        /// Messages per second this connection may send (`rate_limit`).
        #[serde(rename = "rateLimit")]
        rate_limit: f64,
        /// Messages it may send at once (`rate_burst`).
        #[serde(rename = "rateBurst")]
        rate_burst: u32,
        /// The authenticated user, when authentication is on.
        #[serde(rename = "userId", skip_serializing_if = "Option::is_none")]
        user_id: Option<&'a str>,
    },
    /// Events of `channel` up to `seq` in `epoch` were lost and will not come (a shared
    /// engine could not fill a gap, or Redis lost the channel); the next event is `seq + 1`.
    Gap {
        /// The channel.
        channel: &'a str,
        /// The last seq lost.
        seq: u64,
        /// The epoch it counts in.
        epoch: &'a str,
    },
    /// Answer to a successful `refresh`.
    Refreshed {
        /// The new token's `exp`, in seconds since the Unix epoch.
        #[serde(rename = "expiresAt")]
        expires_at: u64,
        /// The request's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
    },
    /// The connection is subscribed to `channel`.
    Subscribed {
        /// The channel.
        channel: &'a str,
        /// The channel's latest sequence number (0 before the first publish).
        seq: u64,
        /// The channel's epoch: quote it with `seq` in `since` when resuming.
        epoch: &'a str,
        /// With `since`: whether every missed event follows (true) or the gap cannot be
        /// filled and the client must reload its state (false).
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        /// The request's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
    },
    /// The connection is no longer subscribed to `channel`.
    Unsubscribed {
        /// The channel.
        channel: &'a str,
        /// The request's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
    },
    /// Answer to `presence_stats`.
    #[serde(rename = "presence_stats")]
    PresenceStats {
        /// The channel.
        channel: &'a str,
        /// Members (users, or connections without authentication).
        members: usize,
        /// Their open connections.
        connections: usize,
        /// The request's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
    },
    /// Answer to `{"type":"ping"}`.
    Pong {
        /// The request's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
    },
    /// The last message of a Server-Sent Events stream the server ends: what a WebSocket's
    /// Close frame would have said (an event stream has no close handshake).
    Close {
        /// The close code, as in the WebSocket's Close frame.
        code: u16,
        /// The reason text.
        reason: &'a str,
    },
    /// A refused request.
    Error {
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable detail.
        message: &'a str,
        /// The request's channel.
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
        /// The request's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
    },
}

impl Reply<'_> {
    /// The JSON text of this reply.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("replies hold only strings, numbers and JSON values")
    }
}

impl<'a> From<&'a Rejection> for Reply<'a> {
    fn from(r: &'a Rejection) -> Reply<'a> {
        Reply::Error {
            code: r.code,
            message: &r.message,
            channel: r.channel.as_deref(),
            id: r.id.as_ref(),
        }
    }
}

/// What an event is addressed to.
#[derive(Clone, Copy, Debug)]
pub enum EventTarget<'a> {
    /// One channel, with the event's sequence number there.
    Channel(&'a str, u64),
    /// The same, asking the page to acknowledge it (`"ack":true`).
    Acked(&'a str, u64),
    /// Every open connection.
    Broadcast,
}

/// Builds the complete WebSocket text frame of an event, header included, so that it can be
/// shared by every recipient: server frames are unmasked, so all recipients get identical bytes.
/// `data` is valid JSON. `scratch` is reused between calls; the returned buffer is the only
/// allocation.
pub fn event_frame(target: EventTarget<'_>, data: &[u8], scratch: &mut Vec<u8>) -> Bytes {
    scratch.clear();
    match target {
        EventTarget::Channel(channel, seq) | EventTarget::Acked(channel, seq) => {
            scratch.extend_from_slice(b"{\"type\":\"event\",\"channel\":\"");
            // Channel names are validated ASCII without quotes or backslashes: no escaping.
            scratch.extend_from_slice(channel.as_bytes());
            write!(scratch, "\",\"seq\":{seq}").expect("writing to a Vec cannot fail");
            if matches!(target, EventTarget::Acked(..)) {
                scratch.extend_from_slice(b",\"ack\":true");
            }
        }
        EventTarget::Broadcast => {
            scratch.extend_from_slice(b"{\"type\":\"event\",\"broadcast\":true");
        }
    }
    scratch.extend_from_slice(b",\"data\":");
    scratch.extend_from_slice(data);
    scratch.push(b'}');
    text_frame(scratch)
}

/// The payload of a frame [`text_frame`] made (an unmasked server frame: its header is 2, 4
/// or 10 bytes as its length needs).
pub fn text_payload(frame: &[u8]) -> &[u8] {
    let header = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.get(header..).unwrap_or_default()
}

/// Frames `payload` as one unmasked, final text frame.
pub fn text_frame(payload: &[u8]) -> Bytes {
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Text),
        ..FrameHeader::default()
    };
    let len = payload.len() as u64;
    let mut frame = Vec::with_capacity(header.len(len) + payload.len());
    header
        .format(len, &mut frame)
        .expect("writing to a Vec cannot fail");
    frame.extend_from_slice(payload);
    Bytes::from(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rejected(text: &str) -> (ErrorCode, Option<String>, Option<Value>) {
        let r = parse_request(text).expect_err(text);
        (r.code, r.channel, r.id)
    }

    #[test]
    fn channel_names() {
        assert!(ChannelName::parse("project:42").is_ok());
        assert!(ChannelName::parse("a.B-c_d:9").is_ok());
        assert!(ChannelName::parse(&"x".repeat(128)).is_ok());
        for bad in ["", "has space", "quote\"", "é", "a/b", &"x".repeat(129)] {
            assert!(ChannelName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_requests() {
        let sub = parse_request(r#"{"type":"subscribe","channel":"project:42","id":7}"#);
        assert_eq!(
            sub,
            Ok(Request::Subscribe {
                channel: ChannelName::parse("project:42").unwrap(),
                backfill: Backfill::default(),
                id: Some(json!(7))
            })
        );
        let resume =
            r#"{"type":"subscribe","channel":"a","since":{"seq":17,"epoch":"x7f3"},"rewind":3}"#;
        let since = Some(Since {
            seq: 17,
            epoch: "x7f3".into(),
        });
        assert!(matches!(
            parse_request(resume),
            Ok(Request::Subscribe { backfill, .. }) if backfill == Backfill { since, rewind: 3 }
        ));
        for bad in [
            r#"{"seq":-1,"epoch":"e"}"#,
            r#"{"seq":1}"#,
            r#"{"seq":1,"epoch":2}"#,
            "5",
        ] {
            let text = format!(r#"{{"type":"subscribe","channel":"a","since":{bad}}}"#);
            assert_eq!(rejected(&text).0, ErrorCode::InvalidMessage, "{text}");
        }
        for bad in ["0", "-1", "1.5", "\"1\"", "true"] {
            let text = format!(r#"{{"type":"subscribe","channel":"a","rewind":{bad}}}"#);
            let rejection = parse_request(&text).expect_err(&text);
            assert_eq!(rejection.code, ErrorCode::InvalidMessage, "{text}");
            assert!(
                rejection.message.contains("rewind"),
                "{}",
                rejection.message
            );
        }
        let unsub = parse_request(r#"{"type":"unsubscribe","channel":"a","id":"x"}"#);
        assert!(matches!(
            unsub,
            Ok(Request::Unsubscribe {
                id: Some(Value::String(_)),
                ..
            })
        ));
        assert_eq!(
            parse_request(r#"{"type":"ping"}"#),
            Ok(Request::Ping { id: None })
        );
    }

    #[test]
    fn rejects_bad_requests_with_codes() {
        use ErrorCode::*;
        assert_eq!(rejected("{nope").0, InvalidJson);
        assert_eq!(rejected("[1]").0, InvalidMessage);
        assert_eq!(
            rejected(r#"{"channel":"a"}"#),
            (InvalidMessage, Some("a".into()), None)
        );
        assert_eq!(rejected(r#"{"type":5}"#).0, InvalidMessage);
        assert_eq!(rejected(r#"{"type":"ping","id":[1]}"#).0, InvalidMessage);
        assert_eq!(
            rejected(r#"{"type":"subscribe","id":1}"#),
            (InvalidMessage, None, Some(json!(1)))
        );
        assert_eq!(
            rejected(r#"{"type":"subscribe","channel":7}"#).0,
            InvalidMessage
        );
        assert_eq!(
            rejected(r#"{"type":"subscribe","channel":"bad name","id":"q"}"#),
            (InvalidChannel, Some("bad name".into()), Some(json!("q")))
        );
        assert_eq!(
            rejected(r#"{"type":"dance","id":2}"#),
            (UnknownType, None, Some(json!(2)))
        );
    }

    #[test]
    fn replies_serialize_as_documented() {
        let id = json!(3);
        let cases = [
            (
                Reply::Connected {
                    client_id: "c1",
                    heartbeat_ms: 30000,
                    rate_limit: 20.0,
                    rate_burst: 50,
                    user_id: None,
                },
                r#"{"type":"connected","clientId":"c1","heartbeatMs":30000,"rateLimit":20.0,"rateBurst":50}"#,
            ),
            (
                Reply::Subscribed {
                    channel: "a",
                    seq: 0,
                    epoch: "e1",
                    recovered: Some(true),
                    id: Some(&id),
                },
                r#"{"type":"subscribed","channel":"a","seq":0,"epoch":"e1","recovered":true,"id":3}"#,
            ),
            (
                Reply::Unsubscribed {
                    channel: "a",
                    id: None,
                },
                r#"{"type":"unsubscribed","channel":"a"}"#,
            ),
            (Reply::Pong { id: None }, r#"{"type":"pong"}"#),
            (
                Reply::Error {
                    code: ErrorCode::TooManySubscriptions,
                    message: "m",
                    channel: Some("a"),
                    id: None,
                },
                r#"{"type":"error","code":"too_many_subscriptions","message":"m","channel":"a"}"#,
            ),
        ];
        for (reply, json) in cases {
            assert_eq!(reply.to_json(), json);
        }
    }

    #[test]
    fn event_frames_carry_data_byte_for_byte() {
        let data = br#"{ "p" : 1.50 }"#;
        let mut scratch = Vec::new();
        let frame = event_frame(EventTarget::Channel("project:42", 18), data, &mut scratch);
        let payload = br#"{"type":"event","channel":"project:42","seq":18,"data":{ "p" : 1.50 }}"#;
        assert_eq!(frame[0], 0x81, "FIN + text opcode");
        assert_eq!(usize::from(frame[1]), payload.len());
        assert_eq!(&frame[2..], payload);
        let frame = event_frame(EventTarget::Broadcast, data, &mut scratch);
        assert_eq!(
            &frame[2..],
            br#"{"type":"event","broadcast":true,"data":{ "p" : 1.50 }}"#
        );
    }

    #[test]
    fn long_frames_use_extended_length() {
        let frame = text_frame(&vec![b'x'; 70_000]);
        assert_eq!(frame[1], 127);
        assert_eq!(frame.len(), 10 + 70_000);
        for len in [0, 125, 126, 65_535, 65_536, 70_000] {
            let payload = vec![b'x'; len];
            assert_eq!(text_payload(&text_frame(&payload)), &payload[..], "{len}");
        }
    }
}
