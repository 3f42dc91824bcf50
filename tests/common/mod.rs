//! Test helpers: a real server on an ephemeral port and a temp socket path, real WebSocket
//! clients (tungstenite's blocking client) and real Unix-socket publishers.
//!
//! Every blocking read has a timeout, so a missing message fails the test instead of hanging
//! it. Tests wait on conditions (a message, a reply, a metric), never on sleeps.
#![allow(
    dead_code,
    reason = "each test binary uses a different subset of the helpers"
)]

pub mod deflate;
pub mod redis;
pub mod sse;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sidecast::{Config, Server, ShutdownHandle};
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{Role, WebSocket};
use tungstenite::{Message, Utf8Bytes};

/// How long any single wait may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A server running on its own thread; shut down and joined on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    pub socket: PathBuf,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub fn start() -> TestServer {
        TestServer::start_with(|_| {})
    }

    pub fn start_with(configure: impl FnOnce(&mut Config)) -> TestServer {
        TestServer::start_instrumented(configure, || {})
    }

    /// Like `start_with`, running `setup` on the server's thread before its loop starts.
    pub fn start_instrumented(
        configure: impl FnOnce(&mut Config),
        setup: impl FnOnce() + Send + 'static,
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            publish_socket: dir.path().join("sidecast.sock"),
            ..Config::default()
        };
        configure(&mut config);
        let socket = config.publish_socket.clone();
        let server = Server::bind(config).expect("server binds");
        let addr = server.local_addr();
        let handle = server.shutdown_handle();
        let thread = Some(std::thread::spawn(move || {
            setup();
            server.run()
        }));
        TestServer {
            addr,
            socket,
            handle,
            thread,
            _dir: dir,
        }
    }

    /// Starts the graceful shutdown, as SIGTERM would; `Drop` then waits for it to finish.
    pub fn shutdown(&self) {
        self.handle.shutdown().expect("the server is running");
    }

    /// A WebSocket client that has received its `connected` message.
    #[track_caller]
    pub fn ws(&self) -> Ws {
        let mut ws = self.ws_raw("/ws").expect("upgrade succeeds");
        let connected = ws.recv();
        assert_eq!(connected["type"], "connected", "{connected}");
        ws
    }

    /// A WebSocket client right after the upgrade, or the handshake error.
    pub fn ws_raw(&self, path: &str) -> Result<Ws, tungstenite::Error> {
        self.ws_with_headers(path, &[])
    }

    /// Like `ws_raw`, adding request headers (e.g. `Origin`).
    pub fn ws_with_headers(
        &self,
        path: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<Ws, tungstenite::Error> {
        use tungstenite::client::IntoClientRequest;
        let stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut request = format!("ws://{}{path}", self.addr).into_client_request()?;
        for (name, value) in headers {
            request.headers_mut().insert(*name, value.parse().unwrap());
        }
        let (ws, _) = tungstenite::client(request, stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => unreachable!("blocking socket"),
        })?;
        Ok(Ws(ws))
    }

    /// A raw Unix-socket publisher.
    pub fn publisher(&self) -> RawPublisher {
        RawPublisher::connect(&self.socket)
    }

    /// Publishes one command line (it must carry an id) and returns the parsed reply.
    #[track_caller]
    pub fn publish(&self, command: Value) -> Value {
        let mut publisher = self.publisher();
        publisher.send(&command.to_string());
        publisher.reply()
    }

    /// Sends a raw HTTP request and returns the whole response.
    pub fn http(&self, request: &str) -> String {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    pub fn get(&self, path: &str) -> String {
        self.http(&format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"))
    }

    pub fn health(&self) -> Value {
        let response = self.get("/health");
        let (_, body) = response.split_once("\r\n\r\n").expect("a body");
        serde_json::from_str(body).unwrap()
    }

    /// The value of one metric line (exact name with labels) from `/metrics`.
    pub fn metric(&self, series: &str) -> u64 {
        let response = self.get("/metrics");
        let prefix = format!("{series} ");
        let line = response
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {series}"));
        line[prefix.len()..].parse().unwrap()
    }

    /// Polls `condition` until it holds.
    #[track_caller]
    pub fn wait_until(&self, what: &str, condition: impl FnMut(&TestServer) -> bool) {
        self.wait_until_within(what, PATIENCE, condition);
    }

    /// Like `wait_until`, for conditions that need longer than `PATIENCE`.
    #[track_caller]
    pub fn wait_until_within(
        &self,
        what: &str,
        patience: Duration,
        mut condition: impl FnMut(&TestServer) -> bool,
    ) {
        let deadline = Instant::now() + patience;
        while !condition(self) {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.handle.shutdown();
        if let Some(thread) = self.thread.take() {
            let result = thread.join();
            if !std::thread::panicking() {
                result
                    .expect("server thread panicked")
                    .expect("server loop failed");
            }
        }
    }
}

/// An HS256 token signed with `secret` for user `sub`, valid for an hour.
pub fn hs256_token(secret: &str, sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A WebSocket client.
pub struct Ws(pub WebSocket<TcpStream>);

impl Ws {
    #[track_caller]
    pub fn send(&mut self, value: Value) {
        self.0.send(Message::text(value.to_string())).unwrap();
    }

    /// The next JSON message, skipping protocol Pings and Pongs (tungstenite answers Pings).
    #[track_caller]
    pub fn recv(&mut self) -> Value {
        loop {
            match self.0.read().expect("a message") {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// The next JSON message, or `None` when the server closed the connection instead.
    #[track_caller]
    pub fn recv_or_close(&mut self) -> Option<Value> {
        loop {
            match self.0.read() {
                Ok(Message::Text(text)) => return Some(serde_json::from_str(&text).unwrap()),
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(other) => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// Subscribes and returns the `subscribed` reply.
    #[track_caller]
    pub fn subscribe(&mut self, channel: &str) -> Value {
        self.send(json!({"type": "subscribe", "channel": channel}));
        let reply = self.recv();
        assert_eq!(reply["type"], "subscribed", "{reply}");
        assert_eq!(reply["channel"], channel);
        reply
    }

    /// Expects an event on `channel` with sequence number `seq`; returns its data.
    #[track_caller]
    pub fn expect_event(&mut self, channel: &str, seq: u64) -> Value {
        let event = self.recv();
        assert_eq!(event["type"], "event", "{event}");
        assert_eq!(event["channel"], channel, "{event}");
        assert_eq!(event["seq"], seq, "{event}");
        event["data"].clone()
    }

    /// Reads until the server's Close frame and returns it.
    #[track_caller]
    pub fn expect_close(&mut self) -> CloseFrame {
        loop {
            match self.0.read() {
                Ok(Message::Close(Some(frame))) => return frame,
                Ok(Message::Close(None)) => panic!("close without a code"),
                Ok(_) => {}
                Err(e) => panic!("expected a close frame, got {e}"),
            }
        }
    }

    /// Runs the close handshake from the client side: sends Close 1000, expects the echo.
    #[track_caller]
    pub fn close_cleanly(&mut self) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        self.0.close(Some(frame)).unwrap();
        assert_eq!(self.expect_close().code, CloseCode::Normal);
    }

    /// The raw TCP stream, to write bytes tungstenite would refuse to produce.
    pub fn raw(&mut self) -> &mut TcpStream {
        self.0.get_mut()
    }
}

/// Frames the server sent on `stream` until it closed the connection, decoded as a client
/// would. For clients that read nothing until the end.
pub fn drain_frames(stream: &mut TcpStream) -> Vec<Message> {
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let mut ws = WebSocket::from_raw_socket(io::Cursor::new(bytes), Role::Client, None);
    let mut messages = Vec::new();
    while let Ok(message) = ws.read() {
        messages.push(message);
    }
    messages
}

/// The close code and reason in a list of messages.
pub fn close_of(messages: &[Message]) -> Option<(u16, Utf8Bytes)> {
    messages.iter().find_map(|m| match m {
        Message::Close(Some(frame)) => Some((frame.code.into(), frame.reason.clone())),
        _ => None,
    })
}

/// A Unix-socket publisher speaking raw lines.
pub struct RawPublisher {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl RawPublisher {
    pub fn connect(path: &PathBuf) -> RawPublisher {
        let writer = UnixStream::connect(path).expect("publish socket accepts");
        writer.set_read_timeout(Some(PATIENCE)).unwrap();
        let reader = BufReader::new(writer.try_clone().unwrap());
        RawPublisher { writer, reader }
    }

    /// Sends a line; a newline is appended.
    pub fn send(&mut self, line: &str) {
        self.send_bytes(format!("{line}\n").as_bytes());
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Sends bytes to a server that may close the connection meanwhile (which is what the
    /// caller tests): a broken pipe is not an error here.
    pub fn send_until_closed(&mut self, bytes: &[u8]) {
        if let Err(e) = self.writer.write_all(bytes) {
            assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
        }
    }

    /// The next reply line, parsed.
    #[track_caller]
    pub fn reply(&mut self) -> Value {
        let line = self.reply_line().expect("a reply line");
        serde_json::from_str(&line).unwrap()
    }

    /// The next raw reply line; `None` when the server closed the connection.
    pub fn reply_line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line),
        }
    }
}
