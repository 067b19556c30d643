//! Provider plugin `korexo`: forwards a stored upload to the Kore.ai XO platform's v2
//! attachments API, and deletes it there.
//!
//! Flow: the host hands over a [`PutRequest`] (the spooled file), or a [`StreamRequest`] and
//! the upload's [`Body`] while it arrives ([`FLAG_STREAMING`]); it streams as the
//! `file` part of `POST {base_url}/api/v2/apps/{appId}/environments/{envName}/attachments/upload`
//! with `x-api-key: KEY`, `userReference` and `uploadType=runtime`. Korexo answers 200
//! `{fileId, filePath, ...}`: `fileId` (`f-<uuid>`) becomes the remote id, `filePath` the URL.
//! `delete` sends `DELETE .../attachments/{fileId}` for the configured app and environment.
//!
//! `appId` and `envName` come from the request's metadata when the upload came through the
//! Kore XO dialect (its path) and they are valid (`[A-Za-z0-9._-]+`), else from the `app_id`
//! and `env_name` settings (another dialect's metadata, a tus client's, never chooses); a
//! client's app or environment other than the configured ones must be listed in
//! `allowed_app_ids` / `allowed_env_names` (`"*"`: any), else the upload is refused (404),
//! since the operator's key would write there. `userReference` comes from the metadata, else
//! the `user_reference` setting, else `upgate`.
//!
//! Settings: the common upstream keys (see `upgate_upstream::UpstreamSettings`), `app_id`
//! and `env_name` (required), `allowed_app_ids`, `allowed_env_names`, `user_reference`.
#![deny(unsafe_code)]

use serde_json::Value;
use upgate_plugin_api::{
    Body, DeleteRequest, ErrorKind, FLAG_STREAMING, InitContext, PluginError, Provider, PutRequest,
    PutResult, StreamRequest,
};
use upgate_upstream::{
    AllowedScope, Auth, Content, Upstream, UpstreamSettings, is_path_segment, metadata_value,
};

const VENDOR: &str = "korexo";
/// The inbound dialect whose metadata (its path's `appId`, `envName`) chooses the scope.
const DIALECT: &str = "korexo";

/// The korexo provider.
#[derive(Debug)]
pub struct Korexo {
    upstream: Upstream,
    app_id: String,
    env_name: String,
    /// The apps and environments a client may name.
    allowed_apps: AllowedScope,
    allowed_envs: AllowedScope,
    user_reference: String,
}

fn path_setting(settings: &UpstreamSettings, key: &str) -> Result<String, PluginError> {
    let value = settings.required_string(key)?;
    if !is_path_segment(&value) {
        return Err(PluginError::new(
            ErrorKind::Config,
            format!("setting `{key}` must match [A-Za-z0-9._-]+"),
        ));
    }
    Ok(value)
}

impl Provider for Korexo {
    const FLAGS: u32 = FLAG_STREAMING;

    fn init(context: &InitContext, settings: Value) -> Result<Self, PluginError> {
        let settings = UpstreamSettings::parse(
            context,
            settings,
            &[
                "app_id",
                "env_name",
                "allowed_app_ids",
                "allowed_env_names",
                "user_reference",
            ],
        )?;
        let app_id = path_setting(&settings, "app_id")?;
        let env_name = path_setting(&settings, "env_name")?;
        let allowed = |key, what, configured: &str| {
            AllowedScope::from_settings(&settings, key, what, Some(configured.to_owned()), is_path_segment)
        };
        let allowed_apps = allowed("allowed_app_ids", "app", &app_id)?;
        let allowed_envs = allowed("allowed_env_names", "environment", &env_name)?;
        let user_reference = settings.string_or("user_reference", "upgate")?;
        let upstream = Upstream::new(VENDOR, settings, Auth::header("x-api-key"))?.deleting_late_uploads();
        Ok(Self {
            upstream,
            app_id,
            env_name,
            allowed_apps,
            allowed_envs,
            user_reference,
        })
    }

    fn put(&self, request: PutRequest) -> Result<PutResult, PluginError> {
        self.upload(Content::Spooled(&request))
    }

    fn put_stream(&self, request: StreamRequest, body: &mut Body<'_>) -> Result<PutResult, PluginError> {
        self.upload(Content::Arriving(&request, body))
    }

    fn delete(&self, request: DeleteRequest) -> Result<(), PluginError> {
        let file_id = request.remote_id.as_str();
        if file_id.is_empty()
            || file_id.len() > 100
            || !file_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(PluginError::new(
                ErrorKind::Rejected,
                "korexo delete: remote id is not a korexo file id",
            ));
        }
        // Where the upload was put: its own app and environment when the client named them.
        let (app_id, env_name) = self.scope(&request.dialect, &request.metadata);
        let path = format!("{}/{file_id}", attachments_path(app_id, env_name));
        self.upstream.delete("delete", &path, &[])?;
        Ok(())
    }

    fn health(&self) -> Result<(), PluginError> {
        self.upstream.health()
    }
}

impl Korexo {
    /// The app and environment come from the dialect's path (known before the body); the
    /// user reference may come after the file part.
    fn upload(&self, content: Content<'_, '_>) -> Result<PutResult, PluginError> {
        let (app_id, env_name) = self.scope(content.dialect(), content.metadata());
        let app_id = self.allowed_apps.choose(Some(app_id))?;
        let env_name = self.allowed_envs.choose(Some(env_name))?;
        let path = format!("{}/upload", attachments_path(app_id, env_name));
        let default_reference = self.user_reference.clone();
        let fields = move |metadata: &upgate_upstream::Metadata| {
            let user_reference = metadata_value(metadata, "userReference").unwrap_or(&default_reference);
            Ok(vec![
                ("userReference".to_owned(), user_reference.to_owned()),
                ("uploadType".to_owned(), "runtime".to_owned()),
            ])
        };
        let reply = self
            .upstream
            .post_upload("upload", &path, &[], content, "file", fields)?;
        reply.into_put_result("", "fileId", &["filePath"])
    }

    /// The app and environment for an upload: the client's (Kore XO dialect metadata), when
    /// it came through that dialect and they are valid path segments, else the configured
    /// ones. An upload checks them against the
    /// allowed ones; a delete goes where its upload went.
    fn scope<'a>(
        &'a self,
        dialect: &str,
        metadata: &'a serde_json::Map<String, Value>,
    ) -> (&'a str, &'a str) {
        let from_path = dialect == DIALECT;
        let scoped = |key: &str, fallback: &'a str| -> &'a str {
            metadata_value(metadata, key)
                .filter(|value| from_path && is_path_segment(value))
                .unwrap_or(fallback)
        };
        (scoped("appId", &self.app_id), scoped("envName", &self.env_name))
    }
}

fn attachments_path(app_id: &str, env_name: &str) -> String {
    format!("/api/v2/apps/{app_id}/environments/{env_name}/attachments")
}

upgate_plugin_api::export_provider!(Korexo, "korexo");
