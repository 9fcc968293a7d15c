//! Pre-encoded `SubscribeResponse` messages.
//!
//! Fan-out is the hot path: one event goes to thousands of streams. The bus encodes each event once, as a
//! complete `SubscribeResponse { event }` body, and every stream writes the same refcounted [`Bytes`]. The
//! server's generated trait uses [`SharedResponse`] in place of `SubscribeResponse` (see `build.rs`); on the
//! wire the two are identical, so clients decode it as the ordinary message.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::proto::v1::{subscribe_response, Event, SubscribeResponse};

/// Field number of `SubscribeResponse.event`.
const EVENT_FIELD: u32 = 2;

/// An already-encoded `SubscribeResponse`. Cloning it shares the bytes.
#[derive(Clone, Default, PartialEq)]
pub struct SharedResponse(Bytes);

impl SharedResponse {
    /// Encodes any response (used for the rare, per-stream messages: `Subscribed`, `Heartbeat`, `Reset`).
    pub fn from_message(kind: subscribe_response::Kind) -> Self {
        Self(Bytes::from(
            SubscribeResponse { kind: Some(kind) }.encode_to_vec(),
        ))
    }

    /// Encodes `SubscribeResponse { event }` once, to be shared by every subscriber of the room.
    pub fn from_event(event: &Event) -> Self {
        let len = event.encoded_len();
        let mut buf = Vec::with_capacity(len + 1 + prost::length_delimiter_len(len));
        prost::encoding::message::encode(EVENT_FIELD, event, &mut buf);
        Self(Bytes::from(buf))
    }

    /// Wraps the encoding of an `Event` (as stored in a history) without decoding it.
    pub fn from_encoded_event(event: &[u8]) -> Self {
        let mut buf =
            Vec::with_capacity(event.len() + 1 + prost::length_delimiter_len(event.len()));
        prost::encoding::encode_key(EVENT_FIELD, WireType::LengthDelimited, &mut buf);
        prost::encoding::encode_varint(event.len() as u64, &mut buf);
        buf.extend_from_slice(event);
        Self(Bytes::from(buf))
    }

    /// The encoded message body.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }
}

impl std::fmt::Debug for SharedResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedResponse({} bytes)", self.0.len())
    }
}

impl Message for SharedResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    /// The server only ever encodes responses; decoding one here skips its fields.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::{event::Payload, Task};

    #[test]
    fn shared_event_decodes_as_the_ordinary_message() {
        let event = Event {
            id: "e-1".into(),
            room: "tenant:t1".into(),
            r#type: "task.created".into(),
            payload: Some(Payload::Task(Task {
                id: "t".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let shared = SharedResponse::from_event(&event);
        let decoded = SubscribeResponse::decode(shared.as_bytes().clone()).expect("decodes");
        assert_eq!(
            decoded.kind,
            Some(subscribe_response::Kind::Event(event.clone()))
        );
        let rewrapped = SharedResponse::from_encoded_event(&event.encode_to_vec());
        assert_eq!(rewrapped, shared);
    }
}
