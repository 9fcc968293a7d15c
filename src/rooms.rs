//! Room names and their grammar.
//!
//! A room is one of `tenant:{tid}`, `tenant:{tid}:user:{sub}`, `tenant:{tid}:project:{pid}` or
//! `tenant:{tid}:channel:{cid}`, with ids of 1 to 128 characters from `[A-Za-z0-9_.-]`. Anything else is
//! rejected before it reaches the policy or the bus, so a room name is always safe to use as a key.
//!
//! Every room belongs to a tenant, so tenant isolation holds by construction. `user:{sub}` (the seed's
//! name) is accepted as a *shorthand*: it means that user's room in the caller's own tenant, and
//! [`crate::policy::canonical`] turns it into `tenant:{tid}:user:{sub}` before anything else sees it.

use std::fmt;

/// Longest id allowed inside a room name.
pub const MAX_ID_LEN: usize = 128;

/// Why a room name was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid room {room:?}: expected tenant:{{tid}}, tenant:{{tid}}:user:{{sub}} (or user:{{sub}} in the token's tenant), tenant:{{tid}}:project:{{pid}} or tenant:{{tid}}:channel:{{cid}} with ids of 1-{MAX_ID_LEN} characters [A-Za-z0-9_.-]")]
pub struct InvalidRoom {
    /// The name as given (truncated to keep error messages short).
    pub room: String,
}

/// A parsed room. Its `Display` gives back the canonical name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Room {
    /// `user:{sub}`: shorthand for `tenant:{tid}:user:{sub}` in the caller's tenant. Never reaches the
    /// policy's checks or the bus: [`crate::policy::canonical`] resolves it first.
    UserShorthand(String),
    /// `tenant:{tid}:user:{sub}`: direct notifications to one user of one tenant.
    User {
        /// Tenant id.
        tenant: String,
        /// User id (`sub`).
        user: String,
    },
    /// `tenant:{tid}`: tenant-wide broadcasts (and ONLINE/OFFLINE statuses).
    Tenant(String),
    /// `tenant:{tid}:project:{pid}`.
    Project {
        /// Tenant id.
        tenant: String,
        /// Project id.
        project: String,
    },
    /// `tenant:{tid}:channel:{cid}`.
    Channel {
        /// Tenant id.
        tenant: String,
        /// Channel id.
        channel: String,
    },
}

impl Room {
    /// Parses a room name, or says why it is not one.
    pub fn parse(name: &str) -> Result<Room, InvalidRoom> {
        let invalid = || InvalidRoom {
            room: name.chars().take(MAX_ID_LEN * 2).collect(),
        };
        let parts: Vec<&str> = name.split(':').collect();
        if !parts.iter().skip(1).step_by(2).all(|id| is_valid_id(id)) {
            return Err(invalid());
        }
        let room = match parts.as_slice() {
            ["user", id] => Room::UserShorthand((*id).to_owned()),
            ["tenant", tid] => Room::Tenant((*tid).to_owned()),
            ["tenant", tid, "user", sub] => Room::User {
                tenant: (*tid).to_owned(),
                user: (*sub).to_owned(),
            },
            ["tenant", tid, "project", pid] => Room::Project {
                tenant: (*tid).to_owned(),
                project: (*pid).to_owned(),
            },
            ["tenant", tid, "channel", cid] => Room::Channel {
                tenant: (*tid).to_owned(),
                channel: (*cid).to_owned(),
            },
            _ => return Err(invalid()),
        };
        Ok(room)
    }

    /// The tenant a room belongs to (`None` only for the unresolved `user:{sub}` shorthand).
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Room::UserShorthand(_) => None,
            Room::Tenant(t)
            | Room::User { tenant: t, .. }
            | Room::Project { tenant: t, .. }
            | Room::Channel { tenant: t, .. } => Some(t),
        }
    }

    /// The room itself, with the `user:{sub}` shorthand resolved in `tenant` (`None` when it is the
    /// shorthand and there is no tenant to resolve it in).
    pub fn in_tenant(self, tenant: Option<&str>) -> Option<Room> {
        match self {
            Room::UserShorthand(user) => tenant.map(|tenant| Room::User {
                tenant: tenant.to_owned(),
                user,
            }),
            room => Some(room),
        }
    }

    /// The room where a tenant's ONLINE/OFFLINE statuses go.
    pub fn tenant_room(tenant: &str) -> String {
        format!("tenant:{tenant}")
    }
}

impl fmt::Display for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Room::UserShorthand(id) => write!(f, "user:{id}"),
            Room::Tenant(t) => write!(f, "tenant:{t}"),
            Room::User { tenant, user } => write!(f, "tenant:{tenant}:user:{user}"),
            Room::Project { tenant, project } => write!(f, "tenant:{tenant}:project:{project}"),
            Room::Channel { tenant, channel } => write!(f, "tenant:{tenant}:channel:{channel}"),
        }
    }
}

/// True for ids of 1 to [`MAX_ID_LEN`] characters from `[A-Za-z0-9_.-]`.
pub fn is_valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_and_round_trips() {
        for name in [
            "user:u1",
            "tenant:t-1",
            "tenant:t1:project:p.2",
            "tenant:t1:channel:c_3",
            "tenant:t1:user:u-1",
        ] {
            let room = Room::parse(name).expect(name);
            assert_eq!(room.to_string(), name);
        }
        assert_eq!(Room::parse("user:u1").unwrap().tenant(), None);
        assert_eq!(
            Room::parse("tenant:t1:user:u1").unwrap().tenant(),
            Some("t1")
        );
        assert_eq!(
            Room::parse("user:u1").unwrap().in_tenant(Some("t1")),
            Some(Room::parse("tenant:t1:user:u1").unwrap())
        );
        assert_eq!(Room::parse("user:u1").unwrap().in_tenant(None), None);
        assert_eq!(
            Room::parse("tenant:t1:channel:c").unwrap().tenant(),
            Some("t1")
        );
    }

    #[test]
    fn rejects_everything_outside_the_grammar() {
        let long = "x".repeat(MAX_ID_LEN + 1);
        for name in [
            "",
            "user",
            "user:",
            "user:a:b",
            "tenant:t1:project",
            "tenant:t1:project:",
            "tenant:t1:board:b1",
            "tenant:t1:user:",
            "tenant:t1:user:u1:x",
            "user:u1:project:p1",
            "tenant:t1:project:p1:extra",
            "team:t1",
            "user:a b",
            "user:ü",
            "tenant:t*1",
            &format!("user:{long}"),
        ] {
            assert!(Room::parse(name).is_err(), "{name:?} should be rejected");
        }
        assert!(Room::parse(&format!("user:{}", "x".repeat(MAX_ID_LEN))).is_ok());
    }
}
