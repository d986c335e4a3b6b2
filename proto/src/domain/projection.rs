//! llama.cpp's own memory projection of a model, as an agent answers
//! `ProjectMemory`: the settings asked about ([`ProjectionSettings`]) and
//! the per-device rows or why there are none ([`ProjectionAnswer`]).

use super::instance::cache_type_to_wire;
use super::{CacheType, ConversionError, check_model_id};
use crate::v1;

/// Largest context a projection may be asked for (2^24 tokens).
pub const MAX_CONTEXT: u32 = 1 << 24;
/// Most slots a projection may be asked for.
pub const MAX_PARALLEL: u32 = 256;
/// Largest `-b` / `-ub` a projection may be asked for.
pub const MAX_BATCH: u32 = 1 << 16;

/// The llama.cpp settings a projection is made at, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProjectionSettings {
    /// `-c`, 0 = the model's trained context.
    pub context_size: u32,
    /// `-np`, at least 1; each slot its own KV stream.
    pub parallel: u32,
    /// `-ctk`
    pub cache_type_k: CacheType,
    /// `-ctv`
    pub cache_type_v: CacheType,
    /// `-fa on|off`; `None` = auto.
    pub flash_attention: Option<bool>,
    /// `-b`
    pub batch_size: u32,
    /// `-ub`
    pub ubatch_size: u32,
}

impl Default for ProjectionSettings {
    /// llama.cpp's defaults: trained context, one slot, f16 caches, flash
    /// attention auto, batch 2048, ubatch 512.
    fn default() -> Self {
        ProjectionSettings {
            context_size: 0,
            parallel: 1,
            cache_type_k: CacheType::F16,
            cache_type_v: CacheType::F16,
            flash_attention: None,
            batch_size: 2048,
            ubatch_size: 512,
        }
    }
}

impl ProjectionSettings {
    /// `-fa`'s value.
    pub fn flash_attention_name(&self) -> &'static str {
        match self.flash_attention {
            Some(true) => "on",
            Some(false) => "off",
            None => "auto",
        }
    }
}

/// A `ProjectMemory` request: a model id and the settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProjectionRequest {
    /// A model id from the agent's scan.
    pub model_id: String,
    /// At these settings.
    pub settings: ProjectionSettings,
}

impl TryFrom<v1::ProjectMemoryRequest> for ProjectionRequest {
    type Error = ConversionError;

    fn try_from(r: v1::ProjectMemoryRequest) -> Result<Self, Self::Error> {
        check_model_id(&r.model_id).map_err(|reason| ConversionError::Invalid {
            field: "model_id",
            reason: reason.to_owned(),
        })?;
        let d = ProjectionSettings::default();
        let bounded = |field: &'static str, v: u32, max: u32| {
            if v > max {
                Err(ConversionError::Invalid {
                    field,
                    reason: format!("{v} is above {max}"),
                })
            } else {
                Ok(v)
            }
        };
        let or = |v: u32, default: u32| if v == 0 { default } else { v };
        Ok(ProjectionRequest {
            model_id: r.model_id,
            settings: ProjectionSettings {
                context_size: bounded("context_size", r.context_size, MAX_CONTEXT)?,
                parallel: bounded("parallel", r.parallel, MAX_PARALLEL)?.max(1),
                cache_type_k: CacheType::from_wire("cache_type_k", r.cache_type_k)?
                    .unwrap_or(d.cache_type_k),
                cache_type_v: CacheType::from_wire("cache_type_v", r.cache_type_v)?
                    .unwrap_or(d.cache_type_v),
                flash_attention: r.flash_attention,
                batch_size: or(
                    bounded("batch_size", r.batch_size, MAX_BATCH)?,
                    d.batch_size,
                ),
                ubatch_size: or(
                    bounded("ubatch_size", r.ubatch_size, MAX_BATCH)?,
                    d.ubatch_size,
                ),
            },
        })
    }
}

impl From<ProjectionRequest> for v1::ProjectMemoryRequest {
    fn from(r: ProjectionRequest) -> Self {
        let s = r.settings;
        v1::ProjectMemoryRequest {
            model_id: r.model_id,
            context_size: s.context_size,
            parallel: s.parallel,
            cache_type_k: cache_type_to_wire(Some(s.cache_type_k)),
            cache_type_v: cache_type_to_wire(Some(s.cache_type_v)),
            flash_attention: s.flash_attention,
            batch_size: s.batch_size,
            ubatch_size: s.ubatch_size,
        }
    }
}

/// One device (or host buffer) row of the projection, bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProjectedDevice {
    /// `Host`, `CPU_REPACK`, `ROCm0 (…)`…
    pub name: String,
    /// Weights.
    pub weights_bytes: u64,
    /// KV cache and recurrent state.
    pub context_bytes: u64,
    /// Compute buffer.
    pub compute_bytes: u64,
}

/// llama.cpp's projection: one row per device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemoryProjection {
    /// The rows (at least one).
    pub devices: Vec<ProjectedDevice>,
}

impl MemoryProjection {
    /// Weights over every device.
    pub fn weights_bytes(&self) -> u64 {
        self.devices.iter().map(|d| d.weights_bytes).sum()
    }

    /// KV and recurrent state over every device.
    pub fn context_bytes(&self) -> u64 {
        self.devices.iter().map(|d| d.context_bytes).sum()
    }

    /// Compute buffers over every device.
    pub fn compute_bytes(&self) -> u64 {
        self.devices.iter().map(|d| d.compute_bytes).sum()
    }

    /// Weights + context + compute.
    pub fn total_bytes(&self) -> u64 {
        self.weights_bytes() + self.context_bytes() + self.compute_bytes()
    }
}

/// An agent's answer: the projection, or why there is none (the text the
/// agent gave: "llama-fit-params not found at PATH", "failed: ...",
/// "timed out after N s").
pub type ProjectionAnswer = Result<MemoryProjection, String>;

/// The answer a response carries.
pub fn answer_from_wire(r: v1::ProjectMemoryResponse) -> ProjectionAnswer {
    if !r.unavailable.is_empty() {
        return Err(r.unavailable);
    }
    if r.devices.is_empty() {
        return Err("the agent sent no projection rows".to_owned());
    }
    Ok(MemoryProjection {
        devices: r
            .devices
            .into_iter()
            .map(|d| ProjectedDevice {
                name: d.name,
                weights_bytes: d.weights_bytes,
                context_bytes: d.context_bytes,
                compute_bytes: d.compute_bytes,
            })
            .collect(),
    })
}

/// The response for an answer.
pub fn answer_to_wire(a: &ProjectionAnswer, cached: bool) -> v1::ProjectMemoryResponse {
    match a {
        Ok(p) => v1::ProjectMemoryResponse {
            devices: p
                .devices
                .iter()
                .map(|d| v1::ProjectedDevice {
                    name: d.name.clone(),
                    weights_bytes: d.weights_bytes,
                    context_bytes: d.context_bytes,
                    compute_bytes: d.compute_bytes,
                })
                .collect(),
            unavailable: String::new(),
            cached,
        },
        Err(why) => v1::ProjectMemoryResponse {
            devices: Vec::new(),
            unavailable: why.clone(),
            cached,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_gets_llama_cpp_defaults_and_bad_values_are_named() {
        let r = ProjectionRequest::try_from(v1::ProjectMemoryRequest {
            model_id: "m.gguf".into(),
            context_size: 8192,
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(r.settings.parallel, 1);
        assert_eq!(r.settings.batch_size, 2048);
        assert_eq!(r.settings.ubatch_size, 512);
        assert_eq!(r.settings.cache_type_k, CacheType::F16);
        let back = ProjectionRequest::try_from(v1::ProjectMemoryRequest::from(r.clone()));
        assert_eq!(back, Ok(r));
        let e = ProjectionRequest::try_from(v1::ProjectMemoryRequest {
            model_id: "../x.gguf".into(),
            ..Default::default()
        })
        .expect_err("hostile id");
        assert!(e.to_string().contains("model_id"), "{e}");
        let e = ProjectionRequest::try_from(v1::ProjectMemoryRequest {
            model_id: "m.gguf".into(),
            context_size: u32::MAX,
            ..Default::default()
        })
        .expect_err("huge context");
        assert!(e.to_string().contains("context_size"), "{e}");
    }

    #[test]
    fn an_unavailable_answer_round_trips_with_its_reason() {
        let a: ProjectionAnswer = Err("timed out after 60 s".into());
        assert_eq!(answer_from_wire(answer_to_wire(&a, true)), a);
        let ok: ProjectionAnswer = Ok(MemoryProjection {
            devices: vec![ProjectedDevice {
                name: "Host".into(),
                weights_bytes: 3,
                context_bytes: 2,
                compute_bytes: 1,
            }],
        });
        assert_eq!(answer_from_wire(answer_to_wire(&ok, false)), ok);
        assert_eq!(ok.as_ref().map(MemoryProjection::total_bytes), Ok(6));
    }
}
