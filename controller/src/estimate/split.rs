//! One model's layers across several nodes, as llama.cpp lays them out
//! with `--rpc` and `--tensor-split` (`llama_model::load_tensors`,
//! `src/llama-model.cpp`):
//!
//! * the devices are the RPC servers first (`model->devices.insert(begin,
//!   rpc_servers…)`, "to minimize network transfers"), then the host's own
//!   GPUs; a CPU-only host has only the RPC devices;
//! * layer `il` of `0..=n_layer` (`n_layer` is the output head) is on the
//!   CPU when `il < i_gpu_start = max(n_layer + 1 − n_gpu_layers, 0)`, else
//!   on device `upper_bound(split_points, (il − i_gpu_start) / act)` where
//!   the split points are the normalised running sums of `--tensor-split`
//!   (in `f32`, as llama.cpp computes them) and `act = min(n_gpu_layers,
//!   n_layer + 1)`;
//! * the input embedding always stays on the host's CPU.
//!
//! A node's share is then: the weights of its blocks (from the header's
//! per-block tensor bytes), their KV cache or recurrent state (it follows
//! the layers), a compute buffer on every device that runs layers, and on
//! the host the input embedding and the logits buffer. The layers are given
//! in proportion to each node's free memory after its fixed costs (compute
//! buffer, margin, and on the host the input/output tensors), then
//! rebalanced until every node's share plus margin fits, if it can.

use super::Estimate;
use proto::domain::ModelParams;
use proto::units;

/// llama.cpp's device for each layer `0..=n_layer` (the last is the output
/// head): `Some(device index)`, or `None` for the CPU.
pub fn assign_layers(n_layer: u32, n_gpu_layers: u32, split: &[u32]) -> Vec<Option<usize>> {
    let n = i64::from(n_layer);
    let ngl = i64::from(n_gpu_layers);
    let i_gpu_start = (n + 1 - ngl).max(0);
    let act = if split.is_empty() { 0 } else { ngl.min(n + 1) };
    let mut points: Vec<f32> = Vec::with_capacity(split.len());
    let mut sum = 0f32;
    for &s in split {
        sum += s as f32;
        points.push(sum);
    }
    for p in &mut points {
        *p /= sum;
    }
    (0..=n)
        .map(|il| {
            if il < i_gpu_start || il - i_gpu_start >= act {
                return None;
            }
            let x = (il - i_gpu_start) as f32 / act as f32;
            let d = points.partition_point(|&p| p <= x);
            Some(d.min(split.len().saturating_sub(1)))
        })
        .collect()
}

/// One node as the split planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitNode {
    /// Name.
    pub name: String,
    /// Free bytes (usable − reserve − used).
    pub free_bytes: u64,
}

/// One node's part of a split: the share the placement records.
pub use proto::domain::SplitShare as Share;

/// A split of one model over helpers (RPC servers, in device order) and a
/// host (runs llama-server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Helpers first, the host last.
    pub shares: Vec<Share>,
    /// llama-server's `-ngl`.
    pub gpu_layers: u32,
    /// llama-server's `--tensor-split`, one per device.
    pub tensor_split: Vec<u32>,
    /// Hidden-state bytes crossing the network per token.
    pub traffic_bytes_per_token: u64,
}

impl Layout {
    /// Whether every share fits its node.
    pub fn fits(&self) -> bool {
        self.shares.iter().all(Share::fits)
    }
}

/// Largest `--tensor-split` value the planner writes (MiB granularity).
const MAX_PROPORTION: u64 = 1_000_000;

/// The layout llama.cpp would load with these proportions (`weights[i]`
/// per helper, then the host's): with host GPUs every layer is offloaded
/// and split over `[helpers…, host]`; on a CPU-only host the host's layers
/// stay on its CPU (`-ngl` covers the helpers' layers only) and the rest is
/// split over the helpers.
#[allow(clippy::too_many_arguments)]
pub fn layout(
    params: &ModelParams,
    est: &Estimate,
    helpers: &[SplitNode],
    host: &SplitNode,
    host_gpu: bool,
    weights: &[u64],
    margin: impl Fn(u64) -> u64,
) -> Layout {
    let n_layer = params.block_count;
    let n = n_layer as usize;
    let total: u64 = weights.iter().sum::<u64>().max(1);
    let prop = |w: u64| -> u32 {
        u32::try_from((w.saturating_mul(MAX_PROPORTION) / total).max(u64::from(w > 0)))
            .unwrap_or(u32::MAX)
    };
    let (gpu_layers, tensor_split) = if host_gpu {
        (
            n_layer + 1,
            weights.iter().map(|&w| prop(w)).collect::<Vec<_>>(),
        )
    } else {
        let host_w = weights.last().copied().unwrap_or(0);
        let host_layers =
            ((u128::from(host_w) * u128::from(n_layer + 1)) / u128::from(total)) as u32;
        let host_layers = host_layers.min(n_layer);
        let split: Vec<u32> = weights[..helpers.len()].iter().map(|&w| prop(w)).collect();
        (n_layer + 1 - host_layers, split)
    };
    let devs = assign_layers(n_layer, gpu_layers, &tensor_split);
    let host_ix = helpers.len();
    let owner = |d: Option<usize>| d.filter(|&k| k < host_ix).unwrap_or(host_ix);

    let mut shares: Vec<Share> = helpers
        .iter()
        .chain(std::iter::once(host))
        .enumerate()
        .map(|(i, node)| Share {
            node: node.name.clone(),
            host: i == host_ix,
            free_bytes: node.free_bytes,
            tensor_split: tensor_split.get(i).copied().unwrap_or(0),
            ..Share::default()
        })
        .collect();
    let uniform = params.weight_bytes / u64::from(n_layer.max(1));
    for (il, &d) in devs.iter().take(n).enumerate() {
        let s = &mut shares[owner(d)];
        s.layers += 1;
        s.weights_bytes += params
            .block_weight_bytes
            .get(il)
            .copied()
            .unwrap_or(uniform);
        s.kv_bytes += est.context.per_layer.get(il).copied().unwrap_or(0);
    }
    // The output head goes where layer n_layer goes; the input embedding
    // stays on the host's CPU. A tied output head is a second copy of the
    // embedding on a device (or when the CPU repacks it).
    let out_dev = devs.get(n).copied().flatten();
    let out = owner(out_dev);
    let tied = if out_dev.is_some() {
        params.tied_output_bytes
    } else {
        super::tied_output_copy(params)
    };
    shares[out].weights_bytes += params.output_weight_bytes + tied;
    shares[host_ix].weights_bytes += params.input_weight_bytes;
    if params.block_weight_bytes.is_empty() {
        // No per-block sums: the blocks got `weight_bytes / n_layer` each;
        // put the rounding on the host.
        let given: u64 = shares.iter().map(|s| s.weights_bytes).sum();
        shares[host_ix].weights_bytes += params.weight_bytes.saturating_sub(given);
    }
    shares[host_ix].output_bytes = est.output_bytes;
    for s in &mut shares {
        // Every device that runs layers reserves its own compute buffer;
        // the host's CPU runs the input layer and the graph's glue.
        if s.layers > 0 || s.host {
            s.compute_bytes = est.compute_bytes;
        }
        s.total_bytes = s.weights_bytes + s.kv_bytes + s.compute_bytes + s.output_bytes;
        s.margin_bytes = margin(s.total_bytes);
    }
    // Hidden states cross the network at each change of node along the
    // layers (the input embedding is on the host).
    let mut crossings = 0u64;
    let mut at = host_ix;
    for &d in &devs {
        let o = owner(d);
        if o != at {
            crossings += 1;
            at = o;
        }
    }
    if at != host_ix {
        crossings += 1;
    }
    Layout {
        shares,
        gpu_layers,
        tensor_split,
        traffic_bytes_per_token: crossings * params.embedding_length * 4,
    }
}

/// Plans a split over `helpers` and `host`: layers in proportion to each
/// node's free memory after its fixed costs, then rebalanced (at most 32
/// rounds) until each share plus margin fits. Returns the last layout tried
/// whether or not it fits; `Layout::fits` tells.
pub fn plan(
    params: &ModelParams,
    est: &Estimate,
    helpers: &[SplitNode],
    host: &SplitNode,
    host_gpu: bool,
    margin: impl Fn(u64) -> u64 + Copy,
) -> Layout {
    let nodes: Vec<&SplitNode> = helpers.iter().chain(std::iter::once(host)).collect();
    let host_ix = helpers.len();
    let fixed = |i: usize| -> u64 {
        let mut f = est.compute_bytes;
        if i == host_ix {
            f += params.input_weight_bytes
                + params.output_weight_bytes
                + params.tied_output_bytes
                + est.output_bytes;
        }
        f
    };
    let mut weights: Vec<u64> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let f = fixed(i);
            n.free_bytes
                .saturating_sub(f)
                .saturating_sub(margin(n.free_bytes.min(f.saturating_mul(4)).max(f)))
                .max(1)
        })
        .collect();
    let mut best = layout(params, est, helpers, host, host_gpu, &weights, margin);
    for _ in 0..32 {
        if best.fits() {
            break;
        }
        // Shrink the overflowing shares' proportions by how much they are
        // over, grow the others by their headroom.
        for (i, s) in best.shares.iter().enumerate() {
            let need = s.total_bytes + s.margin_bytes;
            let movable = s.weights_bytes + s.kv_bytes;
            if movable == 0 {
                continue;
            }
            let target = movable as i128 + (s.free_bytes as i128 - need as i128);
            let target = target.max(1) as u128;
            weights[i] = ((u128::from(weights[i]) * target) / u128::from(movable)).max(1) as u64;
        }
        let next = layout(params, est, helpers, host, host_gpu, &weights, margin);
        if next == best {
            break;
        }
        best = next;
    }
    best
}

/// One line per share: "halo2 (rpc): 30 layers, weights … + KV … + compute
/// … = … + margin … of … free".
pub fn describe(l: &Layout) -> Vec<String> {
    l.shares
        .iter()
        .map(|s| {
            format!(
                "{} ({}): {} layer(s), weights {} + KV {} + compute {}{} = {} + margin {} of {} free{}",
                s.node,
                if s.host { "host, llama-server" } else { "helper, ggml-rpc-server" },
                s.layers,
                units::bytes(s.weights_bytes),
                units::bytes(s.kv_bytes),
                units::bytes(s.compute_bytes),
                if s.output_bytes > 0 {
                    format!(" + output {}", units::bytes(s.output_bytes))
                } else {
                    String::new()
                },
                units::bytes(s.total_bytes),
                units::bytes(s.margin_bytes),
                units::bytes(s.free_bytes),
                if s.fits() { "" } else { " (does not fit)" }
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_follow_llama_cpp_split_points() {
        // 4 layers + output, two devices 1:1, everything offloaded:
        // x = il/5 → 0, .2, .4 on device 0; .6, .8 on device 1.
        let d = assign_layers(4, 5, &[1, 1]);
        assert_eq!(d, vec![Some(0), Some(0), Some(0), Some(1), Some(1)]);
        // -ngl 2 on a CPU-only host with one RPC device: the last layer
        // and the output are offloaded.
        let d = assign_layers(4, 2, &[7]);
        assert_eq!(d, vec![None, None, None, Some(0), Some(0)]);
        // No devices: all on the CPU.
        assert_eq!(assign_layers(2, 99, &[]), vec![None, None, None]);
        // A zero proportion gets nothing.
        let d = assign_layers(3, 4, &[0, 1]);
        assert!(d.iter().all(|&x| x == Some(1)));
    }
}
