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
