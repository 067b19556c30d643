//! Provider plugin `maiagent`: forwards a stored upload to MaiAgent's attachments API.
//!
//! Flow: the host hands over a [`PutRequest`]; the spooled file streams from disk as the
//! `file` part of `POST {base_url}/api/v1/attachments-upload/` with
//! `Authorization: Api-Key KEY`, its filename (non-ASCII included) byte for byte. MaiAgent
//! answers 201 `{id, type, filename, file}`: `id` becomes the remote id and `file` the URL.
//! MaiAgent has no delete API.
//!
//! Settings: the common upstream keys only (see `upgate_upstream::UpstreamSettings`).
#![deny(unsafe_code)]

use serde_json::Value;
use upgate_plugin_api::{DeleteRequest, InitContext, PluginError, Provider, PutRequest, PutResult};
use upgate_upstream::{Auth, Upstream, UpstreamSettings, no_delete_api, upload_form};

const VENDOR: &str = "maiagent";

/// The maiagent provider.
#[derive(Debug)]
pub struct Maiagent {
    upstream: Upstream,
}

impl Provider for Maiagent {
    fn init(context: &InitContext, settings: Value) -> Result<Self, PluginError> {
        let settings = UpstreamSettings::parse(context, settings, &[])?;
        Ok(Self {
            upstream: Upstream::new(VENDOR, settings, Auth::scheme("authorization", "Api-Key"))?,
        })
    }

    fn put(&self, request: PutRequest) -> Result<PutResult, PluginError> {
        let form = upload_form(&request, "file")?;
        let reply = self
            .upstream
            .post_multipart("upload", "/api/v1/attachments-upload/", &[], form)?;
        reply.into_put_result("", "id", &["file"])
    }

    fn delete(&self, _request: DeleteRequest) -> Result<(), PluginError> {
        Err(no_delete_api(VENDOR))
    }

    fn health(&self) -> Result<(), PluginError> {
        self.upstream.health()
    }
}

upgate_plugin_api::export_provider!(Maiagent, "maiagent");
