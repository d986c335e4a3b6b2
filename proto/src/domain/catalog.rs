//! The catalog: a model name people type (`qwen3-coder-30b`) mapped to the
//! file agents report (`model_id`), with the settings placement starts from
//! and the editor modes it serves. Stored as JSON under `/halo/v1/catalog/`.

use super::CacheType;
use super::instance::{cache_name_from_wire, cache_name_to_wire};
use crate::ConversionError;
use crate::v1;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// An editor mode a model serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EditorMode {
    /// Questions about code.
    Ask,
    /// Edits.
    Code,
    /// Inline completion.
    Autocomplete,
    /// Planning across files.
    Architect,
    /// Finding bugs.
    Debug,
}

impl EditorMode {
    /// Every mode.
    pub const ALL: [EditorMode; 5] = [
        EditorMode::Ask,
        EditorMode::Code,
        EditorMode::Autocomplete,
        EditorMode::Architect,
        EditorMode::Debug,
    ];

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            EditorMode::Ask => "ask",
            EditorMode::Code => "code",
            EditorMode::Autocomplete => "autocomplete",
            EditorMode::Architect => "architect",
            EditorMode::Debug => "debug",
        }
    }
}

impl EditorMode {
    /// The mode a wire value names; `None` for unspecified or a value
    /// outside the enum.
    pub fn from_wire(v: i32) -> Option<EditorMode> {
        v1::EditorMode::try_from(v).ok()?.try_into().ok()
    }
}

impl fmt::Display for EditorMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EditorMode {
    type Err = ConversionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EditorMode::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| ConversionError::Invalid {
                field: "modes",
                reason: format!(
                    "unknown editor mode `{s}` (ask, code, autocomplete, architect, debug)"
                ),
            })
    }
}

impl From<EditorMode> for v1::EditorMode {
    fn from(m: EditorMode) -> Self {
        match m {
            EditorMode::Ask => v1::EditorMode::Ask,
            EditorMode::Code => v1::EditorMode::Code,
            EditorMode::Autocomplete => v1::EditorMode::Autocomplete,
            EditorMode::Architect => v1::EditorMode::Architect,
            EditorMode::Debug => v1::EditorMode::Debug,
        }
    }
}

impl TryFrom<v1::EditorMode> for EditorMode {
    type Error = ConversionError;

    fn try_from(m: v1::EditorMode) -> Result<Self, Self::Error> {
        Ok(match m {
            v1::EditorMode::Ask => EditorMode::Ask,
            v1::EditorMode::Code => EditorMode::Code,
            v1::EditorMode::Autocomplete => EditorMode::Autocomplete,
            v1::EditorMode::Architect => EditorMode::Architect,
            v1::EditorMode::Debug => EditorMode::Debug,
            v1::EditorMode::Unspecified => return Err(ConversionError::Missing("modes")),
        })
    }
}

/// Default context when an entry names none.
pub const DEFAULT_CONTEXT: u32 = 8192;
/// Default smallest context placement falls back to.
pub const DEFAULT_MIN_CONTEXT: u32 = 2048;

/// One catalog entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    /// The name people type, e.g. `qwen3-coder-30b`.
    pub name: String,
    /// The file's id as agents report it (path relative to a model dir).
    pub model_id: String,
    /// Context placement asks for when the request names none.
    #[serde(default = "default_context")]
    pub default_context: u32,
    /// Smallest context placement falls back to.
    #[serde(default = "default_min_context")]
    pub min_context: u32,
    /// `-ctk` (llama.cpp name).
    #[serde(default = "f16")]
    pub cache_type_k: String,
    /// `-ctv` (llama.cpp name).
    #[serde(default = "f16")]
    pub cache_type_v: String,
    /// Names from the agents' extra-flag allow-list.
    #[serde(default)]
    pub extra_flags: Vec<String>,
    /// Higher wins; eviction removes only lower-priority placements.
    #[serde(default)]
    pub priority: i32,
    /// Editor modes served.
    #[serde(default)]
    pub modes: Vec<EditorMode>,
    /// llama-server slots (`-np`).
    #[serde(default = "one")]
    pub parallel: u32,
    /// Placement may split the model across nodes (llama.cpp RPC) when no
    /// single node fits it.
    #[serde(default)]
    pub allow_split: bool,
    /// Contexts above the model's trained context are allowed (llama.cpp
    /// extends it with RoPE scaling, often at a cost in quality).
    #[serde(default)]
    pub allow_context_over_trained: bool,
    /// Loaded when a request through a gateway names it (or a mode it
    /// serves) and unloaded after `idle_unload_secs` without one.
    #[serde(default)]
    pub on_demand: bool,
    /// Seconds without a request after which an on-demand placement is
    /// unplaced.
    #[serde(default = "default_idle_unload")]
    pub idle_unload_secs: u64,
    /// Seconds an on-demand placement stays at least, unless a higher
    /// priority needs the room.
    #[serde(default = "default_min_resident")]
    pub min_resident_secs: u64,
    /// Role of the nodes an on-demand load places it on (empty: any node
    /// holding the file).
    #[serde(default)]
    pub role: String,
    /// Placement may choose a node of the role that has the memory but
    /// lacks the file, when a live node holds it: the file is copied there
    /// before the replica starts (nodes holding it are preferred).
    #[serde(default)]
    pub copy_if_missing: bool,
}

/// Default `idle_unload_secs`: 15 minutes.
pub const DEFAULT_IDLE_UNLOAD_SECS: u64 = 900;
/// Default `min_resident_secs`: 2 minutes.
pub const DEFAULT_MIN_RESIDENT_SECS: u64 = 120;

fn default_idle_unload() -> u64 {
    DEFAULT_IDLE_UNLOAD_SECS
}
fn default_min_resident() -> u64 {
    DEFAULT_MIN_RESIDENT_SECS
}

fn default_context() -> u32 {
    DEFAULT_CONTEXT
}
fn default_min_context() -> u32 {
    DEFAULT_MIN_CONTEXT
}
fn f16() -> String {
    "f16".to_owned()
}
fn one() -> u32 {
    1
}

impl CatalogEntry {
    /// An entry with defaults for everything but the two names.
    pub fn new(name: &str, model_id: &str) -> CatalogEntry {
        CatalogEntry {
            name: name.to_owned(),
            model_id: model_id.to_owned(),
            default_context: DEFAULT_CONTEXT,
            min_context: DEFAULT_MIN_CONTEXT,
            cache_type_k: f16(),
            cache_type_v: f16(),
            extra_flags: Vec::new(),
            priority: 0,
            modes: Vec::new(),
            parallel: 1,
            allow_split: false,
            allow_context_over_trained: false,
            on_demand: false,
            idle_unload_secs: DEFAULT_IDLE_UNLOAD_SECS,
            min_resident_secs: DEFAULT_MIN_RESIDENT_SECS,
            role: String::new(),
            copy_if_missing: false,
        }
    }

    /// Checks names, ranges and cache types; the reason names the field.
    pub fn validate(&self) -> Result<(), ConversionError> {
        check_name("name", &self.name)?;
        // The same check agents make: an id that could leave a model
        // directory never reaches the store (or a start request).
        if let Err(reason) = crate::domain::check_model_id(&self.model_id) {
            return Err(ConversionError::Invalid {
                field: "model_id",
                reason: format!(
                    "`{}` {reason}",
                    crate::domain::model::shown_id(&self.model_id)
                ),
            });
        }
        if self.default_context == 0 || self.min_context == 0 {
            return Err(ConversionError::Invalid {
                field: "default_context",
                reason: "contexts must be at least 1".into(),
            });
        }
        if self.min_context > self.default_context {
            return Err(ConversionError::Invalid {
                field: "min_context",
                reason: format!(
                    "{} is above default_context {}",
                    self.min_context, self.default_context
                ),
            });
        }
        for (field, t) in [
            ("cache_type_k", &self.cache_type_k),
            ("cache_type_v", &self.cache_type_v),
        ] {
            if t.parse::<CacheType>().is_err() {
                return Err(ConversionError::Invalid {
                    field,
                    reason: format!("unknown cache type `{t}`"),
                });
            }
        }
        if self.parallel == 0 || self.parallel > 256 {
            return Err(ConversionError::Invalid {
                field: "parallel",
                reason: "must be 1-256".into(),
            });
        }
        Ok(())
    }
}

/// Checks a name used in keys and request ids: 1-63 of `a-z 0-9 . _ -`,
/// starting with a letter or digit.
pub fn check_name(field: &'static str, name: &str) -> Result<(), ConversionError> {
    if is_name(name) {
        return Ok(());
    }
    // Names are lower case: `Tiny` or `Qwen3 Coder` most likely meant the
    // lower-case, dashed spelling.
    let guess = name.trim().to_ascii_lowercase().replace(' ', "-");
    let hint = if is_name(&guess) {
        format!("; did you mean `{guess}`?")
    } else {
        String::new()
    };
    Err(ConversionError::Invalid {
        field,
        reason: format!(
            "`{}` is not 1-63 of a-z 0-9 . _ - starting with a letter or digit{hint}",
            crate::domain::model::shown_id(name)
        ),
    })
}

fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

impl From<CatalogEntry> for v1::CatalogEntry {
    fn from(e: CatalogEntry) -> Self {
        v1::CatalogEntry {
            name: e.name,
            model_id: e.model_id,
            default_context: e.default_context,
            cache_type_k: cache_name_to_wire(&e.cache_type_k),
            cache_type_v: cache_name_to_wire(&e.cache_type_v),
            extra_flags: e.extra_flags,
            priority: e.priority,
            modes: e
                .modes
                .into_iter()
                .map(|m| v1::EditorMode::from(m) as i32)
                .collect(),
            nodes: Vec::new(),
            copies: Vec::new(),
            params: None,
            file_size_bytes: 0,
            min_context: e.min_context,
            parallel: e.parallel,
            allow_split: e.allow_split,
            allow_context_over_trained: e.allow_context_over_trained,
            on_demand: e.on_demand,
            idle_unload_secs: e.idle_unload_secs,
            min_resident_secs: e.min_resident_secs,
            role: e.role,
            copy_if_missing: e.copy_if_missing,
        }
    }
}

impl TryFrom<v1::CatalogEntry> for CatalogEntry {
    type Error = ConversionError;

    fn try_from(e: v1::CatalogEntry) -> Result<Self, Self::Error> {
        let modes = e
            .modes
            .iter()
            .map(|&m| {
                v1::EditorMode::try_from(m)
                    .map_err(|_| ConversionError::Invalid {
                        field: "modes",
                        reason: format!("unknown editor mode {m}"),
                    })
                    .and_then(EditorMode::try_from)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let entry = CatalogEntry {
            name: e.name,
            model_id: e.model_id,
            default_context: if e.default_context == 0 {
                DEFAULT_CONTEXT
            } else {
                e.default_context
            },
            min_context: if e.min_context == 0 {
                DEFAULT_MIN_CONTEXT.min(e.default_context.max(1))
            } else {
                e.min_context
            },
            cache_type_k: cache_name_from_wire("cache_type_k", e.cache_type_k)?,
            cache_type_v: cache_name_from_wire("cache_type_v", e.cache_type_v)?,
            extra_flags: e.extra_flags,
            priority: e.priority,
            modes,
            parallel: e.parallel.max(1),
            allow_split: e.allow_split,
            allow_context_over_trained: e.allow_context_over_trained,
            on_demand: e.on_demand,
            idle_unload_secs: if e.idle_unload_secs == 0 {
                DEFAULT_IDLE_UNLOAD_SECS
            } else {
                e.idle_unload_secs
            },
            min_resident_secs: if e.min_resident_secs == 0 {
                DEFAULT_MIN_RESIDENT_SECS
            } else {
                e.min_resident_secs
            },
            role: e.role,
            copy_if_missing: e.copy_if_missing,
        };
        entry.validate()?;
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_in_capitals_or_with_spaces_is_refused_with_the_spelling_that_works() {
        let e = check_name("model", "Tiny")
            .expect_err("capitals")
            .to_string();
        assert!(e.contains("did you mean `tiny`?"), "{e}");
        let e = check_name("model", "Qwen3 Coder")
            .expect_err("space")
            .to_string();
        assert!(e.contains("did you mean `qwen3-coder`?"), "{e}");
        let e = check_name("model", "../x").expect_err("path").to_string();
        assert!(
            !e.contains("did you mean"),
            "no guess for what cannot be a name: {e}"
        );
        assert!(check_name("model", "tiny").is_ok());
    }

    #[test]
    fn catalog_entry_survives_the_wire() {
        let mut e = CatalogEntry::new("qwen3-coder-30b", "qwen3/coder.gguf");
        e.cache_type_k = "q8_0".into();
        e.modes = vec![EditorMode::Code, EditorMode::Ask];
        e.priority = 5;
        let back = CatalogEntry::try_from(v1::CatalogEntry::from(e.clone()));
        assert_eq!(back, Ok(e));
    }

    #[test]
    fn editor_modes_from_the_wire_are_none_when_unspecified_or_unknown() {
        for m in EditorMode::ALL {
            assert_eq!(
                EditorMode::from_wire(v1::EditorMode::from(m) as i32),
                Some(m)
            );
        }
        assert_eq!(EditorMode::from_wire(0), None);
        assert_eq!(EditorMode::from_wire(99), None);
    }

    #[test]
    fn names_with_upper_case_or_slashes_are_refused() {
        assert!(check_name("name", "gpt-oss-20b").is_ok());
        assert!(check_name("name", "GPT").is_err());
        assert!(check_name("name", "a/b").is_err());
        assert!(check_name("name", "").is_err());
        assert!(check_name("name", "-x").is_err());
    }
}
