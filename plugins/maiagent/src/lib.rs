//! Provider plugin `maiagent`: forwards a stored upload to MaiAgent's attachments API.
//!
//! Flow: the host hands over a [`PutRequest`] (the spooled file), or a [`StreamRequest`] and
//! the upload's [`Body`] while it arrives ([`FLAG_STREAMING`]); it streams as the
//! `file` part of `POST {base_url}/api/v1/attachments-upload/` with
//! `Authorization: Api-Key KEY`, its filename (non-ASCII included) byte for byte. MaiAgent
//! answers 201 `{id, type, filename, file}`: `id` becomes the remote id and `file` the URL.
//! MaiAgent has no delete API.
//!
//! Settings: the common upstream keys only (see `upgate_upstream::UpstreamSettings`).
#![deny(unsafe_code)]

use serde_json::Value;
use upgate_plugin_api::{
    Body, DeleteRequest, FLAG_STREAMING, InitContext, PluginError, Provider, PutRequest, PutResult,
    StreamRequest,
};
use upgate_upstream::{Auth, Content, Upstream, UpstreamSettings, no_delete_api};

const VENDOR: &str = "maiagent";

/// The maiagent provider.
#[derive(Debug)]
pub struct Maiagent {
    upstream: Upstream,
}

impl Maiagent {
    fn upload(&self, content: Content<'_, '_>) -> Result<PutResult, PluginError> {
        let reply = self.upstream.post_upload(
            "upload",
            "/api/v1/attachments-upload/",
            &[],
            content,
            "file",
            |_| Ok(Vec::new()),
        )?;
        reply.into_put_result("", "id", &["file"])
    }
}

impl Provider for Maiagent {
    const FLAGS: u32 = FLAG_STREAMING;

    fn init(context: &InitContext, settings: Value) -> Result<Self, PluginError> {
        let settings = UpstreamSettings::parse(context, settings, &[])?;
        Ok(Self {
            upstream: Upstream::new(VENDOR, settings, Auth::scheme("authorization", "Api-Key"))?,
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

upgate_plugin_api::export_provider!(Maiagent, "maiagent");
