//! Upstream scopes a client may choose: the Kore XO app and environment of the dialect's path,
//! the Beam workspace of its header. The operator's upstream key works wherever its account
//! reaches, so a tenant's client must not pick any scope it likes: a provider writes to the
//! configured scope, or to one its operator listed.
//!
//! What flows through here: a list setting (`allowed_app_ids: [app-1, app-2]`, `"*"` for any)
//! read once at `init`, and per upload the client's value (from the upload's metadata), which
//! comes back as the scope to use or as a [`ErrorKind::Rejected`] 404 naming it.

use upgate_plugin_api::{ErrorKind, PluginError};

use crate::UpstreamSettings;

/// The values of one scope an upload may be sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedScope {
    /// What the scope is called in messages (`app`, `workspace`).
    what: &'static str,
    /// The value used when the client names none; always allowed.
    configured: Option<String>,
    /// Listed values beside the configured one.
    listed: Vec<String>,
    /// `"*"` was listed.
    any: bool,
}

impl AllowedScope {
    /// Reads list setting `key` (strings; `"*"` allows any value). Absent, only `configured`
    /// is allowed, or, when nothing is configured either, any value: the operator then left
    /// the choice to the clients.
    pub fn from_settings(
        settings: &UpstreamSettings,
        key: &str,
        what: &'static str,
        configured: Option<String>,
        valid: fn(&str) -> bool,
    ) -> Result<Self, PluginError> {
        let listed = settings.string_list(key)?;
        if let Some(bad) = listed.iter().find(|value| *value != "*" && !valid(value)) {
            return Err(PluginError::new(
                ErrorKind::Config,
                format!("setting `{key}`: `{bad}` is not a valid {what}"),
            ));
        }
        let any = listed.iter().any(|value| value == "*") || (listed.is_empty() && configured.is_none());
        Ok(Self {
            what,
            configured,
            listed: listed.into_iter().filter(|value| value != "*").collect(),
            any,
        })
    }

    /// The scope of an upload whose client asked for `requested`: that value when it is
    /// allowed, the configured one when the client asked for none; a value not allowed is
    /// refused (404: to the client, a scope this gateway does not serve), and so is no value
    /// at all when none is configured.
    pub fn choose<'a>(&'a self, requested: Option<&'a str>) -> Result<&'a str, PluginError> {
        match requested {
            Some(value)
                if self.any
                    || self.configured.as_deref() == Some(value)
                    || self.listed.iter().any(|listed| listed == value) =>
            {
                Ok(value)
            }
            Some(value) => {
                let mut error = PluginError::new(
                    ErrorKind::Rejected,
                    format!("{} `{value}` is not served by this gateway", self.what),
                );
                error.status = Some(404);
                Err(error)
            }
            None => self
                .configured
                .as_deref()
                .ok_or_else(|| PluginError::new(ErrorKind::Rejected, format!("no {} was given", self.what))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::is_path_segment;
    use serde_json::Value;
    use upgate_plugin_api::InitContext;

    fn settings(extra: Value) -> UpstreamSettings {
        let mut map = serde_json::json!({"base_url": "http://127.0.0.1:1", "api_key": "k"});
        map.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        UpstreamSettings::parse(&InitContext::default(), map, &["allowed"]).unwrap()
    }

    fn allowed(extra: Value, configured: Option<&str>) -> Result<AllowedScope, PluginError> {
        AllowedScope::from_settings(
            &settings(extra),
            "allowed",
            "app",
            configured.map(str::to_owned),
            is_path_segment,
        )
    }

    #[test]
    fn only_the_configured_scope_unless_others_are_listed() {
        let scope = allowed(serde_json::json!({}), Some("app-1")).unwrap();
        assert_eq!(scope.choose(None).unwrap(), "app-1");
        assert_eq!(scope.choose(Some("app-1")).unwrap(), "app-1");
        let refused = scope.choose(Some("app-2")).unwrap_err();
        assert_eq!((refused.kind, refused.status), (ErrorKind::Rejected, Some(404)));
        assert!(refused.message.contains("app `app-2`"), "{}", refused.message);

        let scope = allowed(serde_json::json!({"allowed": ["app-2"]}), Some("app-1")).unwrap();
        assert_eq!(scope.choose(Some("app-2")).unwrap(), "app-2");
        assert!(scope.choose(Some("app-3")).is_err());
        let scope = allowed(serde_json::json!({"allowed": ["*"]}), Some("app-1")).unwrap();
        assert_eq!(scope.choose(Some("app-3")).unwrap(), "app-3");
    }

    #[test]
    fn nothing_configured_leaves_the_choice_to_the_client_unless_listed() {
        let scope = allowed(serde_json::json!({}), None).unwrap();
        assert_eq!(scope.choose(Some("ws-9")).unwrap(), "ws-9");
        assert_eq!(scope.choose(None).unwrap_err().kind, ErrorKind::Rejected);
        let scope = allowed(serde_json::json!({"allowed": ["ws-1"]}), None).unwrap();
        assert_eq!(scope.choose(Some("ws-1")).unwrap(), "ws-1");
        assert!(scope.choose(Some("ws-9")).is_err());
    }

    #[test]
    fn a_bad_list_is_a_config_error() {
        for extra in [
            serde_json::json!({"allowed": "app-1"}),
            serde_json::json!({"allowed": [1]}),
            serde_json::json!({"allowed": [""]}),
            serde_json::json!({"allowed": ["../x"]}),
        ] {
            let error = allowed(extra.clone(), Some("app-1")).unwrap_err();
            assert_eq!(error.kind, ErrorKind::Config, "{extra}");
        }
    }
}
