//! API keys as the config gives them, digested as they are read.
//!
//! What flows through here: each `keys:` entry of a tenant (plain, or `sha256:<hex>`),
//! with `${VAR}` expanded, turned into a [`KeyDigest`] during parsing, so a key that cannot
//! be compiled is a located config error and nothing downstream can skip it. A key itself
//! is never kept, printed or logged.

use serde::Deserialize;
use serde::de::{self, Deserializer};
use sha2::{Digest, Sha256};

use super::units::EnvString;

/// sha256 of an API key: how keys are compared and stored in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// The digest in hex: how a shared limiter (Redis) names the key's counters, so the key
    /// itself never leaves the process.
    pub(crate) fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A key as written in config: plain, or `sha256:<64 hex digits>`.
    pub fn from_config(entry: &str) -> Result<Self, String> {
        match entry.strip_prefix("sha256:") {
            Some(hex_digest) => {
                let bytes =
                    hex::decode(hex_digest).map_err(|_| "a `sha256:` key needs 64 hex digits".to_owned())?;
                let digest: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| "a `sha256:` key needs 64 hex digits".to_owned())?;
                Ok(Self(digest))
            }
            None if entry.trim().is_empty() => Err("a key may not be empty".into()),
            None if entry.chars().any(|c| c.is_control() || c == ' ') => {
                Err("a key may not hold spaces or control characters".into())
            }
            None => Ok(Self::of(entry)),
        }
    }
}

/// A `keys:` entry, as its digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiKey(pub KeyDigest);

impl<'de> Deserialize<'de> for ApiKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entry = EnvString::deserialize(deserializer)?;
        KeyDigest::from_config(&entry.0)
            .map(Self)
            .map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_digests() {
        let plain = KeyDigest::from_config("demo-key").unwrap();
        let hashed =
            KeyDigest::from_config(&format!("sha256:{}", hex::encode(Sha256::digest(b"demo-key")))).unwrap();
        assert_eq!(plain, hashed);
        assert_eq!(plain, KeyDigest::of("demo-key"));
        assert!(KeyDigest::from_config("sha256:abc").is_err());
        assert!(KeyDigest::from_config(" ").is_err());
        assert!(KeyDigest::from_config("a b").is_err());
    }
}
