//! The ids that outlive a slab slot's borrow: a connection's [`ConnId`] (checked against the
//! slab's current occupant before use), a hub channel's [`ChannelId`], and an acknowledged
//! event's [`AckKey`].

/// Identifies a connection across slab-key reuse: `generation` is unique per accepted
/// connection, so a stale id (in a timer or subscriber list) is detectable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    /// The key in the client slab.
    pub key: u32,
    /// Unique per accepted connection.
    pub generation: u32,
}

/// Index of a channel in the hub, valid while the channel has subscribers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelId(u32);

impl ChannelId {
    /// The id of the hub's slot `index`.
    pub fn new(index: usize) -> ChannelId {
        ChannelId(index as u32)
    }

    /// The hub's slot.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Identifies this node's tally of an acknowledged event awaiting its pages' acks, across
/// slot reuse: a stale key (its count already final) is told apart by its serial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckKey {
    /// The slot in the fan-out's tallies.
    pub slot: u32,
    /// Unique per acknowledged event.
    pub serial: u32,
}
