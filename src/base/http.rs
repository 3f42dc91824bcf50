//! HTTP/1.1 responses as bytes, for the WebSocket port's routes, the served assets and the
//! publish port's HTTP framing.

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
