//! A [`Sink`] for unit tests: records every publish and has capacity for a set number more.

use serde_json::value::RawValue;

use super::{AckAsk, Outcome, Published, Reach, Seqs, Sink, Target};

/// One recorded publish.
#[derive(Debug, PartialEq, Eq)]
pub struct Recorded {
    /// `channel <name>`, `channels <a,b>`, `user <id>` or `broadcast`.
    pub target: String,
    /// The payload as given.
    pub data: String,
    /// The idempotency key, empty without one.
    pub idem: String,
}

/// Records publishes; `budget` is how many more fit in the pass.
pub struct Recorder {
    pub published: Vec<Recorded>,
    pub budget: usize,
}

impl Recorder {
    /// A recorder with room for `budget` publishes.
    pub fn new(budget: usize) -> Recorder {
        Recorder {
            published: Vec::new(),
            budget,
        }
    }

    /// The payloads published, in order.
    pub fn data(&self) -> Vec<String> {
        self.published.iter().map(|p| p.data.clone()).collect()
    }
}

impl Sink for Recorder {
    fn publish(
        &mut self,
        target: &Target<'_>,
        data: &RawValue,
        idem: Option<&str>,
        _ack: Option<AckAsk<'_>>,
    ) -> Outcome {
        let target = match target {
            Target::Channel(c) => format!("channel {c}"),
            Target::Channels(cs) => format!("channels {}", cs.join(",")),
            Target::User(u) => format!("user {u}"),
            Target::Broadcast => "broadcast".into(),
        };
        self.published.push(Recorded {
            target,
            data: data.get().to_string(),
            idem: idem.unwrap_or_default().to_string(),
        });
        self.budget = self.budget.saturating_sub(1);
        Outcome::Done(Published {
            seqs: Seqs::One(self.published.len() as u64),
            reach: Reach::Connections {
                delivered: 1,
                skipped: 0,
            },
            duplicate: false,
        })
    }

    fn disconnect_user(&mut self, _user: &str) -> Outcome {
        Outcome::Done(Published {
            seqs: Seqs::None,
            reach: Reach::Disconnected(0),
            duplicate: false,
        })
    }

    /// An empty roll of `channel`.
    fn presence(&mut self, channel: &str) -> Outcome {
        Outcome::Members(format!("{{\"channel\":\"{channel}\",\"members\":[]}}"))
    }

    fn has_capacity(&self) -> bool {
        self.budget > 0
    }
}
