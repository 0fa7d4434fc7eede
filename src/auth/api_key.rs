//! Static API keys: the config holds only the SHA-256 of each key (`[[keys]] key_sha256`);
//! a presented key is hashed and looked up by its digest.

use super::{CredentialKind, Principal};
use crate::config::{Config, KeyPolicy};
use crate::error::AuthFailure;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Hex SHA-256 of an API key, the value to put in `[[keys]] key_sha256`.
///
/// The key is hashed exactly as given: callers reading it from a terminal or a pipe trim
/// the trailing newline first, because `authenticate` hashes the Bearer value byte for byte.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The `[[keys]]` entries that have a `key_sha256`, by digest.
pub(super) struct ApiKeyTable {
    by_digest: HashMap<[u8; 32], Principal>,
}

impl ApiKeyTable {
    /// `policies` holds the shared `Arc<KeyPolicy>` of every `[[keys]]` entry by id.
    pub(super) fn from_config(
        config: &Config,
        policies: &HashMap<String, Arc<KeyPolicy>>,
    ) -> ApiKeyTable {
        let by_digest = config
            .keys
            .iter()
            .filter_map(|key| {
                let sha256 = key.key_sha256?;
                Some((
                    sha256,
                    Principal {
                        key_id: key.id.clone(),
                        metrics_label: key.id.clone(),
                        policy: policies[&key.id].clone(),
                        credential: CredentialKind::ApiKey,
                    },
                ))
            })
            .collect();
        ApiKeyTable { by_digest }
    }

    /// Finds the key whose hash matches the credential's.
    ///
    /// A lookup by digest: its timing depends on SHA-256(presented key), which the caller
    /// already knows, and on how that digest compares with the configured digests — from
    /// which no key can be recovered (that would need a SHA-256 preimage). So the lookup
    /// leaks nothing worth having, and it costs the same with 10 keys or 100,000. The final
    /// comparison is constant-time anyway, so no reader has to repeat this argument.
    pub(super) fn authenticate(&self, credential: &str) -> Result<Principal, AuthFailure> {
        let presented: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
        match self.by_digest.get_key_value(&presented) {
            Some((digest, principal)) if bool::from(digest[..].ct_eq(&presented[..])) => {
                Ok(principal.clone())
            }
            _ => Err(AuthFailure::UnknownKey),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_key_is_hex_sha256_of_the_exact_bytes() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_ne!(hash_key("abc\n"), hash_key("abc"));
    }
}
