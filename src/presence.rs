//! Presence: who is connected to which room, and the ONLINE/OFFLINE statuses derived from it.
//!
//! A *connection* is one open `Subscribe` stream of a user; a user is online while at least one of their
//! connections is open anywhere. Services (role `publisher`) are not counted. [`PresenceTable`] is the
//! in-process bookkeeping; a distributed bus keeps the same counts in its own store. Statuses are
//! published coalesced, per tenant and window: see [`crate::statuses`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

/// `publisher_id` of the statuses the server itself publishes.
pub const SYSTEM_PUBLISHER: &str = "lamplight";

/// One connection of one user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The user (`sub`).
    pub user_id: String,
    /// The user's tenant: where their ONLINE/OFFLINE statuses go.
    pub tenant: String,
    /// Unique per connection on this node, across restarts too (see [`ConnectionIds`]).
    pub connection_id: String,
}

/// Issues connection ids `{boot}-{n}`: `boot` is random per process start, so a node restarted under the
/// same `--redis-node-id` never reuses an id of its previous run (whose entries may still be in Redis).
/// Ids contain no `/` (the separator of presence entries).
#[derive(Debug)]
pub struct ConnectionIds {
    boot: String,
    next: AtomicU64,
}

impl ConnectionIds {
    /// Ids of a new boot.
    pub fn new() -> Self {
        Self {
            boot: crate::bus::redis::random_token(8),
            next: AtomicU64::new(1),
        }
    }

    /// A fresh id.
    pub fn next(&self) -> String {
        format!(
            "{}-{}",
            self.boot,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

impl Default for ConnectionIds {
    fn default() -> Self {
        Self::new()
    }
}

/// Which of a room's users to list: those after `after` in user-id order, at most `limit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// The last user of the previous page; `None` for the first page.
    pub after: Option<String>,
    /// Users listed at most (at least 1 is listed when any follow).
    pub limit: usize,
}

impl PageRequest {
    /// Every user on one page (tests and small rooms).
    pub fn all() -> Self {
        Self {
            after: None,
            limit: usize::MAX,
        }
    }
}

/// Who is in a room: totals, and one page of its users.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PresenceSnapshot {
    /// This page's distinct users, sorted.
    pub user_ids: Vec<String>,
    /// Distinct users in the room, on every page.
    pub user_count: u32,
    /// Open connections in the room (a user with two tabs counts twice).
    pub connections: u32,
    /// The last user of this page when more users follow it, to ask for the next page with.
    pub more_after: Option<String>,
}

impl PresenceSnapshot {
    /// The page `page` asks for out of a room's `users` (sorted and distinct, `user_count` of them).
    pub fn page<'a>(
        users: impl Iterator<Item = &'a String>,
        user_count: usize,
        connections: u32,
        page: &PageRequest,
    ) -> Self {
        let mut rest = users.skip_while(|u| page.after.as_ref().is_some_and(|after| *u <= after));
        let user_ids: Vec<String> = rest.by_ref().take(page.limit.max(1)).cloned().collect();
        let more_after = match rest.next() {
            Some(_) => user_ids.last().cloned(),
            None => None,
        };
        Self {
            user_ids,
            user_count: u32::try_from(user_count).unwrap_or(u32::MAX),
            connections,
            more_after,
        }
    }
}

/// A status change to publish after [`PresenceTable::connect`] or [`PresenceTable::disconnect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The user's first connection opened.
    Online,
    /// The user's last connection closed.
    Offline,
    /// Nothing to announce.
    None,
}

/// In-process presence counts. Not synchronised: the owner wraps it in a lock.
#[derive(Debug, Default)]
pub struct PresenceTable {
    /// room -> user -> open connections.
    rooms: HashMap<String, BTreeMap<String, u32>>,
    /// (tenant, user) -> open connections.
    users: HashMap<(String, String), u32>,
    /// tenant -> users whose transition was decided but not settled yet (see [`crate::statuses`]).
    dirty: HashMap<String, BTreeSet<String>>,
    /// tenant -> users the tenant room was last told are online.
    told_online: HashMap<String, HashSet<String>>,
}

impl PresenceTable {
    /// Counts a new connection of `member` in `rooms`.
    pub fn connect(&mut self, member: &Member, rooms: &[String]) -> Transition {
        for room in rooms {
            *self
                .rooms
                .entry(room.clone())
                .or_default()
                .entry(member.user_id.clone())
                .or_default() += 1;
        }
        let count = self
            .users
            .entry((member.tenant.clone(), member.user_id.clone()))
            .or_default();
        *count += 1;
        if *count == 1 {
            Transition::Online
        } else {
            Transition::None
        }
    }

    /// The connection left `room` (taken off its stream) and stays in its other rooms.
    pub fn leave(&mut self, member: &Member, room: &str) {
        if let Some(users) = self.rooms.get_mut(room) {
            if let Some(n) = users.get_mut(&member.user_id) {
                *n -= 1;
                if *n == 0 {
                    users.remove(&member.user_id);
                }
            }
            if users.is_empty() {
                self.rooms.remove(room);
            }
        }
    }

    /// Removes a connection counted by [`Self::connect`] with the same arguments (less the rooms it left).
    pub fn disconnect(&mut self, member: &Member, rooms: &[String]) -> Transition {
        for room in rooms {
            self.leave(member, room);
        }
        let key = (member.tenant.clone(), member.user_id.clone());
        match self.users.get_mut(&key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                Transition::None
            }
            Some(_) => {
                self.users.remove(&key);
                Transition::Offline
            }
            None => Transition::None,
        }
    }

    /// Remembers that `member`'s user had a transition, to be settled by [`Self::settle`].
    pub fn mark_dirty(&mut self, member: &Member) {
        self.dirty
            .entry(member.tenant.clone())
            .or_default()
            .insert(member.user_id.clone());
    }

    /// The net status changes of `tenant` since its last settle: each dirty user whose state now differs
    /// from what the tenant room was told, as (user, online), sorted by user; they are now told.
    pub fn settle(&mut self, tenant: &str) -> Vec<(String, bool)> {
        let Some(dirty) = self.dirty.remove(tenant) else {
            return Vec::new();
        };
        let told = self.told_online.entry(tenant.to_owned()).or_default();
        let mut changes = Vec::new();
        for user in dirty {
            let online = self.users.contains_key(&(tenant.to_owned(), user.clone()));
            if online && !told.contains(&user) {
                told.insert(user.clone());
                changes.push((user, true));
            } else if !online && told.remove(&user) {
                changes.push((user, false));
            }
        }
        if told.is_empty() {
            self.told_online.remove(tenant);
        }
        changes
    }

    /// How many users of `tenant` its room was told are online.
    pub fn told_online(&self, tenant: &str) -> usize {
        self.told_online.get(tenant).map_or(0, |told| told.len())
    }

    /// Who is in `room`: totals and the page asked for. Costs O(users in the room) for the connection
    /// total, and a range of the sorted map for the page.
    pub fn snapshot(&self, room: &str, page: &PageRequest) -> PresenceSnapshot {
        use std::ops::Bound::{Excluded, Unbounded};
        let Some(users) = self.rooms.get(room) else {
            return PresenceSnapshot::default();
        };
        let from = match &page.after {
            Some(after) => (Excluded(after.clone()), Unbounded),
            None => (Unbounded, Unbounded),
        };
        PresenceSnapshot::page(
            users.range(from).map(|(u, _)| u),
            users.len(),
            users.values().sum(),
            page,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(user: &str, conn: u64) -> Member {
        Member {
            user_id: user.into(),
            tenant: "t1".into(),
            connection_id: conn.to_string(),
        }
    }

    #[test]
    fn connection_ids_differ_across_boots() {
        let (a, b) = (ConnectionIds::new(), ConnectionIds::new());
        let first = a.next();
        assert_ne!(first, a.next());
        assert_ne!(first, b.next(), "a restarted node must not reuse ids");
        assert!(!first.contains('/'));
    }

    #[test]
    fn counts_users_and_connections_and_reports_transitions() {
        let mut t = PresenceTable::default();
        let rooms = vec!["tenant:t1".to_owned()];
        assert_eq!(t.connect(&member("u1", 1), &rooms), Transition::Online);
        assert_eq!(t.connect(&member("u1", 2), &rooms), Transition::None);
        assert_eq!(t.connect(&member("u2", 3), &rooms), Transition::Online);
        assert_eq!(
            t.snapshot("tenant:t1", &PageRequest::all()),
            PresenceSnapshot {
                user_ids: vec!["u1".into(), "u2".into()],
                user_count: 2,
                connections: 3,
                more_after: None,
            }
        );
        let first = PageRequest {
            after: None,
            limit: 1,
        };
        let page = t.snapshot("tenant:t1", &first);
        assert_eq!((page.user_ids, page.user_count), (vec!["u1".into()], 2));
        assert_eq!(page.more_after.as_deref(), Some("u1"));
        let next = PageRequest {
            after: page.more_after,
            limit: 1,
        };
        let page = t.snapshot("tenant:t1", &next);
        assert_eq!((page.user_ids, page.more_after), (vec!["u2".into()], None));
        assert_eq!(t.disconnect(&member("u1", 1), &rooms), Transition::None);
        assert_eq!(t.disconnect(&member("u1", 2), &rooms), Transition::Offline);
        assert_eq!(
            t.snapshot("tenant:t1", &PageRequest::all()).user_ids,
            vec!["u2".to_owned()]
        );
        assert_eq!(t.disconnect(&member("u2", 3), &rooms), Transition::Offline);
        assert_eq!(
            t.snapshot("tenant:t1", &PageRequest::all()),
            PresenceSnapshot::default()
        );
        assert!(t.rooms.is_empty() && t.users.is_empty());
    }

    #[test]
    fn settle_reports_net_changes_once() {
        let mut t = PresenceTable::default();
        let rooms = vec!["tenant:t1".to_owned()];
        for (user, conn) in [("u1", 1), ("u2", 2)] {
            t.connect(&member(user, conn), &rooms);
            t.mark_dirty(&member(user, conn));
        }
        assert_eq!(
            t.settle("t1"),
            vec![("u1".to_owned(), true), ("u2".to_owned(), true)]
        );
        assert_eq!(t.settle("t1"), vec![], "told already");
        // u3 comes and goes within one window: nothing to tell. u1 leaves.
        t.connect(&member("u3", 3), &rooms);
        t.mark_dirty(&member("u3", 3));
        t.disconnect(&member("u3", 3), &rooms);
        t.mark_dirty(&member("u3", 3));
        t.disconnect(&member("u1", 1), &rooms);
        t.mark_dirty(&member("u1", 1));
        assert_eq!(t.settle("t1"), vec![("u1".to_owned(), false)]);
        t.disconnect(&member("u2", 2), &rooms);
        t.mark_dirty(&member("u2", 2));
        assert_eq!(t.settle("t1"), vec![("u2".to_owned(), false)]);
        assert!(t.dirty.is_empty() && t.told_online.is_empty());
    }
}
