//! `GET /health`: a small JSON document for load balancers and orchestrators.

/// The health document: always `ok` while the loop answers, with a few figures.
pub fn health_json(connections: u64, channels: usize, uptime_secs: u64) -> String {
    format!(
        "{{\"status\":\"ok\",\"connections\":{connections},\"channels\":{channels},\"uptimeSecs\":{uptime_secs}}}"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn is_json_with_the_figures() {
        let value: serde_json::Value = serde_json::from_str(&super::health_json(3, 2, 7)).unwrap();
        assert_eq!(value["status"], "ok");
        assert_eq!(value["connections"], 3);
        assert_eq!(value["channels"], 2);
        assert_eq!(value["uptimeSecs"], 7);
    }
}
