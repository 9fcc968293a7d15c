//! Open `Subscribe` streams per user on this node (`--max-streams-per-user`).
//!
//! Counted by `(tenant, sub)`, services (role `publisher`) by `sub` too: one token cannot hold more than
//! the limit, however many connections it spreads them over. A [`StreamPermit`] is taken before the stream
//! attaches to anything and given back when it is dropped, however the stream ends. Per node: with Redis,
//! a user may hold the limit on every node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::auth::Principal;
use crate::error::ServiceError;
use crate::metrics::STREAMS_REFUSED;

type UserKey = (Option<String>, String);

/// Open streams per user on this node.
#[derive(Debug)]
pub struct UserStreams {
    limit: usize,
    open: Mutex<HashMap<UserKey, usize>>,
}

impl UserStreams {
    /// At most `limit` streams per user.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    fn open(&self) -> MutexGuard<'_, HashMap<UserKey, usize>> {
        // Nothing panics while holding it.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more stream of `p`, or refuses with `RESOURCE_EXHAUSTED` naming the limit.
    pub fn acquire(self: &Arc<Self>, p: &Principal) -> Result<StreamPermit, ServiceError> {
        let key = (p.tenant.clone(), p.user_id.clone());
        let mut open = self.open();
        let count = open.entry(key.clone()).or_default();
        if *count >= self.limit {
            drop(open);
            metrics::counter!(STREAMS_REFUSED).increment(1);
            return Err(ServiceError::TooManyStreams {
                user: p.user_id.clone(),
                limit: self.limit,
            });
        }
        *count += 1;
        Ok(StreamPermit {
            owner: self.clone(),
            key,
        })
    }

    /// Streams `p` has open (for tests).
    pub fn count(&self, p: &Principal) -> usize {
        let key = (p.tenant.clone(), p.user_id.clone());
        self.open().get(&key).copied().unwrap_or(0)
    }
}

/// One counted stream; dropping it gives the slot back.
#[derive(Debug)]
pub struct StreamPermit {
    owner: Arc<UserStreams>,
    key: UserKey,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.owner.open();
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn principal(tenant: Option<&str>, sub: &str) -> Principal {
        Principal {
            user_id: sub.into(),
            tenant: tenant.map(Into::into),
            email_verified: true,
            projects: Default::default(),
            channels: Default::default(),
            roles: Default::default(),
            valid_until: SystemTime::now(),
            issued_at: None,
        }
    }

    #[test]
    fn the_limit_is_per_user_and_slots_come_back_on_drop() {
        let streams = UserStreams::new(2);
        let u1 = principal(Some("t1"), "u1");
        let a = streams.acquire(&u1).unwrap();
        let _b = streams.acquire(&u1).unwrap();
        let err = streams.acquire(&u1).unwrap_err();
        assert!(err.to_string().contains("--max-streams-per-user"), "{err}");
        // Same sub in another tenant, and a service without tenant: other users.
        let _other = streams.acquire(&principal(Some("t2"), "u1")).unwrap();
        let _svc = streams.acquire(&principal(None, "u1")).unwrap();
        drop(a);
        assert_eq!(streams.count(&u1), 1);
        let _c = streams.acquire(&u1).unwrap();
        assert_eq!(streams.count(&u1), 2);
    }
}
