//! `server.spool:`: where bytes that must outlive a node rest when several nodes share them.
//!
//! What flows through here: an `s3://BUCKET/PREFIX/` URL, the service's endpoint and region,
//! and its credentials (`${VAR}` expanded), checked when the config is read. The secret's
//! `Debug` never shows it.

use serde::Deserialize;
use serde::de::{self, Deserializer};

use super::units::EnvString;

/// `server.spool:` (absent: `data_dir/spool` on local disk).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// `s3://BUCKET/PREFIX/`.
    pub url: S3Url,
    /// `http(s)://HOST:PORT` of an S3-compatible service; absent: AWS's endpoint of `region`.
    #[serde(default)]
    pub(crate) endpoint: Option<EnvString>,
    #[serde(default = "default_region")]
    pub(crate) region: EnvString,
    pub(crate) access_key_id: EnvString,
    pub secret_access_key: Secret,
}

fn default_region() -> EnvString {
    EnvString("us-east-1".into())
}

impl SpoolConfig {
    /// The endpoint requests go to.
    pub(crate) fn endpoint(&self) -> String {
        match &self.endpoint {
            Some(endpoint) => endpoint.0.trim_end_matches('/').to_owned(),
            None => format!("https://s3.{}.amazonaws.com", self.region.0),
        }
    }
}

/// A bucket and a key prefix (empty, or ending in `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    pub prefix: String,
}

impl S3Url {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        const EXPECTED: &str = "expected s3://BUCKET/PREFIX/";
        let rest = text
            .strip_prefix("s3://")
            .ok_or_else(|| format!("not an s3:// URL: {EXPECTED}"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(format!(
                "the bucket name must be 3 to 63 lowercase letters, digits, `-` or `.`; {EXPECTED}"
            ));
        }
        let prefix_ok = prefix.len() <= 512
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
            && !prefix.starts_with('/')
            && !prefix.contains("//")
            && !prefix.split('/').any(|segment| segment == "..");
        if !prefix_ok {
            return Err(format!(
                "the prefix may hold letters, digits, `-`, `_`, `.` and single `/`; {EXPECTED}"
            ));
        }
        let mut prefix = prefix.to_owned();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Self {
            bucket: bucket.to_owned(),
            prefix,
        })
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

impl<'de> Deserialize<'de> for S3Url {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = EnvString::deserialize(deserializer)?;
        Self::parse(&text.0).map_err(de::Error::custom)
    }
}

/// A secret read from the config: `${VAR}` expanded, never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the signer only: never print it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        EnvString::deserialize(deserializer).map(|text| Self(text.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_a_bucket_and_a_prefix_ending_in_a_slash() {
        assert_eq!(
            S3Url::parse("s3://upgate/spool").expect("valid"),
            S3Url {
                bucket: "upgate".into(),
                prefix: "spool/".into()
            }
        );
        assert_eq!(S3Url::parse("s3://upgate").expect("valid").prefix, "");
        assert_eq!(S3Url::parse("s3://up.gate-1/a/b/").expect("valid").prefix, "a/b/");
    }

    #[test]
    fn bad_urls_are_refused_with_the_expected_form() {
        for bad in [
            "http://upgate/",
            "s3://UP/",
            "s3://ab/",
            "s3://upgate/../x",
            "s3://upgate//x",
            "s3://upgate/a b",
        ] {
            let error = S3Url::parse(bad).expect_err(bad);
            assert!(error.contains("s3://BUCKET/PREFIX/"), "{bad}: {error}");
        }
    }

    #[test]
    fn the_secret_is_never_shown() {
        let config: SpoolConfig = serde_norway::from_str(
            "url: s3://upgate/p/\nendpoint: http://127.0.0.1:8333\naccess_key_id: id\nsecret_access_key: hush-hush\n",
        )
        .expect("valid spool config");
        assert!(!format!("{config:?}").contains("hush-hush"));
        assert_eq!(config.secret_access_key.expose(), "hush-hush");
        assert_eq!(config.endpoint(), "http://127.0.0.1:8333");
        assert_eq!(config.region.0, "us-east-1");
    }
}
