//! The model catalog (which provider serves a model, where, with which key, at what
//! price) and the [`Router`] that sends each request to its provider.
//!
//! The built-in catalog is `catalog.toml`, compiled in; a user file in the same format
//! overrides it entry by entry ([`Catalog::merge_toml`]).
//!
//! Model names, as in `--model` or a line's `model`:
//!
//! | name | meaning |
//! |---|---|
//! | `gpt-4.1-mini`, `claude-sonnet-4-5`, `gemini-2.5-flash` | a catalog entry (or one of its aliases) |
//! | `openai:NAME`, `anthropic:NAME`, `gemini:NAME` | that provider, whether or not the catalog knows NAME |
//! | `openai-compatible:NAME@URL` | an OpenAI-compatible server at base URL `URL` (no key is sent) |
//! | anything else | an OpenAI(-compatible) model at the OpenAI base URL |

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::cost::Price;
use crate::provider::ProviderKind;

/// The built-in catalog's TOML text.
pub const BUILTIN: &str = include_str!("catalog.toml");

/// A provider's defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderEntry {
    /// API base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_base: Option<String>,
    /// Environment variable holding the API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
}

/// One model of the catalog.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// Who serves it.
    pub provider: ProviderKind,
    /// Its own API base URL (an OpenAI-compatible host), else the provider's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_base: Option<String>,
    /// Its own key variable, else the provider's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
    /// USD per million input tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_per_mtok: Option<f64>,
    /// USD per million output tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_per_mtok: Option<f64>,
    /// USD per million cached input tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_per_mtok: Option<f64>,
    /// USD per million input tokens written to the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_per_mtok: Option<f64>,
    /// Context window, tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_window: Option<u64>,
    /// Most output tokens per request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
    /// Typical requests per minute of a new account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Typical tokens per minute of a new account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Typical input tokens per minute (Anthropic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub itpm: Option<u64>,
    /// Typical output tokens per minute (Anthropic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otpm: Option<u64>,
    /// Other names of the same model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

impl ModelEntry {
    /// Its prices, when both input and output prices are known.
    pub fn price(&self) -> Option<Price> {
        Some(Price {
            input_per_mtok: self.input_per_mtok?,
            output_per_mtok: self.output_per_mtok?,
            cached_input_per_mtok: self.cached_input_per_mtok,
            cache_write_per_mtok: self.cache_write_per_mtok,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    providers: BTreeMap<String, ProviderEntry>,
    #[serde(default)]
    models: BTreeMap<String, ModelEntry>,
}

/// A catalog file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("model catalog {origin}: {reason}")]
pub struct CatalogError {
    /// Which file (or `built-in`).
    pub origin: String,
    /// What is wrong, with the entry or line.
    pub reason: String,
}

/// Every known model and provider.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    /// Provider defaults.
    pub providers: BTreeMap<ProviderKind, ProviderEntry>,
    /// Models by name.
    pub models: BTreeMap<String, ModelEntry>,
    aliases: HashMap<String, String>,
}

impl Catalog {
    /// The built-in catalog.
    pub fn builtin() -> Catalog {
        let mut c = Catalog::default();
        c.merge_toml(BUILTIN, "built-in")
            .expect("the built-in catalog is valid (tested)");
        c
    }

    /// Adds the entries of a TOML catalog, replacing entries of the same name (a
    /// provider's fields are replaced one by one). `origin` names the file in errors.
    pub fn merge_toml(&mut self, text: &str, origin: &str) -> Result<(), CatalogError> {
        let err = |reason: String| CatalogError {
            origin: origin.to_string(),
            reason,
        };
        let file: CatalogFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        for (name, p) in file.providers {
            let kind = ProviderKind::parse(&name).ok_or_else(|| {
                err(format!(
                    "[providers.{name}]: unknown provider (expected openai, anthropic or gemini)"
                ))
            })?;
            let entry = self.providers.entry(kind).or_insert(ProviderEntry {
                api_base: None,
                key_env: None,
            });
            if p.api_base.is_some() {
                entry.api_base = p.api_base;
            }
            if p.key_env.is_some() {
                entry.key_env = p.key_env;
            }
        }
        for (name, m) in file.models {
            if let Some(p) = m.price() {
                p.validate()
                    .map_err(|r| err(format!("[models.\"{name}\"]: {r}")))?;
            } else if m.input_per_mtok.is_some() != m.output_per_mtok.is_some() {
                return Err(err(format!(
                    "[models.\"{name}\"]: give both input_per_mtok and output_per_mtok, or neither"
                )));
            }
            if name.contains(':') {
                return Err(err(format!(
                    "[models.\"{name}\"]: a model name cannot contain `:` (it separates the provider)"
                )));
            }
            for a in &m.aliases {
                self.aliases.insert(a.clone(), name.clone());
            }
            self.models.insert(name, m);
        }
        Ok(())
    }

    /// Adds the entries of a TOML file.
    pub fn merge_file(&mut self, path: &std::path::Path) -> Result<(), CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|e| CatalogError {
            origin: path.display().to_string(),
            reason: e.to_string(),
        })?;
        self.merge_toml(&text, &path.display().to_string())
    }

    /// The entry named `name` or having it as an alias.
    pub fn get(&self, name: &str) -> Option<(&str, &ModelEntry)> {
        let name = self.aliases.get(name).map_or(name, String::as_str);
        self.models
            .get_key_value(name)
            .map(|(k, v)| (k.as_str(), v))
    }

    /// The API base URL of `provider` (catalog, else the wire API's default).
    pub fn provider_base(&self, provider: ProviderKind) -> String {
        self.providers
            .get(&provider)
            .and_then(|p| p.api_base.clone())
            .unwrap_or_else(|| provider.api().default_base_url().to_string())
    }

    /// The key variable of `provider`.
    pub fn provider_key_env(&self, provider: ProviderKind) -> Option<String> {
        self.providers
            .get(&provider)
            .and_then(|p| p.key_env.clone())
    }
}

/// Where a model name leads.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelRef {
    /// The provider.
    pub provider: ProviderKind,
    /// The model's name as the provider knows it.
    pub model: String,
    /// The API base URL.
    pub base_url: String,
    /// The key variable (none for `openai-compatible:NAME@URL`).
    pub key_env: Option<String>,
    /// The catalog price, when known.
    pub price: Option<Price>,
}

impl Catalog {
    /// Reads a model name (see the module docs).
    pub fn resolve(&self, name: &str) -> Result<ModelRef, String> {
        let name = name.trim();
        if name.is_empty() {
            return Err("empty model name".into());
        }
        if let Some(rest) = name.strip_prefix("openai-compatible:") {
            let (model, url) = rest.rsplit_once('@').ok_or_else(|| {
                format!("{name:?}: write openai-compatible:NAME@URL, e.g. openai-compatible:llama3@http://localhost:11434/v1")
            })?;
            if model.is_empty() || !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "{name:?}: NAME must not be empty and URL must be an http:// or https:// base URL"
                ));
            }
            return Ok(ModelRef {
                provider: ProviderKind::OpenAi,
                model: model.to_string(),
                base_url: url.trim_end_matches('/').to_string(),
                key_env: None,
                price: self.get(model).and_then(|(_, e)| e.price()),
            });
        }
        let (explicit, model) = match name.split_once(':') {
            Some((p, m)) => match ProviderKind::parse(p) {
                Some(kind) if !m.is_empty() => (Some(kind), m),
                Some(_) => return Err(format!("{name:?}: no model name after the provider")),
                None => {
                    return Err(format!(
                        "{name:?}: unknown provider {p:?} (expected openai, anthropic, gemini or openai-compatible)"
                    ))
                }
            },
            None => (None, name),
        };
        let entry = self
            .get(model)
            .filter(|(_, e)| explicit.is_none_or(|k| k == e.provider));
        let provider = explicit
            .or(entry.map(|(_, e)| e.provider))
            .unwrap_or(ProviderKind::OpenAi);
        let base_url = entry
            .and_then(|(_, e)| e.api_base.clone())
            .unwrap_or_else(|| self.provider_base(provider));
        let key_env = entry
            .and_then(|(_, e)| e.key_env.clone())
            .or_else(|| self.provider_key_env(provider));
        Ok(ModelRef {
            provider,
            // A dated alias is sent as written; the catalog only lends its price.
            model: model.to_string(),
            base_url: base_url.trim_end_matches('/').to_string(),
            key_env,
            price: entry.and_then(|(_, e)| e.price()),
        })
    }
}

/// A target the router sends requests to: a provider at a base URL with a key variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    /// The provider.
    pub provider: ProviderKind,
    /// The base URL.
    pub base_url: String,
    /// The variable holding its key, if it takes one.
    pub key_env: Option<String>,
}

/// Where one request goes.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// Index into [`Router::targets`] (and the transport's targets).
    pub target: u16,
    /// The provider.
    pub provider: ProviderKind,
    /// The model name sent to the provider.
    pub model: String,
    /// Its price, when known.
    pub price: Option<Price>,
}

/// Settings that override the catalog for one run.
#[derive(Clone, Debug, Default)]
pub struct RouterOptions {
    /// Every target goes to this address instead (`--sim`: the simulator serves every wire
    /// API on one address, OpenAI and Anthropic below `/v1`, Gemini below `/v1beta`).
    /// Keys are not used.
    pub sim_origin: Option<String>,
    /// The OpenAI provider's base URL (`--base-url`).
    pub openai_base: Option<String>,
    /// The OpenAI provider's key variable (`--api-key-env`).
    pub openai_key_env: Option<String>,
}

/// Resolves model names to targets, numbering each distinct target the first time a
/// request needs it. Shared by the input reader and the run; the transport is built
/// from [`Router::targets`] once the input has been checked.
#[derive(Debug)]
pub struct Router {
    catalog: Catalog,
    options: RouterOptions,
    targets: Mutex<Vec<TargetSpec>>,
    routes: Mutex<rustc_hash::FxHashMap<String, Route>>,
}

impl Router {
    /// A router over `catalog` with `options`.
    pub fn new(catalog: Catalog, options: RouterOptions) -> Router {
        Router {
            catalog,
            options,
            targets: Mutex::new(Vec::new()),
            routes: Mutex::new(rustc_hash::FxHashMap::default()),
        }
    }

    /// The catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Every target routed to so far, by index.
    pub fn targets(&self) -> Vec<TargetSpec> {
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The names routed so far whose model has no known price, sorted.
    pub fn unpriced_models(&self) -> Vec<String> {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = routes
            .iter()
            .filter(|(_, r)| r.price.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
    }

    /// Where a request naming `model` goes.
    pub fn route(&self, model: &str) -> Result<Route, String> {
        if let Some(r) = self
            .routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
        {
            return Ok(r.clone());
        }
        let mut m = self.catalog.resolve(model)?;
        if m.provider == ProviderKind::OpenAi {
            if let Some(base) = &self.options.openai_base {
                if m.base_url == self.catalog.provider_base(ProviderKind::OpenAi) {
                    m.base_url = base.trim_end_matches('/').to_string();
                }
            }
            if let Some(env) = &self.options.openai_key_env {
                if m.key_env == self.catalog.provider_key_env(ProviderKind::OpenAi) {
                    m.key_env = Some(env.clone());
                }
            }
        }
        if let Some(origin) = &self.options.sim_origin {
            let origin = origin.trim_end_matches('/');
            m.base_url = match m.provider {
                ProviderKind::Gemini => format!("{origin}/v1beta"),
                _ => format!("{origin}/v1"),
            };
            m.key_env = None;
        }
        let spec = TargetSpec {
            provider: m.provider,
            base_url: m.base_url,
            key_env: m.key_env,
        };
        let target = {
            let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
            match targets.iter().position(|t| *t == spec) {
                Some(i) => i,
                None => {
                    targets.push(spec);
                    targets.len() - 1
                }
            }
        };
        let target = u16::try_from(target).map_err(|_| "more than 65536 distinct API targets")?;
        let route = Route {
            target,
            provider: m.provider,
            model: m.model,
            price: m.price,
        };
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(model.to_string(), route.clone());
        Ok(route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_parses_and_prices_every_current_model() {
        let c = Catalog::builtin();
        for name in [
            "gpt-4.1",
            "gpt-4.1-mini",
            "gpt-4.1-nano",
            "gpt-4o",
            "gpt-4o-mini",
            "o3",
            "o4-mini",
            "gpt-5",
            "gpt-5-mini",
            "gpt-5-nano",
            "claude-sonnet-4-5",
            "claude-opus-4-1",
            "claude-haiku-4-5",
            "claude-3-5-haiku-latest",
            "gemini-2.5-pro",
            "gemini-2.5-flash",
            "gemini-2.5-flash-lite",
        ] {
            let (_, e) = c.get(name).unwrap_or_else(|| panic!("{name} missing"));
            let p = e.price().unwrap_or_else(|| panic!("{name} has no price"));
            assert!(
                p.input_per_mtok > 0.0 && p.output_per_mtok > p.input_per_mtok,
                "{name}"
            );
            assert!(e.context_window.is_some(), "{name}");
        }
        assert_eq!(
            c.get("claude-haiku-4-5-20251001").unwrap().0,
            "claude-haiku-4-5"
        );
        assert_eq!(
            c.provider_key_env(ProviderKind::Gemini).as_deref(),
            Some("GEMINI_API_KEY")
        );
    }

    #[test]
    fn names_resolve_to_providers() {
        let c = Catalog::builtin();
        let r = c.resolve("claude-sonnet-4-5").unwrap();
        assert_eq!(r.provider, ProviderKind::Anthropic);
        assert_eq!(r.base_url, "https://api.anthropic.com/v1");
        assert_eq!(r.key_env.as_deref(), Some("ANTHROPIC_API_KEY"));
        assert_eq!(r.price.unwrap().output_per_mtok, 15.0);

        let r = c.resolve("gemini:gemini-3-preview").unwrap();
        assert_eq!(
            (r.provider, r.model.as_str()),
            (ProviderKind::Gemini, "gemini-3-preview")
        );
        assert_eq!(r.price, None, "unknown model: unknown price");

        let r = c
            .resolve("openai-compatible:llama3@http://localhost:11434/v1/")
            .unwrap();
        assert_eq!(r.provider, ProviderKind::OpenAi);
        assert_eq!(r.base_url, "http://localhost:11434/v1");
        assert_eq!(
            (r.model.as_str(), r.key_env),
            ("llama3", None),
            "no key to a foreign host"
        );

        let r = c.resolve("my-finetune").unwrap();
        assert_eq!(r.provider, ProviderKind::OpenAi);
        assert_eq!(r.base_url, "https://api.openai.com/v1");

        for bad in [
            "",
            "mistral:large",
            "anthropic:",
            "openai-compatible:x",
            "openai-compatible:x@ftp://h",
        ] {
            assert!(c.resolve(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_user_file_overrides_and_adds() {
        let mut c = Catalog::builtin();
        c.merge_toml(
            r#"
            [providers.openai]
            key_env = "MY_OPENAI_KEY"
            [models."gpt-4.1-mini"]
            provider = "openai"
            input_per_mtok = 1.0
            output_per_mtok = 2.0
            [models."llama-3.3-70b"]
            provider = "openai"
            api_base = "https://api.groq.example/openai/v1"
            key_env = "GROQ_API_KEY"
            "#,
            "user.toml",
        )
        .unwrap();
        assert_eq!(c.get("gpt-4.1-mini").unwrap().1.input_per_mtok, Some(1.0));
        assert_eq!(
            c.providers[&ProviderKind::OpenAi].api_base.as_deref(),
            Some("https://api.openai.com/v1")
        );
        let r = c.resolve("gpt-4o").unwrap();
        assert_eq!(r.key_env.as_deref(), Some("MY_OPENAI_KEY"));
        let r = c.resolve("llama-3.3-70b").unwrap();
        assert_eq!(r.base_url, "https://api.groq.example/openai/v1");
        assert_eq!(r.price, None);

        for (text, needle) in [
            ("[models.x]\nprovider = \"mistral\"", "provider"),
            (
                "[models.x]\nprovider = \"openai\"\ninput_per_mtok = 1.0",
                "both",
            ),
            (
                "[models.x]\nprovider = \"openai\"\ninput_per_mtok = -1.0\noutput_per_mtok = 1.0",
                "non-negative",
            ),
            ("[models.x]\nprovider = \"openai\"\nprice = 3", "price"),
            (
                "[providers.mistral]\napi_base = \"http://x\"",
                "unknown provider",
            ),
        ] {
            let e = c.clone().merge_toml(text, "bad.toml").unwrap_err();
            assert!(
                e.to_string().contains(needle) && e.to_string().contains("bad.toml"),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn router_numbers_targets_and_applies_overrides() {
        let router = Router::new(
            Catalog::builtin(),
            RouterOptions {
                openai_base: Some("http://127.0.0.1:9/v1".into()),
                openai_key_env: Some("OTHER_KEY".into()),
                ..RouterOptions::default()
            },
        );
        let a = router.route("gpt-4.1-mini").unwrap();
        let b = router.route("claude-haiku-4-5").unwrap();
        let c = router.route("gpt-4o").unwrap();
        assert_eq!((a.target, b.target, c.target), (0, 1, 0));
        let t = router.targets();
        assert_eq!(t[0].base_url, "http://127.0.0.1:9/v1");
        assert_eq!(t[0].key_env.as_deref(), Some("OTHER_KEY"));
        assert_eq!(t[1].key_env.as_deref(), Some("ANTHROPIC_API_KEY"));

        let sim = Router::new(
            Catalog::builtin(),
            RouterOptions {
                sim_origin: Some("http://127.0.0.1:5".into()),
                ..RouterOptions::default()
            },
        );
        for (m, base) in [
            ("gemini-2.5-flash", "http://127.0.0.1:5/v1beta"),
            ("claude-sonnet-4-5", "http://127.0.0.1:5/v1"),
            ("gpt-4.1", "http://127.0.0.1:5/v1"),
        ] {
            let r = sim.route(m).unwrap();
            let t = &sim.targets()[usize::from(r.target)];
            assert_eq!(
                (t.base_url.as_str(), t.key_env.as_deref()),
                (base, None),
                "{m}"
            );
        }
        assert_eq!(sim.targets().len(), 3, "one target per provider");
    }
}
