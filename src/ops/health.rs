//! `GET /health`: a small JSON document for load balancers and orchestrators.
//!
//! `200` with `"status":"ok"` while the node can serve. Under the Redis engine, a node that
//! cannot reach every Redis shard, or has a channel with local subscribers subscribed on no
//! Redis connection, answers `503` with `"status":"unavailable"`: its WebSockets
//! stay open, but publishes fail and new subscribers wait, so a load balancer should steer
//! new connections to a node that can serve.

use crate::engine::SharedState;

/// The figures the document reports.
#[derive(Clone, Debug)]
pub struct Health {
    /// Open WebSockets.
    pub connections: u64,
    /// Channels with subscribers.
    pub channels: usize,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// The state of an engine shared by several nodes (Redis), when it runs one.
    pub shared: Option<SharedState>,
}

impl Health {
    /// Whether the node can serve.
    pub fn is_ok(&self) -> bool {
        self.shared.as_ref().is_none_or(|shared| shared.up)
    }

    /// The JSON document.
    pub fn json(&self) -> String {
        let Health {
            connections,
            channels,
            uptime_secs,
            ref shared,
        } = *self;
        let status = if self.is_ok() { "ok" } else { "unavailable" };
        let engine = match shared {
            None => "\"engine\":\"memory\"".to_string(),
            Some(r) => {
                // Under Sentinel: which primary, and how many promotions were seen.
                let sentinel = match &r.primary {
                    Some(primary) => format!(
                        ",\"primary\":{},\"switches\":{}",
                        serde_json::Value::from(primary.as_str()),
                        r.switches
                    ),
                    None => String::new(),
                };
                format!(
                    "\"engine\":\"redis\",\"redis\":{{\"up\":{},\"shardsUp\":{},\"shards\":{},\"unsubscribedChannels\":{}{sentinel}}}",
                    r.up, r.shards_up, r.shards, r.unsubscribed
                )
            }
        };
        format!(
            "{{\"status\":\"{status}\",\"connections\":{connections},\"channels\":{channels},\"uptimeSecs\":{uptime_secs},{engine}}}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_json_with_the_figures_and_the_engine_state() {
        let mut health = Health {
            connections: 3,
            channels: 2,
            uptime_secs: 7,
            shared: None,
        };
        let value: serde_json::Value = serde_json::from_str(&health.json()).unwrap();
        assert_eq!(value["status"], "ok");
        assert_eq!(value["connections"], 3);
        assert_eq!(value["channels"], 2);
        assert_eq!(value["uptimeSecs"], 7);
        assert_eq!(value["engine"], "memory");
        health.shared = Some(SharedState {
            shards: 3,
            shards_up: 2,
            ..SharedState::default()
        });
        assert!(!health.is_ok());
        let value: serde_json::Value = serde_json::from_str(&health.json()).unwrap();
        assert_eq!(value["status"], "unavailable");
        assert_eq!(value["redis"]["shardsUp"], 2);
        assert_eq!(value["redis"].get("primary"), None, "not under Sentinel");
        health.shared = Some(SharedState {
            primary: Some("10.0.0.2:6379".into()),
            switches: 1,
            ..SharedState::default()
        });
        let value: serde_json::Value = serde_json::from_str(&health.json()).unwrap();
        assert_eq!(value["redis"]["primary"], "10.0.0.2:6379");
        assert_eq!(value["redis"]["switches"], 1);
    }
}
