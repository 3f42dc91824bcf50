//! RFC 7692 negotiation: whether a `Sec-WebSocket-Extensions` header offers
//! `permessage-deflate` on terms this server can honour without per-connection compressor
//! state, and what the 101 response then says ([`AGREED`]).
//!
//! The answer always carries both `no_context_takeover` parameters, which RFC 7692 lets a
//! server add to any offer it accepts (7.1.1.1, 7.1.1.2): every event is then compressed
//! once, on its own, and shared by every subscriber, and every client message inflates on
//! its own. An offer is declined (the next one is tried, and with none left the connection
//! goes uncompressed, RFC 7692 5) when it has an unknown parameter, a parameter twice, a
//! malformed value, or a `server_max_window_bits` below 15: the shared frames are compressed
//! with the full 32 KiB window, so a smaller one cannot be promised.

/// The `Sec-WebSocket-Extensions` value of a 101 response that accepts compression.
pub const AGREED: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// True when one of `values` (every `Sec-WebSocket-Extensions` header of the request) holds
/// an acceptable `permessage-deflate` offer.
pub fn accepts<'a>(values: impl IntoIterator<Item = &'a str>) -> bool {
    values
        .into_iter()
        .flat_map(|value| value.split(','))
        .any(acceptable)
}

/// One offer: `permessage-deflate` followed by `; name[=value]` parameters.
fn acceptable(offer: &str) -> bool {
    let mut parts = offer.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate"))
    {
        return false;
    }
    let mut seen = 0u8;
    for parameter in parts {
        let (name, value) = match parameter.split_once('=') {
            Some((name, value)) => (name.trim(), Some(unquoted(value.trim()))),
            None => (parameter, None),
        };
        let bit = match (name.to_ascii_lowercase().as_str(), value) {
            ("server_no_context_takeover", None) => 1,
            ("client_no_context_takeover", None) => 2,
            ("client_max_window_bits", None) => 4,
            ("client_max_window_bits", Some(bits)) if window_bits(bits).is_some() => 4,
            ("server_max_window_bits", Some(bits)) if window_bits(bits) == Some(15) => 8,
            _ => return false,
        };
        if seen & bit != 0 {
            return false;
        }
        seen |= bit;
    }
    true
}

/// A value without the quotes RFC 7692 7.1 allows around it.
fn unquoted(value: &str) -> Option<&str> {
    match value.strip_prefix('"') {
        Some(inner) => inner.strip_suffix('"'),
        None => Some(value),
    }
}

/// A window size: 8 to 15, in decimal without a leading zero (RFC 7692 7.1.2).
fn window_bits(value: Option<&str>) -> Option<u8> {
    let value = value?;
    if value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_browsers_offer_is_accepted() {
        // Chromium, Firefox, Safari.
        assert!(accepts(["permessage-deflate; client_max_window_bits"]));
        assert!(accepts(["permessage-deflate"]));
        assert!(accepts([
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ]));
        assert!(accepts(["PerMessage-Deflate; Client_Max_Window_Bits=10"]));
        assert!(accepts([
            "permessage-deflate; server_max_window_bits=\"15\""
        ]));
    }

    #[test]
    fn an_offer_it_cannot_honour_is_declined_and_the_next_one_tried() {
        for declined in [
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=1a",
            "permessage-deflate; client_max_window_bits=\"10",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=9",
            "permessage-deflate; mystery",
            "x-webkit-deflate-frame",
            "",
        ] {
            assert!(!accepts([declined]), "{declined:?}");
            let then = format!("{declined}, permessage-deflate");
            assert!(accepts([then.as_str()]), "{then:?}");
        }
        assert!(accepts(["foo", "permessage-deflate"]), "a later header");
    }
}
