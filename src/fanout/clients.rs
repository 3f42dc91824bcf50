//! The WebSocket-port connections, in a slab, and the dirty list of those with work for the
//! next flush.
//!
//! Invariant (sozu's "writable invariant", kept by construction): every connection that had
//! bytes queued since the last flush is on the dirty list. Mutable access goes only through
//! [`Clients::get_mut`], whose guard puts the connection on the list when the borrow ends if
//! it queued anything ([`ClientConn::list`]), so no path can forget.

use std::ops::{Deref, DerefMut};

use slab::Slab;

use crate::base::ids::ConnId;
use crate::ws::conn::ClientConn;

/// The connections and their dirty list.
#[derive(Default)]
pub struct Clients {
    slab: Slab<ClientConn>,
    dirty: Vec<usize>,
}

/// A connection borrowed for change; lists it as dirty when dropped, if it needs a flush.
pub struct Conn<'a> {
    key: usize,
    conn: &'a mut ClientConn,
    dirty: &'a mut Vec<usize>,
}

impl Deref for Conn<'_> {
    type Target = ClientConn;
    fn deref(&self) -> &ClientConn {
        self.conn
    }
}

impl DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut ClientConn {
        self.conn
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if self.conn.list() {
            self.dirty.push(self.key);
        }
    }
}

impl Conn<'_> {
    /// Lists the connection for the next flush whatever it holds (its socket became
    /// writable).
    pub fn mark_writable(&mut self) {
        if self.conn.relist() {
            self.dirty.push(self.key);
        }
    }
}

impl Clients {
    /// The connection at `key`, to change.
    pub fn get_mut(&mut self, key: usize) -> Option<Conn<'_>> {
        let conn = self.slab.get_mut(key)?;
        Some(Conn {
            key,
            conn,
            dirty: &mut self.dirty,
        })
    }

    /// The connection at `key`, to change; the caller knows it is there (it was just
    /// looked up, or its key comes from this pass).
    ///
    /// # Panics
    /// When no connection is at `key`: a reactor bug.
    pub fn live_mut(&mut self, key: usize) -> Conn<'_> {
        self.get_mut(key).expect("a live connection at this key")
    }

    /// The connection at `key`, to look at; as [`live_mut`](Clients::live_mut).
    ///
    /// # Panics
    /// When no connection is at `key`.
    pub fn live(&self, key: usize) -> &ClientConn {
        self.get(key).expect("a live connection at this key")
    }

    /// The connection at `key`, to look at.
    pub fn get(&self, key: usize) -> Option<&ClientConn> {
        self.slab.get(key)
    }

    /// The connection `id` names, if it is still the one at its key (keys are reused).
    pub fn current(&mut self, id: ConnId) -> Option<Conn<'_>> {
        self.get_mut(id.key as usize).filter(|c| c.id() == id)
    }

    /// True while `id` names a connection still in the slab.
    pub fn is_current(&self, id: ConnId) -> bool {
        self.slab.get(id.key as usize).is_some_and(|c| c.id() == id)
    }

    /// Inserts a connection built from its key.
    pub fn insert(&mut self, make: impl FnOnce(usize) -> ClientConn) -> usize {
        let entry = self.slab.vacant_entry();
        let key = entry.key();
        entry.insert(make(key));
        key
    }

    /// The key the next insert will take.
    pub fn next_key(&self) -> usize {
        self.slab.vacant_key()
    }

    /// Removes a connection (it stays harmlessly on the dirty list: a later key reuse finds
    /// its successor, whose flush is then only early).
    pub fn remove(&mut self, key: usize) -> Option<ClientConn> {
        self.slab.try_remove(key)
    }

    /// Open connections and connections still in their request or draining phase.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Every key, for a pass over all connections.
    pub fn keys(&self) -> Vec<usize> {
        self.slab.iter().map(|(key, _)| key).collect()
    }

    /// Every connection, to change: the broadcast path. Each is listed as it is dropped.
    pub fn for_each(&mut self, mut f: impl FnMut(&mut Conn<'_>)) {
        for (key, conn) in self.slab.iter_mut() {
            f(&mut Conn {
                key,
                conn,
                dirty: &mut self.dirty,
            });
        }
    }

    /// The dirty keys so far in this pass (slow consumers are looked for among them).
    pub fn dirty(&self) -> &[usize] {
        &self.dirty
    }

    /// Takes the dirty list, for the flush; the list stays allocated between passes.
    pub fn take_dirty(&mut self, into: &mut Vec<usize>) {
        into.clear();
        std::mem::swap(into, &mut self.dirty);
    }
}
