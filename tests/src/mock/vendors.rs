//! What each vendor checks and answers. The server, the body parsing and the faults are
//! shared (`mod.rs`); this file holds only the five APIs' routes, rules and JSON shapes.

use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::http::{Answer, Head};
use super::multipart::FilePart;
use super::{ChunkInfo, Content, Incoming, KoreSession, Shared, Stored, Vendor};

/// An error answer in the vendor's own shape.
pub(crate) fn error(vendor: Vendor, status: u16, code: &str, message: &str) -> Answer {
    let body = match vendor {
        Vendor::Dify => json!({"code": code, "message": message, "status": status}),
        Vendor::Kore | Vendor::Korexo => json!({"errors": [{"msg": message, "code": status}]}),
        Vendor::Maiagent => json!({"detail": message}),
        Vendor::Beam if status == 401 => json!({"message": message, "statusCode": status}),
        Vendor::Beam => json!({"statusCode": status, "message": message, "error": nest_error(status)}),
    };
    let answer = Answer::json(status, &body);
    if vendor == Vendor::Dify && status == 401 {
        answer.with_header("www-authenticate", "Bearer realm=\"api\"")
    } else {
        answer
    }
}

fn nest_error(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        404 => "Not Found",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500..=599 => "Internal Server Error",
        _ => "Error",
    }
}

/// The reason each mock gives for a wrong API key (what a plugin should pass on).
pub fn wrong_key_reason(vendor: Vendor) -> &'static str {
    match vendor {
        Vendor::Dify => "Access token is invalid",
        Vendor::Kore | Vendor::Korexo | Vendor::Beam => "Unauthorized",
        Vendor::Maiagent => "Invalid API key.",
    }
}

/// Whether file parts of this request go to disk (kore chunks, assembled at `complete`).
pub(crate) fn spools_files(vendor: Vendor, head: &Head) -> bool {
    vendor == Vendor::Kore
        && kore_route(head.path()).is_some_and(|route| matches!(route, KoreRoute::Chunk(_)))
}

pub(crate) fn handle(shared: &Shared, incoming: &mut Incoming) -> Answer {
    match shared.vendor {
        Vendor::Dify => dify(shared, incoming),
        Vendor::Kore => kore(shared, incoming),
        Vendor::Maiagent => maiagent(shared, incoming),
        Vendor::Korexo => korexo(shared, incoming),
        Vendor::Beam => beam(shared, incoming),
    }
}

// ---- shared pieces -------------------------------------------------------------------------

fn now() -> SystemTime {
    SystemTime::now()
}

fn iso(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn name_text(file: &FilePart) -> String {
    String::from_utf8_lossy(&file.filename).into_owned()
}

fn extension(name: &str) -> String {
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() && !ext.is_empty() => ext.to_ascii_lowercase(),
        _ => String::new(),
    }
}

fn mime(file: &FilePart) -> String {
    file.content_type
        .clone()
        .unwrap_or_else(|| "application/octet-stream".to_owned())
}

fn store(shared: &Shared, file: &FilePart, id: &str, url: &str, scope: &str) {
    store_raw(
        shared,
        Stored {
            id: id.to_owned(),
            filename: file.filename.clone(),
            size: file.size,
            sha256: file.sha256.clone(),
            url: url.to_owned(),
            scope: scope.to_owned(),
        },
    );
}

fn store_raw(shared: &Shared, stored: Stored) {
    shared.state().stored.push(stored);
}

/// The single file part under `field`, when there is exactly one part and it has that name.
fn single_file<'a>(incoming: &'a Incoming, field: &str) -> Option<&'a FilePart> {
    match incoming.files() {
        [file] if file.field == field => Some(file),
        _ => None,
    }
}

fn key_matches(sent: Option<&str>, expected: &str) -> bool {
    sent.is_some_and(|key| key.trim() == expected)
}

// ---- dify ---------------------------------------------------------------------------------

fn dify(shared: &Shared, incoming: &mut Incoming) -> Answer {
    let fail = |status, code, message: &str| error(Vendor::Dify, status, code, message);
    if !matches!(incoming.path(), "/v1/files/upload" | "/files/upload") {
        return fail(404, "not_found", "The requested URL was not found on the server.");
    }
    if incoming.head.method != "POST" {
        return fail(
            405,
            "method_not_allowed",
            "The method is not allowed for the requested URL.",
        );
    }
    let Some(token) = incoming
        .header("authorization")
        .and_then(|value| value.strip_prefix("Bearer "))
    else {
        return fail(
            401,
            "unauthorized",
            "Authorization header must be provided and start with 'Bearer'",
        );
    };
    if !key_matches(Some(token), &shared.api_key) {
        return fail(401, "unauthorized", wrong_key_reason(Vendor::Dify));
    }
    let files = incoming.files();
    if files.len() > 1 {
        return fail(400, "too_many_files", "Only one file is allowed.");
    }
    let Some(file) = single_file(incoming, "file") else {
        return fail(400, "no_file_uploaded", "Please upload your file.");
    };
    if file.filename.is_empty() {
        return fail(
            400,
            "filename_not_exists_error",
            "The specified filename does not exist.",
        );
    }
    if file.filename.iter().any(|b| *b == b'/' || *b == b'\\') {
        return fail(400, "invalid_param", "Filename must not contain '/' or '\\'.");
    }
    let name = name_text(file);
    let id = uuid();
    let url = format!("{}/files/{id}/file-preview", shared.origin);
    let user = incoming.field("user").unwrap_or_default().to_owned();
    store(shared, file, &id, &url, &user);
    let created_by = uuid();
    let created_at = now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let extension = extension(&name);
    Answer::json(
        201,
        &json!({
            "id": id,
            "name": name,
            "size": file.size,
            "extension": extension,
            "mime_type": mime(file),
            "created_by": created_by,
            "created_at": created_at,
            "preview_url": null,
            "source_url": url,
            "original_url": null,
            "user_id": created_by,
            "tenant_id": "11223344-5566-7788-99aa-bbccddeeff00",
            "conversation_id": null,
            "file_key": format!("upload_files/11223344-5566-7788-99aa-bbccddeeff00/{id}.{extension}"),
        }),
    )
}

// ---- kore ---------------------------------------------------------------------------------

enum KoreRoute<'a> {
    Single,
    Start,
    Chunk(&'a str),
    Complete(&'a str),
}

fn kore_route(path: &str) -> Option<KoreRoute<'_>> {
    if path == "/api/public/files" {
        return Some(KoreRoute::Single);
    }
    let rest = path.strip_prefix("/api/public/files/session/")?;
    match rest.split('/').collect::<Vec<_>>().as_slice() {
        ["start"] => Some(KoreRoute::Start),
        [id] if !id.is_empty() => Some(KoreRoute::Chunk(id)),
        [id, "complete"] if !id.is_empty() => Some(KoreRoute::Complete(id)),
        _ => None,
    }
}

/// Kore's limit for one file sent in one request; larger files go through upload sessions.
const KORE_SINGLE_UPLOAD_LIMIT: u64 = 25_000_000;

fn kore_fail(status: u16, message: &str) -> Answer {
    error(Vendor::Kore, status, "", message)
}

fn kore(shared: &Shared, incoming: &mut Incoming) -> Answer {
    let path = incoming.path().to_owned();
    let Some(route) = kore_route(&path) else {
        return kore_fail(404, "Not Found");
    };
    if incoming.head.method != "POST" {
        return kore_fail(405, "Method Not Allowed");
    }
    if !key_matches(incoming.header("x-api-key"), &shared.api_key) {
        return kore_fail(401, wrong_key_reason(Vendor::Kore));
    }
    match route {
        KoreRoute::Single => kore_single(shared, incoming),
        KoreRoute::Start => kore_start(shared, incoming),
        KoreRoute::Chunk(id) => kore_chunk(shared, incoming, id),
        KoreRoute::Complete(id) => kore_complete(shared, id),
    }
}

fn kore_file_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..24].to_owned()
}

fn kore_single(shared: &Shared, incoming: &Incoming) -> Answer {
    let Some(file) = single_file(incoming, "file") else {
        return kore_fail(400, "file is required");
    };
    if incoming.field("fileContext").is_none_or(str::is_empty) {
        return kore_fail(400, "fileContext is required");
    }
    let limit = shared
        .state()
        .kore_single_upload_limit
        .unwrap_or(KORE_SINGLE_UPLOAD_LIMIT);
    if file.size > limit {
        return kore_fail(
            413,
            &format!("file exceeds the single upload limit of {limit} bytes; use an upload session"),
        );
    }
    let id = kore_file_id();
    let url = format!("{}/api/public/files/{id}", shared.origin);
    store(shared, file, &id, &url, "");
    Answer::json(200, &json!({"fileId": id, "url": url}))
}

fn kore_start(shared: &Shared, incoming: &Incoming) -> Answer {
    let Content::Json(body) = &incoming.content else {
        return kore_fail(400, "a JSON body is required");
    };
    let text = |key: &str| body.get(key).and_then(Value::as_str);
    let number = |key: &str| body.get(key).and_then(Value::as_u64);
    if text("fileContext").is_none_or(str::is_empty) {
        return kore_fail(400, "fileContext is required");
    }
    let Some(total_chunks) = number("totalChunks").filter(|n| (1..=100_000).contains(n)) else {
        return kore_fail(400, "totalChunks must be a positive number");
    };
    if text("fileExtension").is_none() {
        return kore_fail(400, "fileExtension is required");
    }
    let Some(file_name) = text("fileName").filter(|name| !name.is_empty()) else {
        return kore_fail(400, "fileName is required");
    };
    let Some(file_size) = number("fileSize") else {
        return kore_fail(400, "fileSize must be a number");
    };
    let id = uuid();
    let dir = shared.spool.path().join(format!("session-{id}"));
    if let Err(problem) = std::fs::create_dir(&dir) {
        return kore_fail(500, &format!("cannot open a session: {problem}"));
    }
    let session = KoreSession {
        total_chunks,
        file_name: file_name.to_owned(),
        file_size,
        dir,
        chunks: Default::default(),
    };
    shared.state().sessions.insert(id.clone(), session);
    let expires = iso(now() + Duration::from_secs(3600));
    Answer::json(200, &json!({"sessionId": id, "expirationDate": expires}))
}

fn kore_chunk(shared: &Shared, incoming: &mut Incoming, id: &str) -> Answer {
    let Some(number) = incoming
        .field("chunkNumber")
        .and_then(|n| n.trim().parse::<u64>().ok())
    else {
        return kore_fail(400, "chunkNumber is required");
    };
    incoming.chunk = Some(ChunkInfo {
        session_id: id.to_owned(),
        chunk_number: number,
    });
    if single_file(incoming, "file").is_none() {
        return kore_fail(400, "file is required");
    }
    let part = &mut incoming.files_mut()[0];
    let mut state = shared.state();
    let Some(session) = state.sessions.get_mut(id) else {
        return kore_fail(404, "upload session not found");
    };
    if number >= session.total_chunks {
        return kore_fail(
            400,
            &format!("chunkNumber {number} is outside 0..{}", session.total_chunks),
        );
    }
    let others: u64 = session
        .chunks
        .iter()
        .filter(|(n, _)| **n != number)
        .map(|(_, size)| size)
        .sum();
    if others + part.size > session.file_size {
        return kore_fail(
            400,
            &format!("chunks add up to more than fileSize {}", session.file_size),
        );
    }
    let Some(spooled) = part.spooled.take() else {
        return kore_fail(500, "chunk was not spooled");
    };
    if let Err(problem) = spooled.persist(session.dir.join(format!("chunk-{number}"))) {
        return kore_fail(500, &format!("cannot keep the chunk: {problem}"));
    }
    session.chunks.insert(number, part.size);
    Answer::json(200, &json!({"chunkNumber": number, "sessionId": id}))
}

fn kore_complete(shared: &Shared, id: &str) -> Answer {
    let (dir, total, file_size, file_name) = {
        let state = shared.state();
        let Some(session) = state.sessions.get(id) else {
            return kore_fail(404, "upload session not found");
        };
        let missing: Vec<String> = (0..session.total_chunks)
            .filter(|n| !session.chunks.contains_key(n))
            .take(50)
            .map(|n| n.to_string())
            .collect();
        if !missing.is_empty() {
            return kore_fail(400, &format!("missing chunks: {}", missing.join(", ")));
        }
        (
            session.dir.clone(),
            session.total_chunks,
            session.file_size,
            session.file_name.clone(),
        )
    };
    // Hash outside the lock: sessions can be large.
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0; 256 << 10];
    for number in 0..total {
        let mut chunk = match std::fs::File::open(dir.join(format!("chunk-{number}"))) {
            Ok(chunk) => chunk,
            Err(problem) => return kore_fail(500, &format!("chunk {number} lost: {problem}")),
        };
        loop {
            match chunk.read(&mut buf) {
                Ok(0) => break,
                Ok(read) => {
                    hasher.update(&buf[..read]);
                    size += read as u64;
                }
                Err(problem) => return kore_fail(500, &format!("chunk {number}: {problem}")),
            }
        }
    }
    if size != file_size {
        return kore_fail(
            400,
            &format!("the chunks hold {size} bytes, not fileSize {file_size}"),
        );
    }
    if shared.state().sessions.remove(id).is_none() {
        return kore_fail(404, "upload session not found");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let file_id = kore_file_id();
    let url = format!("{}/api/public/files/{file_id}", shared.origin);
    store_raw(
        shared,
        Stored {
            id: file_id.clone(),
            filename: file_name.into_bytes(),
            size,
            sha256: hex::encode(hasher.finalize()),
            url: url.clone(),
            scope: String::new(),
        },
    );
    Answer::json(200, &json!({"fileId": file_id, "url": url}))
}

// ---- maiagent -----------------------------------------------------------------------------

fn maiagent_type(extension: &str) -> &'static str {
    match extension {
        "mp3" | "m4a" | "wav" | "amr" | "mpga" | "ogg" | "flac" => "audio",
        "png" | "jpg" | "jpeg" | "gif" | "webp" | "svg" | "bmp" => "image",
        "mp4" | "mov" | "mpeg" | "webm" | "avi" => "video",
        "pdf" | "doc" | "docx" | "xls" | "xlsx" | "ppt" | "pptx" | "csv" => "document",
        "txt" | "md" | "json" | "jsonl" => "text",
        _ => "other",
    }
}

fn maiagent(shared: &Shared, incoming: &mut Incoming) -> Answer {
    let fail = |status, message: &str| error(Vendor::Maiagent, status, "", message);
    if incoming.path() != "/api/v1/attachments-upload/" {
        return fail(404, "Not found.");
    }
    if incoming.head.method != "POST" {
        return fail(405, &format!("Method \"{}\" not allowed.", incoming.head.method));
    }
    let Some(authorization) = incoming.header("authorization") else {
        return fail(401, "Authentication credentials were not provided.");
    };
    let Some(key) = authorization.strip_prefix("Api-Key ") else {
        return fail(401, "Invalid API key format.");
    };
    if !key_matches(Some(key), &shared.api_key) {
        return fail(401, wrong_key_reason(Vendor::Maiagent));
    }
    if let Content::Other(_) | Content::Json(_) = incoming.content {
        let content_type = incoming.header("content-type").unwrap_or_default();
        return fail(
            415,
            &format!("Unsupported media type \"{content_type}\" in request."),
        );
    }
    let Some(file) = incoming.files().iter().find(|file| file.field == "file") else {
        return Answer::json(400, &json!({"file": ["This field is required."]}));
    };
    let name = name_text(file);
    let id = uuid();
    let extension = extension(&name);
    let url = format!("{}/media/chat/attachment/{}.{extension}", shared.origin, uuid());
    store(shared, file, &id, &url, "");
    Answer::json(
        201,
        &json!({"id": id, "type": maiagent_type(&extension), "filename": name, "file": url}),
    )
}

// ---- korexo -------------------------------------------------------------------------------

fn korexo(shared: &Shared, incoming: &mut Incoming) -> Answer {
    let fail = |status, message: &str| error(Vendor::Korexo, status, "", message);
    let path = incoming.path().to_owned();
    let segments: Vec<&str> = path.split('/').collect();
    let [
        "",
        "api",
        "v2",
        "apps",
        app,
        "environments",
        env,
        "attachments",
        last,
    ] = segments.as_slice()
    else {
        return fail(404, "Not Found");
    };
    if app.is_empty() || env.is_empty() || last.is_empty() {
        return fail(404, "Not Found");
    }
    let scope = format!("{app}/{env}");
    let method = incoming.head.method.as_str();
    let allowed = if *last == "upload" {
        method == "POST"
    } else {
        method == "DELETE"
    };
    if !allowed {
        return fail(405, "Method Not Allowed");
    }
    if !key_matches(incoming.header("x-api-key"), &shared.api_key) {
        return fail(401, wrong_key_reason(Vendor::Korexo));
    }
    if *last != "upload" {
        let file_id = *last;
        let mut state = shared.state();
        let Some(at) = state
            .stored
            .iter()
            .position(|stored| stored.id == file_id && stored.scope == scope)
        else {
            return fail(404, "file not found");
        };
        state.stored.remove(at);
        return Answer::json(
            200,
            &json!({"message": "file deleted successfully", "success": "true", "fileId": file_id}),
        );
    }
    let Some(file) = single_file(incoming, "file") else {
        return fail(400, "file is required");
    };
    if incoming.field("userReference").is_none_or(str::is_empty) {
        return fail(400, "userReference is required");
    }
    if incoming.field("uploadType") != Some("runtime") {
        return fail(400, "uploadType must be 'runtime'");
    }
    let name = name_text(file);
    let extension = extension(&name);
    let id = format!("f-{}", uuid());
    let file_path = if extension.is_empty() {
        format!("AppFileSystem/{id}")
    } else {
        format!("AppFileSystem/{id}.{extension}")
    };
    store(shared, file, &id, &file_path, &scope);
    Answer::json(
        200,
        &json!({
            "fileId": id,
            "fileName": name,
            "filePath": file_path,
            "fileSize": file.size,
            "mimeType": mime(file),
            "extension": extension,
            "uploadedAt": iso(now()),
        }),
    )
}

// ---- beam ---------------------------------------------------------------------------------

fn beam(shared: &Shared, incoming: &mut Incoming) -> Answer {
    let fail = |status, message: Value| {
        Answer::json(
            status,
            &json!({"statusCode": status, "message": message, "error": nest_error(status)}),
        )
    };
    if incoming.path() != "/agent-setup/upload" || incoming.head.method != "POST" {
        return fail(
            404,
            json!(format!("Cannot {} {}", incoming.head.method, incoming.path())),
        );
    }
    if !key_matches(incoming.header("x-api-key"), &shared.api_key) {
        return error(Vendor::Beam, 401, "", wrong_key_reason(Vendor::Beam));
    }
    let Some(workspace) = incoming
        .header("current-workspace-id")
        .filter(|id| !id.is_empty())
    else {
        return fail(400, json!("current-workspace-id header is required"));
    };
    let files = incoming.files();
    if files.len() > 10 || files.iter().any(|file| file.field != "files") {
        return fail(400, json!("Unexpected field"));
    }
    let thread_id = incoming.field("threadId").unwrap_or_default();
    if uuid::Uuid::try_parse(thread_id).is_err() || thread_id.len() != 36 {
        return fail(400, json!(["threadId must be a UUID"]));
    }
    if files.is_empty() {
        return fail(400, json!("files should not be empty"));
    }
    let stamp = iso(now());
    let user_id = "5f0c7a2e-1d3b-4c5a-9e8f-7a6b5c4d3e2f";
    let upload_status = shared.state().beam_upload_status.unwrap_or("processing");
    let answer: Vec<Value> = files
        .iter()
        .map(|file| {
            let id = uuid();
            let name = name_text(file);
            let key = format!("uploads/{workspace}/{id}/{name}");
            let url = format!("{}/files/{id}", shared.origin);
            store(shared, file, &id, &url, workspace);
            // The real API leaks the whole user row; the mock does too, so a client that
            // passes answers on can be checked for not forwarding it.
            json!({
                "name": name, "threadId": thread_id, "uploadStatus": upload_status,
                "uploadSource": "file_upload", "id": id, "createdAt": stamp, "updatedAt": stamp,
                "src": key, "fileKey": key, "url": url, "mimeType": mime(file), "userId": user_id,
                "user": {
                    "name": "Mock User", "email": "mock@example.com", "id": user_id,
                    "password": "$2b$10$mockmockmockmockmockmo", "rememberToken": "mock-remember-token",
                    "createdAt": stamp, "updatedAt": stamp,
                },
            })
        })
        .collect();
    Answer::json(201, &Value::Array(answer))
}
