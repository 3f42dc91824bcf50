//! Files compiled into the binary and served on the WebSocket port: the browser client
//! (`GET /sidecast.js`, from `client/`) and the dashboard (`GET /`).
//!
//! Each response carries a strong `ETag` (a hash of the file, fixed at compile time) and
//! `Cache-Control: no-cache`, so browsers revalidate and get `304 Not Modified` until the
//! server is upgraded. The client script allows any origin to load it (CORS `*`): it is public
//! code that pages on the application's own origin import as a module.

use crate::base::http;

/// A file served from memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asset {
    /// `GET /sidecast.js`: the ES module browsers use to connect.
    Client,
    /// `GET /`: the live dashboard page.
    Dashboard,
}

const CLIENT: &str = include_str!("../../client/sidecast.js");
const DASHBOARD: &str = include_str!("dashboard.html");
const CLIENT_HASH: u64 = fnv1a(CLIENT.as_bytes());
const DASHBOARD_HASH: u64 = fnv1a(DASHBOARD.as_bytes());

impl Asset {
    /// The asset served at `path`, if any.
    pub fn at(path: &str) -> Option<Asset> {
        match path {
            "/sidecast.js" => Some(Asset::Client),
            "/" => Some(Asset::Dashboard),
            _ => None,
        }
    }

    /// Its entity tag, quoted as in the `ETag` header.
    pub fn etag(self) -> String {
        let hash = match self {
            Asset::Client => CLIENT_HASH,
            Asset::Dashboard => DASHBOARD_HASH,
        };
        format!("\"{hash:016x}\"")
    }

    /// The complete response, which closes the connection: `304` when `if_none_match` (the
    /// request's header) names the current version, else `200` with the file.
    pub fn response(self, if_none_match: Option<&str>) -> Vec<u8> {
        let etag = self.etag();
        let (content_type, body, extra) = match self {
            Asset::Client => (
                "text/javascript; charset=utf-8",
                CLIENT,
                "Access-Control-Allow-Origin: *\r\n",
            ),
            Asset::Dashboard => (
                "text/html; charset=utf-8",
                DASHBOARD,
                "X-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\n",
            ),
        };
        let fresh = if_none_match.is_some_and(|tags| {
            tags.split(',')
                .any(|tag| tag.trim() == "*" || tag.trim().trim_start_matches("W/") == etag)
        });
        let (status, body) = if fresh {
            ("304 Not Modified", "")
        } else {
            ("200 OK", body)
        };
        let headers = format!(
            "ETag: {etag}\r\nCache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\n{extra}"
        );
        http::response(status, &headers, content_type, body)
    }
}

/// FNV-1a, 64 bits: a compile-time fingerprint, not a security measure.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(response: &[u8]) -> (String, String) {
        let text = String::from_utf8(response.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_string(), body.to_string())
    }

    #[test]
    fn serves_the_client_with_cors_and_revalidates_by_etag() {
        let (head, body) = split(&Asset::Client.response(None));
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(head.contains("Access-Control-Allow-Origin: *"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(body.contains("export class Sidecast"));
        let etag = Asset::Client.etag();
        for header in [etag.clone(), format!("W/{etag}"), format!("\"x\", {etag}")] {
            let (head, body) = split(&Asset::Client.response(Some(&header)));
            assert!(
                head.starts_with("HTTP/1.1 304 Not Modified\r\n"),
                "{header}"
            );
            assert!(body.is_empty());
        }
        let (head, _) = split(&Asset::Client.response(Some("\"stale\"")));
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
    }

    #[test]
    fn each_file_has_its_own_tag() {
        assert_ne!(Asset::Client.etag(), Asset::Dashboard.etag());
        assert_eq!(Asset::at("/"), Some(Asset::Dashboard));
        assert_eq!(Asset::at("/index.html"), None);
    }
}
