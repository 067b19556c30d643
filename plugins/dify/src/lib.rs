//! Provider plugin `dify`: forwards a stored upload to a Dify-style service API.
//!
//! Flow: the host hands over a [`PutRequest`] (the spooled file and its metadata), or, with
//! sync delivery, a [`StreamRequest`] and the upload's [`Body`] while it arrives
//! ([`FLAG_STREAMING`]); either streams as the `file` part of `POST {base_url}/files/upload`
//! (`base_url` like `https://api.dify.ai/v1`), with `Authorization: Bearer KEY` and the `user`
//! field (the request's `user` metadata, else the `user` setting, else `upgate`). Dify answers 201 with
//! the file record: its `id` becomes the remote id, and the first of `source_url`,
//! `preview_url`, `original_url` that is set becomes the URL. Dify has no delete API.
//!
//! Settings: the common upstream keys (see `upgate_upstream::UpstreamSettings`) and `user`.
#![deny(unsafe_code)]

use serde_json::Value;
use upgate_plugin_api::{
    Body, DeleteRequest, FLAG_STREAMING, InitContext, PluginError, Provider, PutRequest, PutResult,
    StreamRequest,
};
use upgate_upstream::{Auth, Content, Upstream, UpstreamSettings, metadata_value, no_delete_api};

const VENDOR: &str = "dify";

/// The dify provider: one pooled client, the default `user`.
#[derive(Debug)]
pub struct Dify {
    upstream: Upstream,
    user: String,
}

impl Dify {
    fn upload(&self, content: Content<'_, '_>) -> Result<PutResult, PluginError> {
        let default_user = self.user.clone();
        let fields = move |metadata: &upgate_upstream::Metadata| {
            let user = metadata_value(metadata, "user").unwrap_or(&default_user);
            Ok(vec![("user".to_owned(), user.to_owned())])
        };
        let reply = self
            .upstream
            .post_upload("upload", "/files/upload", &[], content, "file", fields)?;
        reply.into_put_result("", "id", &["source_url", "preview_url", "original_url"])
    }
}

impl Provider for Dify {
    const FLAGS: u32 = FLAG_STREAMING;

    fn init(context: &InitContext, settings: Value) -> Result<Self, PluginError> {
        let settings = UpstreamSettings::parse(context, settings, &["user"])?;
        let user = settings.string_or("user", "upgate")?;
        Ok(Self {
            upstream: Upstream::new(VENDOR, settings, Auth::bearer())?,
            user,
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

upgate_plugin_api::export_provider!(Dify, "dify");
