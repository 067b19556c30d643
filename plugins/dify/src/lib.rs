//! Provider plugin `dify`: forwards a stored upload to a Dify-style service API.
//!
//! Flow: the host hands over a [`PutRequest`] (the spooled file and its metadata); the file
//! streams from disk as the `file` part of `POST {base_url}/files/upload` (`base_url` like
//! `https://api.dify.ai/v1`), with `Authorization: Bearer KEY` and the `user` field (the
//! request's `user` metadata, else the `user` setting, else `upgate`). Dify answers 201 with
//! the file record: its `id` becomes the remote id, and the first of `source_url`,
//! `preview_url`, `original_url` that is set becomes the URL. Dify has no delete API.
//!
//! Settings: the common upstream keys (see `upgate_upstream::UpstreamSettings`) and `user`.
#![deny(unsafe_code)]

use serde_json::Value;
use upgate_plugin_api::{DeleteRequest, InitContext, PluginError, Provider, PutRequest, PutResult};
use upgate_upstream::{Auth, Upstream, UpstreamSettings, metadata_str, no_delete_api, upload_form};

const VENDOR: &str = "dify";

/// The dify provider: one pooled client, the default `user`.
#[derive(Debug)]
pub struct Dify {
    upstream: Upstream,
    user: String,
}

impl Provider for Dify {
    fn init(context: &InitContext, settings: Value) -> Result<Self, PluginError> {
        let settings = UpstreamSettings::parse(context, settings, &["user"])?;
        let user = settings.string_or("user", "upgate")?;
        Ok(Self {
            upstream: Upstream::new(VENDOR, settings, Auth::bearer())?,
            user,
        })
    }

    fn put(&self, request: PutRequest) -> Result<PutResult, PluginError> {
        let user = metadata_str(&request, "user").unwrap_or(&self.user);
        let form = upload_form(&request, "file")?.text("user", user);
        let reply = self
            .upstream
            .post_multipart("upload", "/files/upload", &[], form)?;
        reply.into_put_result("", "id", &["source_url", "preview_url", "original_url"])
    }

    fn delete(&self, _request: DeleteRequest) -> Result<(), PluginError> {
        Err(no_delete_api(VENDOR))
    }

    fn health(&self) -> Result<(), PluginError> {
        self.upstream.health()
    }
}

upgate_plugin_api::export_provider!(Dify, "dify");
