//! `GET /sse?channels=…`: what a stream subscribes to, and where each channel resumes.
//!
//! The query (values percent-decoded, unknown parameters ignored):
//! - `channels`: comma-separated channel names, at most [`MAX_BATCH`]; a name written
//!   `name~N` wants the channel's latest `N` events first (its own `rewind`). Required, but
//!   may be empty: such a stream carries broadcasts and the user's own events;
//! - `rewind=N`: the same for every channel without its own;
//! - `lastEventId`: an id this server sent on a stream with the same `channels` (see
//!   [`position`](super::position)): where each channel resumes. The `Last-Event-ID` header,
//!   which a browser's `EventSource` sends by itself when it reconnects, wins over it;
//! - `token`: read by the route (as for `/ws`), not here.
//!
//! A query that cannot be a stream (no channels, too many, a malformed `rewind` or id) is a
//! 400; a channel with a bad name is refused on its own, in the stream, as a batch
//! `subscribe` would be.

use super::position::Positions;
use crate::base::channel::{Backfill, ChannelName};
use crate::base::http::percent_decode as decode;
use crate::ws::wire::{ErrorCode, MAX_BATCH, Rejection, Subscribing};

/// What a stream subscribes to, and where it starts.
#[derive(Debug, PartialEq)]
pub struct Opening {
    /// Each channel of the request, in order, or why it is refused.
    pub entries: Vec<Result<Subscribing, Rejection>>,
    /// Where the stream stands in each channel as it opens.
    pub positions: Positions,
}

/// Parses the query of `GET /sse` and its `Last-Event-ID` header.
///
/// # Errors
/// The reason for a 400.
pub fn parse(query: &str, last_event_id: Option<&str>) -> Result<Opening, &'static str> {
    let mut channels = None;
    let mut rewind = 0;
    let mut id_in_query = None;
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "channels" => channels = Some(decode(value).ok_or(BAD_ENCODING)?),
            "rewind" => rewind = count(&decode(value).ok_or(BAD_ENCODING)?).ok_or(BAD_REWIND)?,
            "lastEventId" => id_in_query = Some(decode(value).ok_or(BAD_ENCODING)?),
            _ => {}
        }
    }
    let channels = channels.ok_or(NO_CHANNELS)?;
    let names: Vec<&str> = channels.split(',').filter(|n| !n.is_empty()).collect();
    if names.len() > MAX_BATCH {
        return Err(TOO_MANY);
    }
    let mut wanted = Vec::with_capacity(names.len());
    let mut rewinds = Vec::with_capacity(names.len());
    for name in names {
        let (name, own) = match name.split_once('~') {
            Some((name, n)) => (name, count(n).ok_or(BAD_REWIND)?),
            None => (name, rewind),
        };
        wanted.push(Box::<str>::from(name));
        rewinds.push(own);
    }
    let id = last_event_id.or(id_in_query.as_deref());
    let positions = Positions::parse(wanted, id)?;
    let entries = positions
        .iter()
        .zip(rewinds)
        .map(|((name, since), rewind)| {
            let channel = ChannelName::parse(name).map_err(|why| Rejection {
                channel: Some(name.to_string()),
                ..Rejection::new(ErrorCode::InvalidChannel, why)
            })?;
            Ok(Subscribing {
                channel,
                backfill: Backfill { since, rewind },
            })
        })
        .collect();
    Ok(Opening { entries, positions })
}

const BAD_ENCODING: &str = "malformed percent-encoding in the query";
const BAD_REWIND: &str = "rewind must be a whole number of events, at least 1";
const NO_CHANNELS: &str = "name the channels: /sse?channels=a,b (empty for none)";
const TOO_MANY: &str = "at most 1000 channels per stream";

/// A `rewind` count: a whole number, at least 1.
fn count(text: &str) -> Option<usize> {
    let n: usize = text.parse().ok()?;
    (n >= 1).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::channel::Since;

    fn channels(opening: &Opening) -> Vec<(String, Option<Since>, usize)> {
        opening
            .entries
            .iter()
            .map(|e| {
                let s = e.as_ref().unwrap();
                let b = &s.backfill;
                (s.channel.to_string(), b.since.clone(), b.rewind)
            })
            .collect()
    }

    #[test]
    fn channels_rewinds_and_positions() {
        let opening = parse("channels=order%3A7,job:1~3&rewind=1&token=abc", None).unwrap();
        assert_eq!(
            channels(&opening),
            [("order:7".into(), None, 1), ("job:1".into(), None, 3)]
        );
        let since = |seq, epoch: &str| {
            Some(Since {
                seq,
                epoch: epoch.into(),
            })
        };
        let query = "channels=a,b&lastEventId=e1%3A4%2C";
        let opening = parse(query, None).unwrap();
        assert_eq!(
            channels(&opening),
            [("a".into(), since(4, "e1"), 0), ("b".into(), None, 0)]
        );
        let header_wins = parse(query, Some(",e2:9")).unwrap();
        assert_eq!(
            channels(&header_wins),
            [("a".into(), None, 0), ("b".into(), since(9, "e2"), 0)]
        );
    }

    #[test]
    fn a_bad_name_is_refused_alone_and_a_bad_query_whole() {
        let opening = parse("channels=ok,bad%20name", None).unwrap();
        assert!(opening.entries[0].is_ok());
        let refused = opening.entries[1].as_ref().unwrap_err();
        assert_eq!(refused.code, ErrorCode::InvalidChannel);
        assert_eq!(refused.channel.as_deref(), Some("bad name"));
        for (query, why) in [
            ("", NO_CHANNELS),
            ("rewind=1", NO_CHANNELS),
            ("channels=a&rewind=0", BAD_REWIND),
            ("channels=a~x", BAD_REWIND),
            ("channels=a%zz", BAD_ENCODING),
            (
                "channels=a,b&lastEventId=x:1",
                "Last-Event-ID does not hold one position per channel",
            ),
        ] {
            assert_eq!(parse(query, None).unwrap_err(), why, "{query}");
        }
        let many = vec!["c"; MAX_BATCH + 1].join(",");
        assert_eq!(
            parse(&format!("channels={many}"), None).unwrap_err(),
            TOO_MANY
        );
        let none = parse("channels=", None).unwrap();
        assert!(
            none.entries.is_empty(),
            "broadcasts and the user's own events only"
        );
    }
}
