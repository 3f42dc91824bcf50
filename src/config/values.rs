//! The types settings are written in, how each becomes a `Config` value ([`Setting`]), and
//! how TOML values are read through the same `FromStr` as flags, so the file accepts exactly
//! what the command line does.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use log::LevelFilter;
use serde::{Deserialize, Deserializer};

/// A type a setting is written in: parsed from a flag or a TOML value, then turned into the
/// `Config` field's type.
pub trait Setting: FromStr {
    /// The `Config` field's type.
    type Value;
    /// Whether `sidecast config` writes it as a TOML string.
    const QUOTED: bool;
    /// The value for `Config`.
    fn value(self) -> Self::Value;
}

/// Types that are their own `Config` value.
macro_rules! plain_settings {
    ($($ty:ty => $quoted:literal),* $(,)?) => {$(
        impl Setting for $ty {
            type Value = $ty;
            const QUOTED: bool = $quoted;
            fn value(self) -> $ty {
                self
            }
        }
    )*};
}

plain_settings!(
    SocketAddr => true, PathBuf => true, String => true, LevelFilter => true,
    Dashboard => true, JwtAlgorithm => true, Cidr => true, EngineKind => true, RedisUrl => true,
    usize => false, u32 => false, f64 => false, bool => false,
);

impl Setting for HumanDuration {
    type Value = Duration;
    const QUOTED: bool = true;
    fn value(self) -> Duration {
        self.0
    }
}

impl Setting for ByteSize {
    type Value = usize;
    const QUOTED: bool = true;
    fn value(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl Setting for FileMode {
    type Value = u32;
    const QUOTED: bool = true;
    fn value(self) -> u32 {
        self.0
    }
}

/// The `dashboard` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dashboard {
    /// On when `listen` is a loopback address.
    Auto,
    /// Always on.
    On,
    /// Always off: `GET /` is 404 and no stats are published.
    Off,
}

impl FromStr for Dashboard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        clap::ValueEnum::from_str(s, true).map_err(|_| format!("{s:?} is not auto, on or off"))
    }
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum JwtAlgorithm {
    /// RSA PKCS#1 v1.5 with SHA-256.
    #[value(name = "RS256")]
    Rs256,
    /// ECDSA P-256 with SHA-256.
    #[value(name = "ES256")]
    Es256,
}

impl FromStr for JwtAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        clap::ValueEnum::from_str(s, false).map_err(|_| format!("{s:?} is not RS256 or ES256"))
    }
}

/// Deserializes a scalar (string, integer, float or boolean) through `FromStr`, so the file accepts what the flags do.
pub(super) fn parse<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Bool(bool),
        Int(u64),
        Float(f64),
        Text(String),
    }
    let text = match Scalar::deserialize(deserializer)? {
        Scalar::Bool(b) => b.to_string(),
        Scalar::Int(n) => n.to_string(),
        Scalar::Float(x) => x.to_string(),
        Scalar::Text(text) => text,
    };
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

/// Deserializes a list of strings through `FromStr`.
pub(super) fn parse_list<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
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

/// The `engine` setting: where seqs, history and cross-node delivery live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// Everything in this process: one node.
    Memory,
    /// Redis or Redis Cluster: nodes share channels, seqs, history and per-user limits.
    Redis,
}

impl FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        clap::ValueEnum::from_str(s, true).map_err(|_| format!("{s:?} is not memory or redis"))
    }
}

/// A Redis address written `redis://[[user]:password@]host:port`. Its password never appears
/// in `Debug` or `Display`, so it is never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// `host:port`.
    pub host_port: String,
    /// `rediss://`: TLS.
    pub tls: bool,
    /// `AUTH` user, when a password is given (`default` when the URL names none).
    pub user: Option<String>,
    /// `AUTH` password.
    pub password: Option<String>,
}

impl FromStr for RedisUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (tls, rest) = match (s.strip_prefix("redis://"), s.strip_prefix("rediss://")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => return Err("a Redis URL starts with redis:// or rediss:// (TLS)".into()),
        };
        let rest = rest.trim_end_matches('/');
        let (auth, host_port) = match rest.rsplit_once('@') {
            Some((auth, host_port)) => (Some(auth), host_port),
            None => (None, rest),
        };
        let (user, password) = match auth.map(|a| a.split_once(':').unwrap_or(("", a))) {
            Some((user, password)) => (
                Some(if user.is_empty() { "default" } else { user }.to_string()),
                Some(password.to_string()),
            ),
            None => (None, None),
        };
        if !is_host_port(host_port) || host_port.contains('/') {
            return Err("expected redis://host:port, without a database number".into());
        }
        Ok(RedisUrl {
            host_port: host_port.to_string(),
            tls,
            user,
            password,
        })
    }
}

/// True for `host:port` with a host and a valid port (a Redis node, a Sentinel).
pub fn is_host_port(text: &str) -> bool {
    text.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = if self.password.is_some() { "***@" } else { "" };
        let scheme = if self.tls { "rediss" } else { "redis" };
        write!(f, "{scheme}://{auth}{}", self.host_port)
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
