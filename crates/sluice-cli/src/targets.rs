//! The model catalog as the CLI loads it, and the transport to the targets the input's
//! models were routed to, each with its own key.

use std::path::{Path, PathBuf};

use sluice::catalog::{Catalog, Router};
use sluice::provider::http::{HttpTransport, TargetConfig};

/// The user's catalog file, when there is one: `$XDG_CONFIG_HOME/sluice/models.toml`, else
/// `~/.config/sluice/models.toml`.
fn default_user_file() -> Option<PathBuf> {
    let dir = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(dir.join("sluice/models.toml")).filter(|p| p.is_file())
}

/// The built-in catalog, overridden by the user's file and then by `--model-config`.
pub fn load_catalog(model_config: Option<&Path>) -> Result<Catalog, String> {
    let mut catalog = Catalog::builtin();
    if let Some(p) = default_user_file() {
        catalog.merge_file(&p).map_err(|e| e.to_string())?;
    }
    if let Some(p) = model_config {
        catalog.merge_file(p).map_err(|e| e.to_string())?;
    }
    Ok(catalog)
}

/// One HTTP transport to every target the router handed out. A target's key comes from
/// its variable; without one, a target at its provider's own API is an error (naming the
/// variable), while a local or compatible server is sent no key. With `sim`, no keys.
pub fn transport(router: &Router, sim: bool, max_idle: usize) -> Result<HttpTransport, String> {
    let mut configs = Vec::new();
    for t in router.targets() {
        let key = match (&t.key_env, sim) {
            (_, true) | (None, _) => None,
            (Some(var), false) => match std::env::var(var) {
                Ok(k) if !k.trim().is_empty() => Some(k.trim().to_string()),
                _ if t.base_url != router.catalog().provider_base(t.provider) => None,
                _ => {
                    return Err(format!(
                        "no API key for {} ({}): set {var}{}, or use --sim to run against the built-in simulator",
                        t.provider,
                        t.base_url,
                        if t.provider == sluice::ProviderKind::OpenAi {
                            " (or name another variable with --api-key-env)"
                        } else {
                            ""
                        }
                    ))
                }
            },
        };
        configs.push(TargetConfig {
            provider: t.provider,
            base_url: t.base_url,
            api_key: key,
        });
    }
    HttpTransport::with_targets(&configs, max_idle).map_err(|e| e.to_string())
}
