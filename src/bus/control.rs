//! The control plane: membership commands (`AdminService`) that must reach every node's open streams.
//!
//! A command is carried like an event of a reserved room, [`CONTROL_ROOM`], whose name is outside the room
//! grammar (no client can subscribe or publish to it: every room a client names is parsed first). So the
//! control channel has what rooms have on every bus, with no second mechanism to keep right: on Redis one
//! (sharded, in a cluster) pub/sub channel every node subscribes, `lamplight:{lamplight.control}:events`,
//! with a short history in its stream, from which a node that lost its subscription for a moment catches
//! up in order (or is told with a `Reset` that it may have missed commands); on the memory bus, this node.
//! The payload is a [`Control`] as JSON in a `Custom` event.

use serde::{Deserialize, Serialize};

use super::StoredEvent;
use crate::auth::Revocation;
use crate::proto::v1::{
    event::Payload, subscribe_response::Kind, Custom, Event, SubscribeResponse,
};

/// The reserved room carrying control commands (not a valid client room name).
pub const CONTROL_ROOM: &str = "lamplight.control";
/// Media type of a control command in its `Custom` payload.
pub const CONTROL_CONTENT_TYPE: &str = "application/vnd.lamplight.control+json";

/// One membership command, applied by every node to its own open streams.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Control {
    /// Take `room` (canonical) off every open stream of the user; they get `Removed`.
    Unsubscribe {
        /// `tid`.
        tenant: String,
        /// `sub`.
        user: String,
        /// Canonical room name.
        room: String,
        /// For `Removed.reason`.
        reason: String,
    },
    /// End every open stream of the user with `PERMISSION_DENIED`.
    Disconnect {
        /// `tid`.
        tenant: String,
        /// `sub`.
        user: String,
        /// Named in the status.
        reason: String,
    },
    /// Refuse the user's tokens issued before the cutoff, and end the streams opened with them.
    Revoke(Revocation),
}

impl Control {
    /// The event that carries this command on the bus.
    pub fn to_event(&self) -> Event {
        Event {
            room: CONTROL_ROOM.to_owned(),
            r#type: "lamplight.control".to_owned(),
            time: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            payload: Some(Payload::Custom(Custom {
                content_type: CONTROL_CONTENT_TYPE.to_owned(),
                // A derived Serialize of strings and integers does not fail.
                data: serde_json::to_vec(self).unwrap_or_default(),
            })),
            ..Default::default()
        }
    }

    /// The command an event of [`CONTROL_ROOM`] carries, or why it carries none.
    pub fn from_stored(event: &StoredEvent) -> Result<Control, String> {
        use prost::Message as _;
        let response = SubscribeResponse::decode(event.frame.as_slice())
            .map_err(|e| format!("undecodable control event: {e}"))?;
        let Some(Kind::Event(Event {
            payload: Some(Payload::Custom(custom)),
            ..
        })) = response.kind
        else {
            return Err("control event without a Custom payload".into());
        };
        if custom.content_type != CONTROL_CONTENT_TYPE {
            return Err(format!(
                "control event of type {:?}, expected {CONTROL_CONTENT_TYPE}",
                custom.content_type
            ));
        }
        serde_json::from_slice(&custom.data).map_err(|e| format!("bad control command: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Position;

    #[test]
    fn commands_round_trip_through_an_event_and_the_room_is_not_a_client_room() {
        let cmd = Control::Unsubscribe {
            tenant: "t1".into(),
            user: "u1".into(),
            room: "tenant:t1:project:p1".into(),
            reason: "left the project".into(),
        };
        let mut event = cmd.to_event();
        event.id = "1".into();
        let stored = StoredEvent::new(Position::default(), CONTROL_ROOM.into(), &event);
        assert_eq!(Control::from_stored(&stored), Ok(cmd));
        assert!(crate::rooms::Room::parse(CONTROL_ROOM).is_err());
    }
}
