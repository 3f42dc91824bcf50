//! HTTP/1.1 on the publish port: a request head (httparse) → what it asks for, and the
//! response bytes. No I/O; `port.rs` reads, executes and writes.
//!
//! Routes:
//! - `POST /publish`: the body is one publish command, or several NDJSON lines, executed in
//!   order; the response carries one reply line per command;
//! - `GET /dapr/subscribe`: the Dapr subscriptions configured (see [`super::dapr`]);
//! - `POST <route>` of a configured Dapr subscription: a CloudEvent, or Dapr's bulk format;
//! - any other path → 404; a known path with another method → 405.
//!
//! Bounds: a head over `max_header_size` → 431; a body over `max_publish_line` → 413 (and the
//! connection closes, since its body is not read); a `POST` without `Content-Length` → 411
//! (chunked bodies are not supported). With a publish key (the TCP listener), a request
//! without `Authorization: Bearer <key>` (or Dapr's `dapr-api-token: <key>`) → 401.
//! Connections are kept alive unless the client says `Connection: close` or speaks HTTP/1.0
//! without `keep-alive`.

use super::command::error_reply;
use super::dapr::Dapr;

/// Most headers accepted in one request (more → 431).
const MAX_HEADERS: usize = 32;

/// What the HTTP side of the publish port is judged by.
#[derive(Clone, Copy)]
pub struct HttpRules<'a> {
    /// `max_header_size`.
    pub max_head: usize,
    /// `max_publish_line`: the largest body.
    pub max_body: usize,
    /// The key a request must present (`Authorization: Bearer`); `None` on the Unix socket.
    pub key: Option<&'a str>,
    /// The Dapr subscriptions.
    pub dapr: &'a Dapr,
}

/// What a complete, acceptable request head asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// `POST /publish`.
    Publish,
    /// `GET /dapr/subscribe`.
    DaprSubscribe,
    /// `POST` to the route of Dapr subscription number `n`.
    DaprEvent(usize),
}

/// A parsed request head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// What it asks for.
    pub ask: Ask,
    /// Bytes of the head, CRLFCRLF included.
    pub head_len: usize,
    /// Bytes of the body that follows.
    pub body_len: usize,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
}

/// A request answered with an error status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// The status line's code and reason, e.g. `413 Content Too Large`.
    pub status: &'static str,
    /// Why, for the JSON body.
    pub message: String,
    /// Whether the connection can go on (the request was read completely).
    pub keep_alive: bool,
    /// Bytes to skip before the next request (the head and the body), when it can.
    pub skip: usize,
}

impl Reject {
    /// A refusal after which the connection closes.
    pub fn closing(status: &'static str, message: impl Into<String>) -> Reject {
        Reject {
            status,
            message: message.into(),
            keep_alive: false,
            skip: 0,
        }
    }

    /// The response: the error reply line a refused command gets, under this status.
    pub fn response(&self) -> Vec<u8> {
        let body = error_reply(None, &self.message);
        let extra = if self.status.starts_with("401") {
            "WWW-Authenticate: Bearer\r\n"
        } else {
            ""
        };
        crate::base::http::message(
            self.status,
            extra,
            "application/json",
            &body,
            self.keep_alive,
        )
    }
}

/// Whether `bytes` begin an HTTP request rather than NDJSON: a method is upper-case letters.
pub fn looks_like_http(bytes: &[u8]) -> Option<bool> {
    bytes.first().map(u8::is_ascii_uppercase)
}

/// Parses the head at the start of `buf`. `Ok(None)`: incomplete, read more.
///
/// # Errors
/// The response to send instead.
pub fn parse_head(buf: &[u8], rules: &HttpRules<'_>) -> Result<Option<Head>, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > rules.max_head => {
            return Err(Reject::closing(
                "431 Request Header Fields Too Large",
                format!(
                    "request head over max_header_size ({} bytes)",
                    rules.max_head
                ),
            ));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reject::closing(
                "431 Request Header Fields Too Large",
                format!("more than {MAX_HEADERS} headers"),
            ));
        }
        Err(e) => {
            return Err(Reject::closing(
                "400 Bad Request",
                format!("bad request: {e}"),
            ));
        }
    };
    if head_len > rules.max_head {
        return Err(Reject::closing(
            "431 Request Header Fields Too Large",
            format!(
                "request head over max_header_size ({} bytes)",
                rules.max_head
            ),
        ));
    }
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let connection = header("Connection")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let keep_alive = match request.version {
        Some(1) => !connection.contains("close"),
        _ => connection.contains("keep-alive"),
    };
    if header("Transfer-Encoding").is_some() {
        return Err(Reject::closing(
            "411 Length Required",
            "send the body with Content-Length; chunked bodies are not supported",
        ));
    }
    let body_len = match header("Content-Length").map(|v| v.trim().parse::<usize>()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return Err(Reject::closing("400 Bad Request", "bad Content-Length")),
    };
    if body_len > rules.max_body {
        return Err(Reject::closing(
            "413 Content Too Large",
            format!("body over max_publish_line ({} bytes)", rules.max_body),
        ));
    }
    // From here on the request is read whole, so a refusal can keep the connection.
    let refuse = |status, message: String| Reject {
        status,
        message,
        keep_alive,
        skip: head_len + body_len,
    };
    if let Some(key) = rules.key {
        // Workers send the key as a bearer token; Dapr sends its app API token (set it to
        // the same secret) in its own header.
        let bearer = header("Authorization").and_then(|v| v.strip_prefix("Bearer "));
        let presented = [bearer, header("dapr-api-token")];
        let matches = |given: &str| constant_time_eq(given.trim().as_bytes(), key.as_bytes());
        if !presented.into_iter().flatten().any(matches) {
            return Err(refuse(
                "401 Unauthorized",
                "this listener needs Authorization: Bearer <publish key>".into(),
            ));
        }
    }
    let method = request.method.unwrap_or_default();
    let path = request.path.unwrap_or_default();
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    let (ask, wanted) = match path {
        "/publish" => (Ask::Publish, "POST"),
        "/dapr/subscribe" => (Ask::DaprSubscribe, "GET"),
        _ => match rules.dapr.route(path) {
            Some(n) => (Ask::DaprEvent(n), "POST"),
            None => return Err(refuse("404 Not Found", format!("no route {path}"))),
        },
    };
    if method != wanted {
        return Err(refuse(
            "405 Method Not Allowed",
            format!("{path} takes {wanted}, not {method}"),
        ));
    }
    if wanted == "POST" && header("Content-Length").is_none() {
        return Err(Reject::closing(
            "411 Length Required",
            "send Content-Length",
        ));
    }
    Ok(Some(Head {
        ask,
        head_len,
        body_len,
        keep_alive,
    }))
}

/// Compares without an early exit, so the time taken does not tell how much of a guess was
/// right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules<'a>(dapr: &'a Dapr, key: Option<&'a str>) -> HttpRules<'a> {
        HttpRules {
            max_head: 1024,
            max_body: 100,
            key,
            dapr,
        }
    }

    fn parse(request: &str, key: Option<&str>) -> Result<Option<Head>, Reject> {
        let dapr = Dapr::default();
        parse_head(request.as_bytes(), &rules(&dapr, key))
    }

    #[test]
    fn routes_and_bodies() {
        let head = parse(
            "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n{\"a\":",
            None,
        );
        let head = head.unwrap().unwrap();
        assert_eq!(
            (head.ask, head.body_len, head.keep_alive),
            (Ask::Publish, 12, true)
        );
        let head = parse("GET /dapr/subscribe HTTP/1.0\r\n\r\n", None)
            .unwrap()
            .unwrap();
        assert_eq!((head.ask, head.keep_alive), (Ask::DaprSubscribe, false));
        assert_eq!(
            parse("POST /publish HTTP/1.1\r\nContent-Len", None),
            Ok(None)
        );
    }

    #[test]
    fn refusals_carry_their_status() {
        let status = |request: &str, key| parse(request, key).unwrap_err().status;
        assert!(status("GET /nope HTTP/1.1\r\n\r\n", None).starts_with("404"));
        assert!(status("GET /publish HTTP/1.1\r\n\r\n", None).starts_with("405"));
        assert!(status("POST /publish HTTP/1.1\r\n\r\n", None).starts_with("411"));
        let chunked = "POST /publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(status(chunked, None).starts_with("411"));
        let big = "POST /publish HTTP/1.1\r\nContent-Length: 101\r\n\r\n";
        assert!(status(big, None).starts_with("413"));
        let huge = format!("POST /publish HTTP/1.1\r\nX: {}", "y".repeat(2000));
        assert!(status(&huge, None).starts_with("431"));
        assert!(status("BREW\0 / HTTP/1.1\r\n\r\n", None).starts_with("400"));
        let post = "POST /publish HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        assert!(status(post, Some("k3y")).starts_with("401"));
        let wrong =
            "POST /publish HTTP/1.1\r\nAuthorization: Bearer nope\r\nContent-Length: 0\r\n\r\n";
        let refused = parse(wrong, Some("k3y")).unwrap_err();
        assert_eq!((refused.keep_alive, refused.skip), (true, wrong.len()));
        assert!(
            String::from_utf8(refused.response())
                .unwrap()
                .contains("WWW-Authenticate: Bearer")
        );
        let right =
            "POST /publish HTTP/1.1\r\nAuthorization: Bearer k3y\r\nContent-Length: 0\r\n\r\n";
        assert!(parse(right, Some("k3y")).unwrap().is_some());
        let dapr = "GET /dapr/subscribe HTTP/1.1\r\ndapr-api-token: k3y\r\n\r\n";
        assert!(
            parse(dapr, Some("k3y")).unwrap().is_some(),
            "Dapr's app API token"
        );
        let wrong = "GET /dapr/subscribe HTTP/1.1\r\ndapr-api-token: nope\r\n\r\n";
        assert!(
            parse(wrong, Some("k3y"))
                .unwrap_err()
                .status
                .starts_with("401")
        );
    }

    #[test]
    fn http_is_told_from_ndjson_by_its_first_byte() {
        assert_eq!(looks_like_http(b"POST /"), Some(true));
        assert_eq!(looks_like_http(b"{\"channel\""), Some(false));
        assert_eq!(looks_like_http(b" {"), Some(false));
        assert_eq!(looks_like_http(b""), None);
    }
}
