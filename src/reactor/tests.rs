//! The loop's deadlines with stepped time: a manual [`Clock`] and passes driven one by one,
//! against real sockets. Heartbeats, handshake timeouts, token expiry and the shutdown drain
//! are tested here without waiting for them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use mio::Events;

use super::{Clock, Listeners, Server};
use crate::auth::jwt::JwtKey;
use crate::config::Config;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

struct Harness {
    server: Server,
    clock: Clock,
    events: Events,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new(configure: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            publish_socket: dir.path().join("sidecast.sock"),
            ..Config::default()
        };
        configure(&mut config);
        let ws = std::net::TcpListener::bind(config.listen).unwrap();
        let publish = std::os::unix::net::UnixListener::bind(&config.publish_socket).unwrap();
        let clock = Clock::manual();
        let server = Server::new(config, Listeners::from_std(ws, publish), clock.clone()).unwrap();
        Harness {
            server,
            clock,
            events: Events::with_capacity(64),
            _dir: dir,
        }
    }

    /// A few passes, so that whatever is ready is handled (nothing waits on time).
    fn settle(&mut self) {
        for _ in 0..4 {
            self.server
                .turn(&mut self.events, Some(Duration::ZERO))
                .unwrap();
        }
    }

    fn advance(&mut self, by: Duration) {
        self.clock.advance(by);
        self.settle();
    }

    fn connect(&mut self) -> Client {
        let stream = TcpStream::connect(self.server.local_addr()).unwrap();
        stream.set_nonblocking(true).unwrap();
        self.settle();
        Client {
            stream,
            input: Vec::new(),
            eof: false,
        }
    }

    /// An open WebSocket, its `connected` reply read.
    fn open(&mut self, query: &str) -> Client {
        let mut client = self.connect();
        let request = format!(
            "GET /ws{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        client.stream.write_all(request.as_bytes()).unwrap();
        self.settle();
        client.read();
        let head_end = client
            .input
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head");
        assert!(client.input.starts_with(b"HTTP/1.1 101"));
        client.input.drain(..head_end + 4);
        let frames = client.frames();
        assert!(
            matches!(&frames[..], [(0x1, text)] if text.starts_with(b"{\"type\":\"connected\"")),
            "{frames:?}"
        );
        client
    }
}

struct Client {
    stream: TcpStream,
    input: Vec<u8>,
    eof: bool,
}

impl Client {
    fn read(&mut self) {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    return;
                }
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.eof = true;
                    return;
                }
            }
        }
    }

    /// The complete server frames received so far, as (opcode, payload).
    fn frames(&mut self) -> Vec<(u8, Vec<u8>)> {
        self.read();
        let mut frames = Vec::new();
        while let [first, len, ..] = self.input[..] {
            let len = usize::from(len);
            assert!(len < 126, "the tests exchange short frames");
            if self.input.len() < 2 + len {
                break;
            }
            frames.push((first & 0x0F, self.input[2..2 + len].to_vec()));
            self.input.drain(..2 + len);
        }
        frames
    }

    /// The close code and reason of a Close frame among `frames`.
    fn close_of(frames: &[(u8, Vec<u8>)]) -> Option<(u16, String)> {
        frames.iter().find(|(op, _)| *op == 0x8).map(|(_, p)| {
            let code = u16::from_be_bytes([p[0], p[1]]);
            (code, String::from_utf8_lossy(&p[2..]).into_owned())
        })
    }
}

#[test]
fn a_silent_tcp_connection_is_dropped_at_the_handshake_deadline() {
    let mut h = Harness::new(|c| c.handshake_timeout = Duration::from_secs(10));
    let mut client = h.connect();
    h.advance(Duration::from_millis(9_990));
    client.read();
    assert!(!client.eof, "not before the deadline");
    h.advance(Duration::from_millis(20));
    client.read();
    assert!(client.eof, "dropped at 10 s");
    assert_eq!(h.server.fanout.metrics().handshake_timeouts, 1);
}

#[test]
fn a_quiet_client_is_pinged_then_closed_at_the_heartbeat_timeout() {
    let mut h = Harness::new(|c| {
        c.heartbeat_interval = Duration::from_secs(30);
        c.heartbeat_timeout = Duration::from_secs(60);
    });
    let mut client = h.open("");
    h.advance(Duration::from_millis(29_990));
    assert!(client.frames().is_empty(), "no Ping before the interval");
    h.advance(Duration::from_millis(20));
    assert_eq!(client.frames(), [(0x9, vec![])], "an empty Ping at 30 s");
    h.advance(Duration::from_secs(30));
    let frames = client.frames();
    assert_eq!(
        Client::close_of(&frames),
        Some((1001, "heartbeat timeout".into())),
        "{frames:?}"
    );
    assert_eq!(h.server.fanout.metrics().connections, 0);
}

#[test]
fn a_token_that_expires_closes_the_connection_with_4001() {
    let mut h = Harness::new(|c| {
        c.jwt = Some(JwtKey::Secret(SECRET.to_vec()));
        c.jwt_leeway = Duration::from_secs(10);
        c.heartbeat_interval = Duration::from_secs(100);
        c.heartbeat_timeout = Duration::from_secs(200);
    });
    let exp = h.clock.unix_secs() + 20;
    let claims = serde_json::json!({"sub": "u1", "exp": exp});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    let mut client = h.open(&format!("?token={token}"));
    h.advance(Duration::from_secs(28));
    assert!(client.frames().is_empty(), "exp + leeway is 30 s away");
    h.advance(Duration::from_secs(3));
    let frames = client.frames();
    assert_eq!(
        Client::close_of(&frames),
        Some((4001, "token expired".into())),
        "{frames:?}"
    );
}

#[test]
fn the_shutdown_drain_closes_one_batch_per_tick() {
    let mut h = Harness::new(|c| c.shutdown_drain = Duration::from_secs(1));
    let mut clients: Vec<Client> = (0..3).map(|_| h.open("")).collect();
    h.server.shutdown_handle().shutdown().unwrap();
    h.settle();
    let closed = |clients: &mut Vec<Client>| {
        clients
            .iter_mut()
            .map(|c| {
                let frames = c.frames();
                Client::close_of(&frames).is_some()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        closed(&mut clients),
        [true, false, false],
        "the first batch at once"
    );
    h.advance(Duration::from_millis(10));
    assert_eq!(
        closed(&mut clients),
        [false, true, false],
        "the next one tick later"
    );
    h.advance(Duration::from_millis(10));
    assert_eq!(closed(&mut clients), [false, false, true]);
    assert!(
        TcpStream::connect(h.server.local_addr()).is_err(),
        "the listener is closed"
    );
}
