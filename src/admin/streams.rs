//! The node's open streams by user (tenant, `sub`), so a membership command reaches each of them.
//!
//! Every `Subscribe` stream registers here when it opens (before it attaches to any room, so a command
//! that arrives meanwhile is not missed) and leaves when it is dropped. A command marks what each stream
//! of the user must do in its [`StreamControl`] and wakes it; the stream acts on it in its own loop
//! (detaches the room and sends `Removed`, or ends). Bounded: a stream's pending removals are at most its
//! rooms (a room is marked once), and an ending is one value.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::auth::{Principal, Revocations};
use crate::bus::control::Control;

/// Why an administrative command ends a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// `Disconnect`, with its reason.
    Disconnected(String),
    /// `RevokeTokens` covered the stream's token.
    Revoked,
}

#[derive(Debug, Default)]
struct Pending {
    /// Canonical rooms still on the stream (not removed yet).
    rooms: HashSet<String>,
    /// Rooms to take off: (canonical room, reason).
    removed: Vec<(String, String)>,
    end: Option<Ending>,
}

/// What the commands ask of one stream.
#[derive(Debug)]
pub(crate) struct StreamControl {
    issued_at: Option<u64>,
    pending: Mutex<Pending>,
    notify: Notify,
}

impl StreamControl {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Nothing panics while holding it.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves when a command marked something for this stream since the last [`Self::take`] (a mark
    /// made while nobody waits is kept for the next wait).
    pub(crate) async fn changed(&self) {
        self.notify.notified().await
    }

    /// The rooms to take off (canonical, reason), and the ending if one is asked.
    pub(crate) fn take(&self) -> (Vec<(String, String)>, Option<Ending>) {
        let mut pending = self.pending();
        (std::mem::take(&mut pending.removed), pending.end.clone())
    }

    /// The ending asked, if any (checked between pages of a replay).
    pub(crate) fn ending(&self) -> Option<Ending> {
        self.pending().end.clone()
    }

    fn apply(&self, cmd: &Control) -> bool {
        let mut pending = self.pending();
        let marked = match cmd {
            Control::Unsubscribe { room, reason, .. } => {
                pending.rooms.remove(room) && {
                    pending.removed.push((room.clone(), reason.clone()));
                    true
                }
            }
            Control::Disconnect { reason, .. } => {
                pending.end.is_none() && {
                    pending.end = Some(Ending::Disconnected(reason.clone()));
                    true
                }
            }
            Control::Revoke(r) => {
                pending.end.is_none() && r.refuses(self.issued_at) && {
                    pending.end = Some(Ending::Revoked);
                    true
                }
            }
        };
        drop(pending);
        if marked {
            self.notify.notify_one();
        }
        marked
    }
}

type UserKey = (String, String);

/// The registry. Shared by the `EventService` (streams register) and the control loop and `AdminService`
/// (commands are applied).
#[derive(Debug)]
pub struct LiveStreams {
    users: Mutex<HashMap<UserKey, HashMap<u64, Arc<StreamControl>>>>,
    next_id: AtomicU64,
    revocations: Arc<Revocations>,
}

impl LiveStreams {
    /// An empty registry whose streams re-check `revocations` when they open.
    pub fn new(revocations: Arc<Revocations>) -> Arc<Self> {
        Arc::new(Self {
            users: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            revocations,
        })
    }

    /// The revocations this node enforces.
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    fn users(&self) -> MutexGuard<'_, HashMap<UserKey, HashMap<u64, Arc<StreamControl>>>> {
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a stream of `p` on `rooms` (canonical names) until the ticket is dropped. A principal
    /// without a tenant (a service) is not a user any command names: its ticket is not registered.
    pub(crate) fn register(self: &Arc<Self>, p: &Principal, rooms: &[String]) -> LiveTicket {
        let control = Arc::new(StreamControl {
            issued_at: p.issued_at,
            pending: Mutex::new(Pending {
                rooms: rooms.iter().cloned().collect(),
                ..Pending::default()
            }),
            notify: Notify::new(),
        });
        let key = p.tenant.clone().map(|tenant| (tenant, p.user_id.clone()));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Some(key) = &key {
            self.users()
                .entry(key.clone())
                .or_default()
                .insert(id, control.clone());
        }
        LiveTicket {
            streams: self.clone(),
            key,
            id,
            control,
        }
    }

    /// Applies `cmd` to the open streams of its user on this node; returns how many it marked. Applying
    /// the same command twice marks nothing the second time.
    pub fn apply(&self, cmd: &Control) -> usize {
        let key = match cmd {
            Control::Unsubscribe { tenant, user, .. }
            | Control::Disconnect { tenant, user, .. } => (tenant.clone(), user.clone()),
            Control::Revoke(r) => (r.tenant.clone(), r.user.clone()),
        };
        let streams: Vec<Arc<StreamControl>> = match self.users().get(&key) {
            Some(streams) => streams.values().cloned().collect(),
            None => return 0,
        };
        streams.iter().filter(|s| s.apply(cmd)).count()
    }

    /// Open streams registered (for tests).
    pub fn len(&self) -> usize {
        self.users().values().map(HashMap::len).sum()
    }

    /// True when no stream is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A registered stream; dropping it unregisters the stream.
#[derive(Debug)]
pub(crate) struct LiveTicket {
    streams: Arc<LiveStreams>,
    key: Option<UserKey>,
    id: u64,
    control: Arc<StreamControl>,
}

impl LiveTicket {
    /// What commands ask of this stream.
    pub(crate) fn control(&self) -> &Arc<StreamControl> {
        &self.control
    }
}

impl Drop for LiveTicket {
    fn drop(&mut self) {
        let Some(key) = &self.key else { return };
        let mut users = self.streams.users();
        if let Some(streams) = users.get_mut(key) {
            streams.remove(&self.id);
            if streams.is_empty() {
                users.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Revocation;

    fn principal(user: &str, iat: Option<u64>) -> Principal {
        Principal::test_user("t1", user, iat)
    }

    #[tokio::test]
    async fn commands_reach_the_users_streams_once_and_tickets_unregister() {
        let live = LiveStreams::new(Arc::new(Revocations::new()));
        let rooms = ["tenant:t1".to_owned(), "tenant:t1:project:p1".to_owned()];
        let a = live.register(&principal("u1", Some(100)), &rooms);
        let b = live.register(&principal("u1", Some(200)), &rooms[..1]);
        let other = live.register(&principal("u2", Some(100)), &rooms);
        let unsubscribe = Control::Unsubscribe {
            tenant: "t1".into(),
            user: "u1".into(),
            room: "tenant:t1:project:p1".into(),
            reason: "r".into(),
        };
        assert_eq!(
            live.apply(&unsubscribe),
            1,
            "only the stream that has the room"
        );
        assert_eq!(live.apply(&unsubscribe), 0, "once");
        a.control().changed().await;
        assert_eq!(
            a.control().take(),
            (vec![("tenant:t1:project:p1".into(), "r".into())], None)
        );
        let revoke = Control::Revoke(Revocation {
            tenant: "t1".into(),
            user: "u1".into(),
            issued_before: 150,
            expires_at: u64::MAX,
        });
        assert_eq!(live.apply(&revoke), 1, "only the token issued before 150");
        assert_eq!(a.control().ending(), Some(Ending::Revoked));
        assert_eq!(b.control().ending(), None);
        assert_eq!(other.control().ending(), None);
        assert_eq!(live.len(), 3);
        drop((a, b));
        assert_eq!(live.len(), 1);
    }
}
