//! A Server-Sent Events reader over a plain TCP socket: the request, the response head, then
//! messages parsed as a browser's `EventSource` parses them (fields `id`, `data`; comment
//! lines; a blank line ends a message). A chunked body (a proxy's re-framing) is de-chunked.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};

use serde_json::Value;

use super::PATIENCE;

/// One item of the stream.
#[derive(Debug, PartialEq)]
pub enum Item {
    /// A message: its `id` field (if it had one) and its data, parsed as JSON.
    Message { id: Option<String>, data: Value },
    /// A comment line (a heartbeat).
    Comment,
}

/// An open stream.
pub struct Sse {
    reader: BufReader<Body>,
    /// The response head.
    pub head: String,
    /// The last id seen, as a browser keeps it for `Last-Event-ID`.
    pub last_id: Option<String>,
}

impl Sse {
    /// `GET path` with `headers`; the stream once the server answered 200, else the whole
    /// response.
    pub fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Sse, String> {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                return Err(head);
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        if !head.starts_with("HTTP/1.1 200 ") {
            let mut rest = String::new();
            let _ = reader.read_to_string(&mut rest);
            return Err(head + &rest);
        }
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let body = Body {
            reader,
            chunk_left: chunked.then_some(0),
        };
        Ok(Sse {
            reader: BufReader::new(body),
            head,
            last_id: None,
        })
    }

    /// The stream, or a panic with the refusal.
    #[track_caller]
    pub fn connect(addr: SocketAddr, path: &str) -> Sse {
        Sse::open(addr, path, &[]).unwrap_or_else(|refusal| panic!("refused: {refusal}"))
    }

    /// The next item; `None` at the end of the stream.
    pub fn next_item(&mut self) -> Option<Item> {
        let mut id = None;
        let mut data: Option<String> = None;
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => panic!("reading the stream: {e}"),
            }
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                let Some(data) = data.take() else {
                    continue;
                };
                if id.is_some() {
                    self.last_id.clone_from(&id);
                }
                let data = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}"));
                return Some(Item::Message { id, data });
            }
            if line.starts_with(':') {
                if data.is_none() && id.is_none() {
                    return Some(Item::Comment);
                }
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => id = Some(value.to_string()),
                "data" => match &mut data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => data = Some(value.to_string()),
                },
                other => panic!("unexpected field {other:?}"),
            }
        }
    }

    /// The next message's data, skipping heartbeats.
    #[track_caller]
    pub fn recv(&mut self) -> Value {
        self.recv_or_end().expect("the stream ended")
    }

    /// The next message's data, or `None` when the stream ended.
    pub fn recv_or_end(&mut self) -> Option<Value> {
        loop {
            match self.next_item()? {
                Item::Message { data, .. } => return Some(data),
                Item::Comment => {}
            }
        }
    }

    /// The next message, which must be event `seq` of `channel`; its data.
    #[track_caller]
    pub fn expect_event(&mut self, channel: &str, seq: u64) -> Value {
        let message = self.recv();
        assert_eq!(
            (&message["type"], &message["channel"], &message["seq"]),
            (&"event".into(), &channel.into(), &seq.into()),
            "{message}"
        );
        message["data"].clone()
    }

    /// The socket, to shut down or to stop reading.
    pub fn socket(&self) -> &TcpStream {
        self.reader.get_ref().reader.get_ref()
    }
}

/// The response body: as it comes, or de-chunked.
struct Body {
    reader: BufReader<TcpStream>,
    /// `Some(bytes left in the current chunk)` when the body is chunked.
    chunk_left: Option<usize>,
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(left) = self.chunk_left else {
            return self.reader.read(buf);
        };
        if left == 0 {
            let mut size = String::new();
            if self.reader.read_line(&mut size)? == 0 {
                return Ok(0);
            }
            if size.trim().is_empty() {
                size.clear(); // the CRLF after the previous chunk
                if self.reader.read_line(&mut size)? == 0 {
                    return Ok(0);
                }
            }
            let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
            if size == 0 {
                return Ok(0);
            }
            self.chunk_left = Some(size);
        }
        let left = self.chunk_left.unwrap();
        let end = left.min(buf.len());
        let n = self.reader.read(&mut buf[..end])?;
        self.chunk_left = Some(left - n);
        Ok(n)
    }
}
