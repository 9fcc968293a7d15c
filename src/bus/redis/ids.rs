//! Event ids of the Redis bus, and how they order.
//!
//! A stored event's id is `{epoch}:{ms}-{seq}`: the id Redis gave its stream entry, prefixed with the
//! room's *epoch*, a random token created (by the publish or read script) together with the room's stream.
//! When the stream is lost (Redis restarted without persistence, the room expired, `FLUSHALL`), the next
//! access creates a new epoch, so an old id is recognised and answered with `Reset` instead of a false
//! recovery, as Centrifugo does.
//!
//! Ephemeral events (typing, user status) are not stored; their id is the room's last stream id plus a
//! counter, `{epoch}:{ms}-{seq}.{n}`. Used as `since`, it resumes after the stream entry it follows.
//!
//! [`Position`]s: a stream id `ms-seq` orders as `(ms, 2*seq)`, an ephemeral event following it as
//! `(ms, 2*seq + 1)`, so an ephemeral event sorts after the stored event it follows and before the next.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::Position;

/// A Redis stream entry id, `ms-seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct StreamId {
    /// Milliseconds part.
    pub(crate) ms: u64,
    /// Sequence within the millisecond.
    pub(crate) seq: u64,
}

impl StreamId {
    /// Parses `ms-seq` (both decimal). `None` when it is not one.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-')?;
        let digits =
            |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return None;
        }
        let seq: u64 = seq.parse().ok()?;
        // Keeps 2*seq + 1 within u64 (Redis never gets near: seq counts entries within one millisecond).
        (seq < 1 << 62).then_some(())?;
        Some(Self {
            ms: ms.parse().ok()?,
            seq,
        })
    }

    /// The position of the stored event with this id, or of an ephemeral event following it.
    pub(crate) fn position(self, ephemeral: bool) -> Position {
        Position {
            major: self.ms,
            minor: self.seq * 2 + u64::from(ephemeral),
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A parsed event id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EventId<'a> {
    /// The room's epoch when the id was issued.
    pub(crate) epoch: &'a str,
    /// The stream entry (for an ephemeral event: the one it follows).
    pub(crate) stream: StreamId,
    /// `Some(n)` for the n-th ephemeral event after `stream`.
    pub(crate) ephemeral: Option<u64>,
}

impl<'a> EventId<'a> {
    /// Parses an id this bus issued, or says why it is not one.
    pub(crate) fn parse(id: &'a str) -> Result<Self, &'static str> {
        let (epoch, rest) = id.split_once(':').ok_or("expected {epoch}:{ms}-{seq}")?;
        if !is_epoch(epoch) {
            return Err("bad epoch");
        }
        let (stream, ephemeral) = match rest.split_once('.') {
            Some((stream, n)) => {
                let n = (!n.is_empty() && n.len() <= 20 && n.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| n.parse::<u64>().ok())
                    .flatten()
                    .ok_or("bad ephemeral counter")?;
                (stream, Some(n))
            }
            None => (rest, None),
        };
        let stream = StreamId::parse(stream).ok_or("bad stream id")?;
        Ok(Self {
            epoch,
            stream,
            ephemeral,
        })
    }

    /// Where the event sorts within its room.
    pub(crate) fn position(&self) -> Position {
        self.stream.position(self.ephemeral.is_some())
    }
}

/// Epochs are 1 to 32 characters `[0-9a-z]`.
fn is_epoch(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

/// A fresh random token of `[0-9a-z]` (epochs, node ids). Not cryptographic: it only has to differ from
/// the tokens issued before it.
pub(crate) fn random_token(len: usize) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = String::with_capacity(len);
    while out.len() < len {
        // RandomState is seeded from the OS per process; the counter and the clock make each call differ.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        let mut n = h.finish();
        for _ in 0..8 {
            if out.len() == len {
                break;
            }
            out.push(DIGITS[(n % 36) as usize] as char);
            n /= 36;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stored_and_ephemeral_ids() {
        let id = EventId::parse("k3x9:1700000000000-5").unwrap();
        assert_eq!(id.epoch, "k3x9");
        assert_eq!(
            id.stream,
            StreamId {
                ms: 1_700_000_000_000,
                seq: 5
            }
        );
        assert_eq!(id.ephemeral, None);
        let eph = EventId::parse("k3x9:1700000000000-5.12").unwrap();
        assert_eq!(eph.ephemeral, Some(12));
        assert!(
            EventId::parse("k3x9:0-0.1").is_ok(),
            "ephemeral in a room without history"
        );
        for bad in [
            "",
            "nocolon",
            ":1-1",
            "K3X9:1-1",
            "e:1",
            "e:1-",
            "e:-1",
            "e:1-1.",
            "e:1-1.x",
            "e:1-2-3",
            "e:a-1",
            "e:1-1:2",
            "e:99999999999999999999999-1",
        ] {
            assert!(EventId::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn ephemeral_events_sort_between_the_stored_events_around_them() {
        let stored = EventId::parse("e:10-3").unwrap().position();
        let eph = EventId::parse("e:10-3.7").unwrap().position();
        let next_same_ms = EventId::parse("e:10-4").unwrap().position();
        let next_ms = EventId::parse("e:11-0").unwrap().position();
        assert!(stored < eph && eph < next_same_ms && next_same_ms < next_ms);
        assert_eq!(
            EventId::parse("e:10-3.1").unwrap().position(),
            EventId::parse("e:10-3.9").unwrap().position()
        );
    }

    #[test]
    fn tokens_are_fresh_and_well_formed() {
        let a = random_token(12);
        let b = random_token(12);
        assert_eq!(a.len(), 12);
        assert!(is_epoch(&a) && is_epoch(&b));
        assert_ne!(a, b);
    }
}
