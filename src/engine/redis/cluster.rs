//! Which Redis node serves which key: one node for a standalone Redis, or the slot map of a
//! Redis Cluster (`CLUSTER SLOTS`), kept current by `MOVED` redirections and re-reads.

use super::resp::{self, Frame};

/// Slots in a Redis Cluster.
pub const SLOTS: usize = 16384;

/// The slot → master map.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// The master of each slot, by address; empty for a standalone Redis.
    owners: Vec<Option<usize>>,
    /// Master addresses, `host:port`.
    pub masters: Vec<String>,
}

impl SlotMap {
    /// A standalone Redis: every key on `addr`.
    pub fn standalone(addr: &str) -> SlotMap {
        SlotMap {
            owners: Vec::new(),
            masters: vec![addr.to_string()],
        }
    }

    /// Whether this is a cluster's map.
    pub fn is_cluster(&self) -> bool {
        !self.owners.is_empty()
    }

    /// Reads a `CLUSTER SLOTS` reply; `seed_host` stands in for an empty host (the node's
    /// own address). `None` when the reply is not a slot map or leaves a slot unserved.
    pub fn from_cluster_slots(reply: &Frame, seed_host: &str) -> Option<SlotMap> {
        let mut map = SlotMap {
            owners: vec![None; SLOTS],
            masters: Vec::new(),
        };
        for range in resp::items(reply)? {
            let parts = resp::items(range)?;
            let (start, end) = (resp::int(parts.first()?)?, resp::int(parts.get(1)?)?);
            let master = resp::items(parts.get(2)?)?;
            let host = resp::text(master.first()?)?;
            let host = if host.is_empty() || host == "?" {
                seed_host
            } else {
                host
            };
            let addr = format!("{host}:{}", resp::int(master.get(1)?)?);
            let index = map.index_of(&addr);
            let range = usize::try_from(start).ok()?..=usize::try_from(end).ok()?;
            for slot in map.owners.get_mut(range)? {
                *slot = Some(index);
            }
        }
        map.owners.iter().all(Option::is_some).then_some(map)
    }

    fn index_of(&mut self, addr: &str) -> usize {
        match self.masters.iter().position(|m| m == addr) {
            Some(i) => i,
            None => {
                self.masters.push(addr.to_string());
                self.masters.len() - 1
            }
        }
    }

    /// The master serving `slot`.
    pub fn owner(&self, slot: u16) -> &str {
        let index = match self.owners.get(usize::from(slot)) {
            Some(Some(i)) => *i,
            _ => 0,
        };
        &self.masters[index]
    }

    /// A `MOVED`: `slot` is served by `addr` now.
    pub fn moved(&mut self, slot: u16, addr: &str) {
        if self.is_cluster() {
            let index = self.index_of(addr);
            self.owners[usize::from(slot)] = Some(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn frame(bytes: &[u8]) -> Frame {
        resp::decode(&mut BytesMut::from(bytes)).unwrap().unwrap()
    }

    #[test]
    fn reads_a_slot_map_and_follows_moves() {
        let reply = frame(
            b"*2\r\n\
              *3\r\n:0\r\n:8191\r\n*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$2\r\nid\r\n\
              *4\r\n:8192\r\n:16383\r\n*2\r\n$0\r\n\r\n:7001\r\n*2\r\n$1\r\nx\r\n:1\r\n",
        );
        let mut map = SlotMap::from_cluster_slots(&reply, "10.0.0.9").unwrap();
        assert!(map.is_cluster());
        assert_eq!(map.owner(0), "127.0.0.1:7000");
        assert_eq!(map.owner(8191), "127.0.0.1:7000");
        assert_eq!(
            map.owner(16383),
            "10.0.0.9:7001",
            "an empty host is the seed's"
        );
        map.moved(5, "127.0.0.1:7002");
        assert_eq!(map.owner(5), "127.0.0.1:7002");
        assert_eq!(map.masters.len(), 3);
        // A map that leaves slots unserved is not used.
        let partial = frame(b"*1\r\n*3\r\n:0\r\n:10\r\n*2\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(SlotMap::from_cluster_slots(&partial, "h"), None);
        assert_eq!(SlotMap::standalone("h:1").owner(9), "h:1");
    }
}
