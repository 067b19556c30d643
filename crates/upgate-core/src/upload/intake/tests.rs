//! Tests of intake's filename rules and extension parsing.

use super::*;

#[test]
fn filenames() {
    assert!(validate_filename("report 2024.pdf").is_ok());
    assert!(validate_filename("產品說明書.pdf").is_ok());
    assert_eq!(validate_filename(""), Err(ApiError::EmptyFilename));
    assert!(matches!(
        validate_filename("../etc/passwd"),
        Err(ApiError::InvalidFilename(_))
    ));
    assert!(matches!(
        validate_filename("a\\b.txt"),
        Err(ApiError::InvalidFilename(_))
    ));
    assert!(matches!(
        validate_filename("a\0b"),
        Err(ApiError::InvalidFilename(_))
    ));
    assert!(matches!(
        validate_filename("line\nbreak.txt"),
        Err(ApiError::InvalidFilename(_))
    ));
    // Shown as `invoiceexe.pdf`, an executable's name.
    assert!(matches!(
        validate_filename("invoice\u{202e}fdp.exe"),
        Err(ApiError::InvalidFilename(_))
    ));
    assert!(matches!(
        validate_filename(".."),
        Err(ApiError::InvalidFilename(_))
    ));
    assert!(matches!(
        validate_filename(&"a".repeat(256)),
        Err(ApiError::InvalidFilename(_))
    ));
    assert!(validate_filename(&"a".repeat(255)).is_ok());
}

#[test]
fn extensions() {
    assert_eq!(extension_of("a.tar.GZ"), "gz");
    assert_eq!(extension_of("README"), "");
    assert_eq!(extension_of(".env"), "");
    assert_eq!(extension_of("a."), "");
}

#[test]
fn extended_filenames_in_the_charsets_rfc_5987_requires() {
    use actix_web::http::header::{Charset, ExtendedValue};
    let extended = |charset: Charset, value: &[u8]| ExtendedValue {
        charset,
        language_tag: None,
        value: value.to_vec(),
    };
    let utf8 = || Charset::Ext("utf-8".into());
    assert_eq!(
        decoded_filename(&extended(utf8(), "第三.txt".as_bytes())).unwrap(),
        "第三.txt"
    );
    assert_eq!(
        decoded_filename(&extended(Charset::Iso_8859_1, b"caf\xe9.txt")).unwrap(),
        "café.txt"
    );
    assert_eq!(
        decoded_filename(&extended(Charset::Us_Ascii, b"a.txt")).unwrap(),
        "a.txt"
    );
    for (charset, value) in [
        (utf8(), &b"caf\xe9.txt"[..]),
        (Charset::Us_Ascii, &b"caf\xe9.txt"[..]),
        (Charset::Shift_Jis, &b"a.txt"[..]),
    ] {
        assert!(matches!(
            decoded_filename(&extended(charset, value)),
            Err(ApiError::InvalidFilename(_))
        ));
    }
}
