//! Pre-encoded `SubscribeResponse` messages.
//!
//! Fan-out is the hot path: one event goes to thousands of streams. The bus encodes each event once, as a
//! complete `SubscribeResponse { event }` body, and every stream writes the same refcounted [`Bytes`]. The
//! server's generated trait uses [`SharedResponse`] in place of `SubscribeResponse` (see `build.rs`); on the
//! wire the two are identical, so clients decode it as the ordinary message.

use std::marker::PhantomData;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::bus::StoredEvent;
use crate::proto::v1::{subscribe_response, Event, SubscribeResponse};

/// Buffers of the server's codec: every open stream keeps its encode buffer for its whole life, so it
/// starts small (a few events; it grows under load) and one write carries at most about 8 KiB of events,
/// which bounds what a burst can make it grow to (tonic's defaults are 8 KiB and 32 KiB).
const BUFFERS: (usize, usize) = (512, 8 * 1024);

/// Field number of `SubscribeResponse.event`.
const EVENT_FIELD: u32 = 2;

/// An already-encoded `SubscribeResponse`. Cloning it shares the bytes.
#[derive(Clone)]
pub struct SharedResponse(Repr);

#[derive(Clone)]
enum Repr {
    Bytes(Bytes),
    /// A stored event's frame, held through the event itself: handing it to a stream moves the `Arc` the
    /// stream received, instead of touching a second shared reference count per delivery.
    Stored(Arc<StoredEvent>),
}

impl SharedResponse {
    /// Encodes any response (used for the rare, per-stream messages: `Subscribed`, `Heartbeat`, `Reset`).
    pub fn from_message(kind: subscribe_response::Kind) -> Self {
        Self::from_bytes(Bytes::from(
            SubscribeResponse { kind: Some(kind) }.encode_to_vec(),
        ))
    }

    /// Encodes `SubscribeResponse { event }` once, to be shared by every subscriber of the room.
    pub fn from_event(event: &Event) -> Self {
        let len = event.encoded_len();
        let mut buf = Vec::with_capacity(len + 1 + prost::length_delimiter_len(len));
        prost::encoding::message::encode(EVENT_FIELD, event, &mut buf);
        Self::from_bytes(Bytes::from(buf))
    }

    /// Wraps the encoding of an `Event` (as stored in a history) without decoding it.
    pub fn from_encoded_event(event: &[u8]) -> Self {
        let mut buf =
            Vec::with_capacity(event.len() + 1 + prost::length_delimiter_len(event.len()));
        prost::encoding::encode_key(EVENT_FIELD, WireType::LengthDelimited, &mut buf);
        prost::encoding::encode_varint(event.len() as u64, &mut buf);
        buf.extend_from_slice(event);
        Self::from_bytes(Bytes::from(buf))
    }

    /// The frame of a stored event, taking over the caller's reference to it.
    pub fn from_stored(event: Arc<StoredEvent>) -> Self {
        Self(Repr::Stored(event))
    }

    /// This event frame with the event's `room` replaced by `room`: a fresh encoding for one stream, for
    /// a client that named the room differently (the `user:{sub}` shorthand). A frame that is not an event
    /// is returned as is.
    pub fn with_event_room(&self, room: &str) -> Self {
        match SubscribeResponse::decode(self.as_slice()) {
            Ok(SubscribeResponse {
                kind: Some(subscribe_response::Kind::Event(mut event)),
            }) => {
                event.room = room.to_owned();
                Self::from_event(&event)
            }
            _ => self.clone(),
        }
    }

    fn from_bytes(bytes: Bytes) -> Self {
        Self(Repr::Bytes(bytes))
    }

    /// The encoded message body.
    pub fn as_slice(&self) -> &[u8] {
        match &self.0 {
            Repr::Bytes(bytes) => bytes,
            Repr::Stored(event) => event.frame.as_slice(),
        }
    }
}

impl Default for SharedResponse {
    fn default() -> Self {
        Self::from_bytes(Bytes::new())
    }
}

impl PartialEq for SharedResponse {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl std::fmt::Debug for SharedResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedResponse({} bytes)", self.as_slice().len())
    }
}

impl Message for SharedResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(self.as_slice());
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
        self.as_slice().len()
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// The codec of the generated `EventService` server (see `build.rs`): prost, with the smaller per-stream
/// buffers of [`BUFFERS`]. The thousands of idle streams a node holds each keep one.
#[derive(Debug)]
pub struct Codec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(tonic::codec::BufferSettings::new(BUFFERS.0, BUFFERS.1))
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(tonic::codec::BufferSettings::new(BUFFERS.0, BUFFERS.1))
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
        let decoded = SubscribeResponse::decode(shared.as_slice()).expect("decodes");
        assert_eq!(
            decoded.kind,
            Some(subscribe_response::Kind::Event(event.clone()))
        );
        let rewrapped = SharedResponse::from_encoded_event(&event.encode_to_vec());
        assert_eq!(rewrapped, shared);
        let stored = StoredEvent::new(Default::default(), "tenant:t1".into(), &event);
        assert_eq!(SharedResponse::from_stored(Arc::new(stored)), shared);
        let renamed = shared.with_event_room("user:u1");
        let mut expected = event.clone();
        expected.room = "user:u1".into();
        assert_eq!(renamed, SharedResponse::from_event(&expected));
    }
}
