//! Start-up check of Redis's `maxmemory-policy`.
//!
//! The bus keeps a room's epoch and last id in a hash next to the room's stream. A Redis that evicts keys
//! under memory pressure (any policy but `noeviction`) can drop that hash while the stream stays: the
//! next publish or read then creates a new epoch over the old entries, and a client resuming with an id
//! of the new epoch is replayed entries it already had, or one of the old epoch gets a needless `Reset`.
//! With `noeviction` Redis refuses writes when full instead (publishes fail with an error, nothing is
//! lost silently). So a node refuses to start against an evicting Redis unless the operator said it is
//! acceptable (`--redis-allow-eviction`).
//!
//! The policy is read with `CONFIG GET maxmemory-policy`, or from `INFO memory` where managed Redis
//! services refuse `CONFIG`; in a cluster from every master. A node whose policy cannot be read at all is
//! logged and accepted.

use redis::Value;

use super::conn::{bounded, Conn};
use crate::bus::BusError;

/// The only policy under which Redis never deletes keys by itself.
pub(crate) const SAFE_POLICY: &str = "noeviction";

/// Reads the policy of every Redis server (every master of a cluster) behind `conn` and fails, naming
/// the setting, when one of them may evict keys, unless `allow` (then it only warns).
pub(crate) async fn check(
    conn: &Conn,
    timeout: std::time::Duration,
    allow: bool,
) -> Result<(), BusError> {
    let mut config = redis::cmd("CONFIG");
    config.arg("GET").arg("maxmemory-policy");
    let mut info = redis::cmd("INFO");
    info.arg("memory");
    let answers = bounded(timeout, "CONFIG GET maxmemory-policy", {
        let mut conn = conn.clone();
        async move { conn.on_every_master(config).await }
    })
    .await?;
    let mut evicting = Vec::new();
    let mut fallback = None;
    for (node, answer) in answers {
        let policy = match answer.as_ref().ok().and_then(policy_of_config) {
            Some(policy) => Some(policy),
            None => {
                // CONFIG refused (managed Redis) or renamed: INFO memory has the policy too.
                if fallback.is_none() {
                    let mut conn = conn.clone();
                    let info = info.clone();
                    fallback = Some(
                        bounded(timeout, "INFO memory", async move {
                            conn.on_every_master(info).await
                        })
                        .await
                        .unwrap_or_default(),
                    );
                }
                fallback
                    .iter()
                    .flatten()
                    .find(|(n, _)| *n == node)
                    .and_then(|(_, v)| v.as_ref().ok())
                    .and_then(policy_of_info)
            }
        };
        match policy {
            Some(policy) if policy == SAFE_POLICY => {}
            Some(policy) => evicting.push(format!("{node} has maxmemory-policy {policy}")),
            None => tracing::warn!(
                node = %node,
                error = ?answer.err(),
                "cannot read Redis's maxmemory-policy (CONFIG GET and INFO memory refused): make sure it \
                 is noeviction, or a room's metadata may be evicted and old events replayed under a new \
                 epoch"
            ),
        }
    }
    if evicting.is_empty() {
        return Ok(());
    }
    let found = evicting.join(", ");
    if allow {
        tracing::warn!(
            redis = %found,
            "Redis may evict keys (--redis-allow-eviction is set): a room whose metadata is evicted while \
             its stream stays replays old events under a new epoch"
        );
        return Ok(());
    }
    Err(BusError::Misconfigured(format!(
        "Redis {found}: under memory pressure it may evict a room's metadata while its stream stays, and \
         clients would then be replayed old events under a new epoch. Set maxmemory-policy to noeviction \
         (`CONFIG SET maxmemory-policy noeviction` and in redis.conf), or start with --redis-allow-eviction \
         (LAMPLIGHT_REDIS_ALLOW_EVICTION=true) to accept that risk"
    )))
}

/// The policy in a `CONFIG GET maxmemory-policy` reply (`[name, value]`, or a map in RESP3).
fn policy_of_config(reply: &Value) -> Option<String> {
    let value = match reply {
        Value::Array(items) => items.get(1)?,
        Value::Map(pairs) => &pairs.first()?.1,
        _ => return None,
    };
    redis::from_redis_value_ref::<String>(value).ok()
}

/// The policy in an `INFO memory` reply (`maxmemory_policy:noeviction` on a line of its own).
fn policy_of_info(reply: &Value) -> Option<String> {
    let text = redis::from_redis_value_ref::<String>(reply).ok()?;
    text.lines()
        .find_map(|line| line.trim().strip_prefix("maxmemory_policy:"))
        .map(|p| p.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_policy_from_config_and_info_replies() {
        let config = Value::Array(vec![
            Value::BulkString(b"maxmemory-policy".to_vec()),
            Value::BulkString(b"allkeys-lru".to_vec()),
        ]);
        assert_eq!(policy_of_config(&config).as_deref(), Some("allkeys-lru"));
        assert_eq!(policy_of_config(&Value::Array(vec![])), None);
        let info = Value::BulkString(
            b"# Memory\r\nused_memory:1\r\nmaxmemory_policy:noeviction\r\nfoo:1\r\n".to_vec(),
        );
        assert_eq!(policy_of_info(&info).as_deref(), Some("noeviction"));
        assert_eq!(policy_of_info(&Value::Nil), None);
    }
}
