//! Publish commands: one JSON line → a [`Command`], and the reply lines a publisher reads.
//!
//! Parsing borrows from the line (`data` stays the publisher's bytes, as a `RawValue`), so a
//! command costs no copy of its payload. Executing one is the [`Sink`]'s job: the fan-out.

use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::Duration;

use crate::base::channel::{RESERVED_PREFIX, check_channel, user_channel};

/// What a command publishes to.
#[derive(Debug, PartialEq)]
pub enum Target<'a> {
    /// `"channel": "..."`
    Channel(Cow<'a, str>),
    /// `"channels": [...]`, each with its own sequence number.
    Channels(Vec<Cow<'a, str>>),
    /// `"broadcast": true`: every open WebSocket.
    Broadcast,
    /// `"user": "u1"`: every connection of that user, as an event on `user:u1`.
    User(Cow<'a, str>),
}

impl Target<'_> {
    /// The one channel the event goes to (`user:<id>` for a user), when it has one.
    pub fn channel_name(&self) -> Option<Cow<'_, str>> {
        match self {
            Target::Channel(channel) => Some(Cow::Borrowed(channel)),
            Target::User(user) => Some(Cow::Owned(user_channel(user))),
            Target::Channels(_) | Target::Broadcast => None,
        }
    }
}

/// What a command does.
#[derive(Debug)]
pub enum Action<'a> {
    /// Publish `data` to `target`.
    Publish {
        /// Where the event goes.
        target: Target<'a>,
        /// The event payload, byte for byte as the publisher wrote it.
        data: &'a RawValue,
        /// `"idem"`: a retry of a publish made under this key (within
        /// `idempotency_window`) is answered with the first one's result instead of
        /// publishing again.
        idem: Option<Cow<'a, str>>,
        /// `"ack":{"timeout":"5s"}`: the pages are asked to acknowledge the event, and the
        /// worker gets one `ack_report` line once all did or the timeout passed.
        ack: Option<Duration>,
    },
    /// `{"op":"disconnect","user":"u1"}`: close every connection of that user (4003).
    DisconnectUser(Cow<'a, str>),
    /// `{"op":"presence","channel":"doc:1"}`: the members of a presence channel.
    Presence(Cow<'a, str>),
}

/// A parsed publish command.
#[derive(Debug)]
pub struct Command<'a> {
    /// Present when the publisher wants a reply: a JSON number or string, echoed verbatim.
    pub id: Option<&'a RawValue>,
    /// What to do.
    pub action: Action<'a>,
}

/// A refused command.
#[derive(Debug)]
pub struct CommandError<'a> {
    /// The command's id, when it could be read.
    pub id: Option<&'a RawValue>,
    /// Why it was refused.
    pub message: String,
}

/// Sequence numbers taken by one publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seqs {
    /// A broadcast has none.
    None,
    /// A single-channel publish.
    One(u64),
    /// A multi-channel publish, in the command's channel order.
    Many(Vec<u64>),
}

/// Who a publish reached, as far as the engine knows it when it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// The memory engine: connections the event was queued to (`"delivered"`), and those
    /// subscribed that did not get it because they were already being closed, or were just
    /// found too slow (`"skipped"`, in the reply when not 0).
    Connections {
        /// Queued to.
        delivered: usize,
        /// Passed over.
        skipped: usize,
    },
    /// The Redis engine: nodes subscribed to the channel when Redis published it, summed
    /// over the channels (`"nodes"`). Which connections on them get it is not known here.
    Nodes(usize),
    /// A memory-engine `disconnect`: connections closed (`"disconnected"`).
    Disconnected(usize),
}

/// The result of executing one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// Sequence numbers taken.
    pub seqs: Seqs,
    /// Who it reached.
    pub reach: Reach,
    /// True when this is a retry under an `idem` key already used: nothing was published
    /// now, and `seqs` and `reach` are the first publish's.
    pub duplicate: bool,
}

/// How the sink took a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Executed now.
    Done(Published),
    /// Sent to a shared engine: the answer for `ticket` comes later (see
    /// [`PublisherConn::complete`](super::PublisherConn::complete)).
    Waiting(u64),
    /// Not executed: the engine cannot be reached. The worker may retry.
    Unavailable,
    /// The members of a presence channel: the fields of the reply after `"ok":true`, as one
    /// JSON object.
    Members(String),
    /// Not executed, for this reason (an acknowledged publish the server cannot take).
    Refused {
        /// The `error` of the reply.
        error: String,
        /// Trying again later may succeed (`"retry":true`).
        retry: bool,
    },
}

/// The error text of a publish the engine could not take, retryable.
pub const UNAVAILABLE: &str = "unavailable";

/// Longest `idem` key, in bytes.
pub const MAX_IDEM_LEN: usize = 128;

/// An acknowledged publish's terms: how long the pages have, and the command's id, which its
/// report carries.
#[derive(Clone, Copy, Debug)]
pub struct AckAsk<'a> {
    /// `ack.timeout`.
    pub timeout: Duration,
    /// The command's `id`, as written.
    pub id: &'a RawValue,
}

/// Executes publish commands: the reactor's fan-out.
pub trait Sink {
    /// Publishes `data` to `target`, once per `idem` key when one is given, asking the pages
    /// to acknowledge it when `ack` is given.
    fn publish(
        &mut self,
        target: &Target<'_>,
        data: &RawValue,
        idem: Option<&str>,
        ack: Option<AckAsk<'_>>,
    ) -> Outcome;

    /// Closes every connection of `user`.
    fn disconnect_user(&mut self, user: &str) -> Outcome;

    /// The members of presence channel `channel`.
    fn presence(&mut self, channel: &str) -> Outcome;

    /// False once this loop pass has done its share of fan-out: the publisher stops reading
    /// and resumes in the next pass, after the queued frames were flushed.
    fn has_capacity(&self) -> bool;
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow)]
    channels: Option<Vec<Cow<'a, str>>>,
    broadcast: Option<bool>,
    #[serde(borrow)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow)]
    idem: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: DataField<'a>,
    #[serde(borrow)]
    ack: Option<AckField<'a>>,
}

/// `"ack": {"timeout": "5s"}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckField<'a> {
    #[serde(borrow)]
    timeout: Option<Cow<'a, str>>,
}

/// `data` as written, telling a missing field from `null` (which `Option` cannot).
#[derive(Default)]
enum DataField<'a> {
    #[default]
    Missing,
    Present(&'a RawValue),
}

impl<'de: 'a, 'a> Deserialize<'de> for DataField<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <&RawValue>::deserialize(deserializer).map(DataField::Present)
    }
}

/// Reads just the id of a command that failed to parse, so its error reply can carry it.
#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
}

/// Parses one command line (without its line terminator).
///
/// # Errors
/// Why the line is not a valid command, with its id when it has a readable one.
pub fn parse_command(line: &[u8]) -> Result<Command<'_>, CommandError<'_>> {
    let raw: RawCommand<'_> = serde_json::from_slice(line).map_err(|e| CommandError {
        id: serde_json::from_slice::<IdOnly<'_>>(line)
            .ok()
            .and_then(|c| c.id)
            .filter(|id| is_valid_id(id)),
        message: format!("invalid command: {e}"),
    })?;
    let id = raw.id;
    let fail = |message: String| Err(CommandError { id, message });
    if id.is_some_and(|id| !is_valid_id(id)) {
        return Err(CommandError {
            id: None,
            message: "id must be a number or a string".into(),
        });
    }
    match raw.op.as_deref() {
        None => {}
        Some(op @ ("disconnect" | "presence")) => {
            // An op names a user or a channel, and carries nothing of a publish.
            let publish_fields = raw.channels.is_some()
                || raw.broadcast.is_some()
                || !matches!(raw.data, DataField::Missing)
                || raw.idem.is_some()
                || raw.ack.is_some();
            let action = match (op, raw.user, raw.channel) {
                _ if publish_fields => None,
                ("disconnect", Some(user), None) => Some(match check_user(&user) {
                    Ok(()) => Action::DisconnectUser(user),
                    Err(why) => return fail(why),
                }),
                ("presence", None, Some(channel)) => Some(match check_channel(&channel) {
                    Ok(()) => Action::Presence(channel),
                    Err(why) => return fail(why.into()),
                }),
                _ => None,
            };
            let Some(action) = action else {
                let what = if op == "disconnect" {
                    "a user"
                } else {
                    "a channel"
                };
                return fail(format!("{op} takes exactly {what}"));
            };
            return Ok(Command { id, action });
        }
        Some(other) => return fail(format!("unknown op {other:?}")),
    }
    let target = match (raw.channel, raw.channels, raw.broadcast, raw.user) {
        (Some(channel), None, None, None) => Target::Channel(channel),
        (None, Some(channels), None, None) => Target::Channels(channels),
        (None, None, Some(true), None) => Target::Broadcast,
        (None, None, None, Some(user)) => Target::User(user),
        (None, None, Some(false), None) => {
            return fail("broadcast must be true when present".into());
        }
        _ => return fail("give exactly one of channel, channels, broadcast or user".into()),
    };
    match &target {
        Target::Channel(name) => {
            if let Err(why) = check_publishable(name) {
                return fail(why);
            }
        }
        Target::Channels(names) => {
            if names.is_empty() {
                return fail("channels is empty".into());
            }
            for (i, name) in names.iter().enumerate() {
                if let Err(why) = check_publishable(name) {
                    return fail(why);
                }
                if names[..i].contains(name) {
                    return fail(format!("channel {name:?} is listed twice"));
                }
            }
        }
        Target::User(user) => {
            if let Err(why) = check_user(user) {
                return fail(why);
            }
        }
        Target::Broadcast => {}
    }
    let DataField::Present(data) = raw.data else {
        return fail("missing field `data`".into());
    };
    if let Some(key) = &raw.idem
        && (key.is_empty() || key.len() > MAX_IDEM_LEN)
    {
        return fail(format!("idem must be 1 to {MAX_IDEM_LEN} bytes"));
    }
    let ack = match raw.ack {
        None => None,
        Some(ack) => match ack_timeout(ack, id.is_some(), &target) {
            Ok(timeout) => Some(timeout),
            Err(why) => return fail(why),
        },
    };
    Ok(Command {
        id,
        action: Action::Publish {
            target,
            data,
            idem: raw.idem,
            ack,
        },
    })
}

/// An `ack` field's timeout, or why the command cannot ask for acknowledgement.
fn ack_timeout(ack: AckField<'_>, has_id: bool, target: &Target<'_>) -> Result<Duration, String> {
    if !has_id {
        return Err("ack needs an id: the ack_report carries it".into());
    }
    if !matches!(target, Target::Channel(_) | Target::User(_)) {
        return Err("ack takes a channel or a user: a report counts the pages of one event".into());
    }
    let Some(timeout) = ack.timeout else {
        return Err("ack needs a timeout, e.g. {\"timeout\":\"5s\"}".into());
    };
    match humantime::parse_duration(&timeout) {
        Ok(timeout) if !timeout.is_zero() => Ok(timeout),
        Ok(_) => Err("ack timeout must be more than 0".into()),
        Err(e) => Err(format!("ack timeout {timeout:?}: {e}")),
    }
}

/// Checks that a publisher may publish to `name`: a valid channel name, outside the
/// server's own `sidecast:` channels.
///
/// # Errors
/// Why not, naming the channel.
pub fn check_publishable(name: &str) -> Result<(), String> {
    match check_channel(name) {
        Err(why) => Err(format!("invalid channel {name:?}: {why}")),
        Ok(()) if name.starts_with(RESERVED_PREFIX) => Err(format!(
            "channel {name:?} is reserved: {RESERVED_PREFIX}* channels are the server's own"
        )),
        Ok(()) => Ok(()),
    }
}

/// Checks a user id: `user:<id>` must be a valid channel name.
///
/// # Errors
/// Why not, naming the user.
pub fn check_user(user: &str) -> Result<(), String> {
    check_channel(&user_channel(user)).map_err(|why| format!("invalid user {user:?}: {why}"))
}

fn is_valid_id(id: &RawValue) -> bool {
    matches!(id.get().as_bytes().first(), Some(b'"' | b'-' | b'0'..=b'9'))
}

/// One executed command: its reply, and whether the publisher asked for it (it had an id).
#[derive(Debug)]
pub struct Executed {
    /// The reply, now or later.
    pub answer: Answer,
    /// The command carried an id: a line-mode publisher reads this reply.
    pub wanted: bool,
    /// An acknowledged publish that was taken: its `ack_report` follows, carrying this id.
    pub report: Option<Box<str>>,
}

/// A command's reply line, or what is needed to render it once the engine answers.
#[derive(Debug)]
pub enum Answer {
    /// The reply line (with `"id":null` when the command had none), newline-terminated.
    Ready {
        /// The line.
        line: String,
        /// The command succeeded.
        ok: bool,
    },
    /// Waiting for the engine's answer to `ticket`.
    Waiting {
        /// The sink's ticket.
        ticket: u64,
        /// How to render it.
        render: Render,
    },
}

/// What a reply line needs from its command: the id and the target's shape.
#[derive(Debug, Clone)]
pub struct Render {
    /// The id, as written (`null` without one).
    id: Box<str>,
    /// A multi-channel publish's channel names, in order.
    channels: Option<Vec<Box<str>>>,
}

impl Render {
    fn new(id: Option<&RawValue>, target: Option<&Target<'_>>) -> Render {
        let channels = match target {
            Some(Target::Channels(names)) => Some(names.iter().map(|n| (**n).into()).collect()),
            _ => None,
        };
        Render {
            id: id.map_or("null", RawValue::get).into(),
            channels,
        }
    }

    /// The reply line and whether it is a success, for the engine's answer.
    pub fn line(&self, outcome: &Outcome) -> (String, bool) {
        match outcome {
            Outcome::Done(published) => (self.ok_line(published), true),
            Outcome::Members(roll) => (
                format!("{{\"id\":{},\"ok\":true,{}\n", self.id, &roll[1..]),
                true,
            ),
            Outcome::Unavailable | Outcome::Waiting(_) => (unavailable_line(&self.id), false),
            Outcome::Refused { error, retry } => (error_line(&self.id, error, *retry), false),
        }
    }

    fn ok_line(&self, published: &Published) -> String {
        let mut line = format!("{{\"id\":{},\"ok\":true", self.id);
        match (&published.seqs, &self.channels) {
            (Seqs::One(seq), _) => {
                let _ = write!(line, ",\"seq\":{seq}");
            }
            (Seqs::Many(seqs), Some(names)) => {
                line.push_str(",\"seqs\":{");
                for (i, (name, seq)) in names.iter().zip(seqs).enumerate() {
                    let comma = if i == 0 { "" } else { "," };
                    // Validated channel names need no escaping.
                    let _ = write!(line, "{comma}\"{name}\":{seq}");
                }
                line.push('}');
            }
            _ => {}
        }
        if published.duplicate {
            line.push_str(",\"duplicate\":true");
        }
        let (key, count) = match published.reach {
            Reach::Connections { delivered, skipped } => {
                if skipped > 0 {
                    let _ = write!(line, ",\"skipped\":{skipped}");
                }
                ("delivered", delivered)
            }
            Reach::Nodes(n) => ("nodes", n),
            Reach::Disconnected(n) => ("disconnected", n),
        };
        let _ = writeln!(line, ",\"{key}\":{count}}}");
        line
    }
}

/// Parses and executes one command line (a trailing `\r` is ignored). `None` for a blank
/// line, which is no command.
pub fn execute(line: &[u8], sink: &mut impl Sink) -> Option<Executed> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let mut report = None;
    let (id, render, outcome) = match parse_command(line) {
        Ok(Command {
            id,
            action:
                Action::Publish {
                    target,
                    data,
                    idem,
                    ack,
                },
        }) => {
            let ack = ack.zip(id).map(|(timeout, id)| AckAsk { timeout, id });
            let outcome = sink.publish(&target, data, idem.as_deref(), ack);
            let reported = matches!(outcome, Outcome::Done(_) | Outcome::Waiting(_));
            report = ack.filter(|_| reported).map(|ack| ack.id.get().into());
            (id, Render::new(id, Some(&target)), outcome)
        }
        Ok(Command {
            id,
            action: Action::DisconnectUser(user),
        }) => (id, Render::new(id, None), sink.disconnect_user(&user)),
        Ok(Command {
            id,
            action: Action::Presence(channel),
        }) => (id, Render::new(id, None), sink.presence(&channel)),
        Err(error) => {
            return Some(Executed {
                answer: Answer::Ready {
                    line: error_reply(error.id, &error.message),
                    ok: false,
                },
                wanted: error.id.is_some(),
                report: None,
            });
        }
    };
    let answer = match outcome {
        Outcome::Waiting(ticket) => Answer::Waiting { ticket, render },
        done => {
            let (line, ok) = render.line(&done);
            Answer::Ready { line, ok }
        }
    };
    Some(Executed {
        answer,
        wanted: id.is_some(),
        report,
    })
}

/// Renders the success reply of a command (`"id":null` without one).
pub fn ok_reply(id: Option<&RawValue>, target: &Target<'_>, published: &Published) -> String {
    Render::new(id, Some(target)).ok_line(published)
}

/// Renders an error reply; `id` is `null` when the command had none that could be read.
pub fn error_reply(id: Option<&RawValue>, message: &str) -> String {
    error_line(id.map_or("null", RawValue::get), message, false)
}

/// An error reply line for the id as written; `retry` adds `"retry":true`.
fn error_line(id: &str, message: &str, retry: bool) -> String {
    let message = serde_json::to_string(message).expect("strings always serialize");
    let retry = if retry { ",\"retry\":true" } else { "" };
    format!("{{\"id\":{id},\"ok\":false,\"error\":{message}{retry}}}\n")
}

/// The reply to a publish the engine could not take: `"retry":true` tells the worker that
/// trying again may succeed.
fn unavailable_line(id: &str) -> String {
    format!("{{\"id\":{id},\"ok\":false,\"error\":\"{UNAVAILABLE}\",\"retry\":true}}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn an_acknowledged_publish_needs_an_id_and_one_channel() {
        let (_, message) = error_of(r#"{"channel":"c","data":1,"ack":{"timeout":"1s"}}"#);
        assert!(message.contains("ack needs an id"), "{message}");
        let parsed = parse_command(br#"{"id":1,"user":"u1","data":1,"ack":{"timeout":"1.5s"}}"#);
        assert!(matches!(
            parsed,
            Ok(Command { action: Action::Publish { ack: Some(t), .. }, .. }) if t == Duration::from_millis(1500)
        ));
    }

    fn error_of(line: &str) -> (Option<String>, String) {
        let e = parse_command(line.as_bytes()).unwrap_err();
        (e.id.map(|id| id.get().to_string()), e.message)
    }

    #[test]
    fn parses_each_target() {
        let publish = |line: &'static [u8]| match parse_command(line).unwrap() {
            Command {
                id,
                action: Action::Publish { target, data, .. },
            } => (
                id.map(|i| i.get().to_string()),
                target,
                data.get().to_string(),
            ),
            other => panic!("not a publish: {other:?}"),
        };
        let (id, target, data) = publish(br#"{"channel":"project:42","data":{"p":1}}"#);
        assert_eq!(
            (id, target, data.as_str()),
            (None, Target::Channel("project:42".into()), r#"{"p":1}"#)
        );
        let (id, target, data) = publish(br#"{"id":"x","channels":["a","b"],"data":[1, 2]}"#);
        assert_eq!(target, Target::Channels(vec!["a".into(), "b".into()]));
        assert_eq!((id.as_deref(), data.as_str()), (Some(r#""x""#), "[1, 2]"));
        let (_, target, data) = publish(br#"{"id":7,"broadcast":true,"data":null}"#);
        assert_eq!((target, data.as_str()), (Target::Broadcast, "null"));
        assert_eq!(
            publish(br#"{"user":"u1","data":1}"#).1,
            Target::User("u1".into())
        );
        assert_eq!(
            publish(br#"{"channel":"\u0061","data":1}"#).1,
            Target::Channel("a".into()),
            "escapes decoded"
        );
        let disconnect = parse_command(br#"{"id":1,"op":"disconnect","user":"u1"}"#).unwrap();
        assert!(matches!(disconnect.action, Action::DisconnectUser(user) if user == "u1"));
    }

    #[test]
    fn refuses_bad_commands_keeping_the_id() {
        assert_eq!(error_of("not json").0, None);
        let (id, message) = error_of(r#"{"id":3,"chanel":"a","data":1}"#);
        assert_eq!(id.as_deref(), Some("3"));
        assert!(message.contains("unknown field `chanel`"), "{message}");
        assert!(
            error_of(r#"{"id":3,"channel":"a"}"#)
                .1
                .contains("missing field `data`")
        );
        assert!(
            error_of(r#"{"id":3,"channel":"a","broadcast":true,"data":1}"#)
                .1
                .contains("exactly one")
        );
        assert!(error_of(r#"{"id":3,"data":1}"#).1.contains("exactly one"));
        assert!(
            error_of(r#"{"id":3,"user":"a b","data":1}"#)
                .1
                .contains("invalid user")
        );
        assert!(
            error_of(r#"{"id":3,"op":"disconnect","user":"u1","data":1}"#)
                .1
                .contains("exactly a user")
        );
        assert!(
            error_of(r#"{"id":3,"op":"explode","user":"u1"}"#)
                .1
                .contains("unknown op")
        );
        assert!(
            error_of(r#"{"id":3,"broadcast":false,"data":1}"#)
                .1
                .contains("must be true")
        );
        assert!(
            error_of(r#"{"id":3,"channel":"a b","data":1}"#)
                .1
                .contains("invalid channel")
        );
        for reserved in [
            r#"{"id":3,"channel":"sidecast:stats","data":1}"#,
            r#"{"id":3,"channels":["a","sidecast:x"],"data":1}"#,
        ] {
            assert!(error_of(reserved).1.contains("reserved"), "{reserved}");
        }
        assert!(
            error_of(r#"{"id":3,"channels":[],"data":1}"#)
                .1
                .contains("empty")
        );
        assert!(
            error_of(r#"{"id":3,"channels":["a","a"],"data":1}"#)
                .1
                .contains("twice")
        );
        assert_eq!(error_of(r#"{"id":{},"channel":"a","data":1}"#).0, None);
    }

    #[test]
    fn replies_are_single_json_lines() {
        let id = raw("7");
        let one = Published {
            seqs: Seqs::One(18),
            reach: Reach::Connections {
                delivered: 1000,
                skipped: 0,
            },
            duplicate: false,
        };
        assert_eq!(
            ok_reply(Some(&id), &Target::Channel("a".into()), &one),
            "{\"id\":7,\"ok\":true,\"seq\":18,\"delivered\":1000}\n"
        );
        let many = Published {
            seqs: Seqs::Many(vec![18, 3]),
            reach: Reach::Nodes(2),
            duplicate: false,
        };
        let target = Target::Channels(vec!["project:42".into(), "order:7".into()]);
        assert_eq!(
            ok_reply(Some(&id), &target, &many),
            "{\"id\":7,\"ok\":true,\"seqs\":{\"project:42\":18,\"order:7\":3},\"nodes\":2}\n"
        );
        let all = Published {
            seqs: Seqs::None,
            reach: Reach::Connections {
                delivered: 5,
                skipped: 2,
            },
            duplicate: true,
        };
        assert_eq!(
            ok_reply(Some(&id), &Target::Broadcast, &all),
            "{\"id\":7,\"ok\":true,\"duplicate\":true,\"skipped\":2,\"delivered\":5}\n"
        );
        assert_eq!(
            error_reply(None, "bad \"x\""),
            "{\"id\":null,\"ok\":false,\"error\":\"bad \\\"x\\\"\"}\n"
        );
        assert_eq!(
            Render::new(Some(&id), None).line(&Outcome::Unavailable).0,
            "{\"id\":7,\"ok\":false,\"error\":\"unavailable\",\"retry\":true}\n"
        );
    }
}
