//! The mapping between `mio::Token`s and the sources the reactor owns. This is the only code
//! that does arithmetic on `Token.0`.
//!
//! Singletons take fixed tokens below `FIRST_DYNAMIC`. Slab entries follow them, interleaved
//! by kind: `Token(FIRST_DYNAMIC + key * 3 + kind)` with kind 0 for WebSocket clients, 1 for
//! publishers and 2 for engine sockets (Redis connections), so each slab can use its own keys.

use mio::Token;

/// An event source known to the reactor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The TCP listener for WebSocket and HTTP.
    Listener,
    /// The Unix listener of the publish port.
    PublishListener,
    /// The signal-hook pipe (SIGTERM, SIGINT).
    Signal,
    /// The waker behind [`ShutdownHandle`](crate::ShutdownHandle).
    Waker,
    /// The TCP listener of the publish port (`publish_listen`).
    PublishTcpListener,
    /// A TCP connection, by its key in the client slab.
    Client(usize),
    /// A publish-port connection, by its key in the publisher slab.
    Publisher(usize),
    /// A socket of the engine (a connection to a Redis node), by the engine's own key.
    Engine(usize),
}

const FIRST_DYNAMIC: usize = 5;
/// Kinds of slab entries interleaved in the dynamic tokens.
const KINDS: usize = 3;

/// The token registered for `source`.
pub fn encode(source: Source) -> Token {
    Token(match source {
        Source::Listener => 0,
        Source::PublishListener => 1,
        Source::Signal => 2,
        Source::Waker => 3,
        Source::PublishTcpListener => 4,
        Source::Client(key) => FIRST_DYNAMIC + key * KINDS,
        Source::Publisher(key) => FIRST_DYNAMIC + key * KINDS + 1,
        Source::Engine(key) => FIRST_DYNAMIC + key * KINDS + 2,
    })
}

/// The source a token was registered for.
pub fn decode(token: Token) -> Source {
    match token.0 {
        0 => Source::Listener,
        1 => Source::PublishListener,
        2 => Source::Signal,
        3 => Source::Waker,
        4 => Source::PublishTcpListener,
        n => {
            let key = (n - FIRST_DYNAMIC) / KINDS;
            match (n - FIRST_DYNAMIC) % KINDS {
                0 => Source::Client(key),
                1 => Source::Publisher(key),
                _ => Source::Engine(key),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let sources = [
            Source::Listener,
            Source::PublishListener,
            Source::Signal,
            Source::Waker,
            Source::PublishTcpListener,
            Source::Client(0),
            Source::Publisher(0),
            Source::Client(7),
            Source::Publisher(7),
            Source::Client(1 << 40),
            Source::Engine(0),
            Source::Engine(9),
        ];
        for source in sources {
            assert_eq!(decode(encode(source)), source);
        }
        assert_ne!(encode(Source::Client(3)), encode(Source::Publisher(3)));
    }
}
