//! Where the client's bearer tokens come from.
//!
//! The client asks its [`TokenSource`] for a token before every stream it opens and every publish attempt,
//! and asks it to [`refresh`](TokenSource::refresh) after the server answered `UNAUTHENTICATED` (an expired
//! token ends a stream that way). A source that cannot produce a new token returns the same one; the client
//! then gives up after the second refusal instead of looping.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;

/// A token source failed: the message is shown to the caller.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TokenError(pub String);

impl TokenError {
    /// A token error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// Supplies the JWT sent as `authorization: Bearer <token>`.
#[async_trait]
pub trait TokenSource: Send + Sync + 'static {
    /// The token to use now. Called before each stream and each publish attempt; cache inside when getting
    /// a token is expensive.
    async fn token(&self) -> Result<String, TokenError>;

    /// A new token, after the server refused the last one (`UNAUTHENTICATED`: expired or revoked). The
    /// default asks [`token`](Self::token) again, which suits sources that mint on every call.
    async fn refresh(&self) -> Result<String, TokenError> {
        self.token().await
    }
}

/// A fixed token: no refresh possible. Streams end for good once it expires.
#[derive(Clone, Debug)]
pub struct StaticToken(pub String);

#[async_trait]
impl TokenSource for StaticToken {
    async fn token(&self) -> Result<String, TokenError> {
        Ok(self.0.clone())
    }
}

#[async_trait]
impl TokenSource for String {
    async fn token(&self) -> Result<String, TokenError> {
        Ok(self.clone())
    }
}

#[async_trait]
impl TokenSource for &'static str {
    async fn token(&self) -> Result<String, TokenError> {
        Ok((*self).to_owned())
    }
}

#[async_trait]
impl<T: TokenSource + ?Sized> TokenSource for Arc<T> {
    async fn token(&self) -> Result<String, TokenError> {
        (**self).token().await
    }

    async fn refresh(&self) -> Result<String, TokenError> {
        (**self).refresh().await
    }
}

/// A token source made of an async closure, called for every token (see [`token_fn`]).
pub struct FnToken<F>(F);

/// A [`TokenSource`] that calls `f` whenever a token is needed, including refreshes: e.g. a call to your
/// identity provider, or minting a short-lived token locally.
pub fn token_fn<F, Fut>(f: F) -> FnToken<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, TokenError>> + Send + 'static,
{
    FnToken(f)
}

#[async_trait]
impl<F, Fut> TokenSource for FnToken<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, TokenError>> + Send + 'static,
{
    async fn token(&self) -> Result<String, TokenError> {
        (self.0)().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn closures_are_called_for_every_token_and_refresh() {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = calls.clone();
        let source = token_fn(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok(format!("token-{n}")) }
        });
        assert_eq!(source.token().await.unwrap(), "token-0");
        assert_eq!(source.refresh().await.unwrap(), "token-1");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn static_tokens_never_change() {
        let source = StaticToken("abc".into());
        assert_eq!(source.token().await.unwrap(), "abc");
        assert_eq!(source.refresh().await.unwrap(), "abc");
        let shared: Arc<dyn TokenSource> = Arc::new("xyz");
        assert_eq!(shared.refresh().await.unwrap(), "xyz");
    }
}
