//! Content checks end to end (`verify_content`, on by default): the real daemon, the Dify
//! dialect. Structure, not just magic numbers: a PNG followed by HTML is refused, a zip named
//! `.docx` is refused, an empty `.png` is refused; `backup.tar.gz`, `.tgz` and `.7z` pass.

use std::path::Path;

use upgate_e2e::harness::*;

const BEARER: (&str, &str) = ("Authorization", "Bearer demo-key");
const ARCHIVES: (&str, &str) = ("Authorization", "Bearer archives-key");

/// The default tenant (any extension) and one whose plan allows only archives, written by
/// their last extension.
fn config(dir: &Path) -> String {
    default_config(dir).replace(
        "plans:\n",
        "plans:\n  archives:\n    max_file_size: 1MiB\n    allowed_extensions: [gz, tgz, 7z]\n",
    ) + "  archives:\n    plan: archives\n    provider: disk\n    keys: [archives-key]\n"
}

fn upload(daemon: &Daemon, key: (&str, &str), name: &str, bytes: &[u8]) -> Reply {
    post_form(
        &daemon.url("/v1/files/upload"),
        &[key],
        &Form::new().file("file", name, "application/octet-stream", bytes),
    )
}

#[track_caller]
fn assert_refused(reply: &Reply, says: &str) {
    assert_eq!(reply.status, 415, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body["code"], "unsupported_file_type", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains(says), "{message}");
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                0xedb8_8320 ^ (crc >> 1)
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    let mut covered = kind.to_vec();
    covered.extend_from_slice(data);
    chunk.extend_from_slice(&crc32(&covered).to_be_bytes());
    chunk
}

/// A valid 1×1 transparent PNG.
fn png() -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &[0, 0, 0, 1, 0, 0, 0, 1, 8, 6, 0, 0, 0]));
    png.extend(png_chunk(
        b"IDAT",
        b"\x78\x9c\x63\x60\x00\x02\x00\x00\x05\x00\x01",
    ));
    png.extend(png_chunk(b"IEND", b""));
    png
}

/// A ustar archive of one file, gzipped (stored deflate blocks): a valid `.tar.gz`.
fn tar_gz(name: &str, data: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    header[100..108].copy_from_slice(b"0000644\0");
    header[108..116].copy_from_slice(b"0000000\0");
    header[116..124].copy_from_slice(b"0000000\0");
    header[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    header[136..148].copy_from_slice(b"00000000000\0");
    header[156] = b'0';
    header[257..265].copy_from_slice(b"ustar\x0000");
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|&byte| u32::from(byte)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut tar = header.to_vec();
    tar.extend_from_slice(data);
    tar.resize(tar.len().next_multiple_of(512) + 1024, 0);

    let mut gz = b"\x1f\x8b\x08\0\0\0\0\0\0\x03".to_vec();
    let blocks: Vec<&[u8]> = tar.chunks(usize::from(u16::MAX)).collect();
    for (index, block) in blocks.iter().enumerate() {
        gz.push(u8::from(index + 1 == blocks.len()));
        gz.extend_from_slice(&(block.len() as u16).to_le_bytes());
        gz.extend_from_slice(&(!(block.len() as u16)).to_le_bytes());
        gz.extend_from_slice(block);
    }
    gz.extend_from_slice(&crc32(&tar).to_le_bytes());
    gz.extend_from_slice(&(tar.len() as u32).to_le_bytes());
    gz
}

/// A stored zip holding one file, built by hand.
fn zip_of(name: &str, data: &[u8]) -> Vec<u8> {
    let mut common = 20u16.to_le_bytes().to_vec();
    common.extend_from_slice(&[0; 8]);
    common.extend_from_slice(&crc32(data).to_le_bytes());
    common.extend_from_slice(&(data.len() as u32).to_le_bytes());
    common.extend_from_slice(&(data.len() as u32).to_le_bytes());
    common.extend_from_slice(&(name.len() as u16).to_le_bytes());
    common.extend_from_slice(&0u16.to_le_bytes());
    let mut zip = b"PK\x03\x04".to_vec();
    zip.extend_from_slice(&common);
    zip.extend_from_slice(name.as_bytes());
    zip.extend_from_slice(data);
    let offset = zip.len() as u32;
    let mut directory = b"PK\x01\x02\x14\0".to_vec();
    directory.extend_from_slice(&common);
    directory.extend_from_slice(&[0; 14]); // comment length, disk, attributes, local offset 0
    directory.extend_from_slice(name.as_bytes());
    zip.extend_from_slice(&directory);
    zip.extend_from_slice(b"PK\x05\x06\0\0\0\0\x01\0\x01\0");
    zip.extend_from_slice(&(directory.len() as u32).to_le_bytes());
    zip.extend_from_slice(&offset.to_le_bytes());
    zip.extend_from_slice(&0u16.to_le_bytes());
    zip
}

#[test]
fn polyglots_and_hollow_files_are_refused() {
    let daemon = Daemon::start_with(config);
    // The same PNG is accepted alone...
    let reply = upload(&daemon, BEARER, "photo.png", &png());
    assert_eq!(reply.status, 201, "{}", reply.text);
    assert_eq!(reply.json()["mime_type"], "image/png");

    // ...and refused with HTML after its IEND chunk.
    let mut polyglot = png();
    polyglot.extend_from_slice(b"<html><body><script>alert(document.cookie)</script></body></html>");
    assert_refused(
        &upload(&daemon, BEARER, "photo.png", &polyglot),
        "data follows the IEND chunk",
    );
    assert_refused(
        &upload(&daemon, BEARER, "photo.png", b"\x89PNG\r\n\x1a\n"),
        "truncated",
    );
    assert_refused(&upload(&daemon, BEARER, "photo.png", b""), ".png");
    assert_refused(
        &upload(&daemon, BEARER, "report.docx", &zip_of("evil.exe", b"MZ\x90\0")),
        "[Content_Types].xml",
    );
    assert_refused(
        &upload(
            &daemon,
            BEARER,
            "report.pdf",
            b"%PDF-1.4\n<html><script>alert(1)</script></html>\n",
        ),
        "%%EOF",
    );
    // Nothing refused was kept.
    let stored = std::fs::read_dir(daemon.files_dir()).unwrap().count();
    assert_eq!(stored, 1);
    assert_eq!(daemon.spool_files(), 0);
    assert_eq!(
        daemon.metric("upgate_rejections_total{dialect=\"dify\",reason=\"content\"}"),
        5.0
    );
}

#[test]
fn archives_with_compound_names_are_accepted() {
    let daemon = Daemon::start_with(config);
    let archive = tar_gz("notes.txt", b"hello, archive\n");
    // Any extension (the default plan), then a plan that allows `gz`: the last extension.
    for key in [BEARER, ARCHIVES] {
        let reply = upload(&daemon, key, "backup.tar.gz", &archive);
        assert_eq!(reply.status, 201, "{}", reply.text);
        let body = reply.json();
        assert_eq!(body["name"], "backup.tar.gz");
        assert_eq!(body["extension"], "gz");
        assert_eq!(body["mime_type"], "application/gzip");
        let id = body["id"].as_str().unwrap();
        assert_eq!(sha256_file(&daemon.files_dir().join(id)), sha256_hex(&archive));

        let reply = upload(&daemon, key, "backup.tgz", &archive);
        assert_eq!(reply.status, 201, "{}", reply.text);
        assert_eq!(reply.json()["mime_type"], "application/gzip");
    }
    // An empty 7z archive: its signature header, pointing at no next header.
    let mut seven = b"7z\xbc\xaf\x27\x1c\x00\x04".to_vec();
    seven.extend_from_slice(&crc32(&[0; 20]).to_le_bytes());
    seven.extend_from_slice(&[0; 20]);
    let reply = upload(&daemon, ARCHIVES, "archive.7z", &seven);
    assert_eq!(reply.status, 201, "{}", reply.text);
    assert_eq!(reply.json()["mime_type"], "application/x-7z-compressed");

    // The allowlist is per last extension; the content must still be what it says.
    assert_refused(&upload(&daemon, ARCHIVES, "notes.tar", &archive), "type");
    assert_refused(
        &upload(&daemon, ARCHIVES, "backup.tar.gz", b"not gzip at all"),
        ".gz",
    );
}
