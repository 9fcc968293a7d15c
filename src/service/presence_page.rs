//! `GetPresence` paging: the page size and the opaque cursor between pages.
//!
//! The cursor is the URL-safe base64 (no padding) of [`PREFIX`] and the last user id of the previous page
//! (the prefix tells a cursor from other base64, and leaves room for another format later): pages are
//! in user-id order, so the next page starts after it, whoever joined or left in between. Clients must
//! treat it as opaque; it is validated, not trusted.

use base64::Engine as _;

use crate::error::ServiceError;

/// User ids per page when the request says 0.
pub(super) const DEFAULT_LIMIT: usize = 100;
/// User ids per page at most: a larger `limit` is clamped to it.
pub(super) const MAX_LIMIT: usize = 1_000;
/// Longest `page_token` accepted, in bytes (a user id of 1,536 bytes, far above any real `sub`).
const MAX_TOKEN_LEN: usize = 2_048;

/// What every cursor starts with, before base64.
const PREFIX: &str = "u:";

const ENGINE: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The page size for a requested `limit`: 0 means [`DEFAULT_LIMIT`], above [`MAX_LIMIT`] is clamped.
pub(super) fn limit(requested: u32) -> usize {
    match usize::try_from(requested).unwrap_or(MAX_LIMIT) {
        0 => DEFAULT_LIMIT,
        n => n.min(MAX_LIMIT),
    }
}

/// The cursor after `last_user`.
pub(super) fn encode(last_user: &str) -> String {
    ENGINE.encode(format!("{PREFIX}{last_user}"))
}

/// The user the page starts after: `None` for an empty token (the first page).
pub(super) fn decode(token: &str) -> Result<Option<String>, ServiceError> {
    if token.is_empty() {
        return Ok(None);
    }
    let refuse = || {
        ServiceError::InvalidArgument(
            "page_token is not one this server returned: pass next_page_token unchanged, or leave it \
             empty for the first page"
                .into(),
        )
    };
    if token.len() > MAX_TOKEN_LEN {
        return Err(refuse());
    }
    let bytes = ENGINE.decode(token).map_err(|_| refuse())?;
    let text = String::from_utf8(bytes).map_err(|_| refuse())?;
    match text.strip_prefix(PREFIX) {
        Some(user) if !user.is_empty() => Ok(Some(user.to_owned())),
        _ => Err(refuse()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_default_and_clamp() {
        assert_eq!(limit(0), DEFAULT_LIMIT);
        assert_eq!(limit(7), 7);
        assert_eq!(limit(u32::MAX), MAX_LIMIT);
    }

    #[test]
    fn tokens_round_trip_and_malformed_ones_are_refused() {
        assert_eq!(decode("").unwrap(), None);
        assert_eq!(decode(&encode("u/ä 1")).unwrap().as_deref(), Some("u/ä 1"));
        for bad in [
            "!!",
            "a",
            "=",
            &"A".repeat(MAX_TOKEN_LEN + 4),
            &ENGINE.encode([0xff, 0xfe]),
            "AA",
            &ENGINE.encode("u:"),
            &ENGINE.encode("x:u1"),
        ] {
            assert!(
                matches!(decode(bad), Err(ServiceError::InvalidArgument(_))),
                "{bad:?} accepted"
            );
        }
    }
}
