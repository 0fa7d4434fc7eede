//! Static API keys: the config holds only the SHA-256 of each key (`[[keys]] key_sha256`);
//! a presented key is hashed and compared against every configured hash in constant time.

use super::{CredentialKind, Principal};
use crate::config::{Config, KeyPolicy};
use crate::error::AuthFailure;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// Hex SHA-256 of an API key, the value to put in `[[keys]] key_sha256`.
///
/// The key is hashed exactly as given: callers reading it from a terminal or a pipe trim
/// the trailing newline first, because `authenticate` hashes the Bearer value byte for byte.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// One configured key and the principal it authenticates as (built once, cloned per request).
struct Entry {
    sha256: [u8; 32],
    principal: Principal,
}

/// The `[[keys]]` entries that have a `key_sha256`.
pub(super) struct ApiKeyTable {
    entries: Vec<Entry>,
}

impl ApiKeyTable {
    /// `policies` holds the shared `Arc<KeyPolicy>` of every `[[keys]]` entry by id.
    pub(super) fn from_config(
        config: &Config,
        policies: &HashMap<String, Arc<KeyPolicy>>,
    ) -> ApiKeyTable {
        let entries = config
            .keys
            .iter()
            .filter_map(|key| {
                let sha256 = key.key_sha256?;
                Some(Entry {
                    sha256,
                    principal: Principal {
                        key_id: key.id.clone(),
                        metrics_label: key.id.clone(),
                        policy: policies[&key.id].clone(),
                        credential: CredentialKind::ApiKey,
                    },
                })
            })
            .collect();
        ApiKeyTable { entries }
    }

    /// Finds the key whose hash matches the credential's.
    ///
    /// Every configured hash is compared with `ct_eq`, and the matching index is picked with
    /// `conditional_assign`, so the time taken depends only on how many keys are configured,
    /// never on which key matched or how many leading bytes of a hash agreed. (A `HashMap`
    /// keyed by the digest would also be acceptable: timing it reveals at most bits of
    /// SHA-256(key) values, from which no key can be recovered. The scan is chosen because it
    /// needs no such argument, and at a few dozen to a few hundred keys it costs microseconds.)
    pub(super) fn authenticate(&self, credential: &str) -> Result<Principal, AuthFailure> {
        let presented: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, entry) in self.entries.iter().enumerate() {
            let equal = entry.sha256[..].ct_eq(&presented[..]);
            index.conditional_assign(&(i as u64), equal);
            found |= equal;
        }
        if bool::from(found) {
            Ok(self.entries[index as usize].principal.clone())
        } else {
            Err(AuthFailure::UnknownKey)
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
