//! RESP3 on byte buffers, through the `redis-protocol` codec: commands encoded as arrays of
//! blob strings, replies decoded one frame at a time from what a connection has read
//! (partial input is "need more", not an error), and the few ways sidecast reads a frame.

use bytes::{Bytes, BytesMut};
use redis_protocol::resp3::decode::complete::decode_bytes_mut;
use redis_protocol::resp3::encode::complete::extend_encode_borrowed;
use redis_protocol::resp3::types::{BorrowedFrame, BytesFrame};

/// A decoded RESP3 frame.
pub type Frame = BytesFrame;

/// Appends the command `args` (name first) to `out`.
pub fn encode(out: &mut BytesMut, args: &[&[u8]]) {
    let frames: Vec<BorrowedFrame<'_>> = args
        .iter()
        .map(|arg| BorrowedFrame::BlobString {
            data: arg,
            attributes: None,
        })
        .collect();
    let array = BorrowedFrame::Array {
        data: &frames,
        attributes: None,
    };
    extend_encode_borrowed(out, &array, false).expect("an array of blobs always encodes");
}

/// Takes the next complete frame off the front of `input`: `Ok(None)` when more bytes are
/// needed.
///
/// # Errors
/// The bytes are not RESP3: the connection cannot be trusted any more.
pub fn decode(input: &mut BytesMut) -> Result<Option<Frame>, String> {
    match decode_bytes_mut(input) {
        Ok(Some((frame, _, _))) => Ok(Some(frame)),
        Ok(None) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// The text of an error reply.
pub fn error_text(frame: &Frame) -> Option<String> {
    match frame {
        Frame::SimpleError { data, .. } => Some(data.to_string()),
        Frame::BlobError { data, .. } => Some(String::from_utf8_lossy(data).into_owned()),
        _ => None,
    }
}

/// The bytes of a string reply.
pub fn bytes(frame: &Frame) -> Option<&Bytes> {
    match frame {
        Frame::BlobString { data, .. }
        | Frame::SimpleString { data, .. }
        | Frame::VerbatimString { data, .. } => Some(data),
        _ => None,
    }
}

/// A string reply as text.
pub fn text(frame: &Frame) -> Option<&str> {
    bytes(frame).and_then(|b| std::str::from_utf8(b).ok())
}

/// An integer reply (or an integer written as a string, as Lua numbers sometimes are).
pub fn int(frame: &Frame) -> Option<i64> {
    match frame {
        Frame::Number { data, .. } => Some(*data),
        other => text(other).and_then(|t| t.parse().ok()),
    }
}

/// The elements of an array, set or push.
pub fn items(frame: &Frame) -> Option<&[Frame]> {
    match frame {
        Frame::Array { data, .. } | Frame::Push { data, .. } => Some(data),
        _ => None,
    }
}

/// Where a cluster redirection sends a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Redirect {
    /// `MOVED slot host:port`: the slot lives there now.
    Moved(u16, String),
    /// `ASK slot host:port`: this one command goes there, after `ASKING`.
    Ask(u16, String),
}

/// Reads a `MOVED` or `ASK` error.
pub fn redirect(error: &str) -> Option<Redirect> {
    let mut words = error.split_ascii_whitespace();
    let kind = words.next()?;
    let slot = words.next()?.parse().ok()?;
    let addr = words.next()?.to_string();
    match kind {
        "MOVED" => Some(Redirect::Moved(slot, addr)),
        "ASK" => Some(Redirect::Ask(slot, addr)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands_as_arrays_of_blobs() {
        let mut out = BytesMut::new();
        encode(&mut out, &[b"SET", b"k", b"v w"]);
        assert_eq!(&out[..], b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv w\r\n");
    }

    #[test]
    fn partial_input_needs_more_and_frames_come_off_in_order() {
        let mut input = BytesMut::from(&b">3\r\n$8\r\nsmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n:4"[..]);
        let push = decode(&mut input).unwrap().unwrap();
        let parts = items(&push).unwrap();
        assert_eq!(text(&parts[0]), Some("smessage"));
        assert_eq!(text(&parts[2]), Some("hi"));
        assert_eq!(decode(&mut input).unwrap(), None, "`:4` lacks its CRLF");
        input.extend_from_slice(b"2\r\n-NOSCRIPT No matching script\r\n");
        assert_eq!(int(&decode(&mut input).unwrap().unwrap()), Some(42));
        let error = decode(&mut input).unwrap().unwrap();
        assert_eq!(error_text(&error).unwrap(), "NOSCRIPT No matching script");
        assert!(input.is_empty());
        assert!(decode(&mut BytesMut::from(&b"?what\r\n"[..])).is_err());
    }

    #[test]
    fn reads_redirections() {
        assert_eq!(
            redirect("MOVED 3999 127.0.0.1:6381"),
            Some(Redirect::Moved(3999, "127.0.0.1:6381".into()))
        );
        assert_eq!(
            redirect("ASK 1 10.0.0.2:7000"),
            Some(Redirect::Ask(1, "10.0.0.2:7000".into()))
        );
        assert_eq!(redirect("ERR unknown command"), None);
    }
}
