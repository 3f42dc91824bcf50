//! Errors that leave a module. Connection-level failures never do: the reactor closes the
//! connection with the code documented on [`crate::client::ReadEnd`] and
//! [`crate::metrics::DisconnectReason`]; client mistakes become `error` replies
//! ([`crate::wire::ErrorCode`]).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

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
        }
    }
}

impl std::error::Error for StartupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartupError::Listen { source, .. }
            | StartupError::PublishSocket { source, .. }
            | StartupError::Reactor(source) => Some(source),
            StartupError::SocketInUse { .. } | StartupError::Auth(_) => None,
        }
    }
}

impl From<io::Error> for StartupError {
    fn from(e: io::Error) -> StartupError {
        StartupError::Reactor(e)
    }
}
