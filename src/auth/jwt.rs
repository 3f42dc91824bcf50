//! JWT authentication of WebSocket clients, with the `jsonwebtoken` crate (no hand-rolled
//! crypto).
//!
//! The algorithm is pinned by configuration: a token whose header names another algorithm, or
//! `none`, is rejected. Required claims: `sub` (the user id, non-empty) and `exp`; optional
//! `channels`, a list of channel patterns (exact names, or a prefix ending in `*`). A user may
//! always subscribe to their personal channel `user:<sub>`.

use std::fmt;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::value::RawValue;

/// How tokens are signed.
#[derive(Clone, PartialEq, Eq)]
pub enum JwtKey {
    /// HS256 with a shared secret.
    Secret(Vec<u8>),
    /// RS256 or ES256 with a PEM public key.
    PublicKey {
        /// The PEM file's contents.
        pem: Vec<u8>,
        /// `RS256` or `ES256`.
        algorithm: Algorithm,
    },
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwtKey::Secret(_) => f.write_str("Secret(<redacted>)"),
            JwtKey::PublicKey { algorithm, .. } => write!(f, "PublicKey({algorithm:?})"),
        }
    }
}

/// An authenticated user, as the token describes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The `sub` claim.
    pub user: Box<str>,
    /// The `exp` claim, in seconds since the Unix epoch.
    pub expires_at: u64,
    /// Channel patterns from the `channels` claim.
    channels: Box<[Box<str>]>,
    /// The `presence` claim, as JSON text: what other members of presence channels see of
    /// this user.
    pub presence: Option<Box<str>>,
}

/// The longest `presence` claim, serialized: members' info goes to every page of a channel.
pub const MAX_PRESENCE_INFO: usize = 1024;

impl Identity {
    /// May this user subscribe to `channel`?
    pub fn may_subscribe(&self, channel: &str) -> bool {
        if crate::base::channel::user_of(channel) == Some(&*self.user) {
            return true;
        }
        self.channels
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => channel.starts_with(prefix),
                None => **pattern == *channel,
            })
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    presence: Option<Box<RawValue>>,
}

/// Verifies tokens against the configured key and algorithm.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    /// A verifier for `key`, accepting `exp` up to `leeway` in the past.
    ///
    /// # Errors
    /// The public key is not a valid PEM key for its algorithm.
    pub fn new(key: &JwtKey, leeway: Duration) -> Result<Verifier, String> {
        let (key, algorithm) = match key {
            JwtKey::Secret(secret) => (DecodingKey::from_secret(secret), Algorithm::HS256),
            JwtKey::PublicKey {
                pem,
                algorithm: Algorithm::ES256,
            } => (
                DecodingKey::from_ec_pem(pem).map_err(|e| e.to_string())?,
                Algorithm::ES256,
            ),
            JwtKey::PublicKey { pem, algorithm } => (
                DecodingKey::from_rsa_pem(pem).map_err(|e| e.to_string())?,
                *algorithm,
            ),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = leeway.as_secs();
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Verifier { key, validation })
    }

    /// The identity in `token`.
    ///
    /// # Errors
    /// Why the token is refused (malformed, badly signed, wrong algorithm, expired, no `sub`).
    pub fn verify(&self, token: &str) -> Result<Identity, String> {
        let claims = jsonwebtoken::decode::<Claims>(token.as_bytes(), &self.key, &self.validation)
            .map_err(|e| e.to_string())?
            .claims;
        if claims.sub.is_empty() {
            return Err("empty sub".into());
        }
        if let Some(info) = &claims.presence
            && info.get().len() > MAX_PRESENCE_INFO
        {
            return Err(format!("presence claim over {MAX_PRESENCE_INFO} bytes"));
        }
        Ok(Identity {
            user: claims.sub.into(),
            expires_at: claims.exp,
            channels: claims
                .channels
                .into_iter()
                .map(String::into_boxed_str)
                .collect(),
            presence: claims.presence.map(|info| info.get().into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_patterns() {
        let identity = Identity {
            user: "u1".into(),
            expires_at: 0,
            channels: vec!["project:*".into(), "order:7".into()].into_boxed_slice(),
            presence: None,
        };
        for (channel, allowed) in [
            ("user:u1", true),
            ("user:u2", false),
            ("user:u10", false),
            ("project:42", true),
            ("project:", true),
            ("projects", false),
            ("order:7", true),
            ("order:70", false),
        ] {
            assert_eq!(identity.may_subscribe(channel), allowed, "{channel}");
        }
    }
}
