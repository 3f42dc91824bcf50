//! Settings → a validated, typed [`Config`].
//!
//! ```text
//!  defaults (DEFAULT_*) ◄── TOML file (--config) ◄── command-line flags
//!         └────────────── merged Settings ──► Config::from_settings ──► Config
//! ```
//! [`Settings`] is both the `sidecast serve` flag set (clap) and the TOML file schema (serde):
//! every flag `--some-name` is the key `some_name`. Each field is optional so that layers can be
//! merged; [`Config`] fills the gaps with the defaults and validates. This module reads the
//! config file and nothing else; it never panics on bad input.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use log::LevelFilter;
use serde::{Deserialize, Deserializer};

use jsonwebtoken::Algorithm;

use crate::auth::jwt::{JwtKey, Verifier};
use crate::error::ConfigError;

/// Default address for WebSocket and HTTP.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3001";
/// Default path of the publish socket.
pub const DEFAULT_PUBLISH_SOCKET: &str = "./sidecast.sock";
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_SHUTDOWN_DRAIN: Duration = Duration::from_secs(3);
const DEFAULT_WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_SEND_BUFFER_SIZE: usize = 64 * 1024;
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024;
const DEFAULT_MAX_SUBSCRIPTIONS: usize = 100;
const DEFAULT_MAX_OUTPUT_BUFFER: usize = 1024 * 1024;
const DEFAULT_MAX_HEADER_SIZE: usize = 8 * 1024;
const DEFAULT_MAX_PUBLISH_LINE: usize = 1024 * 1024;
const DEFAULT_READ_BUFFER_SIZE: usize = 128;
const DEFAULT_RATE_LIMIT: f64 = 20.0;
const DEFAULT_RATE_BURST: u32 = 50;
const DEFAULT_RATE_LIMIT_STRIKES: u32 = 20;
const DEFAULT_PUBLISH_SOCKET_MODE: u32 = 0o660;
const DEFAULT_MAX_PUBLISHERS: usize = 1024;
const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(10);
const DEFAULT_MAX_CONNECTIONS_PER_USER: usize = 3;
const DEFAULT_HISTORY_SIZE: usize = 100;
const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(300);
const DEFAULT_HISTORY_MAX_BYTES: usize = 1024 * 1024;
const DEFAULT_MAX_QUIET_CHANNELS: usize = 100_000;
/// Environment variable that can hold the HS256 secret, to keep it out of process listings.
pub const JWT_SECRET_ENV: &str = "SIDECAST_JWT_SECRET";

/// The shortest duration setting: the timer wheel's tick.
pub const TIMER_TICK: Duration = Duration::from_millis(10);

/// The resolved configuration of a server.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Address for WebSocket and HTTP. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Path of the publish port's Unix socket.
    pub publish_socket: PathBuf,
    /// Time between protocol Pings to each client.
    pub heartbeat_interval: Duration,
    /// A client silent for this long is closed. Greater than `heartbeat_interval`.
    pub heartbeat_timeout: Duration,
    /// A TCP connection must complete its HTTP request within this time.
    pub handshake_timeout: Duration,
    /// How long a closing connection may take to flush and acknowledge before it is dropped.
    pub close_timeout: Duration,
    /// Upper bound on a graceful shutdown.
    pub shutdown_timeout: Duration,
    /// A graceful shutdown closes WebSockets over this window rather than all at once, so
    /// their reconnects do not arrive as one storm. See [`Config::drain_window`].
    pub shutdown_drain: Duration,
    /// A connection whose queued output has not moved for this long is a slow consumer
    /// (close 1008), however little it holds.
    pub write_stall_timeout: Duration,
    /// `SO_SNDBUF` of each WebSocket connection, in bytes: what the kernel may hold for a
    /// peer on top of `max_output_buffer`. 0 leaves the kernel's autotuning on (megabytes).
    pub send_buffer_size: usize,
    /// Open WebSockets at most; the next upgrade gets HTTP 503.
    pub max_connections: usize,
    /// Largest client frame or message, in bytes (close 1009 beyond).
    pub max_message_size: usize,
    /// Channels one connection may subscribe to at most.
    pub max_subscriptions: usize,
    /// Unsent bytes one connection may hold; beyond, it is a slow consumer (close 1008).
    pub max_output_buffer: usize,
    /// Largest HTTP request head, in bytes (431 beyond).
    pub max_header_size: usize,
    /// Longest publish line, in bytes.
    pub max_publish_line: usize,
    /// Initial size of a connection's own buffer for partial frames (sockets are read through
    /// one shared 16 KiB buffer; this one grows only while a larger frame is incomplete).
    pub read_buffer_size: usize,
    /// Log level; `RUST_LOG`, when set, takes precedence.
    pub log_level: LevelFilter,
    /// Origins allowed to open a WebSocket (`https://app.example.com`, or `*`). Empty: only
    /// pages served from the host the request names (same origin).
    pub allowed_origins: Vec<String>,
    /// Refuse upgrades that carry no `Origin` header (non-browser clients) with 403.
    pub require_origin: bool,
    /// Client messages per second per connection (token bucket refill rate).
    pub rate_limit: f64,
    /// Client messages a connection may send in a burst.
    pub rate_burst: u32,
    /// Messages dropped by the rate limit, without the client calming down in between,
    /// before the connection is closed with 1008.
    pub rate_limit_strikes: u32,
    /// New WebSockets per second per client address (bursts of twice that); `None`, the
    /// default, turns the limit off. IPv6 addresses count per /64.
    pub connect_rate_per_ip: Option<f64>,
    /// Proxies whose `X-Forwarded-For` names the client address for `connect_rate_per_ip`
    /// and the logs. Empty: the TCP peer is the client.
    pub trusted_proxies: Vec<Cidr>,
    /// File mode of the publish socket.
    pub publish_socket_mode: u32,
    /// Open publish-port connections at most.
    pub max_publishers: usize,
    /// How tokens are verified; `None` turns authentication off.
    pub jwt: Option<JwtKey>,
    /// How far past `exp` a token is still accepted.
    pub jwt_leeway: Duration,
    /// Open WebSockets per authenticated user at most (close 4008 beyond).
    pub max_connections_per_user: usize,
    /// Recent events each channel keeps for resuming clients; 0 disables history.
    pub history_size: usize,
    /// Events older than this are dropped from the history.
    pub history_ttl: Duration,
    /// Bytes of event frames each channel's history may hold.
    pub history_max_bytes: usize,
    /// Channels that never had an event, remembered (with their epoch) for `history_ttl`
    /// after their last subscriber left, at most at once.
    pub max_quiet_channels: usize,
    /// Whether `GET /` serves the dashboard and the server publishes its stats feed.
    pub dashboard: Dashboard,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            publish_socket: PathBuf::from(DEFAULT_PUBLISH_SOCKET),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            shutdown_drain: DEFAULT_SHUTDOWN_DRAIN,
            write_stall_timeout: DEFAULT_WRITE_STALL_TIMEOUT,
            send_buffer_size: DEFAULT_SEND_BUFFER_SIZE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
            max_output_buffer: DEFAULT_MAX_OUTPUT_BUFFER,
            max_header_size: DEFAULT_MAX_HEADER_SIZE,
            max_publish_line: DEFAULT_MAX_PUBLISH_LINE,
            read_buffer_size: DEFAULT_READ_BUFFER_SIZE,
            log_level: LevelFilter::Info,
            allowed_origins: Vec::new(),
            require_origin: false,
            rate_limit: DEFAULT_RATE_LIMIT,
            rate_burst: DEFAULT_RATE_BURST,
            rate_limit_strikes: DEFAULT_RATE_LIMIT_STRIKES,
            connect_rate_per_ip: None,
            trusted_proxies: Vec::new(),
            publish_socket_mode: DEFAULT_PUBLISH_SOCKET_MODE,
            max_publishers: DEFAULT_MAX_PUBLISHERS,
            jwt: None,
            jwt_leeway: DEFAULT_JWT_LEEWAY,
            max_connections_per_user: DEFAULT_MAX_CONNECTIONS_PER_USER,
            history_size: DEFAULT_HISTORY_SIZE,
            history_ttl: DEFAULT_HISTORY_TTL,
            history_max_bytes: DEFAULT_HISTORY_MAX_BYTES,
            max_quiet_channels: DEFAULT_MAX_QUIET_CHANNELS,
            dashboard: Dashboard::Auto,
        }
    }
}

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
}

/// The `dashboard` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dashboard {
    /// On when `listen` is a loopback address.
    Auto,
    /// Always on.
    On,
    /// Always off: `GET /` is 404 and no stats are published.
    Off,
}

/// A duration written like `30s`, `500ms` or `1m 30s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s)
            .map(HumanDuration)
            .map_err(|e| format!("{e} (expected a duration like 30s or 500ms)"))
    }
}

/// A size in bytes written like `64KiB`, `1MiB` or `4096`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse::<bytesize::ByteSize>()
            .map(|size| ByteSize(size.as_u64()))
            .map_err(|e| format!("{e} (expected a size like 64KiB or 1MiB)"))
    }
}

/// A Unix file mode written in octal, like `0660`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileMode(pub u32);

impl FromStr for FileMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .ok()
            .filter(|mode| *mode <= 0o777)
            .map(FileMode)
            .ok_or_else(|| format!("{s:?} is not an octal file mode like 0660"))
    }
}

/// The algorithm of `--jwt-public-key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
pub enum JwtAlgorithm {
    /// RSA PKCS#1 v1.5 with SHA-256.
    #[serde(rename = "RS256")]
    #[value(name = "RS256")]
    Rs256,
    /// ECDSA P-256 with SHA-256.
    #[serde(rename = "ES256")]
    #[value(name = "ES256")]
    Es256,
}

/// The `serve` settings: command-line flags and TOML keys. Unset fields take the defaults.
#[derive(clap::Args, Deserialize, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// TOML file with settings (keys are the flag names in snake_case); flags override it
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address for WebSocket and HTTP [default: 127.0.0.1:3001]
    #[arg(long, value_name = "ADDR")]
    #[serde(default, deserialize_with = "parse")]
    pub listen: Option<SocketAddr>,
    /// Path of the publish port's Unix socket [default: ./sidecast.sock]
    #[arg(long, value_name = "PATH")]
    #[serde(default)]
    pub publish_socket: Option<PathBuf>,
    /// Time between WebSocket Pings to each client [default: 30s]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "parse")]
    pub heartbeat_interval: Option<HumanDuration>,
    /// Close a client silent for this long [default: 60s]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "parse")]
    pub heartbeat_timeout: Option<HumanDuration>,
    /// Drop a TCP connection that has not completed its HTTP request by then [default: 10s]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "parse")]
    pub handshake_timeout: Option<HumanDuration>,
    /// Drop a closing connection that has not finished closing by then [default: 2s]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "parse")]
    pub close_timeout: Option<HumanDuration>,
    /// Exit at the latest this long after SIGTERM/SIGINT [default: 5s]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "parse")]
    pub shutdown_timeout: Option<HumanDuration>,
    /// On shutdown, close WebSockets spread over this window so their reconnects do not
    /// arrive at once [default: 3s]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "parse")]
    pub shutdown_drain: Option<HumanDuration>,
    /// Close a connection whose queued output has not moved for this long (slow consumer,
    /// 1008) [default: 10s]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "parse")]
    pub write_stall_timeout: Option<HumanDuration>,
    /// Kernel send buffer (SO_SNDBUF) per WebSocket; 0 keeps the kernel's autotuning
    /// [default: 64KiB]
    #[arg(long, value_name = "SIZE")]
    #[serde(default, deserialize_with = "parse")]
    pub send_buffer_size: Option<ByteSize>,
    /// Open WebSockets at most; further upgrades get HTTP 503 [default: 10000]
    #[arg(long, value_name = "COUNT")]
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Largest client frame or message; larger ones close with 1009 [default: 64KiB]
    #[arg(long, value_name = "SIZE")]
    #[serde(default, deserialize_with = "parse")]
    pub max_message_size: Option<ByteSize>,
    /// Channels one connection may subscribe to [default: 100]
    #[arg(long, value_name = "COUNT")]
    #[serde(default)]
    pub max_subscriptions: Option<usize>,
    /// Unsent bytes per connection before it is closed as a slow consumer (1008) [default: 1MiB]
    #[arg(long, value_name = "SIZE")]
    #[serde(default, deserialize_with = "parse")]
    pub max_output_buffer: Option<ByteSize>,
    /// Largest HTTP request head; larger ones get 431 [default: 8KiB]
    #[arg(long, value_name = "SIZE")]
    #[serde(default, deserialize_with = "parse")]
    pub max_header_size: Option<ByteSize>,
    /// Longest publish line; longer ones get an error and the publisher is closed [default: 1MiB]
    #[arg(long, value_name = "SIZE")]
    #[serde(default, deserialize_with = "parse")]
    pub max_publish_line: Option<ByteSize>,
    /// Per-connection buffer for partial client frames; grows as needed [default: 128B]
    #[arg(long, value_name = "SIZE")]
    #[serde(default, deserialize_with = "parse")]
    pub read_buffer_size: Option<ByteSize>,
    /// Log level: error, warn, info, debug, trace or off; RUST_LOG overrides it [default: info]
    #[arg(long, value_name = "LEVEL")]
    #[serde(default, deserialize_with = "parse")]
    pub log_level: Option<LevelFilter>,
    /// Origin allowed to open a WebSocket, e.g. `https://app.example.com`, or `*` (repeatable)
    /// [default: none, so only same-host pages]
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    #[serde(default)]
    pub allowed_origin: Vec<String>,
    /// Refuse WebSocket upgrades without an Origin header (non-browser clients) [default: false]
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    #[serde(default)]
    pub require_origin: Option<bool>,
    /// Client messages per second per connection [default: 20]
    #[arg(long, value_name = "PER_SECOND")]
    #[serde(default)]
    pub rate_limit: Option<f64>,
    /// Client messages a connection may send in one burst [default: 50]
    #[arg(long, value_name = "COUNT")]
    #[serde(default)]
    pub rate_burst: Option<u32>,
    /// Rate-limited messages before the connection is closed with 1008 [default: 20]
    #[arg(long, value_name = "COUNT")]
    #[serde(default)]
    pub rate_limit_strikes: Option<u32>,
    /// New WebSockets per second per client address, bursts of twice that; recommended when
    /// clients connect directly, not through a proxy [default: none, off]
    #[arg(long, value_name = "PER_SECOND")]
    #[serde(default)]
    pub connect_rate_per_ip: Option<f64>,
    /// Proxy addresses or CIDRs whose X-Forwarded-For is believed, e.g. 10.0.0.0/8
    /// (repeatable, or comma-separated) [default: none, so the TCP peer is the client]
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    #[serde(default, deserialize_with = "parse_list")]
    pub trusted_proxies: Vec<Cidr>,
    /// File mode of the publish socket, in octal [default: 0660]
    #[arg(long, value_name = "MODE")]
    #[serde(default, deserialize_with = "parse")]
    pub publish_socket_mode: Option<FileMode>,
    /// Open publish-port connections at most; an idle one holds about 300 B [default: 1024]
    #[arg(long, value_name = "COUNT")]
    #[serde(default)]
    pub max_publishers: Option<usize>,
    /// Turn on authentication with HS256 tokens signed with this secret (or set
    /// SIDECAST_JWT_SECRET) [default: none, auth off]
    #[arg(long, value_name = "SECRET")]
    #[serde(default)]
    pub jwt_secret: Option<String>,
    /// Turn on authentication with RS256/ES256 tokens, verified with this PEM public key
    /// [default: none, auth off]
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub jwt_public_key: Option<PathBuf>,
    /// The algorithm of --jwt-public-key: RS256 or ES256 [default: none]
    #[arg(long, value_name = "ALGORITHM")]
    #[serde(default)]
    pub jwt_algorithm: Option<JwtAlgorithm>,
    /// Accept tokens this long past their exp [default: 10s]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "parse")]
    pub jwt_leeway: Option<HumanDuration>,
    /// Open WebSockets per authenticated user; the next is closed with 4008 [default: 3]
    #[arg(long, value_name = "COUNT")]
    #[serde(default)]
    pub max_connections_per_user: Option<usize>,
    /// Recent events each channel keeps so reconnecting clients can resume; 0 disables
    /// [default: 100]
    #[arg(long, value_name = "COUNT")]
    #[serde(default)]
    pub history_size: Option<usize>,
    /// Events older than this leave the history [default: 5m]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "parse")]
    pub history_ttl: Option<HumanDuration>,
    /// Bytes of events each channel's history may hold [default: 1MiB]
    #[arg(long, value_name = "SIZE")]
    #[serde(default, deserialize_with = "parse")]
    pub history_max_bytes: Option<ByteSize>,
    /// Channels without any event remembered at once after their last subscriber left, so a
    /// resume at seq 0 is not told of a gap [default: 100000]
    #[arg(long, value_name = "COUNT")]
    #[serde(default)]
    pub max_quiet_channels: Option<usize>,
    /// Serve the dashboard at GET / and publish stats to sidecast:stats once a second: auto
    /// (when listening on loopback), on or off [default: auto]
    #[arg(long, value_name = "WHEN")]
    #[serde(default)]
    pub dashboard: Option<Dashboard>,
}

/// Deserializes a string (or integer) through `FromStr`, so the file accepts what the flags do.
fn parse<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Int(u64),
        Text(String),
    }
    let text = match Scalar::deserialize(deserializer)? {
        Scalar::Int(n) => n.to_string(),
        Scalar::Text(text) => text,
    };
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

/// Deserializes a list of strings through `FromStr`.
fn parse_list<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|text| text.parse().map_err(serde::de::Error::custom))
        .collect()
}

/// An address block written like `10.0.0.0/8`, `fd00::/8` or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// True when `ip` lies in the block (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.addr, ip) {
            (IpAddr::V4(block), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(block) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(block), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(block) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an address or CIDR block like 10.0.0.0/8 or fd00::/8");
        let (addr, prefix) = s
            .trim()
            .split_once('/')
            .map_or((s.trim(), None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
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

    /// `self` with every unset field taken from `lower`.
    pub fn over(self, lower: Settings) -> Settings {
        Settings {
            config: self.config.or(lower.config),
            listen: self.listen.or(lower.listen),
            publish_socket: self.publish_socket.or(lower.publish_socket),
            heartbeat_interval: self.heartbeat_interval.or(lower.heartbeat_interval),
            heartbeat_timeout: self.heartbeat_timeout.or(lower.heartbeat_timeout),
            handshake_timeout: self.handshake_timeout.or(lower.handshake_timeout),
            close_timeout: self.close_timeout.or(lower.close_timeout),
            shutdown_timeout: self.shutdown_timeout.or(lower.shutdown_timeout),
            shutdown_drain: self.shutdown_drain.or(lower.shutdown_drain),
            write_stall_timeout: self.write_stall_timeout.or(lower.write_stall_timeout),
            send_buffer_size: self.send_buffer_size.or(lower.send_buffer_size),
            max_connections: self.max_connections.or(lower.max_connections),
            max_message_size: self.max_message_size.or(lower.max_message_size),
            max_subscriptions: self.max_subscriptions.or(lower.max_subscriptions),
            max_output_buffer: self.max_output_buffer.or(lower.max_output_buffer),
            max_header_size: self.max_header_size.or(lower.max_header_size),
            max_publish_line: self.max_publish_line.or(lower.max_publish_line),
            read_buffer_size: self.read_buffer_size.or(lower.read_buffer_size),
            log_level: self.log_level.or(lower.log_level),
            allowed_origin: if self.allowed_origin.is_empty() {
                lower.allowed_origin
            } else {
                self.allowed_origin
            },
            require_origin: self.require_origin.or(lower.require_origin),
            rate_limit: self.rate_limit.or(lower.rate_limit),
            rate_burst: self.rate_burst.or(lower.rate_burst),
            rate_limit_strikes: self.rate_limit_strikes.or(lower.rate_limit_strikes),
            connect_rate_per_ip: self.connect_rate_per_ip.or(lower.connect_rate_per_ip),
            trusted_proxies: if self.trusted_proxies.is_empty() {
                lower.trusted_proxies
            } else {
                self.trusted_proxies
            },
            publish_socket_mode: self.publish_socket_mode.or(lower.publish_socket_mode),
            max_publishers: self.max_publishers.or(lower.max_publishers),
            jwt_secret: self.jwt_secret.or(lower.jwt_secret),
            jwt_public_key: self.jwt_public_key.or(lower.jwt_public_key),
            jwt_algorithm: self.jwt_algorithm.or(lower.jwt_algorithm),
            jwt_leeway: self.jwt_leeway.or(lower.jwt_leeway),
            max_connections_per_user: self
                .max_connections_per_user
                .or(lower.max_connections_per_user),
            history_size: self.history_size.or(lower.history_size),
            history_ttl: self.history_ttl.or(lower.history_ttl),
            history_max_bytes: self.history_max_bytes.or(lower.history_max_bytes),
            max_quiet_channels: self.max_quiet_channels.or(lower.max_quiet_channels),
            dashboard: self.dashboard.or(lower.dashboard),
        }
    }
}

/// The verification key the settings describe, read from its file when it is a public key.
fn jwt_key(
    secret: Option<String>,
    public_key: Option<PathBuf>,
    algorithm: Option<JwtAlgorithm>,
) -> Result<Option<JwtKey>, ConfigError> {
    let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
    match (secret, public_key, algorithm) {
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

impl Config {
    /// Resolves command-line settings: reads the `--config` file if one is named, lets the
    /// flags override it, fills in defaults and validates.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file or setting at fault.
    pub fn load(flags: Settings) -> Result<Config, ConfigError> {
        let settings = match &flags.config {
            Some(path) => {
                let file = Settings::from_file(path)?;
                flags.over(file)
            }
            None => flags,
        };
        let mut settings = settings;
        if settings.jwt_secret.is_none() && settings.jwt_public_key.is_none() {
            settings.jwt_secret = std::env::var(JWT_SECRET_ENV).ok().filter(|s| !s.is_empty());
        }
        Config::from_settings(settings)
    }

    /// Fills unset settings with defaults and validates the result.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the setting at fault.
    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let d = Config::default();
        let duration = |v: Option<HumanDuration>, default| v.map_or(default, |v| v.0);
        let size = |v: Option<ByteSize>, default| v.map_or(default, |v| v.0 as usize);
        let config = Config {
            listen: s.listen.unwrap_or(d.listen),
            publish_socket: s.publish_socket.unwrap_or(d.publish_socket),
            heartbeat_interval: duration(s.heartbeat_interval, d.heartbeat_interval),
            heartbeat_timeout: duration(s.heartbeat_timeout, d.heartbeat_timeout),
            handshake_timeout: duration(s.handshake_timeout, d.handshake_timeout),
            close_timeout: duration(s.close_timeout, d.close_timeout),
            shutdown_timeout: duration(s.shutdown_timeout, d.shutdown_timeout),
            shutdown_drain: duration(s.shutdown_drain, d.shutdown_drain),
            write_stall_timeout: duration(s.write_stall_timeout, d.write_stall_timeout),
            send_buffer_size: size(s.send_buffer_size, d.send_buffer_size),
            max_connections: s.max_connections.unwrap_or(d.max_connections),
            max_message_size: size(s.max_message_size, d.max_message_size),
            max_subscriptions: s.max_subscriptions.unwrap_or(d.max_subscriptions),
            max_output_buffer: size(s.max_output_buffer, d.max_output_buffer),
            max_header_size: size(s.max_header_size, d.max_header_size),
            max_publish_line: size(s.max_publish_line, d.max_publish_line),
            read_buffer_size: size(s.read_buffer_size, d.read_buffer_size),
            log_level: s.log_level.unwrap_or(d.log_level),
            allowed_origins: s.allowed_origin,
            require_origin: s.require_origin.unwrap_or(d.require_origin),
            rate_limit: s.rate_limit.unwrap_or(d.rate_limit),
            rate_burst: s.rate_burst.unwrap_or(d.rate_burst),
            rate_limit_strikes: s.rate_limit_strikes.unwrap_or(d.rate_limit_strikes),
            connect_rate_per_ip: s.connect_rate_per_ip,
            trusted_proxies: s.trusted_proxies,
            publish_socket_mode: s.publish_socket_mode.map_or(d.publish_socket_mode, |m| m.0),
            max_publishers: s.max_publishers.unwrap_or(d.max_publishers),
            jwt: jwt_key(s.jwt_secret, s.jwt_public_key, s.jwt_algorithm)?,
            jwt_leeway: duration(s.jwt_leeway, d.jwt_leeway),
            max_connections_per_user: s
                .max_connections_per_user
                .unwrap_or(d.max_connections_per_user),
            history_size: s.history_size.unwrap_or(d.history_size),
            history_ttl: duration(s.history_ttl, d.history_ttl),
            history_max_bytes: size(s.history_max_bytes, d.history_max_bytes),
            max_quiet_channels: s.max_quiet_channels.unwrap_or(d.max_quiet_channels),
            dashboard: s.dashboard.unwrap_or(d.dashboard),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |key: &'static str, message: String| Err(ConfigError::Invalid { key, message });
        let durations = [
            ("heartbeat_interval", self.heartbeat_interval),
            ("heartbeat_timeout", self.heartbeat_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("close_timeout", self.close_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
            ("shutdown_drain", self.shutdown_drain),
            ("write_stall_timeout", self.write_stall_timeout),
            ("history_ttl", self.history_ttl),
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
        let rates = [
            Some(("rate_limit", self.rate_limit)),
            self.connect_rate_per_ip.map(|r| ("connect_rate_per_ip", r)),
        ];
        for (key, value) in rates.into_iter().flatten() {
            if !(value.is_finite() && value > 0.0) {
                return invalid(key, format!("must be a positive number, got {value}"));
            }
        }
        for origin in &self.allowed_origins {
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
            ("max_connections", self.max_connections, 1),
            ("max_subscriptions", self.max_subscriptions, 1),
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

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
        assert_eq!(config.heartbeat_timeout, DEFAULT_HEARTBEAT_TIMEOUT);
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
        let error = from_flags(&["--connect-rate-per-ip", "0"]);
        assert!(
            error
                .unwrap_err()
                .to_string()
                .contains("connect_rate_per_ip")
        );
    }
}
