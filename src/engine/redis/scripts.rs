//! The Lua scripts that keep each channel's state consistent in Redis, and the key layout
//! they work on. Every key of a channel, and its shard channel, carry the channel name as
//! their hash tag, so a script touches one slot and runs on one shard:
//!
//! ```text
//! <prefix>{<channel>}:m        hash: e = epoch, s = last seq
//! <prefix>{<channel>}:h        stream: one entry per event, id <seq>-0, fields k (kind), d (data), a (ack tag, if any)
//! <prefix>{<channel>}:i:<key>  string "<seq>:<nodes>": a publish made under idempotency key <key>
//! <prefix>{<channel>}          shard channel: "<kind><seq>:<epoch>:<data>", "a<ack tag>:<kind><seq>:<epoch>:<data>", "d" (disconnect), "p<presence change>"
//! <prefix>{<channel>}:p        hash: presence members, member id → {"user":…,"info":…}
//! <prefix>{<channel>}:pc       sorted set: their connections, "<member id>\n<client id>", score = lease expiry (ms)
//! <prefix>{<channel>}:pn       hash: member id → connections in :pc
//! <prefix>{<channel>}:pl       sorted set: members whose last connection left, score = when they leave (ms)
//! <prefix>{<channel>}:pv       string: the presence version, one more per join or leave
//! <prefix>{<channel>}:pr       string: the roster is being restored after Redis lost it (for a lease)
//! <prefix>{user:<id>}:l        sorted set: the user's connections, member <node>:<conn>, score = lease expiry (ms)
//! <prefix>{sidecast:all}       shard channel of broadcasts: "b<data>"
//! <prefix>{sidecast:node:<id>} shard channel of one node's mail: the message as sent
//! ```
//! The message kinds are named in [`tag`], the stream fields in [`field`].
//!
//! A channel's epoch is made by the first script that finds none (after a Redis that lost
//! its data, or a channel idle past its lifetime), which also deletes any stream left from an
//! earlier epoch, so stream ids only grow within an epoch.

/// The first byte of a shard-channel message: what it is.
pub mod tag {
    /// An event: `e<seq>:<epoch>:<data>`.
    pub const EVENT: u8 = b'e';
    /// A `{"user":...}` event, which the user's connections receive too: `u<seq>:<epoch>:<data>`.
    pub const USER_EVENT: u8 = b'u';
    /// A broadcast, on the broadcast channel: `b<data>`.
    pub const BROADCAST: u8 = b'b';
    /// A `disconnect` of the user whose channel it is: `d`.
    pub const DISCONNECT: u8 = b'd';
    /// An acknowledged event: `a<ack tag>:` before the event's own message.
    pub const ACKED: u8 = b'a';
    /// A presence change: `p{"v":<version>,"id":<member>}` for a leave, with `"c"` (its
    /// client) and `"m"` (its `{"user":…,"info":…}`) for a join.
    pub const PRESENCE: u8 = b'p';
}

/// The fields of a stream entry (the scripts write them as `'k'` and `'d'`).
pub mod field {
    /// The entry's kind, a [`tag`](super::tag) byte (`e` or `u`).
    pub const KIND: &str = "k";
    /// The event's data.
    pub const DATA: &str = "d";
    /// An acknowledged event's [`AckTag`](crate::engine::AckTag), encoded.
    pub const ACK: &str = "a";
}

/// Assigns the next seq, appends the event to the stream and publishes it, atomically; with
/// an idempotency key, a key already used answers with the first publish instead.
///
/// KEYS: meta, stream, [idempotency key]. ARGV: shard channel, kind (`e` event, `u` user
/// event), data, epoch to create, history size, history TTL (ms), meta TTL (ms), idempotency
/// window (ms), ack tag (empty: none). Returns `{0, seq, nodes}`, or `{1, "<seq>:<nodes>"}`
/// for a duplicate.
pub const PUBLISH: &str = r"
local idem = KEYS[3]
if idem then
  local first = redis.call('GET', idem)
  if first then return {1, first} end
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 's', 0)
end
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[7])
local acked = ARGV[9] ~= ''
if tonumber(ARGV[5]) > 0 then
  if acked then
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[5], seq .. '-0', 'k', ARGV[2], 'd', ARGV[3], 'a', ARGV[9])
  else
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[5], seq .. '-0', 'k', ARGV[2], 'd', ARGV[3])
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
local message = ARGV[2] .. seq .. ':' .. epoch .. ':' .. ARGV[3]
if acked then message = 'a' .. ARGV[9] .. ':' .. message end
local nodes = redis.call('SPUBLISH', ARGV[1], message)
if idem then redis.call('SET', idem, seq .. ':' .. nodes, 'PX', ARGV[8]) end
return {0, seq, nodes}
";

/// Reads where a channel stands, creating its epoch if it has none, and the stream entries
/// the caller has not seen: one atomic step, so the entries end exactly at the seq returned.
/// When the caller's epoch is the channel's, they are those after the caller's seq; when it
/// is not, and the caller asks for the epoch from its start, those from seq 1 (a new epoch's
/// events are still events to deliver: only the old epoch's unread ones are lost). With a
/// rewind of N, when there is nothing to resume from in this epoch or the stream no longer
/// holds all of it, they are the channel's last N entries instead, marked as such.
///
/// KEYS: meta, stream. ARGV: epoch to create, meta TTL (ms), the caller's epoch (or empty),
/// the caller's seq, most entries, `1` to read another epoch from its start (else `0`),
/// rewind (0: none). Returns `{epoch, seq}` (nothing read), `{epoch, seq, entries}`, or
/// `{epoch, seq, entries, 1}` (the last entries, for a rewind).
pub const READ: &str = r"
local m = redis.call('HMGET', KEYS[1], 'e', 's')
local epoch, seq = m[1], tonumber(m[2])
if not epoch then
  epoch, seq = ARGV[1], 0
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 's', 0)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local rewind = tonumber(ARGV[7])
local since = tonumber(ARGV[4])
local other = ARGV[3] ~= epoch
if rewind == 0 and other and ARGV[6] ~= '1' then return {epoch, seq} end
if rewind == 0 or not other then
  if other then since = 0 end
  if since >= seq then return {epoch, seq, {}} end
  local entries = redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', '+', 'COUNT', ARGV[5])
  local whole = #entries == seq - since and (#entries == 0 or entries[1][1] == (since + 1) .. '-0')
  if whole or rewind == 0 then return {epoch, seq, entries} end
end
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', rewind)
local last = {}
for i = #newest, 1, -1 do last[#last + 1] = newest[i] end
return {epoch, seq, last, 1}
";

/// Takes or renews a lease on one of a user's connections, using Redis's clock so nodes'
/// clocks need not agree: expired leases go first, then a new member is refused when the
/// user holds `max` already.
///
/// KEYS: the user's lease set. ARGV: member, TTL (ms), max. Returns 1 (held) or 0 (refused).
pub const LEASE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// Adds connections to a channel's presence (renews those there): a member new to the
/// roster joins, announced on the shard channel with the next presence version; a lingering
/// member is back, and says nothing.
///
/// A node putting its connections back after its shard came back says `restore` and the
/// highest version it saw. A version behind that means Redis lost the roster: the version is
/// set back to it (so pages, which saw it, take later changes as newer), and for a lease every
/// node's connections are put back without a word (pages still have them). Returns 1 when
/// they were put back that way, else 0.
///
/// KEYS: roster, connections, counts, leaving, version, restoring. ARGV: shard channel, lease
/// (ms), keys' TTL (ms), `1` for restore, the version seen, then member id, client id, member
/// JSON per connection.
pub const PRESENCE_ENTER: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local silent = false
if ARGV[4] == '1' then
  if tonumber(redis.call('GET', KEYS[5]) or '0') < tonumber(ARGV[5]) then
    redis.call('SET', KEYS[5], ARGV[5])
    redis.call('SET', KEYS[6], '1', 'PX', ARGV[2])
  end
  silent = redis.call('EXISTS', KEYS[6]) == 1
end
for i = 6, #ARGV, 3 do
  local member = ARGV[i]
  if redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), member .. '\n' .. ARGV[i + 1]) == 1 then
    redis.call('HINCRBY', KEYS[3], member, 1)
  end
  redis.call('ZREM', KEYS[4], member)
  if redis.call('HSETNX', KEYS[1], member, ARGV[i + 2]) == 1 and not silent then
    local v = redis.call('INCR', KEYS[5])
    redis.call('SPUBLISH', ARGV[1], 'p' .. cjson.encode({v = v, id = member, c = ARGV[i + 1], m = ARGV[i + 2]}))
  end
end
for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
if silent then return 1 end
return 0
";

/// Removes a connection from a channel's presence: with its member's last one gone, the
/// member lingers until now + linger.
///
/// KEYS: roster, connections, counts, leaving. ARGV: member id, client id, linger (ms).
pub const PRESENCE_LEAVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZREM', KEYS[2], ARGV[1] .. '\n' .. ARGV[2]) == 1
  and redis.call('HINCRBY', KEYS[3], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[3]), ARGV[1])
end
return 0
";

/// Ends what is due in a channel's presence: connections whose lease expired (their node
/// stopped renewing them: it died) leave, their member lingering as after a close; members
/// whose linger ended leave the roster, each announced once (whichever node runs this first
/// removes them). At most 1000 of each per call.
///
/// KEYS: roster, connections, counts, leaving, version. ARGV: shard channel, linger (ms).
/// Returns how many members left.
pub const PRESENCE_REAP: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, conn in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', KEYS[2], conn)
  local cut = #conn - string.find(string.reverse(conn), '\n', 1, true)
  local member = string.sub(conn, 1, cut)
  if redis.call('HINCRBY', KEYS[3], member, -1) <= 0 then
    redis.call('HDEL', KEYS[3], member)
    redis.call('ZADD', KEYS[4], 'NX', now + tonumber(ARGV[2]), member)
  end
end
local left = 0
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', KEYS[4], member)
  if redis.call('HDEL', KEYS[1], member) == 1 then
    local v = redis.call('INCR', KEYS[5])
    redis.call('SPUBLISH', ARGV[1], 'p' .. cjson.encode({v = v, id = member}))
    left = left + 1
  end
end
return left
";

/// Reads a channel's presence in one step: `{version, {member id, member JSON, ...},
/// {connection, ...}}`.
///
/// KEYS: roster, connections, version.
pub const PRESENCE_READ: &str = r"
return {tonumber(redis.call('GET', KEYS[3]) or '0'), redis.call('HGETALL', KEYS[1]), redis.call('ZRANGE', KEYS[2], 0, -1)}
";

/// The scripts, in the order their SHA1s are kept.
pub const ALL: [&str; 7] = [
    PUBLISH,
    READ,
    LEASE,
    PRESENCE_ENTER,
    PRESENCE_LEAVE,
    PRESENCE_REAP,
    PRESENCE_READ,
];

/// A script, by its index in [`ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Script {
    /// [`PUBLISH`].
    Publish = 0,
    /// [`READ`].
    Read = 1,
    /// [`LEASE`].
    Lease = 2,
    /// [`PRESENCE_ENTER`].
    PresenceEnter = 3,
    /// [`PRESENCE_LEAVE`].
    PresenceLeave = 4,
    /// [`PRESENCE_REAP`].
    PresenceReap = 5,
    /// [`PRESENCE_READ`].
    PresenceRead = 6,
}

impl Script {
    /// The Lua source.
    pub fn source(self) -> &'static str {
        ALL[self as usize]
    }
}

/// Names of a channel's keys under `prefix`.
#[derive(Clone, Debug)]
pub struct Keys {
    /// The shard channel, `<prefix>{<channel>}`; every key below starts with it.
    pub shard_channel: String,
}

impl Keys {
    /// The keys of `channel`.
    pub fn of(prefix: &str, channel: &str) -> Keys {
        Keys {
            shard_channel: format!("{prefix}{{{channel}}}"),
        }
    }

    /// The hash of epoch and last seq.
    pub fn meta(&self) -> String {
        format!("{}:m", self.shard_channel)
    }

    /// The history stream.
    pub fn stream(&self) -> String {
        format!("{}:h", self.shard_channel)
    }

    /// The idempotency key `key`.
    pub fn idempotency(&self, key: &str) -> String {
        format!("{}:i:{key}", self.shard_channel)
    }

    /// The presence roster, and the keys beside it, in the order the presence scripts take
    /// them: roster, connections, counts, leaving, version, restoring.
    pub fn presence(&self) -> [String; 6] {
        ["p", "pc", "pn", "pl", "pv", "pr"].map(|k| format!("{}:{k}", self.shard_channel))
    }

    /// The lease set, for a `user:<id>` channel.
    pub fn leases(&self) -> String {
        format!("{}:l", self.shard_channel)
    }

    /// The cluster slot every key of the channel lives in.
    pub fn slot(&self) -> u16 {
        redis_protocol::redis_keyslot(self.shard_channel.as_bytes())
    }
}

/// The channel name inside a shard channel `<prefix>{<channel>}`.
pub fn channel_of<'a>(prefix: &str, shard_channel: &'a str) -> Option<&'a str> {
    shard_channel
        .strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix('}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_channel_is_in_its_slot() {
        let keys = Keys::of("sc:", "project:42");
        assert_eq!(keys.shard_channel, "sc:{project:42}");
        let slot = keys.slot();
        for key in [
            keys.meta(),
            keys.stream(),
            keys.idempotency("job-7"),
            keys.leases(),
        ]
        .into_iter()
        .chain(keys.presence())
        {
            assert_eq!(redis_protocol::redis_keyslot(key.as_bytes()), slot, "{key}");
        }
        assert_eq!(slot, redis_protocol::redis_keyslot(b"project:42"));
        assert_eq!(channel_of("sc:", "sc:{project:42}"), Some("project:42"));
        assert_eq!(channel_of("sc:", "other{x}"), None);
    }
}
