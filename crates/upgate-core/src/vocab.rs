//! Vocabulary below everything: the names and id formats every layer shares.
//!
//! What flows through here: nothing but values. [`DialectName`] (the bounded set of
//! dialects, also a metrics label and a config grant), the vendors' upload id formats
//! (generated and validated here, before any id reaches a lookup or a path) and the clock
//! in epoch milliseconds. It imports nothing from the crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// The dialects upgate speaks, a bounded set (also used as a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DialectName {
    Dify,
    Kore,
    Maiagent,
    Korexo,
    Beam,
    /// The tus 1.0 resumable upload protocol.
    Tus,
}

impl DialectName {
    pub const ALL: [DialectName; 6] = [
        Self::Dify,
        Self::Kore,
        Self::Maiagent,
        Self::Korexo,
        Self::Beam,
        Self::Tus,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dify => "dify",
            Self::Kore => "kore",
            Self::Maiagent => "maiagent",
            Self::Korexo => "korexo",
            Self::Beam => "beam",
            Self::Tus => "tus",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|dialect| dialect.as_str() == text)
    }

    /// A new upload id in the vendor's own format. Ids are time-ordered (UUIDv7; for Kore a
    /// MongoDB ObjectId-like 4-byte seconds timestamp and 8 random bytes), so new records
    /// land at the end of the uploads table's primary key: a commit of many uploads then
    /// rewrites a page or two, not one random page per upload.
    pub fn new_upload_id(self) -> String {
        match self {
            Self::Kore => {
                let seconds = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.as_secs() as u32);
                let random = uuid::Uuid::new_v4();
                let mut id = [0u8; 12];
                id[..4].copy_from_slice(&seconds.to_be_bytes());
                id[4..].copy_from_slice(&random.as_bytes()[..8]);
                hex::encode(id)
            }
            Self::Korexo => format!("f-{}", uuid::Uuid::now_v7()),
            // 32 hex digits, as tusd's: never `upload`, Dify's alias path under `/files/`.
            Self::Tus => uuid::Uuid::now_v7().simple().to_string(),
            Self::Dify | Self::Maiagent | Self::Beam => uuid::Uuid::now_v7().to_string(),
        }
    }

    /// Checks that a client-supplied id has this dialect's id format before any lookup.
    pub fn is_valid_upload_id(self, id: &str) -> bool {
        match self {
            Self::Kore => {
                id.len() == 24
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            }
            Self::Korexo => id.strip_prefix("f-").is_some_and(is_uuid),
            Self::Tus => {
                id.len() == 32
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            }
            Self::Dify | Self::Maiagent | Self::Beam => is_uuid(id),
        }
    }
}

/// True for a canonical lower-case hyphenated uuid.
pub(crate) fn is_uuid(text: &str) -> bool {
    text.len() == 36 && uuid::Uuid::parse_str(text).is_ok_and(|uuid| uuid.hyphenated().to_string() == text)
}

/// A character that changes how the text around it is displayed without being seen itself:
/// a C0/C1 control, a Unicode bidirectional control (U+061C, U+200E, U+200F,
/// U+202A..=U+202E, U+2066..=U+2069), a line or paragraph separator (U+2028, U+2029), or an
/// invisible format character (U+00AD soft hyphen, U+180E, U+200B zero-width space,
/// U+2060..=U+2064, U+FEFF byte order mark, U+FFF9..=U+FFFB); the zero-width joiners
/// U+200C and U+200D stay, since emoji and several scripts are written with them. In a
/// filename such a character disguises the name (`invoice` U+202E `fdp.exe` shows as
/// `invoiceexe.pdf`; two names that look alike are two files); in a log line it breaks,
/// reorders or forges what an operator reads.
pub fn is_unseen_control(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00ad}'
                | '\u{061c}'
                | '\u{180e}'
                | '\u{200b}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
        )
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The last millisecond of year 9999: the latest time the date formats upgate writes
/// (RFC 3339, HTTP dates) can hold.
const LATEST_WRITABLE_MS: i64 = 253_402_300_799_999;

/// A stored time (epoch milliseconds) as a `SystemTime`, clamped to what the date formats
/// can write: a row edited by hand with a time before 1970 or after 9999 is shown as the
/// nearest of those, never a panic in a formatter.
pub fn stored_time(epoch_ms: i64) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::from_millis(epoch_ms.clamp(0, LATEST_WRITABLE_MS) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_times_past_what_dates_can_write_are_clamped_not_a_panic() {
        for (stored, rfc3339, http) in [
            (
                i64::MAX,
                "9999-12-31T23:59:59.999Z",
                "Fri, 31 Dec 9999 23:59:59 GMT",
            ),
            (-5, "1970-01-01T00:00:00.000Z", "Thu, 01 Jan 1970 00:00:00 GMT"),
            (1_000, "1970-01-01T00:00:01.000Z", "Thu, 01 Jan 1970 00:00:01 GMT"),
        ] {
            let time = stored_time(stored);
            assert_eq!(humantime::format_rfc3339_millis(time).to_string(), rfc3339);
            assert_eq!(httpdate::fmt_http_date(time), http);
        }
    }

    #[test]
    fn unseen_controls_are_controls_bidi_overrides_separators_and_invisible_formats_only() {
        for c in [
            '\n', '\0', '\u{1b}', '\u{85}', '\u{202e}', '\u{2066}', '\u{200f}', '\u{61c}', '\u{2028}',
            '\u{2029}', '\u{feff}', '\u{200b}', '\u{ad}', '\u{2060}',
        ] {
            assert!(is_unseen_control(c), "{c:?}");
        }
        for c in [
            'a', ' ', '\u{e9}', '\u{7522}', '\u{200d}', '\u{200c}', '\u{5d0}', '\u{3000}',
        ] {
            assert!(!is_unseen_control(c), "{c:?}");
        }
    }

    #[test]
    fn ids_follow_each_vendor_format() {
        for dialect in DialectName::ALL {
            let id = dialect.new_upload_id();
            assert!(dialect.is_valid_upload_id(&id), "{dialect:?} {id}");
        }
        assert_eq!(DialectName::Kore.new_upload_id().len(), 24);
        assert!(DialectName::Korexo.new_upload_id().starts_with("f-"));
        assert!(!DialectName::Korexo.is_valid_upload_id("f-../../etc"));
        assert!(!DialectName::Dify.is_valid_upload_id("A1B2C3D4-5678-90AB-CDEF-1234567890AB"));
        assert!(!DialectName::Kore.is_valid_upload_id("zz0000000000000000000000"));
    }

    #[test]
    fn ids_are_time_ordered_and_distinct() {
        for dialect in DialectName::ALL {
            let first = dialect.new_upload_id();
            // Kore's timestamp counts seconds: compare across one.
            let pause = if dialect == DialectName::Kore { 1001 } else { 2 };
            std::thread::sleep(std::time::Duration::from_millis(pause));
            let later: Vec<String> = (0..1000).map(|_| dialect.new_upload_id()).collect();
            assert!(later.iter().all(|id| *id > first), "{dialect:?}");
            let distinct: std::collections::HashSet<&String> = later.iter().collect();
            assert_eq!(distinct.len(), later.len(), "{dialect:?}");
        }
    }
}
