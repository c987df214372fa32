//! Optional token authentication for chat connections: JWTs signed with a
//! shared secret (HS256) or a key pair (RS256, ES256).
//!
//! A token is presented as `?token=` on the URL, as `Authorization: Bearer`,
//! or as the first message `auth {token}`. Its `name` claim, or else `sub`,
//! becomes the username; an optional `rooms` claim lists the rooms it may
//! join; `exp` is required. Expiry is exact (no leeway): the connection is
//! warned before, and closed with 4001 at `exp` unless a fresh token came.

use std::collections::HashSet;
use std::time::Duration;

use axum::http::{HeaderMap, Uri, header};
use hubbub_protocol::Limits;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{AuthSettings, ConfigError};

/// Verifies tokens against the configured key.
pub(crate) struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

/// Who a valid token says the client is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Identity {
    /// The username the token grants.
    pub(crate) user: String,
    /// The rooms it may join; `None` for any.
    pub(crate) rooms: Option<HashSet<String>>,
    /// Expiry, in milliseconds since the Unix epoch.
    pub(crate) expires_at_ms: u64,
}

impl Identity {
    /// Whether the token allows joining `room`.
    pub(crate) fn may_join(&self, room: &str) -> bool {
        self.rooms.as_ref().is_none_or(|rooms| rooms.contains(room))
    }
}

/// The claims Hubbub reads.
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    name: Option<String>,
    rooms: Option<Vec<String>>,
    exp: u64,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    /// Bad signature, expired, malformed, wrong algorithm.
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    /// Neither `name` nor `sub` is a valid username.
    #[error("the token names no valid user")]
    NoUser,
}

impl Authenticator {
    /// The authenticator the settings ask for, or `None` when auth is off.
    pub(crate) fn from_settings(settings: &AuthSettings) -> Result<Option<Self>, ConfigError> {
        let bad = |cause: String| ConfigError::Inconsistent(format!("auth: {cause}"));
        let (key, algorithm) = match (&settings.secret, &settings.public_key) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => return Err(bad("set either secret or public_key, not both".into())),
            (Some(secret), None) => {
                if secret.len() < 32 {
                    return Err(bad("the HS256 secret must be at least 32 bytes".into()));
                }
                (DecodingKey::from_secret(secret.as_bytes()), Algorithm::HS256)
            }
            (None, Some(path)) => {
                let pem =
                    std::fs::read(path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
                match DecodingKey::from_rsa_pem(&pem) {
                    Ok(key) => (key, Algorithm::RS256),
                    Err(_) => match DecodingKey::from_ec_pem(&pem) {
                        Ok(key) => (key, Algorithm::ES256),
                        Err(e) => {
                            return Err(bad(format!("{} is no RSA or EC public key: {e}", path.display())));
                        }
                    },
                }
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = 0;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        Ok(Some(Self { key, validation }))
    }

    /// Checks a token and reads who it is for.
    pub(crate) fn verify(&self, token: &str, limits: &Limits) -> Result<Identity, AuthError> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?.claims;
        let user = claims.name.or(claims.sub).ok_or(AuthError::NoUser)?;
        let user = limits.username(user).map_err(|_| AuthError::NoUser)?;
        Ok(Identity {
            user,
            rooms: claims.rooms.map(|rooms| rooms.into_iter().collect()),
            expires_at_ms: claims.exp.saturating_mul(1000),
        })
    }
}

/// A token on the upgrade request: `?token=` or `Authorization: Bearer`.
pub(crate) fn token_from_request(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let from_query = uri.query().and_then(|q| {
        q.split('&').find_map(|pair| pair.strip_prefix("token=")).filter(|t| !t.is_empty()).map(str::to_owned)
    });
    from_query.or_else(|| {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
    })
}

/// How long from `now_ms` until `at_ms` (zero if past).
pub(crate) fn until(at_ms: u64, now_ms: u64) -> Duration {
    Duration::from_millis(at_ms.saturating_sub(now_ms))
}
