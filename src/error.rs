//! Errors that leave a module, and [`Close`]: how a WebSocket ends.
//!
//! Connection-level failures never become errors: the connection ends with a [`Close`] (its
//! close code, reason text and metrics label in one place, so no close code is written
//! anywhere else); client mistakes become `error` replies ([`crate::ws::wire::ErrorCode`]).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use tungstenite::protocol::frame::coding::CloseCode;

/// A configuration that cannot be used. `sidecast serve` exits with code 2.
#[derive(Debug)]
pub enum ConfigError {
    /// The config file cannot be read.
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The config file is not valid TOML, has an unknown key or a bad value.
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key.
        message: String,
    },
    /// A setting is out of range or conflicts with another.
    Invalid {
        /// The setting's name, as in the TOML file.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, source } => {
                write!(f, "cannot read config file {}: {source}", path.display())
            }
            ConfigError::Parse { path, message } => {
                write!(
                    f,
                    "invalid config file {}: {}",
                    path.display(),
                    message.trim_end()
                )
            }
            ConfigError::Invalid { key, message } => write!(f, "invalid setting {key}: {message}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The server cannot start. `sidecast serve` exits with code 1.
#[derive(Debug)]
pub enum StartupError {
    /// The TCP address cannot be bound.
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// Another live server answers on the publish socket.
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The publish socket cannot be created.
    PublishSocket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Setting up the event loop or signal handling failed.
    Reactor(io::Error),
    /// The JWT verification key cannot be used.
    Auth(String),
    /// TLS to Redis cannot be set up (a CA, certificate or key file).
    RedisTls(String),
}

impl fmt::Display for StartupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartupError::Listen { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            StartupError::SocketInUse { path } => write!(
                f,
                "publish socket {} is in use by a running server (stop it or choose another --publish-socket)",
                path.display()
            ),
            StartupError::PublishSocket { path, source } => {
                write!(
                    f,
                    "cannot create publish socket {}: {source}",
                    path.display()
                )
            }
            StartupError::Reactor(source) => write!(f, "cannot set up the event loop: {source}"),
            StartupError::Auth(why) => write!(f, "cannot use the JWT key: {why}"),
            StartupError::RedisTls(why) => write!(f, "cannot set up TLS to Redis: {why}"),
        }
    }
}

impl std::error::Error for StartupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartupError::Listen { source, .. }
            | StartupError::PublishSocket { source, .. }
            | StartupError::Reactor(source) => Some(source),
            StartupError::SocketInUse { .. }
            | StartupError::Auth(_)
            | StartupError::RedisTls(_) => None,
        }
    }
}

impl From<io::Error> for StartupError {
    fn from(e: io::Error) -> StartupError {
        StartupError::Reactor(e)
    }
}

/// Why a WebSocket ends: the verdict every path that closes one returns. It carries the close
/// frame sent (see `docs/protocol.md`, "Close codes") and the `reason` label of
/// `sidecast_disconnects_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// The client sent a Close frame (tungstenite has queued the echo).
    ClientClosed,
    /// The connection vanished without a close handshake (EOF, reset).
    Reset,
    /// No frame from the client for `heartbeat_timeout` (1001).
    HeartbeatTimeout,
    /// Output over `max_output_buffer`, or stalled for `write_stall_timeout` (1008).
    SlowConsumer,
    /// An RFC 6455 violation (1002).
    ProtocolError,
    /// A frame or message above `max_message_size` (1009).
    MessageTooBig,
    /// A text message that is not UTF-8 (1007).
    InvalidUtf8,
    /// The server shuts down (1001).
    Shutdown,
    /// The client kept sending over the rate limit (1008).
    RateLimited,
    /// No valid token at the upgrade (4001 `unauthorized`).
    Unauthorized,
    /// The token expired without a refresh (4001 `token expired`).
    TokenExpired,
    /// The user already had `max_connections_per_user` open (4008).
    UserLimit,
    /// A publisher's `{"op":"disconnect"}` (4003).
    DisconnectedByServer,
}

impl Close {
    /// Every way a WebSocket ends, in metrics label order.
    pub const ALL: [Close; 13] = [
        Close::ClientClosed,
        Close::Reset,
        Close::HeartbeatTimeout,
        Close::SlowConsumer,
        Close::ProtocolError,
        Close::MessageTooBig,
        Close::InvalidUtf8,
        Close::Shutdown,
        Close::RateLimited,
        Close::Unauthorized,
        Close::TokenExpired,
        Close::UserLimit,
        Close::DisconnectedByServer,
    ];

    /// The Close frame the server sends, if it sends one: none when the client closed (the
    /// echo is already queued) or vanished.
    pub fn frame(self) -> Option<(CloseCode, &'static str)> {
        let (code, text) = match self {
            Close::ClientClosed | Close::Reset => return None,
            Close::HeartbeatTimeout => (CloseCode::Away, "heartbeat timeout"),
            Close::Shutdown => (CloseCode::Away, "server shutting down"),
            Close::SlowConsumer => (CloseCode::Policy, "slow consumer"),
            Close::RateLimited => (CloseCode::Policy, "rate limit exceeded"),
            Close::ProtocolError => (CloseCode::Protocol, "protocol error"),
            Close::MessageTooBig => (CloseCode::Size, "message too big"),
            Close::InvalidUtf8 => (CloseCode::Invalid, "invalid UTF-8"),
            Close::Unauthorized => (CloseCode::Library(4001), "unauthorized"),
            Close::TokenExpired => (CloseCode::Library(4001), "token expired"),
            Close::DisconnectedByServer => (CloseCode::Library(4003), "disconnected by server"),
            Close::UserLimit => (CloseCode::Library(4008), "Max connections exceeded"),
        };
        Some((code, text))
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Close::ClientClosed => "client_closed",
            Close::Reset => "reset",
            Close::HeartbeatTimeout => "heartbeat_timeout",
            Close::SlowConsumer => "slow_consumer",
            Close::ProtocolError => "protocol_error",
            Close::MessageTooBig => "message_too_big",
            Close::InvalidUtf8 => "invalid_utf8",
            Close::Shutdown => "shutdown",
            Close::RateLimited => "rate_limited",
            Close::Unauthorized => "unauthorized",
            Close::TokenExpired => "token_expired",
            Close::UserLimit => "user_limit",
            Close::DisconnectedByServer => "disconnected_by_server",
        }
    }
}

impl fmt::Display for Close {
    /// The close code and reason sent (`1009 message too big`), or the label when none is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.frame() {
            Some((code, text)) => write!(f, "{} {text}", u16::from(code)),
            None => f.write_str(self.label()),
        }
    }
}
