//! Who may do what with which room. Pure functions of a verified [`Principal`] and a parsed [`Room`].
//!
//! - `tenant:{tid}:user:{sub}`: only that user of that tenant. `user:{sub}` is shorthand for it in the
//!   token's own tenant ([`canonical`]); a token without `tid` must name the tenant.
//! - `tenant:{tid}`: members of the tenant.
//! - `tenant:{tid}:project:{pid}`: `pid` in the token's `projects`, or role `admin` of that tenant.
//! - `tenant:{tid}:channel:{cid}`: `cid` in `channels`, or role `admin` of that tenant.
//! - Role `publisher` (internal services) may publish to and subscribe to any room; a publisher token with
//!   a `tid` is confined to that tenant's rooms, its users' rooms included. Every room has a tenant, so
//!   that confinement has no exception.
//! - Users must have `email_verified: true` (as in the seed) and may not `Publish`; they may `SetTyping`
//!   in channel rooms they may join.
//! - `AdminService` (membership changes of a tenant's users): role `publisher` (a publisher token with a
//!   `tid` only for users of that tenant), or role `admin` for users of the admin's own tenant.

use crate::auth::Principal;
use crate::rooms::Room;

/// A refused action. Every variant maps to `PERMISSION_DENIED`.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Denied {
    /// Users need a verified email.
    #[error("email not verified: users need email_verified=true in their token")]
    EmailNotVerified,
    /// A user token without `tid`.
    #[error("token has no tenant (tid): users need one")]
    NoTenant,
    /// Not allowed in this room.
    #[error("not allowed in room {room}: {reason}")]
    Room {
        /// The room.
        room: String,
        /// Why, in terms of the token's claims.
        reason: &'static str,
    },
    /// Only internal services publish.
    #[error("only tokens with role `publisher` may publish")]
    NotPublisher,
    /// Not allowed to manage this tenant's users (`AdminService`).
    #[error("not allowed to manage users of tenant {tenant}: {reason}")]
    NotAdmin {
        /// The target user's tenant.
        tenant: String,
        /// Why, in terms of the token's claims.
        reason: &'static str,
    },
}

/// `room` with the `user:{sub}` shorthand resolved in the token's tenant: the name the bus, presence and
/// history use. A token without `tid` cannot use the shorthand (it would not say whose tenant).
pub fn canonical(p: &Principal, room: Room) -> Result<Room, Denied> {
    if !p.is_publisher() {
        // A user's own claims fail first, whatever the room (no tenant, unverified email).
        user_tenant(p)?;
    }
    let name = room.to_string();
    room.in_tenant(p.tenant.as_deref()).ok_or(Denied::Room {
        room: name,
        reason: "user:{sub} means that user in the token's tenant and this token has no tid: \
                 name the room tenant:{tid}:user:{sub}",
    })
}

impl Denied {
    /// The same refusal naming the room as the client wrote it (e.g. the `user:{sub}` shorthand), so the
    /// client recognises its own room in the message.
    pub fn naming(self, name: &str) -> Denied {
        match self {
            Denied::Room { reason, .. } => Denied::Room {
                room: name.to_owned(),
                reason,
            },
            other => other,
        }
    }
}

/// May this principal open a stream on (or ask the presence of) `room`, a [`canonical`] room?
pub fn may_join(p: &Principal, room: &Room) -> Result<(), Denied> {
    if p.is_publisher() {
        return publisher_scope(p, room);
    }
    let tenant = user_tenant(p)?;
    let deny = |reason| {
        Err(Denied::Room {
            room: room.to_string(),
            reason,
        })
    };
    if let Some(room_tenant) = room.tenant() {
        if room_tenant != tenant {
            return deny("the room belongs to another tenant");
        }
    }
    match room {
        Room::UserShorthand(_) => deny("the user:{sub} shorthand must be resolved first"),
        Room::User { user, .. } if *user == p.user_id => Ok(()),
        Room::User { .. } => deny("user rooms are only for their own user"),
        Room::Tenant(_) => Ok(()),
        Room::Project { project, .. } if p.projects.contains(project) || p.is_admin() => Ok(()),
        Room::Project { .. } => deny("project not in the token's projects"),
        Room::Channel { channel, .. } if p.channels.contains(channel) || p.is_admin() => Ok(()),
        Room::Channel { .. } => deny("channel not in the token's channels"),
    }
}

/// May this principal publish to `room`, a [`canonical`] room?
pub fn may_publish(p: &Principal, room: &Room) -> Result<(), Denied> {
    if !p.is_publisher() {
        return Err(Denied::NotPublisher);
    }
    publisher_scope(p, room)
}

/// May this principal announce typing in `room`? Only channel rooms it may join.
pub fn may_type(p: &Principal, room: &Room) -> Result<(), Denied> {
    if !matches!(room, Room::Channel { .. }) {
        return Err(Denied::Room {
            room: room.to_string(),
            reason: "typing is only for channel rooms",
        });
    }
    may_join(p, room)
}

/// May this principal change the memberships of users of `tenant` (`AdminService`)? Role `publisher`
/// (confined to its `tid` if it has one), or role `admin` of that tenant.
pub fn may_administer(p: &Principal, tenant: &str) -> Result<(), Denied> {
    let deny = |reason| {
        Err(Denied::NotAdmin {
            tenant: tenant.to_owned(),
            reason,
        })
    };
    if p.is_publisher() {
        return match p.tenant.as_deref() {
            Some(own) if own != tenant => deny("the publisher token is confined to another tenant"),
            _ => Ok(()),
        };
    }
    let own = user_tenant(p)?;
    if !p.is_admin() {
        return deny("needs role `admin` of that tenant (or role `publisher`)");
    }
    if own != tenant {
        return deny("the token is an admin of another tenant");
    }
    Ok(())
}

/// The tenant of a user token, after the checks every user call needs.
fn user_tenant(p: &Principal) -> Result<&str, Denied> {
    if !p.email_verified {
        return Err(Denied::EmailNotVerified);
    }
    p.tenant.as_deref().ok_or(Denied::NoTenant)
}

fn publisher_scope(p: &Principal, room: &Room) -> Result<(), Denied> {
    let deny = |reason| {
        Err(Denied::Room {
            room: room.to_string(),
            reason,
        })
    };
    match (&p.tenant, room.tenant()) {
        // Only the unresolved shorthand has no tenant: never let it through unchecked.
        (_, None) => deny("the user:{sub} shorthand must be resolved first"),
        (Some(own), Some(other)) if own != other => {
            deny("the publisher token is confined to another tenant")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn user(roles: &[&str]) -> Principal {
        Principal {
            user_id: "u1".into(),
            tenant: Some("t1".into()),
            email_verified: true,
            projects: ["p1".to_owned()].into(),
            channels: ["c1".to_owned()].into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            valid_until: SystemTime::now(),
            issued_at: None,
        }
    }

    /// The room as the service sees it: parsed, then resolved for `p`.
    fn resolved(p: &Principal, s: &str) -> Room {
        canonical(p, Room::parse(s).unwrap()).unwrap()
    }

    fn room(s: &str) -> Room {
        Room::parse(s).unwrap()
    }

    #[test]
    fn users_join_their_own_rooms_only() {
        let p = user(&[]);
        for ok in [
            "user:u1",
            "tenant:t1:user:u1",
            "tenant:t1",
            "tenant:t1:project:p1",
            "tenant:t1:channel:c1",
        ] {
            assert_eq!(may_join(&p, &resolved(&p, ok)), Ok(()), "{ok}");
        }
        for denied in [
            "user:u2",
            "tenant:t1:user:u2",
            "tenant:t2:user:u1",
            "tenant:t2",
            "tenant:t1:project:p2",
            "tenant:t1:channel:c2",
            "tenant:t2:project:p1",
            "tenant:t2:channel:c1",
        ] {
            assert!(may_join(&p, &resolved(&p, denied)).is_err(), "{denied}");
        }
    }

    #[test]
    fn admins_join_every_room_of_their_tenant_only() {
        let p = user(&["admin"]);
        assert_eq!(may_join(&p, &room("tenant:t1:project:p9")), Ok(()));
        assert_eq!(may_join(&p, &room("tenant:t1:channel:c9")), Ok(()));
        assert!(may_join(&p, &room("tenant:t2:project:p1")).is_err());
        assert!(may_join(&p, &resolved(&p, "user:u2")).is_err());
        assert!(may_join(&p, &room("tenant:t1:user:u2")).is_err());
    }

    #[test]
    fn the_user_shorthand_means_the_tokens_tenant() {
        let p = user(&[]);
        assert_eq!(resolved(&p, "user:u1"), room("tenant:t1:user:u1"));
        let mut svc = user(&["publisher"]);
        svc.tenant = None;
        assert!(matches!(
            canonical(&svc, room("user:u1")),
            Err(Denied::Room { .. })
        ));
        // Unresolved, the shorthand is refused rather than treated as tenant-less.
        assert!(may_publish(&svc, &room("user:u1")).is_err());
        assert!(may_join(&p, &room("user:u1")).is_err());
    }

    #[test]
    fn unverified_or_tenantless_users_are_refused() {
        let mut p = user(&[]);
        p.email_verified = false;
        assert_eq!(
            may_join(&p, &room("tenant:t1:user:u1")),
            Err(Denied::EmailNotVerified)
        );
        let mut p = user(&[]);
        p.tenant = None;
        assert_eq!(
            may_join(&p, &room("tenant:t1:user:u1")),
            Err(Denied::NoTenant)
        );
    }

    #[test]
    fn publishers_publish_anywhere_in_their_scope() {
        let mut svc = user(&["publisher"]);
        svc.tenant = None;
        svc.email_verified = false;
        assert_eq!(may_publish(&svc, &room("tenant:t9:project:x")), Ok(()));
        assert_eq!(may_join(&svc, &room("tenant:t9:user:u7")), Ok(()));
        svc.tenant = Some("t1".into());
        assert!(may_publish(&svc, &room("tenant:t9")).is_err());
        // A tenant-confined publisher reaches its own tenant's users only, however the room is named.
        assert_eq!(may_publish(&svc, &resolved(&svc, "user:u7")), Ok(()));
        assert_eq!(may_publish(&svc, &room("tenant:t1:user:u7")), Ok(()));
        assert!(may_publish(&svc, &room("tenant:t9:user:u7")).is_err());
        assert!(may_join(&svc, &room("tenant:t9:user:u7")).is_err());
        assert_eq!(
            may_publish(&user(&[]), &room("tenant:t1")),
            Err(Denied::NotPublisher)
        );
    }

    #[test]
    fn admins_manage_their_own_tenant_and_publishers_their_scope() {
        assert_eq!(may_administer(&user(&["admin"]), "t1"), Ok(()));
        assert!(may_administer(&user(&["admin"]), "t2").is_err());
        assert!(may_administer(&user(&[]), "t1").is_err());
        let mut unverified = user(&["admin"]);
        unverified.email_verified = false;
        assert_eq!(
            may_administer(&unverified, "t1"),
            Err(Denied::EmailNotVerified)
        );
        let mut svc = user(&["publisher"]);
        svc.tenant = None;
        assert_eq!(may_administer(&svc, "t9"), Ok(()));
        svc.tenant = Some("t1".into());
        assert_eq!(may_administer(&svc, "t1"), Ok(()));
        assert!(matches!(
            may_administer(&svc, "t9"),
            Err(Denied::NotAdmin { .. })
        ));
    }

    #[test]
    fn typing_only_in_joinable_channels() {
        let p = user(&[]);
        assert_eq!(may_type(&p, &room("tenant:t1:channel:c1")), Ok(()));
        assert!(may_type(&p, &room("tenant:t1:channel:c2")).is_err());
        assert!(may_type(&p, &room("tenant:t1")).is_err());
    }
}
