//! Tests of content classification: sniffed types against extensions, UTF-8 and JSON checks, MIME families.

use super::*;

const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";
const ELF: &[u8] = &[
    0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0x3e, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x40, 0, 0x38, 0, 1, 0, 0x40, 0, 0,
    0, 0, 0,
];
const ZIP: &[u8] = b"PK\x03\x04\x14\0\0\0\0\0";

#[test]
fn matching_content_gives_the_real_mime() {
    assert_eq!(classify("png", PNG, false, true).unwrap(), "image/png");
    assert_eq!(
        classify("txt", "héllo".as_bytes(), true, true).unwrap(),
        "text/plain"
    );
    assert_eq!(
        classify("docx", ZIP, false, true).unwrap(),
        crate::content::KNOWN[9].mime
    );
    // Unknown extension, unknown bytes: accepted as octet-stream.
    assert_eq!(
        classify("bin", &[0, 1, 2, 255], false, true).unwrap(),
        "application/octet-stream"
    );
}

#[test]
fn contradictions_are_refused() {
    let error = classify("png", ELF, false, true).unwrap_err();
    assert_eq!(
        error.to_string(),
        "the content is an executable (application/x-executable), not .png"
    );
    assert!(matches!(
        classify("pdf", ZIP, false, true),
        Err(ContentError::Mismatch { .. })
    ));
    assert_eq!(
        classify("png", b"just text", true, true).unwrap_err().to_string(),
        "the content does not look like a .png file"
    );
    assert!(matches!(
        classify("txt", &[0xff, 0xfe, 0x00], false, true),
        Err(ContentError::NotUtf8 { .. })
    ));
    assert!(matches!(
        classify("txt", ELF, false, true),
        Err(ContentError::Mismatch { .. })
    ));
}

#[test]
fn text_that_sniffs_as_a_script_or_markup_must_still_be_utf8() {
    for head in [
        &b"#!/bin/sh\necho \xff"[..],
        b"<?xml version=\"1.0\"?>\xfe",
        b"<html>\xff",
    ] {
        assert!(
            matches!(
                classify("txt", head, false, true),
                Err(ContentError::NotUtf8 { .. })
            ),
            "{head:?}"
        );
    }
    assert_eq!(
        classify("txt", b"#!/bin/sh\necho hi", true, true).unwrap(),
        "text/plain"
    );
}

#[test]
fn verify_off_trusts_the_extension() {
    assert_eq!(classify("png", ELF, false, false).unwrap(), "image/png");
    assert_eq!(classify("txt", &[0xff], false, false).unwrap(), "text/plain");
}

#[test]
fn text_sniffing() {
    assert!(looks_like_text("plain text, ünïcode".as_bytes()));
    assert!(
        looks_like_text(&"€".as_bytes()[..2]),
        "a character cut by the sample size"
    );
    assert!(!looks_like_text(&[0x41, 0x00, 0x42]));
    assert!(!looks_like_text(&[0xff, 0xfe, 0x41]));
}

#[test]
fn families() {
    assert_eq!(family("image/png", "png"), "image");
    assert_eq!(family("application/pdf", "pdf"), "document");
    assert_eq!(family("application/json", "json"), "text");
    assert_eq!(family("application/octet-stream", "bin"), "other");
    assert_eq!(family("application/vnd.ms-excel", "xls"), "other");
    assert_eq!(family("audio/mpeg", "mp3"), "audio");
    assert_eq!(family("video/mp4", "mp4"), "video");
    assert_eq!(family("text/plain", "txt"), "text");
}

#[test]
fn utf8_across_chunk_boundaries() {
    let text = "añ€𝄞 done".as_bytes();
    for split in 0..text.len() {
        for split2 in split..text.len() {
            let mut validator = Utf8Validator::default();
            validator.feed(&text[..split]);
            validator.feed(&text[split..split2]);
            validator.feed(&text[split2..]);
            assert!(validator.finish(), "split at {split}/{split2}");
        }
    }
    let mut validator = Utf8Validator::default();
    validator.feed(&[0xe2, 0x82]);
    assert!(!validator.finish(), "truncated sequence");
    validator.feed(b"x");
    assert!(!validator.finish(), "broken sequence");
    let mut validator = Utf8Validator::default();
    validator.feed(&[b'a', 0xc3]);
    validator.feed(&[0x28]);
    assert!(!validator.finish());
}

#[test]
fn json_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, br#"{"a": [1, 2, {"b": null}]}"#).unwrap();
    assert!(verify_json_file("json", &path).is_ok());
    std::fs::write(&path, br#"{"a": 1} trailing"#).unwrap();
    assert!(verify_json_file("json", &path).is_err());
    std::fs::write(&path, b"{\"a\":1}\n\n[2]\n").unwrap();
    assert!(verify_json_file("jsonl", &path).is_ok());
    std::fs::write(&path, b"{\"a\":1}\n{oops\n").unwrap();
    let error = verify_json_file("jsonl", &path).unwrap_err().to_string();
    assert!(error.contains("line 2"), "{error}");
}
