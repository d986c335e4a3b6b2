//! The usable-memory rule: from `MemTotal` and the amdgpu cards, the bytes a
//! model may use on this node, plus the arithmetic as lines a person reads.
//! The rule itself is described in the [`super`] module header; this file is
//! its one implementation, a pure function so it can be tested on any input.

use proto::domain::GpuMemory;
use proto::units;

/// Bytes in a GiB.
const GIB: u64 = 1 << 30;

/// Largest VRAM an amdgpu card may report and still be read as an APU's
/// BIOS carve-out (unified memory). Strix Halo ships with 512 MiB; APU
/// firmware menus offer 512 MiB–4 GiB for the usual "small carve-out, big
/// GTT" setup. A discrete card with ≤ 4 GiB would be misread as unified.
pub const UNIFIED_VRAM_MAX_BYTES: u64 = 4 * GIB;

/// The outcome of the usable-memory rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsableMemory {
    /// Bytes a model may use; `None` when an input the rule needs is unknown.
    pub bytes: Option<u64>,
    /// One line per step, with GiB numbers.
    pub explanation: Vec<String>,
    /// True when at least one card is an APU sharing system RAM.
    pub unified: bool,
}

/// Applies the rule (see the module header of [`super`]) to `MemTotal` and
/// the cards that expose amdgpu `mem_info_*` files.
#[must_use]
pub fn usable_memory(mem_total: Option<u64>, gpus: &[GpuMemory]) -> UsableMemory {
    let mut lines = Vec::new();
    match mem_total {
        Some(t) => lines.push(format!(
            "MemTotal {}: system RAM the kernel manages (a BIOS carve-out is already outside it)",
            units::bytes(t)
        )),
        None => lines.push("MemTotal unknown (/proc/meminfo unreadable)".to_owned()),
    }

    if gpus.is_empty() {
        lines.push(
            "no amdgpu card with mem_info files: CPU-only node, models live in system RAM"
                .to_owned(),
        );
        let bytes = mem_total;
        match bytes {
            Some(t) => lines.push(format!("usable = MemTotal = {}", units::bytes(t))),
            None => lines.push("usable unknown: MemTotal unknown".to_owned()),
        }
        return UsableMemory {
            bytes,
            explanation: lines,
            unified: false,
        };
    }

    let mut unknown = false;
    let mut unified = false;
    // Unified cards draw on the same RAM: only the best one counts.
    let mut best_unified: Option<(&str, u64)> = None;
    let mut unified_cards = 0usize;
    // Discrete cards have their own memory: their VRAM adds up.
    let mut discrete: Option<u64> = Some(0);
    let mut discrete_cards = 0usize;

    for gpu in gpus {
        let card = gpu.card.as_str();
        let Some(vram) = gpu.vram_total_bytes else {
            lines.push(format!(
                "{card}: VRAM total unknown, cannot tell an APU from a discrete GPU"
            ));
            unknown = true;
            continue;
        };
        if vram > UNIFIED_VRAM_MAX_BYTES {
            lines.push(format!(
                "{card}: VRAM {} > {} → discrete GPU: its VRAM counts; system RAM and GTT (which is \
                 system RAM) do not, layers spilled to the CPU run far slower",
                units::bytes(vram),
                units::bytes(UNIFIED_VRAM_MAX_BYTES)
            ));
            discrete = discrete.and_then(|d| d.checked_add(vram));
            discrete_cards += 1;
            continue;
        }
        unified = true;
        let Some(gtt) = gpu.gtt_total_bytes else {
            lines.push(format!(
                "{card}: VRAM {} ≤ {} reads as an APU carve-out, but GTT total is unknown",
                units::bytes(vram),
                units::bytes(UNIFIED_VRAM_MAX_BYTES)
            ));
            unknown = true;
            continue;
        };
        let card_usable = unified_card(card, vram, gtt, gpu.ttm_limit_bytes, mem_total, &mut lines);
        unified_cards += 1;
        if best_unified.is_none_or(|(_, best)| card_usable > best) {
            best_unified = Some((card, card_usable));
        }
    }

    if unified_cards > 1
        && let Some((card, _)) = best_unified
    {
        lines.push(format!(
            "{unified_cards} unified GPUs share one RAM pool: only the largest, {card}, counts"
        ));
    }

    let bytes = match (unknown, discrete) {
        (true, _) => {
            lines.push("usable unknown: a card's totals could not be read".to_owned());
            None
        }
        (false, None) => {
            lines.push("usable unknown: discrete VRAM total overflows".to_owned());
            None
        }
        (false, Some(discrete)) => {
            let unified_bytes = best_unified.map_or(0, |(_, b)| b);
            let total = unified_bytes.saturating_add(discrete);
            let line = match (best_unified, discrete_cards) {
                (Some((card, _)), 0) => format!("usable = {} ({card})", units::bytes(total)),
                (None, _) => format!("usable = discrete VRAM {}", units::bytes(total)),
                (Some((card, b)), _) => format!(
                    "usable = {card} {} + discrete VRAM {} = {}",
                    units::bytes(b),
                    units::bytes(discrete),
                    units::bytes(total)
                ),
            };
            lines.push(line);
            Some(total)
        }
    };
    UsableMemory {
        bytes,
        explanation: lines,
        unified,
    }
}

/// One unified (APU) card: VRAM carve-out + min(GTT, ttm limit, `MemTotal`).
fn unified_card(
    card: &str,
    vram: u64,
    gtt: u64,
    ttm_limit: Option<u64>,
    mem_total: Option<u64>,
    lines: &mut Vec<String>,
) -> u64 {
    lines.push(format!(
        "{card}: VRAM {} ≤ {} → APU with unified memory: the GPU draws on system RAM through \
         GTT, so RAM and GTT are one pool, never added",
        units::bytes(vram),
        units::bytes(UNIFIED_VRAM_MAX_BYTES)
    ));
    let mut window = gtt;
    let mut terms = vec![format!("GTT total {}", units::bytes(gtt))];
    if let Some(ttm) = ttm_limit {
        terms.push(format!("ttm.pages_limit {}", units::bytes(ttm)));
        window = window.min(ttm);
    }
    match mem_total {
        Some(t) => {
            terms.push(format!("MemTotal {}", units::bytes(t)));
            window = window.min(t);
        }
        None => lines.push(format!("{card}: MemTotal unknown, not used as a cap")),
    }
    lines.push(format!(
        "{card}: GPU window = min({}) = {}",
        terms.join(", "),
        units::bytes(window)
    ));
    let usable = vram.saturating_add(window);
    lines.push(format!(
        "{card}: VRAM carve-out {} + GPU window {} = {}",
        units::bytes(vram),
        units::bytes(window),
        units::bytes(usable)
    ));
    usable
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn apu(card: &str, vram: u64, gtt: u64, ttm: Option<u64>) -> GpuMemory {
        GpuMemory {
            card: card.into(),
            vram_total_bytes: Some(vram),
            gtt_total_bytes: Some(gtt),
            ttm_limit_bytes: ttm,
            ..GpuMemory::default()
        }
    }

    #[test]
    fn cpu_only_node_uses_mem_total() {
        let u = usable_memory(Some(24 * GIB), &[]);
        assert_eq!(u.bytes, Some(24 * GIB));
        assert!(!u.unified);
        assert!(
            u.explanation
                .iter()
                .any(|l| l == "usable = MemTotal = 24.0 GiB")
        );
    }

    #[test]
    fn cpu_only_node_without_mem_total_is_unknown_not_zero() {
        let u = usable_memory(None, &[]);
        assert_eq!(u.bytes, None);
    }

    #[test]
    fn apu_window_is_capped_by_the_ttm_limit() {
        // 512 MiB + min(GTT 62 GiB, ttm 40 GiB, MemTotal 124 GiB) = 512 MiB + 40 GiB.
        let u = usable_memory(
            Some(124 * GIB),
            &[apu("card1", 512 * MIB, 62 * GIB, Some(40 * GIB))],
        );
        assert_eq!(u.bytes, Some(512 * MIB + 40 * GIB));
        assert!(u.unified);
        assert!(
            u.explanation.iter().any(|l| l.contains("= 40.0 GiB")),
            "{:#?}",
            u.explanation
        );
    }

    #[test]
    fn apu_window_is_capped_by_mem_total() {
        // 1 GiB + min(GTT 200 GiB, MemTotal 30 GiB) = 31 GiB; no ttm reading.
        let u = usable_memory(Some(30 * GIB), &[apu("card0", GIB, 200 * GIB, None)]);
        assert_eq!(u.bytes, Some(31 * GIB));
    }

    #[test]
    fn apu_without_mem_total_still_uses_its_gtt() {
        // 512 MiB + min(GTT 62 GiB, ttm 64 GiB) = 512 MiB + 62 GiB.
        let u = usable_memory(None, &[apu("card1", 512 * MIB, 62 * GIB, Some(64 * GIB))]);
        assert_eq!(u.bytes, Some(512 * MIB + 62 * GIB));
    }

    #[test]
    fn discrete_gpu_counts_vram_only() {
        // 16 GiB VRAM > 4 GiB → discrete; the 64 GiB of RAM and 32 GiB GTT are not counted.
        let u = usable_memory(Some(64 * GIB), &[apu("card0", 16 * GIB, 32 * GIB, None)]);
        assert_eq!(u.bytes, Some(16 * GIB));
        assert!(!u.unified);
    }

    #[test]
    fn two_unified_cards_are_not_added_and_discrete_vram_is() {
        // APUs: 0.5 + min(60, 100) = 60.5 and 1 + min(20, 100) = 21 → 60.5 counts once.
        // Discrete: 8 GiB. Usable = 60.5 + 8 = 68.5 GiB.
        let gpus = [
            apu("card0", 512 * MIB, 60 * GIB, None),
            apu("card1", GIB, 20 * GIB, None),
            apu("card2", 8 * GIB, 50 * GIB, None),
        ];
        let u = usable_memory(Some(100 * GIB), &gpus);
        assert_eq!(u.bytes, Some(512 * MIB + 60 * GIB + 8 * GIB));
        assert!(u.unified);
        assert!(
            u.explanation
                .iter()
                .any(|l| l.contains("only the largest, card0"))
        );
    }

    #[test]
    fn a_card_with_unknown_totals_makes_usable_unknown() {
        let missing_vram = GpuMemory {
            card: "card0".into(),
            gtt_total_bytes: Some(GIB),
            ..GpuMemory::default()
        };
        assert_eq!(usable_memory(Some(8 * GIB), &[missing_vram]).bytes, None);
        let missing_gtt = GpuMemory {
            card: "card0".into(),
            vram_total_bytes: Some(GIB),
            ..GpuMemory::default()
        };
        let u = usable_memory(Some(8 * GIB), &[missing_gtt]);
        assert_eq!(u.bytes, None);
        assert!(u.unified);
    }

    #[test]
    fn the_carve_out_threshold_is_inclusive() {
        let u = usable_memory(Some(60 * GIB), &[apu("card0", 4 * GIB, 30 * GIB, None)]);
        assert!(u.unified);
        assert_eq!(u.bytes, Some(34 * GIB));
        let u = usable_memory(Some(60 * GIB), &[apu("card0", 4 * GIB + 1, 30 * GIB, None)]);
        assert!(!u.unified);
        assert_eq!(u.bytes, Some(4 * GIB + 1));
    }
}
