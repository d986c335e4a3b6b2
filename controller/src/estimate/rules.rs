//! The architectures whose rules halo knows: each has its hyper-parameters
//! read in `agent/src/gguf/params.rs`, its KV / recurrent state and compute
//! graph in [`super::context`] / [`super::compute`], and a sparse fixture
//! whose estimate `tests/estimate.rs` holds against llama.cpp's own
//! projection. Any other architecture is estimated with the generic rules
//! (dense attention over every layer, the generic compute graph), and the
//! estimate says so rather than guessing silently. Adding an architecture
//! is one line here, once its rules and fixture exist.

/// `general.architecture` values with their own, tested rules.
pub const KNOWN_ARCHITECTURES: &[&str] = &[
    "llama",
    "qwen3",
    "seed_oss",
    "starcoder2",
    "gemma3",
    "qwen3moe",
    "gpt-oss",
    "minimax-m2",
    "deepseek2",
    "nemotron_h",
    "nemotron_h_moe",
    "qwen3next",
    "qwen35moe",
    "glm4moe",
];

/// Whether halo has tested rules for `arch`.
pub fn is_known(arch: &str) -> bool {
    KNOWN_ARCHITECTURES.contains(&arch)
}

/// The note an estimate of an unknown architecture carries:
/// "estimate: generic rules for ARCH"; `None` for a known one.
pub fn generic_rules_note(arch: &str) -> Option<String> {
    (!is_known(arch)).then(|| format!("estimate: generic rules for {arch}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_architectures_outside_the_registry_get_the_generic_note() {
        assert_eq!(generic_rules_note("llama"), None);
        assert_eq!(generic_rules_note("nemotron_h_moe"), None);
        assert_eq!(
            generic_rules_note("lfm2").as_deref(),
            Some("estimate: generic rules for lfm2")
        );
    }
}
