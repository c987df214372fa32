//! Optional token authentication for chat connections: JWTs signed with a
//! shared secret (HS256) or a key pair (RS256, ES256).
//!
//! A token is presented as `?token=` on the URL, as `Authorization: Bearer`,
//! or as the first message `auth {token}`. Its `name` claim, or else `sub`,
//! becomes the username; an optional `rooms` claim lists the rooms it may
//! join; `exp` is required. Expiry is exact (no leeway): the connection is
//! warned before, and closed with 4001 at `exp` unless a fresh token came.
//! A token whose `nbf` is still ahead (by more than `auth.leeway`, for an
//! issuer whose clock runs a little fast) is refused; so is one without the
//! configured `auth.audience` or `auth.issuer`, when those are set.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, Uri, header};
use hubbub_protocol::Limits;
use jsonwebtoken::errors::ErrorKind;
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
    /// Bad signature, expired, not yet valid (`nbf`), malformed, wrong
    /// algorithm, wrong audience or issuer.
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    /// Neither `name` nor `sub` is a valid username.
    #[error("the token names no valid user")]
    NoUser,
}

impl Authenticator {
    /// The authenticator the settings ask for, or `None` when auth is off.
    pub(crate) fn from_settings(settings: &AuthSettings) -> Result<Option<Self>, ConfigError> {
        // At most one key, a long enough secret, no empty audience or issuer.
        settings.validate()?;
        let (key, algorithm) = match (&settings.secret, &settings.public_key) {
            (None, None) => return Ok(None),
            // `validate` refused a secret together with a public key.
            (Some(secret), _) => (DecodingKey::from_secret(secret.as_bytes()), Algorithm::HS256),
            (None, Some(path)) => {
                let pem = std::fs::read(path)
                    .map_err(|cause| ConfigError::AuthKeyUnreadable { path: path.clone(), cause })?;
                match DecodingKey::from_rsa_pem(&pem) {
                    Ok(key) => (key, Algorithm::RS256),
                    Err(_) => match DecodingKey::from_ec_pem(&pem) {
                        Ok(key) => (key, Algorithm::ES256),
                        Err(cause) => {
                            return Err(ConfigError::AuthKeyInvalid { path: path.clone(), cause });
                        }
                    },
                }
            }
        };
        let mut validation = Validation::new(algorithm);
        // The leeway is for `nbf` only. `exp` is checked in `verify`, exactly:
        // the connection is closed at `exp`, so a token accepted within a
        // leeway after it would be closed the moment it was accepted.
        validation.leeway = settings.leeway.as_secs();
        validation.validate_nbf = true;
        validation.validate_exp = false;
        let mut required = vec!["exp"];
        match &settings.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // Without a configured audience, `aud` is not looked at.
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &settings.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Some(Self { key, validation }))
    }

    /// Checks a token and reads who it is for.
    pub(crate) fn verify(&self, token: &str, limits: &Limits) -> Result<Identity, AuthError> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?.claims;
        // Valid while the clock is before `exp` (RFC 7519 section 4.1.4).
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        if now >= claims.exp {
            return Err(jsonwebtoken::errors::Error::from(ErrorKind::ExpiredSignature).into());
        }
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

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::{Value, json};

    use super::*;

    const SECRET: &str = "a unit-test secret that is at least 32 bytes";

    fn now() -> u64 {
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs()
    }

    fn authenticator(settings: AuthSettings) -> Authenticator {
        let settings = AuthSettings { secret: Some(SECRET.into()), ..settings };
        Authenticator::from_settings(&settings).ok().flatten().expect("a valid test configuration")
    }

    fn token(claims: &Value) -> String {
        jsonwebtoken::encode(&Header::default(), claims, &EncodingKey::from_secret(SECRET.as_bytes()))
            .expect("test claims serialize")
    }

    fn verify(auth: &Authenticator, claims: &Value) -> Result<String, String> {
        auth.verify(&token(claims), &Limits::default()).map(|id| id.user).map_err(|e| e.to_string())
    }

    #[test]
    fn nbf_in_the_future_is_refused_beyond_the_leeway() {
        let strict = authenticator(AuthSettings { leeway: Duration::ZERO, ..AuthSettings::default() });
        let lenient =
            authenticator(AuthSettings { leeway: Duration::from_secs(60), ..AuthSettings::default() });
        let exp = now() + 600;
        for auth in [&strict, &lenient] {
            assert!(verify(auth, &json!({"sub": "ada", "exp": exp, "nbf": now() + 3600})).is_err());
            assert_eq!(verify(auth, &json!({"sub": "ada", "exp": exp, "nbf": now() - 1})), Ok("ada".into()));
            assert_eq!(verify(auth, &json!({"sub": "ada", "exp": exp})), Ok("ada".into()));
        }
        let soon = json!({"sub": "ada", "exp": exp, "nbf": now() + 30});
        assert!(verify(&strict, &soon).unwrap_err().contains("ImmatureSignature"));
        assert_eq!(verify(&lenient, &soon), Ok("ada".into()));
        // The default leeway is a few seconds of clock skew, not minutes.
        let default = authenticator(AuthSettings::default());
        assert!(verify(&default, &json!({"sub": "ada", "exp": exp, "nbf": now() + 60})).is_err());
    }

    #[test]
    fn exp_is_exact_whatever_the_leeway() {
        let lenient =
            authenticator(AuthSettings { leeway: Duration::from_secs(60), ..AuthSettings::default() });
        for exp in [now() - 30, now()] {
            let err = verify(&lenient, &json!({"sub": "ada", "exp": exp})).unwrap_err();
            assert!(err.contains("ExpiredSignature"), "{err}");
        }
        assert!(verify(&lenient, &json!({"sub": "ada"})).is_err(), "exp is required");
    }

    #[test]
    fn audience_and_issuer_are_checked_when_configured() {
        let exp = now() + 600;
        let open = authenticator(AuthSettings::default());
        assert!(verify(&open, &json!({"sub": "ada", "exp": exp, "aud": "anyone", "iss": "anybody"})).is_ok());

        let strict = authenticator(AuthSettings {
            audience: Some("hubbub".into()),
            issuer: Some("https://id.example".into()),
            ..AuthSettings::default()
        });
        let good = json!({"sub": "ada", "exp": exp, "aud": "hubbub", "iss": "https://id.example"});
        assert_eq!(verify(&strict, &good), Ok("ada".into()));
        let listed =
            json!({"sub": "ada", "exp": exp, "aud": ["other", "hubbub"], "iss": "https://id.example"});
        assert_eq!(verify(&strict, &listed), Ok("ada".into()));
        for bad in [
            json!({"sub": "ada", "exp": exp, "iss": "https://id.example"}),
            json!({"sub": "ada", "exp": exp, "aud": "other", "iss": "https://id.example"}),
            json!({"sub": "ada", "exp": exp, "aud": "hubbub"}),
            json!({"sub": "ada", "exp": exp, "aud": "hubbub", "iss": "https://evil.example"}),
        ] {
            assert!(verify(&strict, &bad).is_err(), "{bad}");
        }
        let empty = AuthSettings {
            secret: Some(SECRET.into()),
            audience: Some(String::new()),
            ..AuthSettings::default()
        };
        assert!(Authenticator::from_settings(&empty).is_err());
    }
}
