//! Minting HS256 tokens, for `lamplight token` (local development) and tests.

use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;

/// Claims of a development token.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DevToken {
    /// User or service id.
    pub sub: String,
    /// Tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tid: Option<String>,
    /// Whether the user's email is verified (users need it to subscribe).
    pub email_verified: bool,
    /// Project ids.
    pub projects: Vec<String>,
    /// Channel ids.
    pub channels: Vec<String>,
    /// Roles (`admin`, `publisher`).
    pub roles: Vec<String>,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expiry (Unix seconds).
    pub exp: u64,
    /// Issuer, when the server requires one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience, when the server requires one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// Signs `claims` with an HS256 `secret`.
pub fn mint_hs256(
    secret: &[u8],
    claims: &impl Serialize,
) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret),
    )
}
