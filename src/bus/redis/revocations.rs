//! Revocations in Redis: one hash (`{tenant}/{user}` -> `"issued_before expires_at"`) and a sorted set of
//! the same fields by expiry, both in the control room's slot (`{lamplight.control}`), so one script keeps
//! them together and a starting node reads them with one `HGETALL`. Entries are dropped once expired (at
//! the next write, and ignored when read); the keys expire with their last entry.

use std::sync::LazyLock;

use redis::Script;

use super::conn::Conn;
use super::keys;
use crate::auth::{Revocation, MAX_REVOCATIONS};
use crate::bus::BusError;

static REVOKE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/revoke.lua")));

fn field(tenant: &str, user: &str) -> String {
    // Ids never contain `/` (room grammar).
    format!("{tenant}/{user}")
}

/// Stores `r`; false (and nothing stored) when [`MAX_REVOCATIONS`] other users already have one.
pub(crate) async fn store(conn: &mut Conn, r: &Revocation) -> Result<bool, redis::RedisError> {
    let (hash, by_expiry) = keys::revocations();
    let stored: i64 = REVOKE
        .key(hash)
        .key(by_expiry)
        .arg(field(&r.tenant, &r.user))
        .arg(r.issued_before)
        .arg(r.expires_at)
        .arg(crate::auth::now_unix())
        .arg(MAX_REVOCATIONS)
        .invoke_async(conn)
        .await?;
    Ok(stored == 1)
}

/// The revocations not expired yet.
pub(crate) async fn load(conn: &mut Conn) -> Result<Vec<Revocation>, BusError> {
    let (hash, _) = keys::revocations();
    let entries: Vec<(String, String)> =
        redis::cmd("HGETALL")
            .arg(&hash)
            .query_async(conn)
            .await
            .map_err(|e| super::conn::classify("revocations read", &e))?;
    let now = crate::auth::now_unix();
    Ok(entries
        .into_iter()
        .filter_map(|(field, value)| {
            let (tenant, user) = field.split_once('/')?;
            let (issued_before, expires_at) = value.split_once(' ')?;
            Some(Revocation {
                tenant: tenant.to_owned(),
                user: user.to_owned(),
                issued_before: issued_before.parse().ok()?,
                expires_at: expires_at.parse().ok()?,
            })
        })
        .filter(|r| r.expires_at > now)
        .collect())
}
