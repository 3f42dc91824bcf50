//! Settings → a validated, typed [`Config`].
//!
//! ```text
//!  declared defaults ◄── TOML file (--config) ◄── command-line flags
//!         └────────────── merged Settings ──► Config::from_settings ──► Config
//! ```
//! Every setting is declared once, below, in `settings!` (`config/declare.rs`): its name (the flag
//! `--some-name` is the key `some_name`), its type, its default, its value name and its doc.
//! From that come the flags and the TOML schema ([`Settings`], each field optional so layers
//! can merge), the typed [`Config`] and its `Default`, the `[default: …]` in `--help`, and
//! [`SETTINGS`], the table `sidecast config` prints. Adding a setting is one line here, plus
//! its range check in `validate` if it has one.
//!
//! This module reads the config file and nothing else; it never panics on bad input.
//!
//! - `declare`: the `settings!` macro.
//! - [`values`]: the types settings are written in, and TOML parsing through `FromStr`.

mod declare;
pub mod values;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use log::LevelFilter;

use crate::auth::jwt::{JwtKey, Verifier};
use crate::error::ConfigError;
use crate::publish::dapr::{Dapr, DaprSettings};
use declare::settings;
pub use values::{
    ByteSize, Cidr, Dashboard, EngineKind, FileMode, HumanDuration, JwtAlgorithm, RedisUrl, Setting,
};

/// Environment variable that can hold the HS256 secret, to keep it out of process listings.
pub const JWT_SECRET_ENV: &str = "SIDECAST_JWT_SECRET";
/// Environment variable that can hold the publish key of `publish_listen`.
pub const PUBLISH_KEY_ENV: &str = "SIDECAST_PUBLISH_KEY";
/// Environment variable that can hold the Redis URL (with its password), when no
/// `redis_url` is given.
pub const REDIS_URL_ENV: &str = "SIDECAST_REDIS_URL";
/// Environment variable that can hold the Sentinels' password.
pub const REDIS_SENTINEL_PASSWORD_ENV: &str = "SIDECAST_REDIS_SENTINEL_PASSWORD";

/// The shortest duration setting: the timer wheel's tick.
pub const TIMER_TICK: Duration = Duration::from_millis(10);

settings! {
    values {
        listen: SocketAddr = "127.0.0.1:3001", "ADDR", "Address for WebSocket and HTTP; port 0 picks a free port";
        publish_socket: PathBuf = "./sidecast.sock", "PATH", "Path of the publish port's Unix socket";
        heartbeat_interval: HumanDuration = "30s", "DURATION", "Time between WebSocket Pings to each client";
        heartbeat_timeout: HumanDuration = "60s", "DURATION", "Close a client silent for this long (longer than heartbeat_interval)";
        sse_heartbeat_interval: HumanDuration = "15s", "DURATION", "Time between comment lines on an idle Server-Sent Events stream (GET /sse), so proxies do not cut it; keep it under your proxies' idle timeout";
        token_cookie: String = "sidecast_token", "NAME", "Cookie that may carry the token when the request has no token parameter or Authorization header (GET /sse, GET /ws); an empty name turns cookies off";
        handshake_timeout: HumanDuration = "10s", "DURATION", "Drop a TCP connection that has not completed its HTTP request by then";
        close_timeout: HumanDuration = "2s", "DURATION", "Drop a closing connection that has not finished closing by then";
        shutdown_timeout: HumanDuration = "5s", "DURATION", "Exit at the latest this long after SIGTERM/SIGINT";
        shutdown_drain: HumanDuration = "3s", "DURATION", "On shutdown, close WebSockets spread over this window so their reconnects do not arrive at once";
        write_stall_timeout: HumanDuration = "10s", "DURATION", "Close a connection whose queued output has not moved for this long (slow consumer, 1008)";
        send_buffer_size: ByteSize = "64KiB", "SIZE", "Kernel send buffer (SO_SNDBUF) per WebSocket; 0 leaves it to the kernel's autotuning, which grows it to a few megabytes";
        max_connections: usize = "10000", "COUNT", "Open WebSockets at most; further upgrades get HTTP 503";
        max_message_size: ByteSize = "64KiB", "SIZE", "Largest client frame or message (inflated, when compressed); larger ones close with 1009";
        permessage_deflate: bool = "true", "BOOL", "Accept a browser's offer of permessage-deflate (RFC 7692): each event is compressed once and the compressed frame shared by every subscriber that agreed, with no compressor per connection"
            [num_args = 0..=1, require_equals = true, default_missing_value = "true"];
        deflate_min_size: ByteSize = "128B", "SIZE", "Events whose frame payload is smaller than this go uncompressed even to connections that agreed to compression";
        max_subscriptions: usize = "100", "COUNT", "Channels one connection may subscribe to";
        max_pending_acks: usize = "10000", "COUNT", "Events published with ack that may await their pages' acks at once; past it an ack publish is refused with ack_capacity (retry)";
        max_unacked_per_connection: usize = "100", "COUNT", "Acknowledged events one connection may leave unanswered; for further ones it counts as timed out at once";
        max_ack_timeout: HumanDuration = "60s", "DURATION", "Longest ack timeout a publish may ask for";
        ack_grace: HumanDuration = "250ms", "DURATION", "Under the Redis engine, how long past its timeout an ack report waits for other nodes' counts in transit before counting a silent node's pages as lost";
        presence_linger: HumanDuration = "5s", "DURATION", "How long a presence member stays after its last connection closed: one back within it (a reload, a reconnect, a deploy) makes no leave and no join";
        presence_window: HumanDuration = "100ms", "DURATION", "Presence joins and leaves of a channel are gathered this long into one presence_diff message per page";
        max_presence_members: usize = "1000", "COUNT", "Members a presence snapshot or change lists at most; beyond it pages get the counts only";
        max_output_buffer: ByteSize = "1MiB", "SIZE", "Unsent bytes per connection before it is closed as a slow consumer (1008)";
        max_header_size: ByteSize = "8KiB", "SIZE", "Largest HTTP request head; larger ones get 431";
        max_publish_line: ByteSize = "1MiB", "SIZE", "Longest publish line; longer ones get an error and the publisher is closed";
        read_buffer_size: ByteSize = "128B", "SIZE", "Per-connection buffer for partial client frames; grows as needed";
        log_level: LevelFilter = "info", "LEVEL", "Log level: error, warn, info, debug, trace or off; RUST_LOG overrides it";
        require_origin: bool = "false", "BOOL", "Refuse WebSocket upgrades without an Origin header (non-browser clients)"
            [num_args = 0..=1, require_equals = true, default_missing_value = "true"];
        reuse_port: bool = "false", "BOOL", "Let several nodes on this host listen on the same WebSocket address (SO_REUSEPORT): the kernel spreads new connections over them; needs --engine redis"
            [num_args = 0..=1, require_equals = true, default_missing_value = "true"];
        reuse_port_without_redis: bool = "false", "BOOL", "Allow reuse_port with the memory engine: each node then serves only its own subscribers, and a publish reaches only the node it was sent to"
            [num_args = 0..=1, require_equals = true, default_missing_value = "true"];
        rate_limit: f64 = "20", "PER_SECOND", "Client messages per second per connection";
        rate_burst: u32 = "50", "COUNT", "Client messages a connection may send in one burst";
        rate_limit_strikes: u32 = "20", "COUNT", "Rate-limited messages before the connection is closed with 1008";
        publish_socket_mode: FileMode = "0660", "MODE", "File mode of the publish socket, in octal";
        max_publishers: usize = "1024", "COUNT", "Open publish-port connections at most; an idle one holds about 300 B";
        jwt_leeway: HumanDuration = "10s", "DURATION", "Accept tokens this long past their exp";
        max_connections_per_user: usize = "3", "COUNT", "Open WebSockets per authenticated user; the next is closed with 4008";
        history_size: usize = "100", "COUNT", "Recent events each channel keeps so reconnecting clients can resume; 0 disables";
        history_ttl: HumanDuration = "5m", "DURATION", "Events older than this leave the history";
        history_max_bytes: ByteSize = "1MiB", "SIZE", "Bytes of events each channel's history may hold";
        max_idempotency_keys: usize = "100000", "COUNT", "Publish idempotency keys (idem, CloudEvent ids) remembered at once; the oldest is forgotten first; 0 ignores idem";
        idempotency_window: HumanDuration = "10m", "DURATION", "How long a publish's idempotency key is remembered: a retry within it is answered with the first result";
        max_quiet_channels: usize = "100000", "COUNT", "Channels without any event remembered at once after their last subscriber left, so a resume at seq 0 is not told of a gap";
        engine: EngineKind = "memory", "ENGINE", "Where seqs, history and cross-node delivery live: memory (this process, one node) or redis (nodes share them through Redis or Redis Cluster)";
        redis_tls: bool = "false", "BOOL", "Use TLS for every Redis connection (cluster nodes and Sentinels included), as a rediss:// URL does for its own"
            [num_args = 0..=1, require_equals = true, default_missing_value = "true"];
        redis_prefix: String = "sidecast:", "PREFIX", "Prefix of every Redis key and shard channel sidecast uses";
        redis_timeout: HumanDuration = "2s", "DURATION", "A Redis reply later than this marks the connection down: publishes answer unavailable until it is back";
        redis_check_interval: HumanDuration = "30s", "DURATION", "With the redis engine, how often each channel with local subscribers compares what this node delivered with Redis's position, and fills any difference from the stream (a safety net: each repair is logged and counted)";
        redis_max_in_flight: usize = "65536", "COUNT", "With the redis engine, publishes sent to Redis and not yet answered, node-wide; past it publishers pause until Redis answers";
        redis_max_in_flight_bytes: ByteSize = "64MiB", "SIZE", "The same bound in bytes of event data waiting for Redis";
        user_lease_ttl: HumanDuration = "30s", "DURATION", "With the redis engine, how long a node's claim on a user's connection lasts unless refreshed: a crashed node's connections stop counting against max_connections_per_user after this";
        dashboard: Dashboard = "auto", "WHEN", "Serve the dashboard at GET / and publish stats to sidecast:stats once a second: auto (when listening on loopback), on or off";
    }
    options {
        publish_listen: SocketAddr, "ADDR", "Also take publishes over HTTP on this TCP address (for workers in other containers of the pod); needs publish_key unless it is a loopback address", "off";
        publish_key: String, "KEY", "The key HTTP publishes on publish_listen must present (Authorization: Bearer); prefer SIDECAST_PUBLISH_KEY", "so publish_listen must be a loopback address";
        node_id: String, "ID", "This node's name in Redis (leases, logs); letters, digits, - and _", "random";
        redis_master_name: String, "NAME", "The name the Sentinels (redis_sentinel) know the primary by", "needed with redis_sentinel";
        redis_sentinel_password: String, "PASSWORD", "The Sentinels' own password (the data password goes in redis_url); prefer SIDECAST_REDIS_SENTINEL_PASSWORD", "Sentinels without a password";
        redis_tls_ca: PathBuf, "FILE", "PEM file of the CA certificates Redis's TLS certificates are checked against", "the system's root certificates";
        redis_tls_cert: PathBuf, "FILE", "PEM client certificate (chain) for a Redis that asks for one (mTLS); needs redis_tls_key", "no client certificate";
        redis_tls_key: PathBuf, "FILE", "PEM private key of redis_tls_cert", "none";
        redis_tls_server_name: String, "NAME", "The name every Redis certificate is checked against (and sent as SNI), instead of each node's host: for nodes known by IP address", "each node's host";
        connect_rate_per_ip: f64, "PER_SECOND", "New WebSockets per second per client address, bursts of twice that; recommended when clients connect directly, not through a proxy", "off";
    }
    inputs {
        jwt_secret: String, "SECRET", "Turn on authentication with HS256 tokens signed with this secret (or set SIDECAST_JWT_SECRET)", "auth off";
        jwt_public_key: PathBuf, "FILE", "Turn on authentication with RS256/ES256 tokens, verified with this PEM public key", "auth off";
        jwt_algorithm: JwtAlgorithm, "ALGORITHM", "The algorithm of --jwt-public-key: RS256 or ES256", "needed with jwt_public_key";
    }
    lists {
        allowed_origin: String, "ORIGIN", "Origin allowed to open a WebSocket, e.g. `https://app.example.com`, or `*` (repeatable)", "so only same-host pages";
        trusted_proxies: Cidr, "CIDR", "Proxy addresses or CIDRs whose X-Forwarded-For is believed, e.g. 10.0.0.0/8 (repeatable, or comma-separated)", "so the TCP peer is the client"
            [value_delimiter = ','];
        redis_url: RedisUrl, "URL", "Redis to use with --engine redis, e.g. redis://127.0.0.1:6379 or rediss://user:pass@host:6380 (repeatable: a cluster's seed nodes; or set SIDECAST_REDIS_URL). With redis_sentinel, only its scheme and credentials are used", "SIDECAST_REDIS_URL, needed with --engine redis unless redis_sentinel";
        redis_sentinel: String, "HOST:PORT", "A Sentinel to ask for the primary (repeatable); needs redis_master_name", "no Sentinel";
        presence_channels: String, "PATTERN", "Channels with presence: their subscribers are members, and get the member list and its changes; `doc:*` for a prefix (repeatable, or comma-separated)", "no presence"
            [value_delimiter = ','];
    }
    files {
        dapr: DaprSettings, "Dapr subscriptions ([[dapr.subscription]]): broker topics whose CloudEvents are published to channels";
    }
    derived {
        /// How tokens are verified (from `jwt_secret`, or `jwt_public_key` and
        /// `jwt_algorithm`); `None` turns authentication off.
        jwt: Option<JwtKey> = jwt_key;
        /// The Dapr subscriptions, checked.
        dapr: Dapr = dapr_subscriptions;
    }
}

/// One declared setting, as `sidecast config` prints it.
#[derive(Clone, Copy, Debug)]
pub struct Declared {
    /// The TOML key (and, with dashes, the flag).
    pub key: &'static str,
    /// What the value looks like.
    pub value_name: &'static str,
    /// What it does.
    pub doc: &'static str,
    /// The default, for settings that always have a value.
    pub default: Option<&'static str>,
    /// Written as a TOML string.
    pub quoted: bool,
    /// A TOML array.
    pub list: bool,
}

/// The declared default of `key`, as text (`None` for a setting that is off by default).
pub fn default_of(key: &str) -> Option<&'static str> {
    SETTINGS
        .iter()
        .find(|s| s.key == key)
        .and_then(|s| s.default)
}

/// Parses a declared default; a default that does not parse is a bug caught by every test.
fn declared_default<T: Setting>(key: &str, text: &str) -> T::Value {
    match text.parse::<T>() {
        Ok(value) => value.value(),
        Err(_) => panic!("the declared default of {key} ({text:?}) does not parse"),
    }
}

/// A complete TOML file of every setting with its default and doc: what `sidecast config`
/// prints. Settings that are off by default are commented out.
pub fn render_defaults() -> String {
    let mut out = String::from(
        "# sidecast configuration: every setting with its default.\n\
         # Use it with `sidecast serve --config FILE`; flags override the file.\n",
    );
    for setting in SETTINGS {
        let _ = write!(out, "\n# {}\n", setting.doc);
        let value = |text: &str| {
            if setting.quoted {
                format!("{text:?}")
            } else {
                text.to_string()
            }
        };
        match (setting.default, setting.list) {
            (Some(default), _) => {
                let _ = writeln!(out, "{} = {}", setting.key, value(default));
            }
            (None, true) => {
                let _ = writeln!(out, "# {} = [{}]", setting.key, value(setting.value_name));
            }
            (None, false) => {
                let _ = writeln!(out, "# {} = {}", setting.key, value(setting.value_name));
            }
        }
    }
    out.push_str(DAPR_EXAMPLE);
    out
}

/// The commented `[[dapr.subscription]]` example `sidecast config` ends with.
const DAPR_EXAMPLE: &str = "
# Dapr subscriptions: events on a broker topic reach channels (see docs/publishing.md).
# Give exactly one of channel (a template over the CloudEvent), user, or broadcast = true.
# [[dapr.subscription]]
# pubsubname = \"kafka-pubsub\"
# topic = \"task-updates\"
# route = \"/dapr/task-updates\"
# user = \"{data.user_id}\"
# bulk = false
";

impl Config {
    /// The window a graceful shutdown spreads its closes over: `shutdown_drain`, shortened
    /// where needed so that the last connection closed still has `close_timeout` before
    /// `shutdown_timeout` ends everything.
    pub fn drain_window(&self) -> Duration {
        let latest = self.shutdown_timeout.saturating_sub(self.close_timeout);
        self.shutdown_drain.min(latest)
    }

    /// Whether the dashboard and its stats feed are on: `auto` means "when listening on a
    /// loopback address", where only this machine can reach it.
    pub fn dashboard_enabled(&self) -> bool {
        match self.dashboard {
            Dashboard::Auto => self.listen.ip().is_loopback(),
            Dashboard::On => true,
            Dashboard::Off => false,
        }
    }

    /// Resolves command-line settings: reads the `--config` file if one is named, lets the
    /// flags override it, fills in defaults and validates.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file or setting at fault.
    pub fn load(flags: Settings) -> Result<Config, ConfigError> {
        let mut settings = match &flags.config {
            Some(path) => {
                let file = Settings::from_file(path)?;
                flags.over(file)
            }
            None => flags,
        };
        if settings.jwt_secret.is_none() && settings.jwt_public_key.is_none() {
            settings.jwt_secret = std::env::var(JWT_SECRET_ENV).ok().filter(|s| !s.is_empty());
        }
        if settings.publish_key.is_none() {
            settings.publish_key = std::env::var(PUBLISH_KEY_ENV)
                .ok()
                .filter(|s| !s.is_empty());
        }
        if settings.redis_sentinel_password.is_none() {
            settings.redis_sentinel_password = std::env::var(REDIS_SENTINEL_PASSWORD_ENV)
                .ok()
                .filter(|s| !s.is_empty());
        }
        if settings.redis_url.is_empty()
            && let Ok(url) = std::env::var(REDIS_URL_ENV)
            && !url.is_empty()
        {
            settings.redis_url = vec![url.parse().map_err(|message| ConfigError::Invalid {
                key: "redis_url",
                message: format!("{REDIS_URL_ENV}: {message}"),
            })?];
        }
        Config::from_settings(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |key: &'static str, message: String| Err(ConfigError::Invalid { key, message });
        let durations = [
            ("heartbeat_interval", self.heartbeat_interval),
            ("heartbeat_timeout", self.heartbeat_timeout),
            ("sse_heartbeat_interval", self.sse_heartbeat_interval),
            ("handshake_timeout", self.handshake_timeout),
            ("close_timeout", self.close_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
            ("shutdown_drain", self.shutdown_drain),
            ("write_stall_timeout", self.write_stall_timeout),
            ("history_ttl", self.history_ttl),
            ("redis_timeout", self.redis_timeout),
            ("redis_check_interval", self.redis_check_interval),
            ("user_lease_ttl", self.user_lease_ttl),
            ("ack_grace", self.ack_grace),
            ("presence_window", self.presence_window),
        ];
        for (key, value) in durations {
            if value < TIMER_TICK {
                return invalid(
                    key,
                    format!("must be at least {TIMER_TICK:?}, got {value:?}"),
                );
            }
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return invalid(
                "heartbeat_timeout",
                format!(
                    "must be longer than heartbeat_interval ({:?}), got {:?}",
                    self.heartbeat_interval, self.heartbeat_timeout
                ),
            );
        }
        if let Some(addr) = self.publish_listen {
            match &self.publish_key {
                None if !addr.ip().is_loopback() => {
                    return invalid(
                        "publish_listen",
                        format!(
                            "{addr} is not a loopback address: set a publish key \
                             ({PUBLISH_KEY_ENV}, or publish_key) so that only your workers publish"
                        ),
                    );
                }
                Some(key) if key.len() < 16 => {
                    return invalid(
                        "publish_key",
                        format!("must be at least 16 bytes, got {}", key.len()),
                    );
                }
                _ => {}
            }
        }
        let rates = [
            Some(("rate_limit", self.rate_limit)),
            self.connect_rate_per_ip.map(|r| ("connect_rate_per_ip", r)),
        ];
        for (key, value) in rates.into_iter().flatten() {
            if !(value.is_finite() && value > 0.0) {
                return invalid(key, format!("must be a positive number, got {value}"));
            }
        }
        for origin in &self.allowed_origin {
            let valid = origin == "*"
                || origin.split_once("://").is_some_and(|(scheme, host)| {
                    !scheme.is_empty() && !host.is_empty() && !host.contains('/')
                });
            if !valid {
                return invalid(
                    "allowed_origin",
                    format!("{origin:?} is not an origin like https://app.example.com or *"),
                );
            }
        }
        let minimums = [
            ("rate_burst", self.rate_burst as usize, 1),
            ("rate_limit_strikes", self.rate_limit_strikes as usize, 1),
            ("max_publishers", self.max_publishers, 1),
            ("max_connections_per_user", self.max_connections_per_user, 1),
            ("redis_max_in_flight", self.redis_max_in_flight, 1),
            (
                "redis_max_in_flight_bytes",
                self.redis_max_in_flight_bytes,
                1024,
            ),
            ("max_connections", self.max_connections, 1),
            ("max_subscriptions", self.max_subscriptions, 1),
            ("max_pending_acks", self.max_pending_acks, 1),
            (
                "max_unacked_per_connection",
                self.max_unacked_per_connection,
                1,
            ),
            ("max_message_size", self.max_message_size, 128),
            ("max_output_buffer", self.max_output_buffer, 1024),
            ("max_header_size", self.max_header_size, 256),
            ("max_publish_line", self.max_publish_line, 128),
            ("read_buffer_size", self.read_buffer_size, 64),
        ];
        for (key, value, minimum) in minimums {
            if value < minimum {
                return invalid(key, format!("must be at least {minimum}, got {value}"));
            }
        }
        if self.engine == EngineKind::Redis
            && self.redis_url.is_empty()
            && self.redis_sentinel.is_empty()
        {
            return invalid(
                "redis_url",
                format!("--engine redis needs a redis_url (or {REDIS_URL_ENV}), or redis_sentinel"),
            );
        }
        if !self.redis_sentinel.is_empty() {
            if self.redis_master_name.is_none() {
                return invalid(
                    "redis_master_name",
                    "redis_sentinel needs the name the Sentinels know the primary by".into(),
                );
            }
            if self.redis_url.len() > 1 {
                return invalid(
                    "redis_url",
                    "with redis_sentinel, one redis_url at most: its credentials and scheme".into(),
                );
            }
            if let Some(bad) = self
                .redis_sentinel
                .iter()
                .find(|s| !values::is_host_port(s))
            {
                return invalid("redis_sentinel", format!("{bad:?}: expected host:port"));
            }
        }
        if self.redis_tls_cert.is_some() != self.redis_tls_key.is_some() {
            return invalid(
                "redis_tls_cert",
                "a client certificate needs its key, and a key its certificate: give both \
                 redis_tls_cert and redis_tls_key"
                    .into(),
            );
        }
        if self.reuse_port && self.engine == EngineKind::Memory && !self.reuse_port_without_redis {
            return invalid(
                "reuse_port",
                "nodes sharing a port must share their channels: use --engine redis (or add \
                 --reuse-port-without-redis to insist: each node then serves only its own \
                 subscribers, and a publish reaches only the node it was sent to)"
                    .into(),
            );
        }
        if self.redis_prefix.contains(['{', '}']) {
            return invalid(
                "redis_prefix",
                "may not contain { or }: sidecast puts each channel in a hash tag".into(),
            );
        }
        if let Some(id) = &self.node_id
            && (id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return invalid(
                "node_id",
                format!("{id:?}: 1 to 64 letters, digits, - and _"),
            );
        }
        if self.user_lease_ttl < Duration::from_secs(3) {
            return invalid(
                "user_lease_ttl",
                format!("must be at least 3s, got {:?}", self.user_lease_ttl),
            );
        }
        // A connection's queue counts in 32 bits (see `OutQueue`).
        const MAXIMUM: usize = 1 << 30;
        for (key, value) in [
            ("max_output_buffer", self.max_output_buffer),
            ("max_publish_line", self.max_publish_line),
            ("max_message_size", self.max_message_size),
        ] {
            if value > MAXIMUM {
                return invalid(key, format!("must be at most 1GiB, got {value}"));
            }
        }
        Ok(())
    }
}

impl Settings {
    /// Reads a TOML settings file.
    ///
    /// # Errors
    /// The file cannot be read, is not TOML, has an unknown key or a bad value.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}

/// The Dapr subscriptions the file describes, checked.
fn dapr_subscriptions(s: &Settings) -> Result<Dapr, ConfigError> {
    Dapr::new(&s.dapr).map_err(|message| ConfigError::Invalid {
        key: "dapr.subscription",
        message,
    })
}

/// The verification key the settings describe, read from its file when it is a public key.
fn jwt_key(s: &Settings) -> Result<Option<JwtKey>, ConfigError> {
    let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
    match (
        s.jwt_secret.clone(),
        s.jwt_public_key.clone(),
        s.jwt_algorithm,
    ) {
        (None, None, None) => Ok(None),
        (Some(_), Some(_), _) => invalid(
            "jwt_secret",
            "give either jwt_secret or jwt_public_key, not both".into(),
        ),
        (Some(_), None, Some(_)) => invalid(
            "jwt_algorithm",
            "applies to jwt_public_key; jwt_secret is HS256".into(),
        ),
        (Some(secret), None, None) if secret.len() < 32 => invalid(
            "jwt_secret",
            format!("must be at least 32 bytes for HS256, got {}", secret.len()),
        ),
        (Some(secret), None, None) => Ok(Some(JwtKey::Secret(secret.into_bytes()))),
        (None, Some(_), None) => invalid(
            "jwt_algorithm",
            "jwt_public_key needs jwt_algorithm (RS256 or ES256)".into(),
        ),
        (None, None, Some(_)) => invalid("jwt_algorithm", "needs jwt_public_key".into()),
        (None, Some(path), Some(algorithm)) => {
            let pem = std::fs::read(&path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let algorithm = match algorithm {
                JwtAlgorithm::Rs256 => Algorithm::RS256,
                JwtAlgorithm::Es256 => Algorithm::ES256,
            };
            let key = JwtKey::PublicKey { pem, algorithm };
            match Verifier::new(&key, Duration::ZERO) {
                Ok(_) => Ok(Some(key)),
                Err(e) => invalid("jwt_public_key", format!("{}: {e}", path.display())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};
    use std::net::IpAddr;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    fn from_flags(args: &[&str]) -> Result<Config, ConfigError> {
        let cli =
            Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied())).unwrap();
        Config::load(cli.settings)
    }

    #[test]
    fn help_advertises_the_real_defaults() {
        // Passing every "[default: X]" from --help explicitly must give the default config.
        let command = Cli::command();
        let mut args = Vec::new();
        for arg in command
            .get_arguments()
            .filter(|a| a.get_long() != Some("config"))
        {
            let help = arg.get_help().expect("every flag has help").to_string();
            let (_, default) = help.split_once("[default: ").expect(&help);
            let default = default.trim_end_matches(']');
            if default.starts_with("none") {
                continue; // an empty list, or an optional setting that is off by default
            }
            args.push(format!("--{}={default}", arg.get_long().unwrap()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(from_flags(&args).unwrap(), Config::default());
    }

    #[test]
    fn the_printed_defaults_are_a_config_file_that_gives_the_defaults() {
        let text = render_defaults();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sidecast.toml");
        std::fs::write(&path, &text).unwrap();
        let config = from_flags(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(config, Config::default());
        for setting in SETTINGS {
            assert!(text.contains(setting.key), "{} is printed", setting.key);
        }
        assert!(
            text.contains("# connect_rate_per_ip = PER_SECOND"),
            "off: commented out"
        );
        assert_eq!(default_of("publish_socket"), Some("./sidecast.sock"));
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sidecast.toml");
        std::fs::write(
            &path,
            "heartbeat_interval = \"5s\"\nmax_message_size = \"16KiB\"\nmax_connections = 7\n\
             max_output_buffer = 4096\n",
        )
        .unwrap();
        let config =
            from_flags(&["--config", path.to_str().unwrap(), "--max-connections", "9"]).unwrap();
        assert_eq!(config.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(config.max_message_size, 16 * 1024);
        assert_eq!(config.max_output_buffer, 4096);
        assert_eq!(config.max_connections, 9);
        assert_eq!(
            config.heartbeat_timeout,
            Config::default().heartbeat_timeout
        );
    }

    #[test]
    fn cidr_blocks() {
        let block = |s: &str| s.parse::<Cidr>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(block("10.0.0.0/8").contains(ip("10.200.3.4")));
        assert!(!block("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(block("10.1.2.3").contains(ip("10.1.2.3")));
        assert!(!block("10.1.2.3").contains(ip("10.1.2.4")));
        assert!(block("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(block("fd00::/8").contains(ip("fd12::1")));
        assert!(
            block("127.0.0.1").contains(ip("::ffff:127.0.0.1")),
            "IPv4-mapped"
        );
        assert!(!block("fd00::/8").contains(ip("10.0.0.1")));
        for bad in ["10.0.0.0/33", "nope", "::/129", "1.2.3.4/"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        let config = from_flags(&["--trusted-proxies", "10.0.0.0/8,192.168.0.1"]).unwrap();
        assert_eq!(config.trusted_proxies.len(), 2);
    }

    #[test]
    fn dapr_subscriptions_come_from_the_file_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sidecast.toml");
        let sub =
            "[[dapr.subscription]]\npubsubname = \"kafka\"\ntopic = \"t\"\nroute = \"/dapr/t\"\n";
        std::fs::write(&path, format!("{sub}user = \"{{data.user_id}}\"\n")).unwrap();
        let config = from_flags(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(config.dapr.route("/dapr/t"), Some(0));
        std::fs::write(&path, sub).unwrap();
        let error = from_flags(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(error.to_string().contains("dapr.subscription"), "{error}");
    }

    #[test]
    fn dashboard_is_on_by_default_only_on_loopback() {
        let on = |args: &[&str]| from_flags(args).unwrap().dashboard_enabled();
        assert!(on(&[]));
        assert!(on(&["--listen", "[::1]:3001"]));
        assert!(!on(&["--listen", "0.0.0.0:3001"]));
        assert!(on(&["--listen", "0.0.0.0:3001", "--dashboard", "on"]));
        assert!(!on(&["--dashboard", "off"]));
    }

    #[test]
    fn jwt_settings() {
        let secret = "s".repeat(32);
        let config = from_flags(&["--jwt-secret", &secret]).unwrap();
        assert_eq!(
            config.jwt,
            Some(JwtKey::Secret(secret.clone().into_bytes()))
        );
        assert_eq!(from_flags(&[]).unwrap().jwt, None, "auth is off by default");
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("key.pem");
        std::fs::write(&pem, "not a key").unwrap();
        let pem = pem.to_str().unwrap();
        for (args, key) in [
            (vec!["--jwt-secret", "short"], "jwt_secret"),
            (
                vec![
                    "--jwt-secret",
                    &secret,
                    "--jwt-public-key",
                    pem,
                    "--jwt-algorithm",
                    "RS256",
                ],
                "jwt_secret",
            ),
            (vec!["--jwt-public-key", pem], "jwt_algorithm"),
            (vec!["--jwt-algorithm", "ES256"], "jwt_algorithm"),
            (
                vec!["--jwt-public-key", pem, "--jwt-algorithm", "RS256"],
                "jwt_public_key",
            ),
        ] {
            let error = from_flags(&args).unwrap_err().to_string();
            assert!(error.contains(key), "{args:?}: {error}");
        }
    }

    #[test]
    fn errors_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        for (text, needle) in [
            ("hearbeat_interval = \"5s\"", "hearbeat_interval"),
            ("heartbeat_interval = \"soon\"", "heartbeat_interval"),
            ("max_message_size = \"lots\"", "max_message_size"),
            ("listen = 3", "listen"),
        ] {
            std::fs::write(&path, text).unwrap();
            let error = from_flags(&["--config", path.to_str().unwrap()])
                .unwrap_err()
                .to_string();
            assert!(error.contains(needle), "{text}: {error}");
        }
        let error = from_flags(&["--heartbeat-interval", "30s", "--heartbeat-timeout", "10s"]);
        assert!(error.unwrap_err().to_string().contains("heartbeat_timeout"));
        let error = from_flags(&["--max-connections", "0"]);
        assert!(error.unwrap_err().to_string().contains("max_connections"));
        let error = from_flags(&["--max-output-buffer", "2GiB"]);
        assert!(error.unwrap_err().to_string().contains("max_output_buffer"));
        let error = from_flags(&["--publish-listen", "0.0.0.0:3002"]);
        assert!(error.unwrap_err().to_string().contains("publish_listen"));
        let error = from_flags(&["--publish-listen", "0.0.0.0:3002", "--publish-key", "short"]);
        assert!(error.unwrap_err().to_string().contains("publish_key"));
        let key = "a-key-long-enough-for-this";
        let config = from_flags(&["--publish-listen", "0.0.0.0:3002", "--publish-key", key]);
        assert!(config.is_ok(), "a key makes a public address acceptable");
        assert!(
            from_flags(&["--publish-listen", "127.0.0.1:3002"]).is_ok(),
            "loopback"
        );
        let error = from_flags(&["--connect-rate-per-ip", "0"]);
        assert!(
            error
                .unwrap_err()
                .to_string()
                .contains("connect_rate_per_ip")
        );
    }
}
