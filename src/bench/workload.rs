//! Who subscribes to what, and what gets published: the same users, claims, rooms and payload as the
//! Socket.IO peer's load generator (`peers/loadgen`), so figures from the two tools compare.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::auth::{mint_hs256, DevToken, ROLE_PUBLISHER};
use crate::config::JwtConfig;
use crate::proto::v1::{event::Payload, Event, Task};

/// Tenant of every fan-out subscriber.
pub(super) const TENANT: &str = "t1";
/// Type of every published event.
pub(super) const EVENT_TYPE: &str = "task.updated";
/// `sub` of the publishing service.
pub(super) const PUBLISHER_SUB: &str = "lamplight-bench";
const STATUS: &str = "in_progress";
const PRIORITY: &str = "high";
/// Lifetime of the minted tokens: longer than any run, so no stream ends on token expiry.
const TOKEN_TTL_SECS: u64 = 7 * 24 * 3600;

/// One subscriber connection.
#[derive(Clone, Debug)]
pub(super) struct SubscriberSpec {
    /// Index (also the user: `u{idx}`).
    pub(super) idx: usize,
    /// Every room of its one `Subscribe`.
    pub(super) rooms: Vec<String>,
    /// The user's claims.
    pub(super) claims: DevToken,
    /// The fan-out room it listens to (index into the publisher's rooms); `None` when idle.
    pub(super) fanout_room: Option<usize>,
    /// Which server (index into `--addr`) it connects to.
    pub(super) server: usize,
}

/// The fan-out room `k`: `tenant:t1:project:p{k}`.
pub(super) fn project_room(k: usize) -> String {
    format!("tenant:{TENANT}:project:p{k}")
}

fn user(sub: String, tid: &str, projects: Vec<String>, channels: Vec<String>) -> DevToken {
    DevToken {
        sub,
        tid: Some(tid.to_owned()),
        email_verified: true,
        projects,
        channels,
        ..DevToken::default()
    }
}

/// Fan-out: subscriber `i` is user `u{i}` of tenant `t1` with project `p{i % rooms}`, subscribed to
/// `user:u{i}`, `tenant:t1` and `tenant:t1:project:p{i % rooms}`. With several servers, subscriber `i`
/// connects to server `(i / rooms) % servers`, so every room has members on every server and two-node
/// traffic really crosses the bus.
pub(super) fn fanout(subs: usize, rooms: usize, servers: usize) -> Vec<SubscriberSpec> {
    (0..subs)
        .map(|i| {
            let k = i % rooms;
            let sub = format!("u{i}");
            SubscriberSpec {
                idx: i,
                rooms: vec![
                    format!("user:{sub}"),
                    format!("tenant:{TENANT}"),
                    project_room(k),
                ],
                claims: user(sub, TENANT, vec![format!("p{k}")], Vec::new()),
                fanout_room: Some(k),
                server: (i / rooms) % servers,
            }
        })
        .collect()
}

/// `sub` of the storm's watcher: a member of tenant `t1` that follows its statuses.
pub(super) const WATCHER_SUB: &str = "storm-watcher";

/// Storm: subscriber `i` is user `u{i}` of tenant `t1`, in `user:u{i}`, `tenant:t1` and project room
/// `p{i % rooms}` (the fan-out users, listening to nothing in particular); servers are used round-robin.
pub(super) fn storm(subs: usize, rooms: usize, servers: usize) -> Vec<SubscriberSpec> {
    fanout(subs, rooms, 1)
        .into_iter()
        .map(|s| SubscriberSpec {
            fanout_room: None,
            server: s.idx % servers,
            ..s
        })
        .collect()
}

/// The storm's watcher: a user of tenant `t1` in `tenant:t1` only.
pub(super) fn watcher() -> DevToken {
    user(WATCHER_SUB.to_owned(), TENANT, Vec::new(), Vec::new())
}

/// Idle: subscriber `i` is user `u{i}` of tenant `t{i % 10}`, in 4 rooms: `user:`, `tenant:`, project
/// `p{i % 50}` and channel `c{i % 100}` of its tenant; servers are used round-robin.
pub(super) fn idle(subs: usize, servers: usize) -> Vec<SubscriberSpec> {
    (0..subs)
        .map(|i| {
            let tid = format!("t{}", i % 10);
            let sub = format!("u{i}");
            let project = format!("p{}", i % 50);
            let channel = format!("c{}", i % 100);
            SubscriberSpec {
                idx: i,
                rooms: vec![
                    format!("user:{sub}"),
                    format!("tenant:{tid}"),
                    format!("tenant:{tid}:project:{project}"),
                    format!("tenant:{tid}:channel:{channel}"),
                ],
                claims: user(sub, &tid, vec![project], vec![channel]),
                fanout_room: None,
                server: i % servers,
            }
        })
        .collect()
}

/// Signs tokens with the server's HS256 secret (resolved like `lamplight token`).
#[derive(Clone)]
pub(super) struct Minter {
    secret: Vec<u8>,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Minter {
    pub(super) fn new(jwt: &JwtConfig) -> anyhow::Result<Self> {
        let secret = jwt
            .hs256_secret()
            .map_err(|e| anyhow::anyhow!("cannot read the JWT secret file: {e}"))?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no HS256 secret to sign the benchmark's tokens with: pass the server's \
                     --jwt-secret (or LAMPLIGHT_JWT_SECRET, or --jwt-secret-file)"
                )
            })?;
        Ok(Self {
            secret: secret.into_bytes(),
            issuer: jwt.jwt_issuer.clone(),
            audience: jwt.jwt_audience.clone(),
        })
    }

    /// Signs `claims`, filling in the times, issuer and audience.
    pub(super) fn sign(&self, claims: &DevToken) -> anyhow::Result<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = DevToken {
            iat: now,
            exp: now + TOKEN_TTL_SECS,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            ..claims.clone()
        };
        Ok(mint_hs256(&self.secret, &claims)?)
    }

    /// The publishing service's token (role `publisher`).
    pub(super) fn publisher(&self) -> anyhow::Result<String> {
        self.sign(&DevToken {
            sub: PUBLISHER_SUB.to_owned(),
            roles: vec![ROLE_PUBLISHER.to_owned()],
            ..DevToken::default()
        })
    }
}

/// The published event: a `task.updated` whose task id carries the room-local sequence number and the
/// send time (`ev-{seq}-{sent_ns}`), like the peer's load generator; `title` pads the task so that its
/// JSON form is about `payload_bytes` long (the Socket.IO peer sends that JSON).
pub(super) struct TaskTemplate {
    title: String,
}

impl TaskTemplate {
    pub(super) fn new(payload_bytes: usize) -> Self {
        let mut template = Self {
            title: String::new(),
        };
        // Sized with a representative id (6-digit seq, 12-digit timestamp), as the peer's loadgen does.
        let probe = template.json("ev-123456-123456789012", "p0").len();
        let pad = payload_bytes.saturating_sub(probe);
        let words = "Refactor the notification pipeline so that room fanout is measured ";
        template.title = words.repeat(pad / words.len() + 1)[..pad].to_owned();
        template
    }

    fn json(&self, id: &str, project: &str) -> String {
        format!(
            r#"{{"id":"{id}","projectId":"{project}","tenantId":"{TENANT}","title":"{}","status":"{STATUS}","priority":"{PRIORITY}","createdById":"{PUBLISHER_SUB}"}}"#,
            self.title
        )
    }

    /// The event for room `k`, with its sequence number and send time.
    pub(super) fn event(&self, room: &str, k: usize, seq: u64, sent_ns: u64) -> Event {
        Event {
            room: room.to_owned(),
            r#type: EVENT_TYPE.to_owned(),
            payload: Some(Payload::Task(Task {
                id: task_id(seq, sent_ns),
                project_id: format!("p{k}"),
                tenant_id: TENANT.to_owned(),
                title: self.title.clone(),
                status: STATUS.to_owned(),
                priority: PRIORITY.to_owned(),
                created_by_id: PUBLISHER_SUB.to_owned(),
            })),
            ..Event::default()
        }
    }
}

/// `ev-{seq}-{sent_ns}`.
pub(super) fn task_id(seq: u64, sent_ns: u64) -> String {
    format!("ev-{seq}-{sent_ns}")
}

/// The sequence number and send time in a task id made by [`task_id`].
pub(super) fn parse_task_id(id: &str) -> Option<(u64, u64)> {
    let (seq, sent) = id.strip_prefix("ev-")?.split_once('-')?;
    Some((seq.parse().ok()?, sent.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_round_trip_and_foreign_ids_are_refused() {
        assert_eq!(parse_task_id(&task_id(7, 123)), Some((7, 123)));
        assert_eq!(parse_task_id("task-1"), None);
        assert_eq!(parse_task_id("ev-x-1"), None);
    }

    #[test]
    fn fanout_spreads_every_room_over_every_server() {
        let subs = fanout(40, 10, 2);
        for k in 0..10 {
            let servers: std::collections::BTreeSet<usize> = subs
                .iter()
                .filter(|s| s.fanout_room == Some(k))
                .map(|s| s.server)
                .collect();
            assert_eq!(servers.len(), 2, "room {k}");
        }
        assert_eq!(subs[3].rooms[2], project_room(3));
    }

    #[test]
    fn the_payload_has_the_requested_json_size() {
        let t = TaskTemplate::new(200);
        assert_eq!(t.json("ev-123456-123456789012", "p0").len(), 200);
    }
}
