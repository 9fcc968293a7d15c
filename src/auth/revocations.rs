//! Revoked tokens (`AdminService.RevokeTokens`): per user, tokens whose `iat` is before a cutoff are refused.
//!
//! The check runs in the synchronous interceptor, so revocations are held in memory on every node: the node
//! that takes the call applies it at once, the others get it through the bus's control channel, and a node
//! that starts later loads the current ones from the bus (Redis keeps them with their expiry; the memory bus
//! has only this node). An entry is kept until every token it refuses has expired anyway: `issued_before`
//! plus `--revocation-ttl-secs` (the longest token lifetime you issue) plus the leeway. A token without
//! `iat` counts as issued before any cutoff.
//!
//! Bounded: at most [`MAX_REVOCATIONS`] users at once; past it `RevokeTokens` fails with
//! `RESOURCE_EXHAUSTED` until entries expire (a revocation that cannot be kept is refused, never dropped).

use std::collections::HashMap;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};

use super::{now_unix, AuthError, Principal};

/// Users with a revocation held at once (per node and in Redis).
pub const MAX_REVOCATIONS: usize = 100_000;

/// One user's revocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// `tid` of the user's tokens.
    pub tenant: String,
    /// `sub` of the user's tokens.
    pub user: String,
    /// Tokens with `iat` before this (Unix seconds) are refused, and tokens without `iat`.
    pub issued_before: u64,
    /// Unix seconds after which the entry is forgotten (every token it refuses has expired by then).
    pub expires_at: u64,
}

impl Revocation {
    /// Whether a token of this user issued at `issued_at` is refused (ignoring the entry's expiry).
    pub fn refuses(&self, issued_at: Option<u64>) -> bool {
        issued_at.is_none_or(|iat| iat < self.issued_before)
    }

    /// Two revocations of one user together: the later cutoff and the later expiry.
    fn merge(&mut self, other: &Revocation) {
        self.issued_before = self.issued_before.max(other.issued_before);
        self.expires_at = self.expires_at.max(other.expires_at);
    }
}

/// [`MAX_REVOCATIONS`] users have a revocation held.
#[derive(Debug, thiserror::Error)]
#[error("{MAX_REVOCATIONS} users already have revoked tokens held on this node: try again when older revocations expire (--revocation-ttl-secs)")]
pub struct TooManyRevocations;

/// The revocations this node enforces: tenant -> user -> entry.
#[derive(Debug, Default)]
pub struct Revocations {
    map: RwLock<HashMap<String, HashMap<String, Revocation>>>,
}

impl Revocations {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, HashMap<String, Revocation>>> {
        // Nothing panics while holding it.
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, HashMap<String, Revocation>>> {
        self.map.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses `p`'s token if a live revocation covers it.
    pub fn check(&self, p: &Principal) -> Result<(), AuthError> {
        match self.covering(p) {
            Some(issued_before) => Err(AuthError::Revoked { issued_before }),
            None => Ok(()),
        }
    }

    /// The cutoff of the live revocation that refuses `p`'s token, if one does.
    pub fn covering(&self, p: &Principal) -> Option<u64> {
        let tenant = p.tenant.as_deref()?;
        let map = self.read();
        let entry = map.get(tenant)?.get(&p.user_id)?;
        (entry.expires_at > now_unix() && entry.refuses(p.issued_at)).then_some(entry.issued_before)
    }

    /// Adds (or strengthens) a revocation; expired entries are dropped first. Fails at the bound for a user
    /// without an entry.
    pub fn insert(&self, revocation: &Revocation) -> Result<(), TooManyRevocations> {
        let now = now_unix();
        if revocation.expires_at <= now {
            return Ok(());
        }
        let mut map = self.write();
        if let Some(entry) = map
            .get_mut(&revocation.tenant)
            .and_then(|users| users.get_mut(&revocation.user))
        {
            entry.merge(revocation);
            return Ok(());
        }
        let mut count: usize = map.values().map(HashMap::len).sum();
        if count >= MAX_REVOCATIONS {
            map.retain(|_, users| {
                users.retain(|_, r| r.expires_at > now);
                !users.is_empty()
            });
            count = map.values().map(HashMap::len).sum();
            if count >= MAX_REVOCATIONS {
                return Err(TooManyRevocations);
            }
        }
        map.entry(revocation.tenant.clone())
            .or_default()
            .insert(revocation.user.clone(), revocation.clone());
        Ok(())
    }

    /// Users with a revocation held (expired ones included until the next prune).
    pub fn len(&self) -> usize {
        self.read().values().map(HashMap::len).sum()
    }

    /// True when none is held.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(tenant: &str, user: &str, iat: Option<u64>) -> Principal {
        Principal::test_user(tenant, user, iat)
    }

    fn revoke(tenant: &str, user: &str, issued_before: u64, expires_at: u64) -> Revocation {
        Revocation {
            tenant: tenant.into(),
            user: user.into(),
            issued_before,
            expires_at,
        }
    }

    #[test]
    fn refuses_older_tokens_of_that_user_only_until_it_expires() {
        let now = now_unix();
        let set = Revocations::new();
        set.insert(&revoke("t1", "u1", now, now + 60)).unwrap();
        assert!(set.check(&principal("t1", "u1", Some(now - 1))).is_err());
        assert!(set.check(&principal("t1", "u1", None)).is_err(), "no iat");
        assert!(
            set.check(&principal("t1", "u1", Some(now))).is_ok(),
            "issued at the cutoff"
        );
        assert!(
            set.check(&principal("t2", "u1", Some(now - 1))).is_ok(),
            "other tenant"
        );
        assert!(
            set.check(&principal("t1", "u2", Some(now - 1))).is_ok(),
            "other user"
        );
        // A weaker revocation does not undo a stronger one.
        set.insert(&revoke("t1", "u1", now - 100, now + 10))
            .unwrap();
        assert!(set.check(&principal("t1", "u1", Some(now - 50))).is_err());
        // An expired one is not enforced, nor stored.
        set.insert(&revoke("t1", "u3", now, now)).unwrap();
        assert!(set.check(&principal("t1", "u3", None)).is_ok());
        assert_eq!(set.len(), 1);
    }
}
