//! Provider plugin `beam`: forwards a stored upload to Beam Studio's agent-setup upload API.
//!
//! Flow: the host hands over a [`PutRequest`] (the spooled file), or a [`StreamRequest`] and
//! the upload's [`Body`] while it arrives ([`FLAG_STREAMING`]); it streams as the one
//! `files` part of `POST {base_url}/agent-setup/upload`, with the `threadId` field and the
//! headers `x-api-key: KEY` and `current-workspace-id`. Beam answers 201 with an array of
//! file records: the first one's `id` becomes the remote id and its `url` (or `src`) the URL.
//! The records' `user` objects are cut down to `id` and `name` before the answer is kept:
//! the real API puts password hashes and tokens there. Beam has no delete API.
//!
//! `threadId` (a UUID, required) is the request's `threadId` metadata, else the `thread_id`
//! setting; the workspace is the `workspaceId` metadata (the Beam dialect's header), else the
//! `workspace_id` setting. Metadata counts only from uploads that came through the Beam
//! dialect (a tus client's `Upload-Metadata` may hold any key). With `workspace_id` set, a client's other workspace must be listed
//! in `allowed_workspace_ids` (`"*"`: any), else the upload is refused (404): the operator's
//! key would write there. Without it, any workspace a client names, unless the list confines
//! them.
//!
//! Settings: the common upstream keys (see `upgate_upstream::UpstreamSettings`),
//! `workspace_id`, `allowed_workspace_ids`, `thread_id`.
#![deny(unsafe_code)]

use serde_json::{Map, Value};
use upgate_plugin_api::{
    Body, DeleteRequest, ErrorKind, FLAG_STREAMING, InitContext, PluginError, Provider, PutRequest,
    PutResult, StreamRequest,
};
use upgate_upstream::{
    AllowedScope, Auth, Content, Upstream, UpstreamSettings, is_header_value, is_uuid, metadata_value,
    no_delete_api,
};

const VENDOR: &str = "beam";
/// The inbound dialect whose metadata (its `current-workspace-id`, `threadId`) is the client's.
const DIALECT: &str = "beam";

/// The beam provider.
#[derive(Debug)]
pub struct Beam {
    upstream: Upstream,
    /// The workspaces an upload may go to (the configured one first).
    workspaces: AllowedScope,
    thread_id: Option<String>,
}

fn rejected(message: &str) -> PluginError {
    PluginError::new(ErrorKind::Rejected, format!("{VENDOR} upload: {message}"))
}

impl Beam {
    /// The workspace (a header) comes from the dialect's request headers, known before the
    /// body; the thread id may come after the file part, and is checked when it is known.
    fn upload(&self, content: Content<'_, '_>) -> Result<PutResult, PluginError> {
        // Only a Beam client's own workspace and thread (its header and form) are its choice.
        let from_client = content.dialect() == DIALECT;
        let requested = metadata_value(content.metadata(), "workspaceId").filter(|_| from_client);
        if requested.is_some_and(|id| !is_header_value(id)) {
            return Err(rejected("the workspace id is not printable ASCII"));
        }
        let workspace_id = self.workspaces.choose(requested)?.to_owned();
        let default_thread = self.thread_id.clone();
        let fields = move |metadata: &upgate_upstream::Metadata| {
            let thread_id = metadata_value(metadata, "threadId")
                .filter(|_| from_client)
                .or(default_thread.as_deref())
                .ok_or_else(|| rejected("no thread id"))?;
            if !is_uuid(thread_id) {
                return Err(rejected("the thread id is not a UUID"));
            }
            Ok(vec![("threadId".to_owned(), thread_id.to_owned())])
        };
        let mut reply = self.upstream.post_upload(
            "upload",
            "/agent-setup/upload",
            &[("current-workspace-id", &workspace_id)],
            content,
            "files",
            fields,
        )?;
        if let Value::Array(records) = &mut reply.body {
            records.iter_mut().for_each(strip_user);
        }
        // A record Beam says failed is no delivery: tried again, as any upstream failure.
        if reply.body.pointer("/0/uploadStatus").and_then(Value::as_str) == Some("failed") {
            let mut error = reply.unexpected("the file's `uploadStatus` is `failed`");
            error.kind = ErrorKind::Unavailable;
            return Err(error);
        }
        reply.into_put_result("/0", "id", &["url", "src"])
    }
}

impl Provider for Beam {
    const FLAGS: u32 = FLAG_STREAMING;

    fn init(context: &InitContext, settings: Value) -> Result<Self, PluginError> {
        let settings = UpstreamSettings::parse(
            context,
            settings,
            &["workspace_id", "allowed_workspace_ids", "thread_id"],
        )?;
        let workspace_id = settings.string("workspace_id")?;
        if workspace_id.as_deref().is_some_and(|id| !is_header_value(id)) {
            return Err(PluginError::new(
                ErrorKind::Config,
                "setting `workspace_id` must be printable ASCII",
            ));
        }
        let workspaces = AllowedScope::from_settings(
            &settings,
            "allowed_workspace_ids",
            "workspace",
            workspace_id,
            is_header_value,
        )?;
        let thread_id = settings.string("thread_id")?;
        if thread_id.as_deref().is_some_and(|id| !is_uuid(id)) {
            return Err(PluginError::new(
                ErrorKind::Config,
                "setting `thread_id` must be a UUID",
            ));
        }
        let upstream = Upstream::new(VENDOR, settings, Auth::header("x-api-key"))?;
        Ok(Self {
            upstream,
            workspaces,
            thread_id,
        })
    }

    fn put(&self, request: PutRequest) -> Result<PutResult, PluginError> {
        self.upload(Content::Spooled(&request))
    }

    fn put_stream(&self, request: StreamRequest, body: &mut Body<'_>) -> Result<PutResult, PluginError> {
        self.upload(Content::Arriving(&request, body))
    }

    fn delete(&self, _request: DeleteRequest) -> Result<(), PluginError> {
        Err(no_delete_api(VENDOR))
    }

    fn health(&self) -> Result<(), PluginError> {
        self.upstream.health()
    }
}

/// Keeps only `id` and `name` of a record's `user`.
fn strip_user(record: &mut Value) {
    if let Some(user) = record.get_mut("user").filter(|user| user.is_object()) {
        let kept: Map<String, Value> = ["id", "name"]
            .into_iter()
            .filter_map(|key| user.get(key).map(|value| (key.to_owned(), value.clone())))
            .collect();
        *user = Value::Object(kept);
    }
}

upgate_plugin_api::export_provider!(Beam, "beam");
