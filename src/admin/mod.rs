//! `lamplight.v1.AdminService`: membership changes that reach live streams, on every node.
//!
//! - `Unsubscribe(user, room)`: every open stream of the user gets `Removed { room, reason }` (with the
//!   room named as that stream subscribed it) and stops receiving the room; its other rooms go on.
//! - `Disconnect(user, reason)`: every open stream of the user ends with `PERMISSION_DENIED` naming the
//!   reason; clients treat it as final.
//! - `RevokeTokens(user, issued_before)`: the user's tokens with `iat` before the cutoff (and tokens
//!   without `iat`) are refused with `UNAUTHENTICATED` on every node (see [`crate::auth::Revocations`]),
//!   and streams opened with them end with `UNAUTHENTICATED` and their resume map, as at token expiry.
//!
//! The node taking the call checks it ([`policy::may_administer`]), hands the command to the bus's control
//! channel (every node applies it: [`node`]) and applies it to its own streams at once; it returns once the
//! bus accepted it. The server keeps no list of removed rooms: a later `Subscribe` (or a resume with
//! `since`) is judged by the token alone, so change the user's claims at the identity provider too, and
//! revoke the tokens already issued when the removal must hold before they expire.

mod node;
mod streams;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::{Request, Response, Status};

pub use node::{start, CONTROL_QUEUE};
pub use streams::LiveStreams;
pub(crate) use streams::{Ending, LiveTicket, StreamControl};

use crate::auth::{self, Principal, Revocation};
use crate::bus::control::Control;
use crate::bus::Bus;
use crate::error::ServiceError;
use crate::policy;
use crate::proto::server::admin_service_server::AdminService;
use crate::proto::v1::{
    DisconnectRequest, DisconnectResponse, RevokeTokensRequest, RevokeTokensResponse,
    UnsubscribeRequest, UnsubscribeResponse, UserRef,
};
use crate::rooms::{is_valid_id, Room, MAX_ID_LEN};

/// Longest `reason` accepted, in bytes.
pub const MAX_REASON_LEN: usize = 512;
/// How far in the future `issued_before` may be (clock skew between the caller and the server).
pub const MAX_CUTOFF_AHEAD: Duration = Duration::from_secs(300);

/// The gRPC `AdminService`. Cheap to clone.
#[derive(Clone)]
pub struct AdminApi {
    bus: Arc<dyn Bus>,
    live: Arc<LiveStreams>,
    /// How long a revocation is kept after its cutoff: `--revocation-ttl-secs` plus the JWT leeway.
    revocation_ttl: Duration,
}

impl AdminApi {
    /// The service over `bus`, applying commands to `live` (this node's streams) at once.
    pub fn new(bus: Arc<dyn Bus>, live: Arc<LiveStreams>, revocation_ttl: Duration) -> Self {
        Self {
            bus,
            live,
            revocation_ttl,
        }
    }

    /// Sends `cmd` to every node and applies it here.
    async fn send(&self, cmd: Control) -> Result<(), ServiceError> {
        self.bus.control(&cmd).await?;
        let streams = self.live.apply(&cmd);
        tracing::info!(?cmd, local_streams = streams, "membership command sent");
        Ok(())
    }

    async fn unsubscribe(
        &self,
        p: &Principal,
        req: UnsubscribeRequest,
    ) -> Result<(), ServiceError> {
        let (tenant, user) = target(p, req.user)?;
        let room = Room::parse(&req.room)?
            .in_tenant(Some(&tenant))
            .filter(|room| room.tenant() == Some(tenant.as_str()))
            .ok_or_else(|| {
                ServiceError::InvalidArgument(format!(
                    "room {:?} belongs to another tenant than the user (tenant {tenant}): a user only \
                     joins rooms of their own tenant",
                    req.room
                ))
            })?;
        let reason = reason(req.reason)?;
        self.send(Control::Unsubscribe {
            tenant,
            user,
            room: room.to_string(),
            reason,
        })
        .await
    }

    async fn disconnect(&self, p: &Principal, req: DisconnectRequest) -> Result<(), ServiceError> {
        let (tenant, user) = target(p, req.user)?;
        let reason = reason(req.reason)?;
        self.send(Control::Disconnect {
            tenant,
            user,
            reason,
        })
        .await
    }

    async fn revoke(&self, p: &Principal, req: RevokeTokensRequest) -> Result<(), ServiceError> {
        let (tenant, user) = target(p, req.user)?;
        // Not sent to the streams (they end as at token expiry): for the log only.
        let reason = reason(req.reason)?;
        let issued_before = cutoff(req.issued_before)?;
        tracing::info!(%tenant, %user, issued_before, %reason, by = %p.user_id, "revoking tokens");
        let revocation = Revocation {
            tenant,
            user,
            issued_before,
            expires_at: issued_before.saturating_add(self.revocation_ttl.as_secs()),
        };
        if revocation.expires_at <= auth::now_unix() {
            // Every token it would refuse has expired already.
            return Ok(());
        }
        // Here first (refused at the bound before anything else changes), then where nodes starting later
        // find it, then to the running nodes.
        self.live.revocations().insert(&revocation)?;
        self.bus.store_revocation(&revocation).await?;
        self.send(Control::Revoke(revocation)).await
    }
}

/// The target user, checked: both ids in the room grammar, and the caller may manage that tenant.
fn target(p: &Principal, user: Option<UserRef>) -> Result<(String, String), ServiceError> {
    let user = user.ok_or_else(|| {
        ServiceError::InvalidArgument("user is required: {tenant_id, user_id}".into())
    })?;
    for (field, id) in [("tenant_id", &user.tenant_id), ("user_id", &user.user_id)] {
        if !is_valid_id(id) {
            let shown: String = id.chars().take(32).collect();
            return Err(ServiceError::InvalidArgument(format!(
                "user.{field} {shown:?} is not an id: 1-{MAX_ID_LEN} characters [A-Za-z0-9_.-]"
            )));
        }
    }
    policy::may_administer(p, &user.tenant_id)?;
    Ok((user.tenant_id, user.user_id))
}

fn reason(reason: String) -> Result<String, ServiceError> {
    if reason.len() > MAX_REASON_LEN {
        return Err(ServiceError::InvalidArgument(format!(
            "reason is {} bytes; the limit is {MAX_REASON_LEN}",
            reason.len()
        )));
    }
    Ok(reason)
}

/// `issued_before` in whole Unix seconds, rounded up (`iat` has whole seconds: a token issued in the same
/// second as a cutoff with a fraction counts as issued before it). Unset: now.
fn cutoff(issued_before: Option<prost_types::Timestamp>) -> Result<u64, ServiceError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let round_up = |secs: u64, nanos: bool| secs + u64::from(nanos);
    let Some(ts) = issued_before else {
        return Ok(round_up(now.as_secs(), now.subsec_nanos() > 0));
    };
    let secs = u64::try_from(ts.seconds)
        .ok()
        .filter(|_| (0..1_000_000_000).contains(&ts.nanos))
        .ok_or_else(|| {
            ServiceError::InvalidArgument(
                "issued_before is not a valid time after 1970 (seconds >= 0, 0 <= nanos < 1e9)"
                    .into(),
            )
        })?;
    let secs = round_up(secs, ts.nanos > 0);
    if secs > (now + MAX_CUTOFF_AHEAD).as_secs() + 1 {
        return Err(ServiceError::InvalidArgument(format!(
            "issued_before is more than {} s in the future: it would refuse tokens not issued yet \
             (leave it unset for now)",
            MAX_CUTOFF_AHEAD.as_secs()
        )));
    }
    Ok(secs)
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn unsubscribe(
        &self,
        request: Request<UnsubscribeRequest>,
    ) -> Result<Response<UnsubscribeResponse>, Status> {
        let principal = auth::principal(&request).await?;
        AdminApi::unsubscribe(self, &principal, request.into_inner()).await?;
        Ok(Response::new(UnsubscribeResponse {}))
    }

    async fn disconnect(
        &self,
        request: Request<DisconnectRequest>,
    ) -> Result<Response<DisconnectResponse>, Status> {
        let principal = auth::principal(&request).await?;
        AdminApi::disconnect(self, &principal, request.into_inner()).await?;
        Ok(Response::new(DisconnectResponse {}))
    }

    async fn revoke_tokens(
        &self,
        request: Request<RevokeTokensRequest>,
    ) -> Result<Response<RevokeTokensResponse>, Status> {
        let principal = auth::principal(&request).await?;
        self.revoke(&principal, request.into_inner()).await?;
        Ok(Response::new(RevokeTokensResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoffs_round_up_to_whole_seconds_and_refuse_the_far_future() {
        let ts = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
        assert_eq!(cutoff(ts(1000, 0)).unwrap(), 1000);
        assert_eq!(cutoff(ts(1000, 1)).unwrap(), 1001);
        assert!(cutoff(ts(-1, 0)).is_err());
        assert!(cutoff(ts(1000, -1)).is_err());
        let far = (auth::now_unix() + 3600) as i64;
        assert!(cutoff(ts(far, 0)).is_err());
        assert!(cutoff(None).unwrap() >= auth::now_unix());
    }
}
