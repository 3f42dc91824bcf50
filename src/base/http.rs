//! HTTP/1.1 responses as bytes, for the WebSocket port's routes, the served assets and the
//! publish port's HTTP framing; percent-decoding of query values.

/// A 200 response with `body`, never cached, which closes the connection.
pub fn ok(content_type: &str, body: &str) -> Vec<u8> {
    response("200 OK", "Cache-Control: no-store\r\n", content_type, body)
}

/// A complete response, which closes the connection. `headers` are extra header lines, each
/// ending in CRLF.
pub fn response(status: &str, headers: &str, content_type: &str, body: &str) -> Vec<u8> {
    message(status, headers, content_type, body, false)
}

/// A complete response, keeping the connection open or not (the publish port keeps HTTP
/// connections alive). A 304 is sent without `Content-Length`, which there would have to
/// describe the body a 200 would carry.
pub fn message(
    status: &str,
    headers: &str,
    content_type: &str,
    body: &str,
    keep_alive: bool,
) -> Vec<u8> {
    let length = if status.starts_with("304") {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Type: {content_type}\r\n{length}\
         Connection: {connection}\r\n\r\n{body}"
    )
    .into_bytes()
}

/// Percent-decodes a query value (`+` is a space, as in a form). `None` when an escape is
/// malformed or the result is not UTF-8.
pub fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%3Ab+c").as_deref(), Some("a:b c"));
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%ff"), None, "not UTF-8");
    }
}
