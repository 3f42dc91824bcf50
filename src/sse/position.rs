//! Where an event stream stands in each of its channels, and the SSE `id` that carries it.
//!
//! The id lists one position per channel of the request, in the request's order, separated
//! by commas: `<epoch>:<seq>` once the channel has been answered (`subscribed`, a `gap` or an
//! event moved it), empty before that (`5f3a09c1:17,,9c2e71d0:40`). A browser's
//! `EventSource` sends the last id it saw as `Last-Event-ID` when it reconnects, so the
//! stream resumes every channel from where it was, on any node: the id alone is the state.
//!
//! Bounds: at most [`MAX_BATCH`](crate::ws::wire::MAX_BATCH) channels, an epoch of at most
//! [`MAX_EPOCH_LEN`] characters and a 20-digit seq each, so an id is at most about 86 bytes
//! per channel; a reconnect's request head (query and `Last-Event-ID` together) must also
//! fit in `max_header_size`.
//!
//! Invariant: `entries` has exactly one position per channel of the request, in order.

use bytes::{BufMut, BytesMut};

use crate::base::channel::Since;

/// Longest epoch accepted in an id: the server makes 8 hex digits.
pub const MAX_EPOCH_LEN: usize = 64;

/// One channel's position.
#[derive(Debug, PartialEq, Eq)]
struct Position {
    channel: Box<str>,
    /// The epoch and the last seq the stream delivered (or was told of) in it.
    at: Option<(Box<str>, u64)>,
}

/// Every channel's position in one stream.
#[derive(Debug, PartialEq, Eq)]
pub struct Positions {
    entries: Vec<Position>,
}

impl Positions {
    /// The positions of `channels` as `id` (a `Last-Event-ID`) gives them; all unknown
    /// without one.
    ///
    /// # Errors
    /// Why `id` is not one this stream's channels could have been given.
    pub fn parse(channels: Vec<Box<str>>, id: Option<&str>) -> Result<Positions, &'static str> {
        let Some(id) = id.map(str::trim).filter(|id| !id.is_empty()) else {
            let entries = channels
                .into_iter()
                .map(|channel| Position { channel, at: None })
                .collect();
            return Ok(Positions { entries });
        };
        let count = id.split(',').count();
        if count != channels.len() {
            return Err("Last-Event-ID does not hold one position per channel");
        }
        let entries = channels
            .into_iter()
            .zip(id.split(','))
            .map(|(channel, at)| {
                let at = if at.is_empty() {
                    None
                } else {
                    Some(parse_one(at).ok_or("Last-Event-ID holds a malformed position")?)
                };
                Ok(Position { channel, at })
            })
            .collect::<Result<_, &'static str>>()?;
        Ok(Positions { entries })
    }

    /// The channels, in the request's order, with where each resumes.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<Since>)> {
        self.entries.iter().map(|p| {
            let since = p.at.as_ref().map(|(epoch, seq)| Since {
                seq: *seq,
                epoch: epoch.to_string(),
            });
            (&*p.channel, since)
        })
    }

    /// `channel` is at `seq` of `epoch` (a `subscribed` or a `gap`).
    pub fn reset(&mut self, channel: &str, seq: u64, epoch: &str) {
        for p in self.entries.iter_mut().filter(|p| &*p.channel == channel) {
            match &mut p.at {
                Some((current, at)) if **current == *epoch => *at = seq,
                at => *at = Some((epoch.into(), seq)),
            }
        }
    }

    /// An event `seq` of `channel` was delivered. True when the channel is one of the
    /// stream's (its id changed).
    pub fn advance(&mut self, channel: &str, seq: u64) -> bool {
        let mut moved = false;
        for p in self.entries.iter_mut().filter(|p| &*p.channel == channel) {
            if let Some((_, at)) = &mut p.at {
                *at = seq;
                moved = true;
            }
        }
        moved
    }

    /// Writes the id.
    pub fn write(&self, out: &mut BytesMut) {
        for (i, p) in self.entries.iter().enumerate() {
            if i > 0 {
                out.put_u8(b',');
            }
            if let Some((epoch, seq)) = &p.at {
                out.put_slice(epoch.as_bytes());
                out.put_u8(b':');
                write_u64(out, *seq);
            }
        }
    }

    /// An upper bound of the id's length, to reserve.
    pub fn max_len(&self) -> usize {
        self.entries
            .iter()
            .map(|p| p.at.as_ref().map_or(1, |(epoch, _)| epoch.len() + 22))
            .sum()
    }
}

/// `<epoch>:<seq>`, the epoch 1 to `MAX_EPOCH_LEN` of `A-Z a-z 0-9 _ -`.
fn parse_one(at: &str) -> Option<(Box<str>, u64)> {
    let (epoch, seq) = at.rsplit_once(':')?;
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-');
    if epoch.is_empty() || epoch.len() > MAX_EPOCH_LEN || !epoch.bytes().all(allowed) {
        return None;
    }
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((epoch.into(), seq.parse().ok()?))
}

/// Writes `n` in decimal, without going through `fmt`.
fn write_u64(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channels(names: &[&str]) -> Vec<Box<str>> {
        names.iter().map(|&n| n.into()).collect()
    }

    fn id(positions: &Positions) -> String {
        let mut out = BytesMut::new();
        positions.write(&mut out);
        assert!(out.len() <= positions.max_len());
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn an_id_round_trips_and_moves_with_the_stream() {
        let mut positions = Positions::parse(channels(&["a", "b", "c"]), None).unwrap();
        assert_eq!(id(&positions), ",,");
        positions.reset("a", 17, "5f3a09c1");
        assert!(positions.advance("a", 18));
        assert!(!positions.advance("b", 3), "b was never answered");
        assert!(!positions.advance("zz", 3), "not one of the stream's");
        positions.reset("c", 0, "9c2e71d0");
        positions.reset("c", 40, "9c2e71d0");
        assert_eq!(id(&positions), "5f3a09c1:18,,9c2e71d0:40");
        let back = Positions::parse(channels(&["a", "b", "c"]), Some(&id(&positions))).unwrap();
        assert_eq!(back, positions);
        let resumes: Vec<_> = back.iter().map(|(c, s)| (c.to_string(), s)).collect();
        assert_eq!(
            resumes[0],
            (
                "a".into(),
                Some(Since {
                    seq: 18,
                    epoch: "5f3a09c1".into()
                })
            )
        );
        assert_eq!(resumes[1], ("b".into(), None));
        let mut moved = back;
        moved.reset("a", 0, "00000001");
        assert_eq!(
            id(&moved),
            "00000001:0,,9c2e71d0:40",
            "a new epoch replaces the old"
        );
        assert_eq!(write_digits(u64::MAX), u64::MAX.to_string());
    }

    fn write_digits(n: u64) -> String {
        let mut out = BytesMut::new();
        write_u64(&mut out, n);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn ids_that_do_not_fit_the_channels_are_refused() {
        let two = || channels(&["a", "b"]);
        for bad in [
            "x:1",
            "x:1,y:2,z:3",
            "x1,",
            "x:,",
            ":1,",
            "x:-1,",
            "x:1e3,",
            "x y:1,",
            "x:99999999999999999999999,",
        ] {
            assert!(Positions::parse(two(), Some(bad)).is_err(), "{bad}");
        }
        let long = format!("{}:1,", "e".repeat(MAX_EPOCH_LEN + 1));
        assert!(Positions::parse(two(), Some(&long)).is_err());
        assert!(Positions::parse(two(), Some(" ")).is_ok(), "blank is no id");
        assert!(Positions::parse(two(), Some("x:1,")).is_ok());
    }
}
