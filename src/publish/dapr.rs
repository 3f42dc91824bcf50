//! sidecast as a Dapr subscriber application: events from any broker Dapr supports (Kafka,
//! say) reach channels.
//!
//! Subscriptions are configured in TOML (`[[dapr.subscription]]`): a Dapr pub/sub component
//! and topic, the route Dapr posts to, and where each event goes, a channel or a user named by
//! a template over the CloudEvent (`project:{data.projectId}`, `{data.user_id}`), or a
//! broadcast. `GET /dapr/subscribe` lists them in Dapr's programmatic subscription format.
//!
//! A CloudEvent (structured JSON, or each entry of Dapr's bulk format) is published with its
//! `source` and `id` as the idempotency key, so a redelivery is answered without publishing
//! twice. The answer is Dapr's status: `SUCCESS`, or `DROP` (with a log line) for an event
//! that can never be mapped: not a CloudEvent, a missing or unusable template field, a bad
//! channel name, binary data; or `RETRY` when the engine could not store it (the Redis
//! engine, while Redis is unreachable), answered only once every event's fate is known.

use std::borrow::Cow;
use std::hash::{Hash, Hasher};

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::command::{MAX_IDEM_LEN, Outcome, Sink, Target, check_publishable, check_user};

/// The `[dapr]` section of the config file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaprSettings {
    /// `[[dapr.subscription]]` entries.
    #[serde(default)]
    pub subscription: Vec<DaprSubscription>,
}

/// One `[[dapr.subscription]]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaprSubscription {
    /// The Dapr pub/sub component.
    pub pubsubname: String,
    /// The topic.
    pub topic: String,
    /// The path Dapr posts this topic's events to, e.g. `/dapr/task-updates`.
    pub route: String,
    /// Publish to the channel this template names, e.g. `project:{data.projectId}`.
    #[serde(default)]
    pub channel: Option<String>,
    /// Publish to the user this template names, e.g. `{data.user_id}`.
    #[serde(default)]
    pub user: Option<String>,
    /// Publish to every connection.
    #[serde(default)]
    pub broadcast: bool,
    /// Ask Dapr for bulk delivery (`bulkSubscribe`).
    #[serde(default)]
    pub bulk: bool,
}

/// Where a subscription's events go.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Destination {
    Channel(Template),
    User(Template),
    Broadcast,
}

/// A name with `{path.to.field}` holes filled from the CloudEvent.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Template(Vec<Part>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Vec<String>),
}

impl Template {
    fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find('{') {
                Some(0) => {
                    let end = rest
                        .find('}')
                        .ok_or_else(|| format!("{text:?}: a {{ without its }}"))?;
                    let path: Vec<String> = rest[1..end].split('.').map(str::to_string).collect();
                    if path.iter().any(String::is_empty) {
                        return Err(format!("{text:?}: an empty field name between braces"));
                    }
                    parts.push(Part::Field(path));
                    rest = &rest[end + 1..];
                }
                found => {
                    let end = found.unwrap_or(rest.len());
                    if rest[..end].contains('}') {
                        return Err(format!("{text:?}: a }} without its {{"));
                    }
                    parts.push(Part::Text(rest[..end].to_string()));
                    rest = &rest[end..];
                }
            }
        }
        if parts.is_empty() {
            return Err("an empty template".into());
        }
        Ok(Template(parts))
    }

    /// The name for `event`, or why it cannot be made.
    fn fill(&self, event: &Value) -> Result<String, String> {
        let mut name = String::new();
        for part in &self.0 {
            match part {
                Part::Text(text) => name.push_str(text),
                Part::Field(path) => {
                    let value = path.iter().try_fold(event, |v, key| v.get(key));
                    match value {
                        Some(Value::String(s)) => name.push_str(s),
                        Some(Value::Number(n)) => name.push_str(&n.to_string()),
                        Some(_) => {
                            return Err(format!("{} is not a string or number", path.join(".")));
                        }
                        None => return Err(format!("the event has no {}", path.join("."))),
                    }
                }
            }
        }
        Ok(name)
    }
}

/// The compiled subscriptions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dapr {
    subscriptions: Vec<(DaprSubscription, Destination)>,
}

/// Dapr's verdict on one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Published (or already published under the same CloudEvent id).
    Success,
    /// Can never be mapped; Dapr drops it (and may dead-letter it).
    Drop,
    /// The engine could not take it now (Redis unreachable); Dapr redelivers it.
    Retry,
    /// Sent to the engine; its answer for this ticket decides.
    Waiting(u64),
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Success => "SUCCESS",
            Status::Drop => "DROP",
            Status::Retry | Status::Waiting(_) => "RETRY",
        }
    }
}

impl Dapr {
    /// Checks and compiles the configured subscriptions.
    ///
    /// # Errors
    /// What is wrong with which subscription.
    pub fn new(settings: &DaprSettings) -> Result<Dapr, String> {
        let mut subscriptions = Vec::new();
        for (i, sub) in settings.subscription.iter().enumerate() {
            let what = format!("subscription {} ({})", i + 1, sub.topic);
            if sub.pubsubname.is_empty() || sub.topic.is_empty() {
                return Err(format!("{what}: pubsubname and topic are required"));
            }
            let route_ok = sub.route.starts_with('/')
                && !sub.route.contains(['?', '#', ' '])
                && sub.route != "/publish"
                && sub.route != "/dapr/subscribe";
            if !route_ok {
                return Err(format!(
                    "{what}: route {:?} must be a path like /dapr/{}, other than /publish and /dapr/subscribe",
                    sub.route, sub.topic
                ));
            }
            if subscriptions
                .iter()
                .any(|(s, _): &(DaprSubscription, _)| s.route == sub.route)
            {
                return Err(format!("{what}: route {} is used twice", sub.route));
            }
            let destination = match (&sub.channel, &sub.user, sub.broadcast) {
                (Some(channel), None, false) => Destination::Channel(Template::parse(channel)?),
                (None, Some(user), false) => Destination::User(Template::parse(user)?),
                (None, None, true) => Destination::Broadcast,
                _ => {
                    return Err(format!(
                        "{what}: give exactly one of channel, user or broadcast = true"
                    ));
                }
            };
            subscriptions.push((sub.clone(), destination));
        }
        Ok(Dapr { subscriptions })
    }

    /// The subscription whose route is `path`.
    pub fn route(&self, path: &str) -> Option<usize> {
        self.subscriptions.iter().position(|(s, _)| s.route == path)
    }

    /// The body of `GET /dapr/subscribe`.
    pub fn subscribe_json(&self) -> String {
        let list: Vec<Value> = self
            .subscriptions
            .iter()
            .map(|(sub, _)| {
                let mut entry = serde_json::json!({
                    "pubsubname": sub.pubsubname,
                    "topic": sub.topic,
                    "route": sub.route,
                });
                if sub.bulk {
                    entry["bulkSubscribe"] = serde_json::json!({"enabled": true});
                }
                entry
            })
            .collect();
        Value::Array(list).to_string()
    }

    /// Publishes one event of subscription `n` through `sink`.
    pub fn deliver(&self, n: usize, event: &Value, sink: &mut impl Sink) -> Status {
        let (sub, destination) = &self.subscriptions[n];
        match self.map(destination, event) {
            Ok((target, data, key)) => match sink.publish(&target, &data, Some(&key), None) {
                Outcome::Done(_) | Outcome::Members(_) => Status::Success,
                Outcome::Unavailable | Outcome::Refused { retry: true, .. } => Status::Retry,
                Outcome::Refused { retry: false, .. } => Status::Drop,
                Outcome::Waiting(ticket) => Status::Waiting(ticket),
            },
            Err(why) => {
                let id = event.get("id").and_then(Value::as_str).unwrap_or("?");
                log::warn!("dapr topic {}: dropped event {id}: {why}", sub.topic);
                Status::Drop
            }
        }
    }

    fn map(
        &self,
        destination: &Destination,
        event: &Value,
    ) -> Result<(Target<'static>, Box<RawValue>, String), String> {
        let id = event
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .ok_or("not a CloudEvent: no string id")?;
        if event.get("data_base64").is_some() {
            return Err("binary data (data_base64) cannot become a JSON event".into());
        }
        let data = event.get("data").ok_or("the event has no data")?;
        let target = match destination {
            Destination::Channel(template) => {
                let channel = template.fill(event)?;
                check_publishable(&channel)?;
                Target::Channel(Cow::Owned(channel))
            }
            Destination::User(template) => {
                let user = template.fill(event)?;
                check_user(&user)?;
                Target::User(Cow::Owned(user))
            }
            Destination::Broadcast => Target::Broadcast,
        };
        let data = serde_json::value::to_raw_value(data).map_err(|e| e.to_string())?;
        let source = event
            .get("source")
            .and_then(Value::as_str)
            .unwrap_or_default();
        Ok((target, data, idempotency_key(source, id)))
    }

    /// Delivers the events of the body Dapr posted to subscription `n` (one CloudEvent, or
    /// the bulk format) from where `progress` stopped, while the sink has capacity. Returns
    /// the response body once every event is done and answered; `None` while the budget ran
    /// out first or an engine's answer is awaited ([`Progress::is_waiting`]).
    pub fn step(
        &self,
        n: usize,
        body: &Value,
        progress: &mut Progress,
        sink: &mut impl Sink,
    ) -> Option<String> {
        let entries = body.get("entries").and_then(Value::as_array);
        let count = entries.map_or(1, Vec::len);
        while progress.statuses.len() < count {
            if !sink.has_capacity() {
                return None;
            }
            let (entry_id, status) = match entries {
                None => (Value::Null, self.deliver(n, body, sink)),
                Some(entries) => {
                    let entry = &entries[progress.statuses.len()];
                    let status = match entry.get("event") {
                        Some(event) if event.is_object() => self.deliver(n, event, sink),
                        _ => Status::Drop,
                    };
                    let id = entry.get("entryId").cloned().unwrap_or(Value::Null);
                    (id, status)
                }
            };
            progress.statuses.push((entry_id, status));
        }
        if progress.is_waiting() {
            return None;
        }
        let statuses = std::mem::take(&mut progress.statuses);
        if entries.is_none() {
            return Some(format!("{{\"status\":\"{}\"}}", statuses[0].1.as_str()));
        }
        let statuses: Vec<Value> = statuses
            .into_iter()
            .map(|(id, status)| serde_json::json!({"entryId": id, "status": status.as_str()}))
            .collect();
        Some(serde_json::json!({ "statuses": statuses }).to_string())
    }
}

/// How far a Dapr request's events have been delivered (see [`Dapr::step`]).
#[derive(Debug, Default)]
pub struct Progress {
    /// Each entry delivered so far (a single event's id is `null`), with its status.
    statuses: Vec<(Value, Status)>,
}

impl Progress {
    /// Some event waits for the engine's answer.
    pub fn is_waiting(&self) -> bool {
        self.statuses
            .iter()
            .any(|(_, s)| matches!(s, Status::Waiting(_)))
    }

    /// The engine answered `ticket`: `stored` or not. Returns whether it was one of these.
    pub fn complete(&mut self, ticket: u64, stored: bool) -> bool {
        let Some((_, status)) = self
            .statuses
            .iter_mut()
            .find(|(_, s)| *s == Status::Waiting(ticket))
        else {
            return false;
        };
        *status = if stored {
            Status::Success
        } else {
            Status::Retry
        };
        true
    }
}

/// `ce:<source>:<id>` (the pair CloudEvents makes unique), hashed when it is too long.
fn idempotency_key(source: &str, id: &str) -> String {
    let key = format!("ce:{source}:{id}");
    if key.len() <= MAX_IDEM_LEN {
        return key;
    }
    // Fixed keys, so every node (and every restart) derives the same key.
    let mut hasher = std::hash::DefaultHasher::new();
    (source, id).hash(&mut hasher);
    format!("ce:#{:016x}", hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::testing::{Recorded, Recorder};

    fn handle(dapr: &Dapr, n: usize, body: &Value, sink: &mut Recorder) -> String {
        dapr.step(n, body, &mut Progress::default(), sink)
            .expect("unlimited capacity")
    }

    fn dapr(toml: &str) -> Result<Dapr, String> {
        let settings: DaprSettings = toml::from_str(toml).map_err(|e| e.to_string())?;
        Dapr::new(&settings)
    }

    const TASKS: &str = r#"
        [[subscription]]
        pubsubname = "kafka"
        topic = "task-updates"
        route = "/dapr/task-updates"
        user = "{data.user_id}"
        bulk = true

        [[subscription]]
        pubsubname = "kafka"
        topic = "projects"
        route = "/dapr/projects"
        channel = "project:{data.projectId}"
    "#;

    #[test]
    fn lists_subscriptions_in_dapr_format() {
        let dapr = dapr(TASKS).unwrap();
        let list: Value = serde_json::from_str(&dapr.subscribe_json()).unwrap();
        assert_eq!(
            list,
            serde_json::json!([
                {"pubsubname": "kafka", "topic": "task-updates", "route": "/dapr/task-updates",
                 "bulkSubscribe": {"enabled": true}},
                {"pubsubname": "kafka", "topic": "projects", "route": "/dapr/projects"},
            ])
        );
        assert_eq!(dapr.route("/dapr/projects"), Some(1));
        assert_eq!(dapr.route("/dapr/other"), None);
    }

    #[test]
    fn maps_events_through_templates_and_drops_what_cannot_be_mapped() {
        let dapr = dapr(TASKS).unwrap();
        let mut sink = Recorder::new(usize::MAX);
        let event = serde_json::json!({
            "specversion": "1.0", "id": "e-1", "source": "tasks", "type": "task.updated",
            "datacontenttype": "application/json",
            "data": {"projectId": 42, "status": "done"},
        });
        assert_eq!(
            handle(&dapr, 1, &event, &mut sink),
            r#"{"status":"SUCCESS"}"#
        );
        assert_eq!(
            sink.published[0],
            Recorded {
                target: "channel project:42".to_string(),
                data: r#"{"projectId":42,"status":"done"}"#.to_string(),
                idem: "ce:tasks:e-1".to_string()
            }
        );
        for bad in [
            serde_json::json!({"id": "e-2", "data": {"status": "done"}}),
            serde_json::json!({"id": "e-3", "data": {"projectId": "a b"}}),
            serde_json::json!({"id": "e-4", "data_base64": "AAAA", "data": {"projectId": 1}}),
            serde_json::json!({"data": {"projectId": 1}}),
            serde_json::json!({"id": "e-5", "data": {"projectId": {"nested": true}}}),
        ] {
            assert_eq!(
                handle(&dapr, 1, &bad, &mut sink),
                r#"{"status":"DROP"}"#,
                "{bad}"
            );
        }
        assert_eq!(sink.published.len(), 1, "nothing dropped was published");
    }

    #[test]
    fn answers_bulk_deliveries_entry_by_entry() {
        let dapr = dapr(TASKS).unwrap();
        let mut sink = Recorder::new(usize::MAX);
        let bulk = serde_json::json!({
            "id": "b-1", "topic": "task-updates", "pubsubname": "kafka",
            "type": "com.dapr.event.sent.bulk",
            "entries": [
                {"entryId": "1", "contentType": "application/cloudevents+json",
                 "event": {"id": "t-1", "source": "s", "data": {"user_id": "u1", "progress": 10}}},
                {"entryId": "2", "contentType": "application/cloudevents+json",
                 "event": {"id": "t-2", "source": "s", "data": {"progress": 20}}},
                {"entryId": "3", "contentType": "text/plain", "event": "raw"},
            ],
        });
        let answer: Value = serde_json::from_str(&handle(&dapr, 0, &bulk, &mut sink)).unwrap();
        assert_eq!(
            answer,
            serde_json::json!({"statuses": [
                {"entryId": "1", "status": "SUCCESS"},
                {"entryId": "2", "status": "DROP"},
                {"entryId": "3", "status": "DROP"},
            ]})
        );
        assert_eq!(sink.published[0].target, "user u1");
    }

    #[test]
    fn a_bulk_delivery_stops_when_the_budget_does_and_resumes_in_order() {
        let dapr = dapr(TASKS).unwrap();
        let event = |id: &str, progress: u32| {
            serde_json::json!({"entryId": id, "event": {"id": id, "source": "s",
                               "data": {"user_id": "u1", "progress": progress}}})
        };
        let bulk = serde_json::json!({"entries": [event("1", 10), event("2", 20), event("3", 30)]});
        let mut sink = Recorder::new(2);
        let mut progress = Progress::default();
        assert_eq!(
            dapr.step(0, &bulk, &mut progress, &mut sink),
            None,
            "two of three"
        );
        assert_eq!(sink.published.len(), 2);
        sink.budget = 10;
        let answer: Value =
            serde_json::from_str(&dapr.step(0, &bulk, &mut progress, &mut sink).unwrap()).unwrap();
        assert_eq!(answer["statuses"].as_array().unwrap().len(), 3);
        let order = sink.data();
        assert_eq!(order.len(), 3);
        assert!(order[2].contains("30"), "{order:?}");
        let mut empty = Recorder::new(0);
        let single = bulk["entries"][0]["event"].clone();
        assert_eq!(
            dapr.step(0, &single, &mut Progress::default(), &mut empty),
            None
        );
    }

    #[test]
    fn bad_subscriptions_are_refused_with_a_reason() {
        let one = |extra: &str| {
            dapr(&format!(
                "[[subscription]]\npubsubname = \"p\"\ntopic = \"t\"\n{extra}"
            ))
        };
        assert!(one("route = \"/r\"\nchannel = \"a:{data.x}\"").is_ok());
        assert!(one("route = \"/r\"").unwrap_err().contains("exactly one"));
        assert!(
            one("route = \"/r\"\nchannel = \"a\"\nbroadcast = true")
                .unwrap_err()
                .contains("exactly one")
        );
        assert!(
            one("route = \"r\"\nbroadcast = true")
                .unwrap_err()
                .contains("route")
        );
        assert!(
            one("route = \"/publish\"\nbroadcast = true")
                .unwrap_err()
                .contains("route")
        );
        assert!(
            one("route = \"/r\"\nchannel = \"a:{data.x\"")
                .unwrap_err()
                .contains("without")
        );
        assert!(
            one("route = \"/r\"\nchannel = \"a:{}\"")
                .unwrap_err()
                .contains("empty")
        );
        assert!(one("route = \"/r\"\nbroadcast = true\nbogus = 1").is_err());
        let twice = "[[subscription]]\npubsubname = \"p\"\ntopic = \"t\"\nroute = \"/r\"\nbroadcast = true\n";
        assert!(
            dapr(&format!("{twice}{twice}"))
                .unwrap_err()
                .contains("twice")
        );
    }

    #[test]
    fn long_source_and_id_pairs_are_hashed_into_a_bounded_key() {
        assert_eq!(idempotency_key("s", "1"), "ce:s:1");
        let long = idempotency_key(&"s".repeat(200), "1");
        assert!(long.len() <= MAX_IDEM_LEN && long.starts_with("ce:#"));
        assert_ne!(long, idempotency_key(&"s".repeat(200), "2"));
    }
}
