//! Authentication: `Authorization: Bearer <credential>` → `Principal`.
//!
//! STUB — being implemented (API keys by SHA-256 in constant time, JWT per `[auth.jwt]`).

use crate::config::{Config, KeyPolicy};
use crate::error::AuthFailure;
use std::sync::Arc;

/// Who is calling, as established by authentication. Inserted into request extensions.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The key id: the `[[keys]] id`, or for a JWT the value of `auth.jwt.key_claim`.
    pub key_id: String,
    /// The value of the `key` metrics label: the configured key id, or `"_jwt"` for JWT
    /// principals without a `[[keys]]` entry (keeps label cardinality bounded).
    pub metrics_label: String,
    /// Limits and quota: the key's own, or `[defaults]`.
    pub policy: Arc<KeyPolicy>,
    pub credential: CredentialKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    ApiKey,
    Jwt,
}

/// Label shared by JWT principals that have no `[[keys]]` entry.
pub const UNLISTED_JWT_LABEL: &str = "_jwt";

/// Verifies credentials against one config snapshot.
pub struct Authenticator {
    _private: (),
}

impl Authenticator {
    pub fn from_config(_config: &Config) -> Result<Authenticator, Vec<String>> {
        Ok(Authenticator { _private: () })
    }

    pub fn authenticate(&self, _headers: &http::HeaderMap) -> Result<Principal, AuthFailure> {
        Err(AuthFailure::MissingCredential)
    }
}

/// STUB pass-through layer.
#[derive(Clone, Default)]
pub struct AuthLayer;

impl<S> tower::Layer<S> for AuthLayer {
    type Service = S;
    fn layer(&self, inner: S) -> S {
        inner
    }
}
