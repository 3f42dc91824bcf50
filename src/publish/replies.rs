//! The replies of one publish-port connection, in the order of its commands: each ready at
//! once, or awaiting the engine's answer to its ticket; and the lines of a `POST /publish`
//! body, executed over passes under the fan-out budget and answered as one response.

use std::collections::VecDeque;

use serde_json::value::RawValue;

use super::command::{self, AckAsk, Answer, Outcome, Render, Sink, Target, error_reply};

/// A reply line ready to go out.
pub(super) struct Reply {
    pub line: String,
    /// The command succeeded.
    pub ok: bool,
    /// The command carried an `id`: the worker wants the line.
    pub wanted: bool,
}

/// A command's reply in its place among the others: ready, or awaiting the engine.
enum Slot {
    Ready(Reply),
    Waiting {
        ticket: u64,
        render: Render,
        wanted: bool,
    },
}

/// Replies in command order. Invariant: the front is `Waiting` (ready replies before it have
/// gone out) unless the queue is in the hands of an HTTP job, which renders them all at once;
/// `bytes` counts the ready lines held, which count against `max_output_buffer`.
#[derive(Default)]
pub(super) struct Replies {
    slots: VecDeque<Slot>,
    pub bytes: usize,
}

impl Replies {
    pub fn push(&mut self, executed: command::Executed) {
        let wanted = executed.wanted;
        self.slots.push_back(match executed.answer {
            Answer::Ready { line, ok } => {
                self.bytes += line.len();
                Slot::Ready(Reply { line, ok, wanted })
            }
            Answer::Waiting { ticket, render } => Slot::Waiting {
                ticket,
                render,
                wanted,
            },
        });
    }

    /// A line that answers no command of its own (an ack report), wanted, after the others.
    pub fn push_line(&mut self, line: String) {
        self.bytes += line.len();
        self.slots.push_back(Slot::Ready(Reply {
            line,
            ok: true,
            wanted: true,
        }));
    }

    /// Fills in the answer to `ticket`; false when it is not one of these.
    pub fn complete(&mut self, ticket: u64, outcome: &Outcome) -> bool {
        for slot in &mut self.slots {
            if let Slot::Waiting {
                ticket: t,
                render,
                wanted,
            } = slot
                && *t == ticket
            {
                let (line, ok) = render.line(outcome);
                self.bytes += line.len();
                *slot = Slot::Ready(Reply {
                    line,
                    ok,
                    wanted: *wanted,
                });
                return true;
            }
        }
        false
    }

    pub fn is_waiting(&self) -> bool {
        self.slots.iter().any(|s| matches!(s, Slot::Waiting { .. }))
    }

    /// The ready replies at the front, in order.
    pub fn take_ready(&mut self) -> impl Iterator<Item = Reply> + '_ {
        std::iter::from_fn(|| match self.slots.front() {
            Some(Slot::Ready(_)) => match self.slots.pop_front() {
                Some(Slot::Ready(reply)) => {
                    self.bytes -= reply.line.len();
                    Some(reply)
                }
                _ => None,
            },
            _ => None,
        })
    }
}

/// A `POST /publish` body's lines as they are executed.
#[derive(Default)]
pub(super) struct Lines {
    /// Bytes of the body executed so far.
    cursor: usize,
    pub replies: Replies,
    commands: usize,
}

impl Lines {
    /// The response body and how many commands failed, once every reply is known.
    pub fn render(&mut self) -> (String, usize) {
        let mut body = String::new();
        let mut failed = 0;
        for reply in self.replies.take_ready() {
            failed += usize::from(!reply.ok);
            body.push_str(&reply.line);
        }
        if self.commands == 0 {
            failed = 1;
            body = error_reply(None, "the body holds no publish command");
        }
        (body, failed)
    }

    /// The status line and content type of the response: 200 when every command succeeded,
    /// 400 when one failed (the body says which) or there was none.
    pub fn status(&self, failed: usize) -> (&'static str, &'static str) {
        let status = if failed > 0 {
            "400 Bad Request"
        } else {
            "200 OK"
        };
        let content_type = if self.commands > 1 {
            "application/x-ndjson"
        } else {
            "application/json"
        };
        (status, content_type)
    }
}

/// Executes the lines of a `POST /publish` body from where `job` stopped, while the sink has
/// capacity. Returns true once every line was executed. The last line needs no newline.
pub(super) fn run_lines(job: &mut Lines, body: &[u8], sink: &mut impl Sink) -> bool {
    while job.cursor < body.len() {
        if !sink.has_capacity() {
            return false;
        }
        let rest = &body[job.cursor..];
        let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        job.cursor += (end + 1).min(rest.len());
        if let Some(executed) = command::execute(&rest[..end], &mut WithoutAcks(&mut *sink)) {
            job.commands += 1;
            job.replies.push(executed);
        }
    }
    true
}

/// The sink of `POST /publish` lines: a publish that asks for acknowledgement is refused (its
/// report would have to hold the response open for the timeout; not built yet), the rest go
/// through.
struct WithoutAcks<'a, S>(&'a mut S);

/// The `error` of an acknowledged publish over HTTP.
pub const NO_ACKS_OVER_HTTP: &str =
    "ack is not available over HTTP yet: publish it on the publish socket";

impl<S: Sink> Sink for WithoutAcks<'_, S> {
    fn publish(
        &mut self,
        target: &Target<'_>,
        data: &RawValue,
        idem: Option<&str>,
        ack: Option<AckAsk<'_>>,
    ) -> Outcome {
        match ack {
            Some(_) => Outcome::Refused {
                error: NO_ACKS_OVER_HTTP.into(),
                retry: false,
            },
            None => self.0.publish(target, data, idem, None),
        }
    }

    fn disconnect_user(&mut self, user: &str) -> Outcome {
        self.0.disconnect_user(user)
    }

    fn has_capacity(&self) -> bool {
        self.0.has_capacity()
    }
}
