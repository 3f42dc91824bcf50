//! Property tests for the parsers that face untrusted bytes: HTTP request heads (on the
//! WebSocket port and on the publish port), client WebSocket messages and publish lines.
//! Arbitrary input never panics and always ends in one of the documented reactions.

use proptest::prelude::*;
use serde_json::Value;
use sidecast::base::channel::check_channel;
use sidecast::ops::assets::Asset;
use sidecast::publish::dapr::Dapr;
use sidecast::publish::http::{HttpRules, parse_head};
use sidecast::publish::{Target, command as publish};
use sidecast::ws::deflate::{Inflater, Inflating};
use sidecast::ws::http::{self, OriginPolicy, Refusal, Route, Routing};
use sidecast::ws::wire::{self, ErrorCode, Request};

const MAX_HEADER: usize = 1024;

fn is_valid_user(user: &str) -> bool {
    check_channel(&format!("user:{user}")).is_ok()
}

/// Strings that look like JSON requests, to get past the first parse more often than noise.
fn json_like() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("type"),
        Just("channel"),
        Just("channels"),
        Just("id"),
        Just("data"),
        Just("broadcast"),
        Just("seq"),
        Just("seqs"),
        Just("ack"),
        Just("x")
    ];
    let value = prop_oneof![
        Just("\"subscribe\"".to_string()),
        Just("\"unsubscribe\"".to_string()),
        Just("\"ping\"".to_string()),
        Just("\"ack\"".to_string()),
        Just("[1,2,3]".to_string()),
        Just("{\"timeout\":\"5s\"}".to_string()),
        Just("true".to_string()),
        Just("null".to_string()),
        Just("[\"a\",\"b\"]".to_string()),
        "-?[0-9]{1,20}(\\.[0-9]{1,3})?".prop_map(|s| s),
        "\"[ -~]{0,140}\"".prop_map(|s| s),
        "\\{\"t\":[0-9]{1,5}\\}".prop_map(|s| s),
    ];
    prop::collection::vec((key, value), 0..6).prop_map(|fields| {
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", body.join(","))
    })
}

/// The statuses protocol.md documents for HTTP publishes.
const PUBLISH_STATUSES: [&str; 8] = ["400", "401", "404", "405", "411", "413", "431", "503"];

fn routing() -> Routing {
    Routing {
        max_header_size: MAX_HEADER,
        origins: OriginPolicy::default(),
        token_cookie: Some("sidecast_token".into()),
        deflate: true,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn publish_port_heads_never_panic_and_end_in_a_documented_status(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..2048),
            (
                prop_oneof![Just("POST".to_string()), Just("GET".to_string()), Just("PUT".to_string())],
                prop_oneof![
                    Just("/publish".to_string()),
                    Just("/dapr/subscribe".to_string()),
                    "/[a-z/]{0,12}",
                ],
                "(Content-Length: [0-9]{1,7}\r\n)?(Authorization: Bearer [a-z]{0,8}\r\n)?(Transfer-Encoding: chunked\r\n)?",
            )
                .prop_map(|(m, p, h)| format!("{m} {p} HTTP/1.1\r\n{h}\r\n").into_bytes()),
        ],
        keyed in any::<bool>(),
    ) {
        let dapr = Dapr::default();
        let rules = HttpRules {
            max_head: MAX_HEADER,
            max_body: 4096,
            key: keyed.then_some("Secret-1"), // no generated header can carry it
            dapr: &dapr,
        };
        match parse_head(&bytes, &rules) {
            Ok(None) => prop_assert!(bytes.len() <= MAX_HEADER, "waiting for more past the cap"),
            Ok(Some(head)) => {
                prop_assert!(head.head_len <= bytes.len() && head.head_len <= MAX_HEADER);
                prop_assert!(head.body_len <= 4096);
                prop_assert!(!keyed, "a keyed listener let a request without the key through");
            }
            Err(reject) => {
                let code = &reject.status[..3];
                prop_assert!(PUBLISH_STATUSES.contains(&code), "{}", reject.status);
                let response = String::from_utf8(reject.response()).unwrap();
                let status_line = format!("HTTP/1.1 {}", reject.status);
                prop_assert!(response.starts_with(&status_line), "{}", response);
                prop_assert!(!reject.keep_alive || reject.skip <= bytes.len() + 4096);
            }
        }
    }

    #[test]
    fn any_bytes_through_the_inflating_step_end_or_stay_bounded(
        frames in prop::collection::vec((any::<u8>(), prop::collection::vec(any::<u8>(), 0..300)), 0..8),
        noise in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        // Client frames with any first byte (RSV1, opcodes, FIN), masked, then noise.
        let mut wire = Vec::new();
        for (first, payload) in &frames {
            wire.push(*first);
            wire.push(0x80 | payload.len().min(125) as u8);
            wire.extend_from_slice(&[9, 8, 7, 6]);
            wire.extend_from_slice(&payload[..payload.len().min(125)]);
        }
        wire.extend_from_slice(&noise);
        let limit = 512;
        let mut inflating = Inflating::default();
        let mut inflater = Inflater::new(limit);
        let mut source = &wire[..];
        let mut buf = [0u8; 100];
        let mut handed_on = 0;
        loop {
            match inflating.read(&mut buf, &mut source, &mut inflater) {
                Ok(0) | Err(_) => break,
                Ok(n) => handed_on += n,
            }
        }
        // Whatever passed or inflated, no more than the input plus one inflated message per
        // frame (each capped at the limit, with its header) came out.
        prop_assert!(handed_on <= wire.len() + frames.len() * (limit + 14));
    }

    #[test]
    fn http_heads_never_panic_and_respect_the_cap(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        match http::parse_request(&bytes, &routing()) {
            Ok(None) => prop_assert!(bytes.len() < MAX_HEADER, "waiting for more past the cap"),
            Ok(Some((_, head_len))) => prop_assert!(head_len <= MAX_HEADER && head_len <= bytes.len()),
            Err(_) => {}
        }
    }

    #[test]
    fn http_requests_with_random_paths_and_headers_route_or_refuse(
        method in prop_oneof![Just("GET".to_string()), Just("POST".to_string()), "[A-Z]{1,7}"],
        path in "/[ -~&&[^ ]]{0,40}",
        headers in prop::collection::vec(("[A-Za-z-]{1,20}", "[ -~]{0,60}"), 0..10),
    ) {
        let mut request = format!("{method} {path} HTTP/1.1\r\n");
        for (name, value) in &headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        match http::parse_request(request.as_bytes(), &routing()) {
            Ok(Some((route, _))) => {
                prop_assert_eq!(method.as_str(), "GET");
                let bare = path.split('?').next().unwrap();
                match route {
                    Route::Upgrade { handshake, .. } => {
                        prop_assert_eq!(bare, "/ws");
                        prop_assert_eq!(handshake.accept_key.len(), 28, "base64 of a SHA-1");
                    }
                    Route::EventStream { opening, .. } => {
                        prop_assert_eq!(bare, "/sse");
                        prop_assert!(opening.entries.len() <= 1000);
                    }
                    Route::Health => prop_assert_eq!(bare, "/health"),
                    Route::Metrics => prop_assert_eq!(bare, "/metrics"),
                    Route::Asset { asset, .. } => prop_assert_eq!(Asset::at(bare), Some(asset)),
                }
            }
            Ok(None) => prop_assert!(request.len() < MAX_HEADER),
            Err(Refusal::MethodNotAllowed) => prop_assert_ne!(method.as_str(), "GET"),
            Err(refusal) => {
                let bare = path.split('?').next().unwrap();
                match &refusal {
                    Refusal::NotFound => prop_assert!(
                        !["/ws", "/health", "/metrics"].contains(&bare) && Asset::at(bare).is_none(),
                        "{bare} exists"
                    ),
                    Refusal::UpgradeRequired | Refusal::Forbidden(_) => prop_assert_eq!(bare, "/ws"),
                    Refusal::HeaderTooLarge => prop_assert!(request.len() > MAX_HEADER),
                    Refusal::BadRequest(_) => {} // a malformed head, or a bad upgrade key
                    Refusal::MethodNotAllowed | Refusal::TooManyRequests | Refusal::Busy => {
                        prop_assert!(false, "the parser never refuses a GET with {refusal:?}")
                    }
                }
                // A complete response: a 4xx status line, and the body the head declares.
                let response = String::from_utf8(refusal.response()).unwrap();
                let (head, body) = response.split_once("\r\n\r\n").unwrap();
                prop_assert!(head.starts_with("HTTP/1.1 4"), "{head}");
                let declared = format!("Content-Length: {}\r\n", body.len());
                prop_assert!(head.contains(declared.trim_end()), "{head}");
            }
        }
    }

    #[test]
    fn client_messages_parse_or_get_a_documented_error(text in prop_oneof![json_like(), any::<String>()]) {
        match wire::parse_request(&text) {
            Ok(Request::Subscribe { channel, id, .. } | Request::Unsubscribe { channel, id } | Request::PresenceStats { channel, id }) => {
                prop_assert!(check_channel(channel.as_str()).is_ok());
                prop_assert!(id.is_none_or(|id| id.is_number() || id.is_string()));
            }
            Ok(Request::SubscribeMany { entries, id }) => {
                prop_assert!((1..=wire::MAX_BATCH).contains(&entries.len()));
                for entry in entries {
                    match entry {
                        Ok(entry) => prop_assert!(check_channel(entry.channel.as_str()).is_ok()),
                        Err(rejection) => prop_assert!(!rejection.message.is_empty()),
                    }
                }
                prop_assert!(id.is_none_or(|id| id.is_number() || id.is_string()));
            }
            Ok(Request::UnsubscribeMany { entries, id }) => {
                prop_assert!((1..=wire::MAX_BATCH).contains(&entries.len()));
                for entry in entries {
                    match entry {
                        Ok(channel) => prop_assert!(check_channel(channel.as_str()).is_ok()),
                        Err(rejection) => prop_assert!(!rejection.message.is_empty()),
                    }
                }
                prop_assert!(id.is_none_or(|id| id.is_number() || id.is_string()));
            }
            Ok(Request::Ack { channel, seqs }) => {
                prop_assert!(check_channel(channel.as_str()).is_ok());
                prop_assert!((1..=wire::MAX_ACK_BATCH).contains(&seqs.len()));
            }
            Ok(Request::Refresh { id, .. }) => prop_assert!(id.is_none_or(|id| id.is_number() || id.is_string())),
            Ok(Request::Ping { id }) => prop_assert!(id.is_none_or(|id| id.is_number() || id.is_string())),
            Err(rejection) => {
                prop_assert!(!rejection.message.is_empty());
                prop_assert!(matches!(
                    rejection.code,
                    ErrorCode::InvalidJson | ErrorCode::InvalidMessage | ErrorCode::UnknownType | ErrorCode::InvalidChannel
                ));
                // The error reply is valid JSON with the documented fields.
                let reply: Value = serde_json::from_str(&wire::Reply::from(&rejection).to_json()).unwrap();
                prop_assert_eq!(&reply["type"], "error");
            }
        }
    }

    #[test]
    fn publish_lines_parse_or_get_a_documented_error(
        line in prop_oneof![json_like().prop_map(String::into_bytes), prop::collection::vec(any::<u8>(), 0..300)]
    ) {
        match publish::parse_command(&line) {
            Ok(publish::Command { action: publish::Action::DisconnectUser(user), .. }) => {
                prop_assert!(is_valid_user(&user));
            }
            Ok(publish::Command { action: publish::Action::Presence(channel), .. }) => {
                prop_assert!(check_channel(&channel).is_ok());
            }
            Ok(publish::Command { action: publish::Action::Publish { target, data, .. }, .. }) => {
                prop_assert!(serde_json::from_str::<Value>(data.get()).is_ok());
                match &target {
                    Target::Channel(name) => prop_assert!(check_channel(name).is_ok()),
                    Target::Channels(names) => {
                        prop_assert!(!names.is_empty());
                        prop_assert!(names.iter().all(|n| check_channel(n).is_ok()));
                    }
                    Target::User(user) => prop_assert!(is_valid_user(user)),
                    Target::Broadcast => {}
                }
            }
            Err(error) => {
                prop_assert!(!error.message.is_empty());
                let reply: Value = serde_json::from_str(publish::error_reply(error.id, &error.message).trim_end()).unwrap();
                prop_assert_eq!(&reply["ok"], false);
            }
        }
    }
}
