//! Which open connections belong to each authenticated user: the index behind `{"user":...}`
//! publishes, `{"op":"disconnect"}` and `max_connections_per_user`.
//!
//! Invariant: a user is listed while, and only while, at least one of their connections is
//! open; each connection appears once.

use std::collections::HashMap;

use crate::base::ids::ConnId;

/// Open connections per user.
#[derive(Default)]
pub struct Users(HashMap<Box<str>, Vec<ConnId>>);

impl Users {
    /// The open connections of `user` (empty when none).
    pub fn connections(&self, user: &str) -> &[ConnId] {
        self.0.get(user).map_or(&[], Vec::as_slice)
    }

    /// Records that `conn` is open for `user`; true when it is the user's first.
    pub fn add(&mut self, user: &str, conn: ConnId) -> bool {
        let tabs = self.0.entry(user.into()).or_default();
        debug_assert!(!tabs.contains(&conn));
        tabs.push(conn);
        tabs.len() == 1
    }

    /// Forgets `conn` of `user`, and the user with their last connection; true when it was
    /// the last.
    pub fn remove(&mut self, user: &str, conn: ConnId) -> bool {
        let Some(tabs) = self.0.get_mut(user) else {
            return false;
        };
        tabs.retain(|id| *id != conn);
        if tabs.is_empty() {
            self.0.remove(user);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_listed_while_a_connection_is_open() {
        let conn = |key| ConnId {
            key,
            generation: key,
        };
        let mut users = Users::default();
        users.add("u1", conn(1));
        users.add("u1", conn(2));
        assert_eq!(users.connections("u1"), [conn(1), conn(2)]);
        users.remove("u1", conn(1));
        users.remove("u1", conn(2));
        assert!(users.connections("u1").is_empty());
        assert!(users.0.is_empty(), "the user is forgotten");
    }
}
