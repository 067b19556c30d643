//! Byte sizes as operators write them, shared by the host's config and the plugins' settings.
//!
//! The grammar, after trimming surrounding whitespace:
//!
//! - a number: ASCII digits with at most one `.` and at least one digit (`10`, `1.5`, `.5`,
//!   `2.`); no sign, no exponent;
//! - optional whitespace;
//! - an optional unit, matched **case-insensitively** (`MiB`, `mib` and `MIB` are the same;
//!   there are no bit units, `Mb` is megabytes):
//!
//!   | unit                     | bytes  |
//!   |--------------------------|--------|
//!   | none, `B`, `bytes`       | 1      |
//!   | `KB`, `K`                | 10^3   |
//!   | `KiB`                    | 2^10   |
//!   | `MB`, `M`                | 10^6   |
//!   | `MiB`                    | 2^20   |
//!   | `GB`, `G`                | 10^9   |
//!   | `GiB`                    | 2^30   |
//!   | `TB`, `T`                | 10^12  |
//!   | `TiB`                    | 2^40   |
//!
//!   The one-letter forms are decimal, like the two-letter ones: `1g` is 10^9 bytes. `bytes`
//!   is there so that what [`format_byte_size`] writes (`1000 bytes`) parses back.
//!
//! A fractional size is computed exactly (no floating point) and rounded to the nearest byte,
//! halves up: `1.5GiB` is 1610612736, `0.5B` is 1. Results above [`u64::MAX`] are errors.

/// The units in error messages.
const EXPECTED_UNITS: &str = "B, KB, KiB, MB, MiB, GB, GiB, TB or TiB";

/// The multiplier of `unit` (already trimmed), matched case-insensitively.
fn unit_multiplier(unit: &str) -> Option<u64> {
    Some(match unit.to_ascii_lowercase().as_str() {
        "" | "b" | "bytes" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => return None,
    })
}

/// Parses a byte size such as `10MiB`, `25 MB`, `1024`, `1.5GiB` or `8m` (see the
/// [module documentation](self) for the grammar).
///
/// The error is a sentence naming the (trimmed) text, one of:
///
/// - `` unknown size unit `XB` in `10XB` (expected B, KB, KiB, MB, MiB, GB, GiB, TB or TiB) ``
///   (the unit as written);
/// - `` `MiB` is not a size (expected e.g. 10MiB) `` (no number, or a malformed one);
/// - `` size `99999999999999999TiB` is out of range `` (above [`u64::MAX`] bytes).
///
/// Zero is a valid size: callers that need a positive one check that themselves.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let not_a_size = || format!("`{text}` is not a size (expected e.g. 10MiB)");
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(not_a_size());
    }
    let unit = unit.trim();
    let multiplier = unit_multiplier(unit)
        .ok_or_else(|| format!("unknown size unit `{unit}` in `{text}` (expected {EXPECTED_UNITS})"))?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(not_a_size());
    }
    scale(whole, fraction, multiplier).ok_or_else(|| format!("size `{text}` is out of range"))
}

/// `whole.fraction × multiplier` rounded to the nearest integer (halves up), or `None` above
/// `u64::MAX`. Both strings are ASCII digits (possibly empty).
///
/// Exact for any number of digits: the decimal digits are multiplied by `multiplier` in
/// place (schoolbook, one small digit at a time), so no wider integer or float is involved.
fn scale(whole: &str, fraction: &str, multiplier: u64) -> Option<u64> {
    let mut digits: Vec<u64> = whole
        .bytes()
        .chain(fraction.bytes())
        .map(|digit| u64::from(digit - b'0'))
        .collect();
    // No overflow: the carry stays below `multiplier` (<= 2^40), so a product is < 10 × 2^40.
    let mut carry = 0u64;
    for digit in digits.iter_mut().rev() {
        let product = *digit * multiplier + carry;
        *digit = product % 10;
        carry = product / 10;
    }
    // What the carry still holds is a prefix of the integer part: at most 13 digits.
    let mut value = carry;
    let integer_digits = digits.len() - fraction.len();
    for &digit in &digits[..integer_digits] {
        value = value.checked_mul(10)?.checked_add(digit)?;
    }
    // Halves up: the rest of the product is at least one half exactly when its first decimal
    // digit is 5 or more.
    match digits.get(integer_digits) {
        Some(&first_decimal) if first_decimal >= 5 => value.checked_add(1),
        _ => Some(value),
    }
}

/// Writes a byte count the way the host shows limits: in the largest binary unit that divides
/// it exactly (`10MiB`, `512KiB`, `3GiB`), otherwise as `N bytes` (`1000 bytes`, `0 bytes`).
/// [`parse_byte_size`] reads every output back to the same count.
pub fn format_byte_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (size, unit) in UNITS {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The assertions of upgate-core's `ByteSize` tests (config.rs).
    #[test]
    fn config_sizes() {
        assert_eq!(parse_byte_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_byte_size("25MB").unwrap(), 25_000_000);
        assert_eq!(parse_byte_size("1.5 GiB").unwrap(), 3 << 29);
        assert_eq!(parse_byte_size("1024").unwrap(), 1024);
        assert_eq!(parse_byte_size("0").unwrap(), 0);
        assert!(parse_byte_size("10XB").unwrap_err().contains("unknown size unit"));
        assert!(parse_byte_size("MiB").is_err());
        assert!(parse_byte_size("-1MiB").is_err());
        assert_eq!(format_byte_size(10 << 20), "10MiB");
        assert_eq!(format_byte_size(1000), "1000 bytes");
    }

    /// The assertions of upgate-upstream's `parse_byte_size` tests (settings.rs).
    #[test]
    fn settings_sizes() {
        assert_eq!(parse_byte_size("25MB"), Ok(25_000_000));
        assert_eq!(parse_byte_size("25 mb"), Ok(25_000_000));
        assert_eq!(parse_byte_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_byte_size("1024"), Ok(1024));
        assert_eq!(parse_byte_size("3kib"), Ok(3072));
        assert!(parse_byte_size("MB").is_err());
        // The settings parser refused decimals; the shared grammar has them.
        assert_eq!(parse_byte_size("2.5MB"), Ok(2_500_000));
        assert!(parse_byte_size("99999999999999999TiB").is_err());
    }

    #[test]
    fn units_are_case_insensitive_and_one_letter_forms_are_decimal() {
        for (text, bytes) in [
            ("1g", 1_000_000_000),
            ("1G", 1_000_000_000),
            ("1 gb", 1_000_000_000),
            ("1GIB", 1 << 30),
            ("2k", 2_000),
            ("2 KiB", 2 << 10),
            ("3m", 3_000_000),
            ("1t", 1_000_000_000_000),
            ("1TiB", 1 << 40),
            ("7b", 7),
            ("7 B", 7),
            ("  12  ", 12),
            ("1000 bytes", 1000),
            ("1000 Bytes", 1000),
        ] {
            assert_eq!(parse_byte_size(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn decimals_are_exact_and_rounded_halves_up() {
        assert_eq!(parse_byte_size("1.1KB"), Ok(1100));
        assert_eq!(parse_byte_size(".5KiB"), Ok(512));
        assert_eq!(parse_byte_size("2."), Ok(2));
        assert_eq!(parse_byte_size("0.5"), Ok(1));
        assert_eq!(parse_byte_size("0.4999"), Ok(0));
        assert_eq!(parse_byte_size("1.0005KB"), Ok(1001));
        assert_eq!(parse_byte_size("1.00049999999999999999999999999999KB"), Ok(1000));
        assert_eq!(parse_byte_size("0.0000000001TiB"), Ok(110));
        // Beyond f64's 53 bits, still exact.
        assert_eq!(parse_byte_size("9007199254740993"), Ok(9_007_199_254_740_993));
        assert_eq!(parse_byte_size("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_byte_size("0015.250MB"), Ok(15_250_000));
    }

    #[test]
    fn errors_name_the_text() {
        assert_eq!(
            parse_byte_size("10XB").unwrap_err(),
            "unknown size unit `XB` in `10XB` (expected B, KB, KiB, MB, MiB, GB, GiB, TB or TiB)"
        );
        assert_eq!(
            parse_byte_size(" MiB ").unwrap_err(),
            "`MiB` is not a size (expected e.g. 10MiB)"
        );
        assert_eq!(
            parse_byte_size("18446744073709551616").unwrap_err(),
            "size `18446744073709551616` is out of range"
        );
        assert_eq!(
            parse_byte_size("16777216TiB").unwrap_err(),
            "size `16777216TiB` is out of range"
        );
        assert_eq!(
            parse_byte_size("18446744073709551615.5").unwrap_err(),
            "size `18446744073709551615.5` is out of range"
        );
        for text in [
            "", " ", ".", "..5", "1.2.3", "1.2.3MB", "+1", "1e3", "1_000", "0x10", "1 2", "10 MiB B",
        ] {
            assert!(parse_byte_size(text).is_err(), "{text}");
        }
    }

    #[test]
    fn formatted_sizes_parse_back() {
        assert_eq!(format_byte_size(0), "0 bytes");
        assert_eq!(format_byte_size(512 << 10), "512KiB");
        assert_eq!(format_byte_size(3 << 30), "3GiB");
        assert_eq!(format_byte_size(5 << 40), "5TiB");
        assert_eq!(format_byte_size(1536 << 20), "1536MiB");
        assert_eq!(format_byte_size(25_000_000), "25000000 bytes");
        for bytes in [0, 1, 1000, 1024, 25_000_000, 10 << 20, 3 << 30, 5 << 40, u64::MAX] {
            assert_eq!(parse_byte_size(&format_byte_size(bytes)), Ok(bytes), "{bytes}");
        }
    }
}
