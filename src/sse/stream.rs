//! One event stream's bytes: the response head, then one SSE message per server message.
//!
//! Each message is `data: <the WebSocket message's JSON>` and a blank line; an event of one
//! of the stream's channels, a `subscribed` and a `gap` also carry `id: <positions>` (see
//! [`position`](super::position)), so the browser's last id always resumes every channel.
//! A JSON text holding raw line breaks (whitespace a publisher sent over HTTP) is split into
//! several `data:` lines, which the browser joins with `\n`: the same JSON. Heartbeats are
//! SSE comments, which a browser ignores and a proxy sees as traffic.
//!
//! Invariants: the head goes out before anything else, exactly once; until it has, the
//! connection may still be refused with an HTTP status instead. An event's bytes are built
//! in an [`Arena`] shared by every stream, so per-recipient framing costs no allocation of
//! its own.

use bytes::{BufMut, Bytes, BytesMut};

use super::position::Positions;
use crate::error::Close;
use crate::ws::wire::Reply;

/// A comment line: keeps idle proxies from cutting the stream.
pub const HEARTBEAT: &[u8] = b":\n\n";

/// Bytes allocated at once for per-recipient messages; each message is a slice of one.
const ARENA_CHUNK: usize = 64 * 1024;

/// Shared room for per-recipient messages: each is split off one large buffer, so thousands
/// of messages cost one allocation, freed when the last of them has been written.
#[derive(Default)]
pub struct Arena {
    buf: BytesMut,
}

impl Arena {
    /// `write` fills at most `max_len` bytes; they are returned as their own `Bytes`.
    fn take(&mut self, max_len: usize, write: impl FnOnce(&mut BytesMut)) -> Bytes {
        if self.buf.capacity() - self.buf.len() < max_len {
            self.buf = BytesMut::with_capacity(ARENA_CHUNK.max(max_len));
        }
        write(&mut self.buf);
        self.buf.split().freeze()
    }
}

/// One event stream's state: its positions and whether its head is out.
#[derive(Debug)]
pub struct Stream {
    positions: Positions,
    /// The `Origin` to allow in the head (a cross-origin `EventSource`); dropped once sent.
    origin: Option<Box<str>>,
    started: bool,
}

impl Stream {
    /// A stream at `positions`, whose head allows `origin` (already checked).
    pub fn new(positions: Positions, origin: Option<&str>) -> Stream {
        Stream {
            positions,
            origin: origin.map(Into::into),
            started: false,
        }
    }

    /// The response head, the first time it is asked for; `None` after.
    pub fn start(&mut self) -> Option<Bytes> {
        if std::mem::replace(&mut self.started, true) {
            return None;
        }
        let cors = match self.origin.take() {
            Some(origin) => format!(
                "Access-Control-Allow-Origin: {origin}\r\n\
                 Access-Control-Allow-Credentials: true\r\nVary: Origin\r\n"
            ),
            None => String::new(),
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
             X-Accel-Buffering: no\r\n{cors}Connection: close\r\n\r\n"
        );
        Some(Bytes::from(head))
    }

    /// True once the head is out: the connection can no longer be refused with a status.
    pub fn is_started(&self) -> bool {
        self.started
    }

    /// The message of an event whose WebSocket text is `json`; `at` is its channel and seq
    /// (`None` for a broadcast).
    pub fn event(&mut self, json: &[u8], at: Option<(&str, u64)>, arena: &mut Arena) -> Bytes {
        let moved = at.is_some_and(|(channel, seq)| self.positions.advance(channel, seq));
        let positions = moved.then_some(&self.positions);
        let max_len = positions.map_or(0, |p| p.max_len() + 5) + data_len(json);
        arena.take(max_len, |out| message(out, positions, json))
    }

    /// The message of a reply; a `subscribed` or a `gap` moves the stream's position.
    pub fn reply(&mut self, reply: &Reply<'_>) -> Bytes {
        let moved = match *reply {
            Reply::Subscribed {
                channel,
                seq,
                epoch,
                ..
            }
            | Reply::Gap {
                channel,
                seq,
                epoch,
            } => {
                self.positions.reset(channel, seq, epoch);
                true
            }
            _ => false,
        };
        let positions = moved.then_some(&self.positions);
        let json = reply.to_json();
        let mut out = BytesMut::with_capacity(
            positions.map_or(0, |p| p.max_len() + 5) + data_len(json.as_bytes()),
        );
        message(&mut out, positions, json.as_bytes());
        out.freeze()
    }

    /// The last message of a stream the server ends for `close`; none when the client went.
    pub fn closing(&mut self, close: Close) -> Option<Bytes> {
        let (code, reason) = close.frame()?;
        Some(self.reply(&Reply::Close {
            code: code.into(),
            reason,
        }))
    }
}

/// The HTTP refusal of a stream refused before its head went out.
pub fn refusal(close: Close) -> Vec<u8> {
    let (status, extra) = match close {
        Close::Unauthorized | Close::TokenExpired => ("401 Unauthorized", ""),
        Close::UserLimit => ("429 Too Many Requests", "Retry-After: 5\r\n"),
        Close::Shutdown => ("503 Service Unavailable", "Retry-After: 1\r\n"),
        _ => ("400 Bad Request", ""),
    };
    let reason = close.frame().map_or(close.label(), |(_, reason)| reason);
    crate::base::http::response(
        status,
        extra,
        "text/plain; charset=utf-8",
        &format!("{reason}\n"),
    )
}

/// Bytes `data:` lines take for `json`, at most.
fn data_len(json: &[u8]) -> usize {
    let breaks = json.iter().filter(|&&b| b == b'\n' || b == b'\r').count();
    json.len() + 8 + 6 * breaks
}

/// `id: <positions>` (when given), the `data:` lines of `json`, and the blank line that ends
/// the message.
fn message(out: &mut BytesMut, positions: Option<&Positions>, json: &[u8]) {
    if let Some(positions) = positions {
        out.put_slice(b"id: ");
        positions.write(out);
        out.put_u8(b'\n');
    }
    out.put_slice(b"data: ");
    for (i, line) in json.split(|&b| b == b'\n' || b == b'\r').enumerate() {
        if i > 0 {
            out.put_slice(b"\ndata: ");
        }
        out.put_slice(line);
    }
    out.put_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(channels: &[&str]) -> Stream {
        let channels = channels.iter().map(|&c| c.into()).collect();
        Stream::new(
            Positions::parse(channels, None).unwrap(),
            Some("https://app.test"),
        )
    }

    fn text(bytes: &Bytes) -> &str {
        std::str::from_utf8(bytes).unwrap()
    }

    #[test]
    fn head_once_then_messages_with_positions() {
        let mut stream = stream(&["a", "b"]);
        let head = stream.start().unwrap();
        let head = text(&head);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
        for line in [
            "Content-Type: text/event-stream",
            "Cache-Control: no-cache",
            "X-Accel-Buffering: no",
            "Access-Control-Allow-Origin: https://app.test",
        ] {
            assert!(head.contains(line), "{line} in {head}");
        }
        assert!(stream.start().is_none());
        let subscribed = stream.reply(&Reply::Subscribed {
            channel: "b",
            seq: 4,
            epoch: "e1",
            recovered: None,
            id: None,
        });
        assert_eq!(
            text(&subscribed),
            "id: ,e1:4\ndata: {\"type\":\"subscribed\",\"channel\":\"b\",\"seq\":4,\"epoch\":\"e1\"}\n\n"
        );
        let mut arena = Arena::default();
        let event = stream.event(
            br#"{"type":"event","channel":"b","seq":5}"#,
            Some(("b", 5)),
            &mut arena,
        );
        assert_eq!(
            text(&event),
            "id: ,e1:5\ndata: {\"type\":\"event\",\"channel\":\"b\",\"seq\":5}\n\n"
        );
        let broadcast = stream.event(b"{\"x\":1}", None, &mut arena);
        assert_eq!(
            text(&broadcast),
            "data: {\"x\":1}\n\n",
            "no id: the positions did not move"
        );
        let pretty = stream.event(b"{\r\n \"x\":\n1}", Some(("a", 1)), &mut arena);
        assert_eq!(
            text(&pretty),
            "data: {\ndata: \ndata:  \"x\":\ndata: 1}\n\n",
            "a's position is unknown until it is answered; line breaks split data lines"
        );
        let closing = stream.closing(Close::Shutdown).unwrap();
        assert_eq!(
            text(&closing),
            "data: {\"type\":\"close\",\"code\":1001,\"reason\":\"server shutting down\"}\n\n"
        );
        assert!(stream.closing(Close::Reset).is_none());
    }

    #[test]
    fn an_arena_hands_out_separate_messages() {
        let mut arena = Arena::default();
        let mut stream = stream(&["a"]);
        let messages: Vec<Bytes> = (0..3000)
            .map(|i| stream.event(format!("{{\"n\":{i}}}").as_bytes(), None, &mut arena))
            .collect();
        for (i, m) in messages.iter().enumerate() {
            assert_eq!(text(m), format!("data: {{\"n\":{i}}}\n\n"));
        }
        let huge = vec![b'x'; 2 * ARENA_CHUNK];
        assert_eq!(stream.event(&huge, None, &mut arena).len(), huge.len() + 8);
    }

    #[test]
    fn refusals_are_statuses() {
        let unauthorized = String::from_utf8(refusal(Close::Unauthorized)).unwrap();
        assert!(unauthorized.starts_with("HTTP/1.1 401 Unauthorized\r\n"));
        let busy = String::from_utf8(refusal(Close::UserLimit)).unwrap();
        assert!(busy.starts_with("HTTP/1.1 429 "));
    }
}
