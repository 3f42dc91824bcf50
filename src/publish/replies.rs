//! The replies of one publish-port connection, in the order of its commands: each ready at
//! once, or awaiting the engine's answer to its ticket; and the lines of a `POST /publish`
//! body, executed over passes under the fan-out budget and answered as one response.

use std::collections::VecDeque;

use super::command::{self, Answer, Outcome, Render, Sink, error_reply};

/// A reply line ready to go out.
pub(super) struct Reply {
    pub line: String,
    /// The command succeeded.
    pub ok: bool,
    /// The command carried an `id`: the worker wants the line.
    pub wanted: bool,
}

/// A command's reply in its place among the others: ready, awaiting the engine, or (in an
/// HTTP response) the `ack_report` of the acknowledged publish before it, by its id.
enum Slot {
    Ready(Reply),
    Waiting {
        ticket: u64,
        render: Render,
        wanted: bool,
    },
    Report(Box<str>),
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
        let slot = self.ready_line(line);
        self.slots.push_back(slot);
    }

    /// A wanted, successful line ready to go out, counted in `bytes`.
    fn ready_line(&mut self, line: String) -> Slot {
        self.bytes += line.len();
        Slot::Ready(Reply {
            line,
            ok: true,
            wanted: true,
        })
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
        self.slots
            .iter()
            .any(|s| matches!(s, Slot::Waiting { .. } | Slot::Report(_)))
    }

    /// Puts the report for `id` in the place kept for it; false when none is kept.
    pub fn fill_report(&mut self, id: &str, line: &str) -> bool {
        let kept = self
            .slots
            .iter()
            .position(|s| matches!(s, Slot::Report(kept) if **kept == *id));
        let Some(at) = kept else {
            return false;
        };
        self.slots[at] = self.ready_line(line.into());
        true
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
    /// Ack reports the response carries after their publishes' replies.
    reports: usize,
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
        let content_type = if self.commands + self.reports > 1 {
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
        if let Some(mut executed) = command::execute(&rest[..end], sink) {
            job.commands += 1;
            // The response waits for the report, which the ack timeout bounds.
            let report = executed.report.take();
            job.replies.push(executed);
            if let Some(id) = report {
                job.reports += 1;
                job.replies.slots.push_back(Slot::Report(id));
            }
        }
    }
    true
}
