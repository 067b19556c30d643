//! Tests of content classification: sniffed types against extensions, UTF-8 and JSON checks,
//! the structure checks of whole files (PNG, GIF, PDF, OOXML), archives, MIME families.

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
        known("docx").unwrap().mime
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
fn text_that_starts_like_a_short_binary_signature_is_text() {
    for text in [
        "BC Hydro invoice, March",
        "BMW service plan",
        "MZ postcodes",
        "ID3 tags",
        "OggS notes",
    ] {
        assert_eq!(
            classify("txt", text.as_bytes(), true, true).unwrap(),
            "text/plain",
            "{text}"
        );
    }
    // A binary with such a signature is still not text.
    let exe = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00";
    assert!(matches!(
        classify("txt", exe, true, true),
        Err(ContentError::Mismatch { .. })
    ));
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
    assert!(verify_file("json", &path).is_ok());
    std::fs::write(&path, br#"{"a": 1} trailing"#).unwrap();
    assert!(verify_file("json", &path).is_err());
    std::fs::write(&path, b"{\"a\":1}\n\n[2]\n").unwrap();
    assert!(verify_file("jsonl", &path).is_ok());
    std::fs::write(&path, b"{\"a\":1}\n{oops\n").unwrap();
    let error = verify_file("jsonl", &path).unwrap_err().to_string();
    assert!(error.contains("line 2"), "{error}");
    // CRLF lines, blank ones, no newline at the end; a value spread over two lines is not
    // a line's value; two values on one line are not one.
    std::fs::write(&path, b" {\"a\": \"x\"} \r\n\r\n\t[1,2]").unwrap();
    assert!(verify_file("ndjson", &path).is_ok());
    std::fs::write(&path, b"{\"a\":\n1}\n").unwrap();
    assert!(verify_file("jsonl", &path).is_err());
    std::fs::write(&path, b"1 2\n").unwrap();
    assert!(verify_file("jsonl", &path).is_err());
    // A line of 8 MiB, read as it streams: valid, then cut short.
    let mut long = b"[\"".to_vec();
    long.resize(8 << 20, b'a');
    long.extend_from_slice(b"\"]\n{}\n");
    std::fs::write(&path, &long).unwrap();
    assert!(verify_file("jsonl", &path).is_ok());
    std::fs::write(&path, &long[..4 << 20]).unwrap();
    assert!(verify_file("jsonl", &path).is_err());
    std::fs::write(&path, b"").unwrap();
    assert!(matches!(
        verify_file("json", &path),
        Err(ContentError::InvalidJson { .. })
    ));
}

/// What an upload with `verify_content` on goes through: its first bytes classified (text
/// validated as UTF-8 whole), then the whole file checked when its type has a structure check.
fn check(extension: &str, bytes: &[u8]) -> Result<String, ContentError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spooled");
    std::fs::write(&path, bytes).unwrap();
    let head = &bytes[..bytes.len().min(SNIFF_LEN)];
    let utf8_ok = if is_text_extension(extension) {
        let mut validator = Utf8Validator::default();
        validator.feed(bytes);
        validator.finish()
    } else {
        looks_like_text(head)
    };
    let mime = classify(extension, head, utf8_ok, true)?;
    if needs_file_check(extension) {
        verify_file(extension, &path)?;
    }
    Ok(mime)
}

#[track_caller]
fn refused(extension: &str, bytes: &[u8]) -> String {
    match check(extension, bytes) {
        Ok(mime) => panic!("a .{extension} file was accepted as {mime}"),
        Err(ContentError::Io(error)) => panic!("an I/O error, not a refusal: {error}"),
        Err(error) => error.to_string(),
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    !crc32_update(!0, bytes)
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(&(!crc32_update(crc32_update(!0, kind), data)).to_be_bytes());
    chunk
}

/// A valid 1×1 RGBA PNG, CRCs computed here.
fn png_with(chunks: &[Vec<u8>]) -> Vec<u8> {
    let mut png = PNG_SIGNATURE.to_vec();
    for chunk in chunks {
        png.extend_from_slice(chunk);
    }
    png
}

fn ihdr() -> Vec<u8> {
    png_chunk(b"IHDR", &[0, 0, 0, 1, 0, 0, 0, 1, 8, 6, 0, 0, 0])
}

/// zlib of one filtered row of one transparent RGBA pixel.
fn idat() -> Vec<u8> {
    png_chunk(b"IDAT", b"\x78\x9c\x63\x60\x00\x02\x00\x00\x05\x00\x01")
}

fn iend() -> Vec<u8> {
    png_chunk(b"IEND", b"")
}

fn valid_png() -> Vec<u8> {
    png_with(&[ihdr(), idat(), iend()])
}

/// The classic 43-byte 1×1 transparent GIF (global colour table, graphic control extension,
/// one image, trailer).
const GIF: &[u8] = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00\
\x21\xf9\x04\x01\x00\x00\x00\x00\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00\x3b";

const PDF: &[u8] = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n";

/// A stored zip of `entries`, local headers, central directory and end record built here.
fn zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut directory = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u32;
        // From "version needed" to "extra field length": the same in both headers.
        let mut common = Vec::new();
        common.extend_from_slice(&20u16.to_le_bytes());
        common.extend_from_slice(&[0; 8]); // flags, method (stored), time, date
        common.extend_from_slice(&crc32(data).to_le_bytes());
        common.extend_from_slice(&(data.len() as u32).to_le_bytes());
        common.extend_from_slice(&(data.len() as u32).to_le_bytes());
        common.extend_from_slice(&(name.len() as u16).to_le_bytes());
        common.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(b"PK\x03\x04");
        out.extend_from_slice(&common);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        directory.extend_from_slice(b"PK\x01\x02");
        directory.extend_from_slice(&20u16.to_le_bytes()); // made by
        directory.extend_from_slice(&common);
        directory.extend_from_slice(&[0; 10]); // comment length, disk, attributes
        directory.extend_from_slice(&offset.to_le_bytes());
        directory.extend_from_slice(name.as_bytes());
    }
    let (offset, size) = (out.len() as u32, directory.len() as u32);
    out.extend_from_slice(&directory);
    out.extend_from_slice(b"PK\x05\x06\0\0\0\0");
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

const CONTENT_TYPES: (&str, &[u8]) = ("[Content_Types].xml", b"<Types/>");
const RELS: (&str, &[u8]) = ("_rels/.rels", b"<Relationships/>");

fn docx() -> Vec<u8> {
    zip(&[CONTENT_TYPES, RELS, ("word/document.xml", b"<w:document/>")])
}

/// A ustar archive of one file.
fn tar(name: &str, data: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    header[100..108].copy_from_slice(b"0000644\0");
    header[108..116].copy_from_slice(b"0000000\0");
    header[116..124].copy_from_slice(b"0000000\0");
    header[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    header[136..148].copy_from_slice(b"00000000000\0");
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|&byte| u32::from(byte)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut archive = header.to_vec();
    archive.extend_from_slice(data);
    archive.resize(archive.len().next_multiple_of(512) + 1024, 0);
    archive
}

/// A gzip member holding `data` in stored deflate blocks.
fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = b"\x1f\x8b\x08\0\0\0\0\0\0\x03".to_vec();
    let blocks: Vec<&[u8]> = data.chunks(u16::MAX as usize).collect();
    for (index, block) in blocks.iter().enumerate() {
        out.push(u8::from(index + 1 == blocks.len()));
        out.extend_from_slice(&(block.len() as u16).to_le_bytes());
        out.extend_from_slice(&(!(block.len() as u16)).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// An empty 7z archive: the signature header pointing at no next header.
fn seven_zip() -> Vec<u8> {
    let mut archive = b"7z\xbc\xaf\x27\x1c\x00\x04".to_vec();
    archive.extend_from_slice(&crc32(&[0; 20]).to_le_bytes());
    archive.extend_from_slice(&[0; 20]);
    archive
}

#[test]
fn crc32_is_the_png_and_zip_one() {
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    assert_eq!(crc32(b""), 0);
    // The IHDR of the 1×1 PNG every PNG tool writes.
    assert_eq!(&ihdr()[21..], b"\x1f\x15\xc4\x89");
}

#[test]
fn empty_files_are_refused_for_every_binary_type() {
    for known in KNOWN.iter().filter(|known| !known.text) {
        for extension in known.extensions {
            assert!(
                matches!(check(extension, b""), Err(ContentError::NotRecognised { .. })),
                ".{extension}"
            );
            // Without verify_content, the extension is trusted.
            assert_eq!(classify(extension, b"", true, false).unwrap(), known.mime);
        }
    }
    for extension in ["png", "pdf", "docx", "gif"] {
        assert_eq!(
            refused(extension, b""),
            format!("the content does not look like a .{extension} file")
        );
    }
    // Text may be empty (JSON must still parse: an empty .json is refused).
    assert_eq!(check("txt", b"").unwrap(), "text/plain");
    assert_eq!(check("csv", b"").unwrap(), "text/csv");
    assert!(matches!(
        check("json", b""),
        Err(ContentError::InvalidJson { .. })
    ));
    // An unknown extension has nothing to check.
    assert_eq!(check("bin", b"").unwrap(), "application/octet-stream");
}

#[test]
fn png_structure() {
    assert_eq!(check("png", &valid_png()).unwrap(), "image/png");
    // Ancillary chunks, and image data across several IDAT chunks larger than a read buffer.
    let big = vec![7u8; 300 * 1024];
    let png = png_with(&[
        ihdr(),
        png_chunk(b"tEXt", b"Comment\0hello"),
        png_chunk(b"IDAT", &big),
        png_chunk(b"IDAT", &big),
        iend(),
    ]);
    assert!(check("png", &png).is_ok());

    let signature_only = refused("png", PNG_SIGNATURE);
    assert!(signature_only.ends_with("it is truncated"), "{signature_only}");
    // A PNG followed by HTML: a polyglot.
    let mut polyglot = valid_png();
    polyglot.extend_from_slice(b"<html><script>alert(1)</script></html>");
    assert!(refused("png", &polyglot).contains("data follows the IEND chunk"));
    let mut one_more = valid_png();
    one_more.push(b'\n');
    assert!(refused("png", &one_more).contains("data follows the IEND chunk"));
    // The signature, then HTML where the chunks should be.
    let mut markup = PNG_SIGNATURE.to_vec();
    markup.extend_from_slice(b"<html><body><script>alert(1)</script></body></html>");
    assert!(check("png", &markup).is_err());

    let mut bad_crc = valid_png();
    let at = 8 + 25 + 10; // a byte of IDAT's data
    bad_crc[at] ^= 1;
    assert!(refused("png", &bad_crc).contains("the CRC of chunk IDAT does not match"));
    assert!(refused("png", &png_with(&[ihdr(), iend()])).contains("IDAT"));
    assert!(refused("png", &png_with(&[idat(), ihdr(), iend()])).contains("the first chunk is not IHDR"));
    assert!(refused("png", &png_with(&[ihdr(), idat()])).ends_with("it is truncated"));
    let full = valid_png();
    assert!(refused("png", &full[..full.len() - 2]).ends_with("it is truncated"));
    let mut huge = png_with(&[ihdr()]);
    huge.extend_from_slice(b"\xff\xff\xff\xffIDAT");
    assert!(refused("png", &huge).contains("longer than"));
    let mut not_letters = png_with(&[ihdr()]);
    not_letters.extend_from_slice(&png_chunk(b"ID1T", b""));
    assert!(refused("png", &not_letters).contains("four letters"));
}

#[test]
fn gif_structure() {
    assert_eq!(check("gif", GIF).unwrap(), "image/gif");
    let mut gif87 = GIF.to_vec();
    gif87[4] = b'7';
    assert!(check("gif", &gif87).is_ok());

    // GIF89a followed by script, the classic GIF/JavaScript polyglot (which ends with `;`).
    let script = b"GIF89a/*\x0a\x00\x00\x00\x00*/=1;alert(document.domain);";
    assert!(refused("gif", script).contains("an unknown GIF block"));
    let mut appended = GIF.to_vec();
    appended.extend_from_slice(b"<script>alert(1)</script>");
    assert!(refused("gif", &appended).contains("data follows the GIF trailer"));
    let mut appended = GIF.to_vec();
    appended.extend_from_slice(b"alert(1);");
    assert!(refused("gif", &appended).contains("data follows the GIF trailer"));
    assert!(refused("gif", &GIF[..GIF.len() - 1]).ends_with("it is truncated"));
    assert!(refused("gif", b"GIF89a").ends_with("it is truncated"));
}

#[test]
fn pdf_structure() {
    assert_eq!(check("pdf", PDF).unwrap(), "application/pdf");
    // Trailing white space after %%EOF (PDF's: NUL, CR, LF, tab, FF, space).
    let mut padded = PDF.to_vec();
    padded.extend_from_slice(b"\r\n\0\0 \t\x0c\n");
    assert!(check("pdf", &padded).is_ok());
    // Larger than the tail that is read: the end is found by a seek.
    let mut large = b"%PDF-1.7\n".to_vec();
    large.extend(std::iter::repeat_n(b'x', 100_000));
    large.extend_from_slice(b"\n%%EOF");
    assert!(check("pdf", &large).is_ok());
    // An incremental update: the last %%EOF counts.
    let mut updated = PDF.to_vec();
    updated.extend_from_slice(b"2 0 obj\n<<>>\nendobj\n%%EOF\r\n");
    assert!(check("pdf", &updated).is_ok());

    // %PDF followed by HTML.
    let polyglot = b"%PDF-1.4\n<html><body><script>alert(1)</script></body></html>\n";
    assert!(refused("pdf", polyglot).contains("it does not end with %%EOF"));
    let mut appended = PDF.to_vec();
    appended.extend_from_slice(b"<html><script>alert(1)</script></html>");
    assert!(refused("pdf", &appended).contains("%%EOF"));
    let mut far = b"%PDF-1.7\n%%EOF\n".to_vec();
    far.extend(std::iter::repeat_n(b'x', 2000));
    assert!(refused("pdf", &far).contains("%%EOF"));
    assert!(refused("pdf", b"%PDF-").contains("%%EOF"));
    // infer finds %PDF anywhere in the first KiB; a PDF must start with it.
    let mut late = b"<html>".to_vec();
    late.extend_from_slice(PDF);
    assert!(refused("pdf", &late).contains("it does not start with %PDF-"));
}

#[test]
fn ooxml_structure() {
    let docx = docx();
    assert_eq!(check("docx", &docx).unwrap(), known("docx").unwrap().mime);
    let xlsx = zip(&[CONTENT_TYPES, RELS, ("xl/workbook.xml", b"<workbook/>")]);
    assert!(verify_file_of("xlsx", &xlsx).is_ok());
    let pptx = zip(&[CONTENT_TYPES, RELS, ("ppt/presentation.xml", b"<p/>")]);
    assert!(verify_file_of("pptx", &pptx).is_ok());
    // Part names compare case-insensitively, as OPC says.
    let upper = zip(&[
        ("[CONTENT_TYPES].XML", b"<Types/>"),
        ("Word/Document.xml", b"<w/>"),
    ]);
    assert!(verify_file_of("docx", &upper).is_ok());

    // A plain zip holding an executable, named .docx.
    let evil = zip(&[("evil.exe", b"MZ\x90\0")]);
    assert!(refused("docx", &evil).contains("without [Content_Types].xml"));
    // An OOXML package of another type.
    let message = verify_file_of("docx", &xlsx).unwrap_err().to_string();
    assert!(message.contains("without word/document.xml"), "{message}");
    let message = verify_file_of("xlsx", &docx).unwrap_err().to_string();
    assert!(message.contains("without xl/workbook.xml"), "{message}");

    // Structure: data after the end record, before the archive, a broken directory, zip64.
    let mut trailing = docx.clone();
    trailing.extend_from_slice(b"<html></html>");
    assert!(refused("docx", &trailing).contains("no zip end of central directory record"));
    let mut prefixed = b"PK\x03\x04 not a header".to_vec();
    prefixed.extend_from_slice(&docx);
    assert!(refused("docx", &prefixed).contains("not where its end record says"));
    let eocd = docx.len() - EOCD_LEN;
    let directory = u32_at(&docx, eocd + 16) as usize;
    let mut broken = docx.clone();
    broken[directory + 2] = b'X';
    assert!(refused("docx", &broken).contains("central directory is malformed"));
    let mut miscounted = docx.clone();
    miscounted[eocd + 8] += 1;
    miscounted[eocd + 10] += 1;
    assert!(refused("docx", &miscounted).contains("central directory is malformed"));
    let mut zip64 = docx.clone();
    zip64[eocd + 8..eocd + 12].copy_from_slice(&[0xff; 4]);
    assert!(refused("docx", &zip64).contains("zip64"));
    let mut zip64 = docx.clone();
    zip64[eocd + 16..eocd + 20].copy_from_slice(&[0xff; 4]);
    assert!(refused("docx", &zip64).contains("zip64"));
    let mut multi_disk = docx.clone();
    multi_disk[eocd + 4] = 1;
    assert!(refused("docx", &multi_disk).contains("multi-disk"));
    assert!(refused("docx", &docx[..docx.len() - 1]).contains("no zip end of central directory"));
    assert!(refused("docx", b"PK\x03\x04").contains("not a zip archive"));
    // A comment after the end record is part of it.
    let mut commented = docx.clone();
    let at = commented.len() - 2;
    commented[at..].copy_from_slice(&5u16.to_le_bytes());
    commented.extend_from_slice(b"hello");
    assert!(check("docx", &commented).is_ok());
}

fn verify_file_of(extension: &str, bytes: &[u8]) -> Result<(), ContentError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spooled");
    std::fs::write(&path, bytes).unwrap();
    verify_file(extension, &path)
}

#[test]
fn archives_are_known_by_their_signature() {
    let archive = tar("notes.txt", b"hello\n");
    let tar_gz = gzip(&archive);
    // `backup.tar.gz` is a `gz` file, `backup.tgz` a `tgz` one: both gzip.
    assert_eq!(check("gz", &tar_gz).unwrap(), "application/gzip");
    assert_eq!(check("tgz", &tar_gz).unwrap(), "application/gzip");
    assert_eq!(check("tar", &archive).unwrap(), "application/x-tar");
    assert_eq!(check("7z", &seven_zip()).unwrap(), "application/x-7z-compressed");
    assert_eq!(
        check("bz2", b"BZh91AY&SY\x00\x00").unwrap(),
        "application/x-bzip2"
    );
    assert_eq!(check("xz", b"\xfd7zXZ\x00\x00\x04").unwrap(), "application/x-xz");
    assert_eq!(
        check("zst", b"\x28\xb5\x2f\xfd\x00\x00").unwrap(),
        "application/zstd"
    );
    // A plain tar is not a .gz, a gzip is not a .7z.
    assert_eq!(
        refused("gz", &archive),
        "the content is tar (application/x-tar), not .gz"
    );
    assert!(refused("7z", &tar_gz).contains("not .7z"));
    assert!(refused("tgz", b"plain text").contains("does not look like a .tgz file"));
}

#[test]
fn a_read_error_is_internal_not_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let error = verify_file("png", &dir.path().join("missing")).unwrap_err();
    assert!(matches!(error, ContentError::Io(_)), "{error:?}");
    assert!(matches!(
        crate::error::ApiError::from(error),
        crate::error::ApiError::Internal
    ));
    let refusal = crate::error::ApiError::from(check("png", PNG_SIGNATURE).unwrap_err());
    assert!(matches!(refusal, crate::error::ApiError::ContentMismatch(_)));
}

#[test]
fn which_types_get_a_file_check() {
    for extension in [
        "json", "jsonl", "ndjson", "png", "gif", "pdf", "docx", "xlsx", "pptx",
    ] {
        assert!(needs_file_check(extension), "{extension}");
    }
    for extension in ["txt", "svg", "jpg", "zip", "gz", "doc", "mp4", ""] {
        assert!(!needs_file_check(extension), "{extension}");
    }
}
