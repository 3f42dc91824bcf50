//! HTTP/1.1 on the WebSocket port: parses a request head with httparse and routes it.
//! Bytes in, verdicts and bytes out; no I/O.
//!
//! Routing (methods are checked first):
//! - a method other than `GET` → 405;
//! - `GET /ws[?query]` with `Upgrade: websocket`, `Connection: upgrade`,
//!   `Sec-WebSocket-Version: 13` and a `Sec-WebSocket-Key` → [`Route::Upgrade`];
//!   `/ws` without the upgrade headers → 426; with a bad key or version → 400 / 426;
//! - `GET /sse?channels=...` → [`Route::EventStream`] (see [`crate::sse::request`]); a query
//!   that cannot be a stream → 400;
//! - `GET /health`, `GET /metrics` → [`Route::Health`], [`Route::Metrics`];
//! - `GET /sidecast.js`, `GET /` → [`Route::Asset`] (the reactor answers 404 for the
//!   dashboard when it is off);
//! - any other path → 404.
//!
//! A head that is not complete within `max_header_size` bytes → 431. An upgrade or a stream
//! whose `Origin` the [`OriginPolicy`] does not permit → 403, before anything else happens.
//!
//! The token comes from the `token` query parameter, else `Authorization: Bearer`, else the
//! `token_cookie` cookie. Nothing here logs a request's target, its query or its cookies.

use std::net::IpAddr;

use crate::base::http::response;
use crate::config::{Cidr, Config};
use crate::ops::assets::Asset;
use crate::sse::{self, Opening};
use crate::ws::deflate::negotiate;

/// Most headers accepted in one request (more → 431).
const MAX_HEADERS: usize = 48;

/// Which browser pages may open a WebSocket, judged by the `Origin` header.
#[derive(Clone, Debug, Default)]
pub struct OriginPolicy {
    /// Exact origins (`https://app.example.com`), or `*` for any. Empty: same host only, i.e.
    /// the origin's `host[:port]` must equal the request's `Host`.
    pub allowed: Vec<String>,
    /// Refuse requests without `Origin` (non-browser clients).
    pub require: bool,
}

impl OriginPolicy {
    /// The policy `config` sets (`allowed_origin`, `require_origin`).
    pub fn new(config: &Config) -> OriginPolicy {
        OriginPolicy {
            allowed: config.allowed_origin.clone(),
            require: config.require_origin,
        }
    }

    fn permits(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return !self.require;
        };
        if self.allowed.is_empty() {
            let origin_host = origin.split_once("://").map(|(_, rest)| rest);
            return origin_host
                .zip(host)
                .is_some_and(|(o, h)| o.eq_ignore_ascii_case(h.trim()));
        }
        self.allowed
            .iter()
            .any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(origin))
    }
}

/// How request heads are judged.
#[derive(Clone, Debug)]
pub struct Routing {
    /// `max_header_size`.
    pub max_header_size: usize,
    /// Which pages may open a session.
    pub origins: OriginPolicy,
    /// The cookie that may carry the token (`token_cookie`); `None` when off.
    pub token_cookie: Option<String>,
    /// `permessage_deflate`: whether a client's offer of compression may be accepted.
    pub deflate: bool,
}

impl Routing {
    /// What `config` sets.
    pub fn new(config: &Config) -> Routing {
        Routing {
            max_header_size: config.max_header_size,
            origins: OriginPolicy::new(config),
            token_cookie: Some(config.token_cookie.clone()).filter(|c| !c.is_empty()),
            deflate: config.permessage_deflate,
        }
    }
}

/// Where a complete, acceptable request goes.
#[derive(Debug, PartialEq)]
pub enum Route {
    /// A valid WebSocket upgrade on `/ws`.
    Upgrade {
        /// What the 101 response says.
        handshake: Handshake,
        /// The bearer token: the `token` query parameter or `Authorization: Bearer`.
        token: Option<String>,
        /// Every `X-Forwarded-For` header, joined by commas; believed only from a trusted
        /// proxy (see [`client_address`]).
        forwarded_for: Option<String>,
    },
    /// A Server-Sent Events stream on `/sse`.
    EventStream {
        /// Its channels and where it starts.
        opening: Opening,
        /// The token (query, header or cookie).
        token: Option<String>,
        /// As for an upgrade.
        forwarded_for: Option<String>,
        /// The request's `Origin`, already permitted, to allow in the response.
        origin: Option<String>,
    },
    /// `GET /health`
    Health,
    /// `GET /metrics`
    Metrics,
    /// A file compiled into the binary.
    Asset {
        /// Which one.
        asset: Asset,
        /// The request's `If-None-Match` header.
        if_none_match: Option<String>,
    },
}

/// What a WebSocket upgrade's 101 response says.
#[derive(Debug, PartialEq)]
pub struct Handshake {
    /// The `Sec-WebSocket-Accept` value.
    pub accept_key: String,
    /// The client offered permessage-deflate on acceptable terms, and it is on.
    pub deflate: bool,
}

impl Handshake {
    /// The 101 response completing the upgrade.
    pub fn response(&self) -> Vec<u8> {
        let extensions = if self.deflate {
            format!("Sec-WebSocket-Extensions: {}\r\n", negotiate::AGREED)
        } else {
            String::new()
        };
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n{extensions}\r\n",
            self.accept_key
        )
        .into_bytes()
    }
}

/// A request refused before any upgrade, with its HTTP status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 400: the head is not valid HTTP/1.x, or the upgrade is malformed.
    BadRequest(&'static str),
    /// 403: the `Origin` is not allowed (or missing while `require_origin` is on). Carries
    /// the origin, for the operator's log.
    Forbidden(Option<String>),
    /// 404: unknown path.
    NotFound,
    /// 405: a method other than GET.
    MethodNotAllowed,
    /// 426: `/ws` without WebSocket upgrade headers, or an unsupported WebSocket version.
    UpgradeRequired,
    /// 431: the head exceeds `max_header_size` or has too many headers.
    HeaderTooLarge,
    /// 429: this peer IP opens connections faster than `connect_rate_per_ip`.
    TooManyRequests,
    /// 503: `max_connections` WebSockets are open.
    Busy,
}

impl Refusal {
    /// The complete HTTP response, which closes the connection.
    pub fn response(&self) -> Vec<u8> {
        let (status, extra, body) = match *self {
            Refusal::BadRequest(why) => ("400 Bad Request", "", why),
            Refusal::Forbidden(_) => ("403 Forbidden", "", "origin not allowed"),
            Refusal::NotFound => ("404 Not Found", "", "not found"),
            Refusal::MethodNotAllowed => ("405 Method Not Allowed", "Allow: GET\r\n", "only GET"),
            Refusal::UpgradeRequired => (
                "426 Upgrade Required",
                "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
                "this endpoint speaks WebSocket (version 13)",
            ),
            Refusal::HeaderTooLarge => (
                "431 Request Header Fields Too Large",
                "",
                "request header too large",
            ),
            Refusal::TooManyRequests => (
                "429 Too Many Requests",
                "Retry-After: 1\r\n",
                "too many connections from this address",
            ),
            Refusal::Busy => (
                "503 Service Unavailable",
                "Retry-After: 5\r\n",
                "too many connections",
            ),
        };
        response(
            status,
            extra,
            "text/plain; charset=utf-8",
            &format!("{body}\n"),
        )
    }
}

/// Parses the request head in `buf`.
///
/// Returns `Ok(None)` while the head is incomplete and shorter than `max_header_size`, and
/// `Ok(Some((route, head_len)))` once it is complete; bytes after `head_len` belong to the
/// WebSocket stream.
///
/// # Errors
/// The [`Refusal`] to answer with.
pub fn parse_request(buf: &[u8], routing: &Routing) -> Result<Option<(Route, usize)>, Refusal> {
    let max_header_size = routing.max_header_size;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= max_header_size => len,
        Ok(httparse::Status::Complete(_)) | Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::HeaderTooLarge);
        }
        Ok(httparse::Status::Partial) if buf.len() >= max_header_size => {
            return Err(Refusal::HeaderTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Refusal::BadRequest("malformed HTTP request")),
    };
    if request.method != Some("GET") {
        return Err(Refusal::MethodNotAllowed);
    }
    let target = request.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let headers = request.headers;
    let token = || token(headers, query, routing.token_cookie.as_deref());
    let route = match path {
        "/ws" => upgrade(headers, routing, token())?,
        "/sse" => {
            // A page's `EventSource` sends `Origin` only across origins: the stream is
            // refused for a foreign page, never for a missing header (`require_origin` is
            // for WebSockets).
            let origin = header(headers, "Origin").map(str::trim);
            if origin.is_some() && !routing.origins.permits(origin, header(headers, "Host")) {
                return Err(Refusal::Forbidden(origin.map(str::to_string)));
            }
            let last_event_id = header(headers, "Last-Event-ID");
            Route::EventStream {
                opening: sse::request::parse(query, last_event_id).map_err(Refusal::BadRequest)?,
                token: token(),
                forwarded_for: forwarded_for(headers),
                origin: origin.map(str::to_string),
            }
        }
        "/health" => Route::Health,
        "/metrics" => Route::Metrics,
        _ => match Asset::at(path) {
            Some(asset) => Route::Asset {
                asset,
                if_none_match: header(headers, "If-None-Match").map(str::to_string),
            },
            None => return Err(Refusal::NotFound),
        },
    };
    Ok(Some((route, head_len)))
}

/// The first header called `name`, when it is UTF-8.
fn header<'h>(headers: &[httparse::Header<'h>], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
}

/// The bearer token: the `token` query parameter, else `Authorization: Bearer`, else the
/// cookie named `cookie`.
fn token(headers: &[httparse::Header<'_>], query: &str, cookie: Option<&str>) -> Option<String> {
    let from_query = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
        .and_then(crate::base::http::percent_decode);
    let from_header = || {
        header(headers, "Authorization")
            .and_then(|v| v.trim().strip_prefix("Bearer "))
            .map(str::to_string)
    };
    let from_cookie = || {
        let name = cookie?;
        headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("Cookie"))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name).then(|| v.trim_matches('"').to_string())
            })
    };
    from_query
        .or_else(from_header)
        .or_else(from_cookie)
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Every `X-Forwarded-For` header, joined by commas.
fn forwarded_for(headers: &[httparse::Header<'_>]) -> Option<String> {
    let forwarded: Vec<&str> = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("X-Forwarded-For"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .collect();
    (!forwarded.is_empty()).then(|| forwarded.join(","))
}

fn upgrade(
    headers: &[httparse::Header<'_>],
    routing: &Routing,
    token: Option<String>,
) -> Result<Route, Refusal> {
    let header = |name: &str| header(headers, name);
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("Upgrade", "websocket") || !has_token("Connection", "upgrade") {
        return Err(Refusal::UpgradeRequired);
    }
    let origin = header("Origin").map(str::trim);
    if !routing.origins.permits(origin, header("Host")) {
        return Err(Refusal::Forbidden(origin.map(str::to_string)));
    }
    if header("Sec-WebSocket-Version").map(str::trim) != Some("13") {
        return Err(Refusal::UpgradeRequired);
    }
    let key = header("Sec-WebSocket-Key").map(str::trim).unwrap_or("");
    // RFC 6455 4.1: the key is a base64-encoded 16-byte nonce, so 24 characters.
    if key.len() != 24 {
        return Err(Refusal::BadRequest(
            "missing or malformed Sec-WebSocket-Key",
        ));
    }
    let accept_key = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let offers = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("Sec-WebSocket-Extensions"))
        .filter_map(|h| std::str::from_utf8(h.value).ok());
    Ok(Route::Upgrade {
        handshake: Handshake {
            accept_key,
            deflate: routing.deflate && negotiate::accepts(offers),
        },
        token,
        forwarded_for: forwarded_for(headers),
    })
}

/// The client's address as far as it can be known. The TCP peer, unless the peer is one of
/// the `trusted` proxies: then the rightmost address in `X-Forwarded-For` that is not itself
/// a trusted proxy (each proxy appends the address it received from, so anything left of the
/// first untrusted hop could have been written by the client). A malformed entry stops the
/// walk at the last address known to be real.
pub fn client_address(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|block| block.contains(ip));
    let mut client = peer;
    let Some(forwarded_for) = forwarded_for else {
        return client;
    };
    for hop in forwarded_for.rsplit(',') {
        if !is_trusted(client) {
            break;
        }
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => client = ip,
            Err(_) => break,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn upgrade_request(path: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
        )
    }

    fn routing() -> Routing {
        Routing {
            max_header_size: 8192,
            origins: OriginPolicy::default(),
            token_cookie: Some("sidecast_token".into()),
            deflate: true,
        }
    }

    fn route(request: &str) -> Result<Option<(Route, usize)>, Refusal> {
        parse_request(request.as_bytes(), &routing())
    }

    #[test]
    fn upgrades_with_any_query_and_rfc_accept_key() {
        let request = upgrade_request("/ws?token=abc");
        let (routed, len) = route(&request).unwrap().unwrap();
        // The example from RFC 6455 section 1.3.
        let accept_key = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".to_string();
        assert_eq!(
            routed,
            Route::Upgrade {
                handshake: Handshake {
                    accept_key,
                    deflate: false,
                },
                token: Some("abc".into()),
                forwarded_for: None,
            }
        );
        let bearer =
            upgrade_request("/ws").replace("Host: x", "Host: x\r\nAuthorization: Bearer xyz");
        assert!(
            matches!(route(&bearer).unwrap().unwrap().0, Route::Upgrade { token: Some(t), .. } if t == "xyz")
        );
        assert_eq!(len, request.len());
    }

    #[test]
    fn compression_is_agreed_when_offered_and_on() {
        let offering = upgrade_request("/ws").replace(
            "Host: x",
            "Host: x\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        );
        let agreed = |routing: &Routing| match parse_request(offering.as_bytes(), routing) {
            Ok(Some((Route::Upgrade { handshake, .. }, _))) => handshake.deflate,
            other => panic!("{other:?}"),
        };
        assert!(agreed(&routing()));
        assert!(!agreed(&Routing {
            deflate: false,
            ..routing()
        }));
        let response = String::from_utf8(
            Handshake {
                accept_key: "k".into(),
                deflate: true,
            }
            .response(),
        )
        .unwrap();
        assert!(response.contains(
            "\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
             client_no_context_takeover\r\n\r\n"
        ));
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxied = upgrade_request("/ws").replace(
            "Host: x",
            "Host: x\r\nX-Forwarded-For: 1.1.1.1, 203.0.113.7\r\nX-Forwarded-For: 10.0.0.2",
        );
        let Route::Upgrade { forwarded_for, .. } = route(&proxied).unwrap().unwrap().0 else {
            panic!("an upgrade");
        };
        let forwarded_for = forwarded_for.as_deref();
        assert_eq!(forwarded_for, Some("1.1.1.1, 203.0.113.7,10.0.0.2"));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let trusted = ["10.0.0.0/8".parse::<Cidr>().unwrap()];
        assert_eq!(
            client_address(ip("10.0.0.1"), forwarded_for, &trusted),
            ip("203.0.113.7"),
            "the rightmost untrusted hop; 1.1.1.1 could be the client's own invention"
        );
        assert_eq!(
            client_address(ip("192.0.2.9"), forwarded_for, &trusted),
            ip("192.0.2.9"),
            "an untrusted peer's header is ignored"
        );
        assert_eq!(
            client_address(ip("10.0.0.1"), forwarded_for, &[]),
            ip("10.0.0.1")
        );
        assert_eq!(
            client_address(ip("10.0.0.1"), Some("garbage, 10.0.0.3"), &trusted),
            ip("10.0.0.3"),
            "a malformed hop stops the walk"
        );
    }

    #[test]
    fn routes_table() {
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(route(&get("/health")).unwrap().unwrap().0, Route::Health);
        assert_eq!(
            route(&get("/metrics?x=1")).unwrap().unwrap().0,
            Route::Metrics
        );
        assert_eq!(route(&get("/ws")), Err(Refusal::UpgradeRequired));
        assert_eq!(route(&get("/nope")), Err(Refusal::NotFound));
        assert_eq!(
            route(&get("/sidecast.js?v=1")).unwrap().unwrap().0,
            Route::Asset {
                asset: Asset::Client,
                if_none_match: None
            }
        );
        let revalidate = get("/").replace("Host: x", "Host: x\r\nIf-None-Match: \"abc\"");
        assert_eq!(
            route(&revalidate).unwrap().unwrap().0,
            Route::Asset {
                asset: Asset::Dashboard,
                if_none_match: Some("\"abc\"".into())
            }
        );
        assert_eq!(
            route("POST /ws HTTP/1.1\r\n\r\n"),
            Err(Refusal::MethodNotAllowed)
        );
        assert_eq!(
            route("GARBAGE\r\n\r\n"),
            Err(Refusal::BadRequest("malformed HTTP request"))
        );
        let old = upgrade_request("/ws").replace("Version: 13", "Version: 8");
        assert_eq!(route(&old), Err(Refusal::UpgradeRequired));
        let keyless = upgrade_request("/ws").replace(KEY, "short");
        assert!(matches!(route(&keyless), Err(Refusal::BadRequest(_))));
    }

    #[test]
    fn origin_policy_table() {
        let same_host = OriginPolicy::default();
        let listed = OriginPolicy {
            allowed: vec!["https://app.example.com".into()],
            require: false,
        };
        let any = OriginPolicy {
            allowed: vec!["*".into()],
            require: true,
        };
        let strict = OriginPolicy {
            allowed: Vec::new(),
            require: true,
        };
        let host = Some("app.example.com");
        let cases = [
            (&same_host, Some("https://app.example.com"), host, true),
            (&same_host, Some("https://evil.example"), host, false),
            (&same_host, Some("null"), host, false),
            (&same_host, None, host, true),
            (&strict, None, host, false),
            (
                &listed,
                Some("https://APP.example.com"),
                Some("other"),
                true,
            ),
            (&listed, Some("http://app.example.com"), host, false),
            (&any, Some("https://anything.test"), host, true),
            (&any, None, host, false),
        ];
        for (policy, origin, host, expected) in cases {
            assert_eq!(
                policy.permits(origin, host),
                expected,
                "{policy:?} {origin:?} {host:?}"
            );
        }
        let request =
            upgrade_request("/ws").replace("Host: x", "Host: x\r\nOrigin: https://evil.example");
        assert_eq!(
            route(&request),
            Err(Refusal::Forbidden(Some("https://evil.example".into())))
        );
    }

    #[test]
    fn partial_heads_wait_until_the_cap() {
        assert_eq!(route("GET /health HTTP/1.1\r\nHost"), Ok(None));
        let long = format!("GET /health HTTP/1.1\r\nX: {}", "a".repeat(9000));
        assert_eq!(route(&long), Err(Refusal::HeaderTooLarge));
        let complete_but_long = format!("GET /health HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
        assert_eq!(route(&complete_but_long), Err(Refusal::HeaderTooLarge));
    }

    #[test]
    fn responses_are_well_formed() {
        let response = String::from_utf8(Refusal::Busy.response()).unwrap();
        assert!(response.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }
}
