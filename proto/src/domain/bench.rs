//! Bench results: what `haloctl bench` measured on one node (prompt and
//! generation tokens/s, time to first token, per depth and concurrency)
//! and the [`BenchSetup`] it depends on (file, node, llama.cpp build,
//! context, slots, cache types, flash attention, threads). The controller
//! keeps them as sent; two results are compared only when their setups are
//! equal, so figures of another build or other settings are never mixed.

use super::ConversionError;
use super::catalog::check_name;
use crate::v1;
use serde::{Deserialize, Serialize};

/// Most points one result may hold.
pub const MAX_POINTS: usize = 64;
/// Longest llama.cpp build string kept.
pub const MAX_BUILD_LEN: usize = 200;

/// What a result depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchSetup {
    /// Catalog name.
    pub model: String,
    /// The agent's model id (file path relative to a model directory).
    pub model_id: String,
    /// Size of the file (all parts).
    pub model_file_bytes: u64,
    /// Node measured.
    pub node: String,
    /// The node's llama.cpp build as its agent reports it.
    pub llama_build: String,
    /// llama-server's context per slot.
    pub context_size: u32,
    /// llama-server's slots (`-np`).
    pub slots: u32,
    /// KV cache type of K (empty = llama.cpp's default, f16).
    pub cache_type_k: String,
    /// KV cache type of V.
    pub cache_type_v: String,
    /// `on`, `off` or `auto`.
    pub flash_attention: String,
    /// `-t`; 0 = llama.cpp's default.
    pub threads: u32,
    /// Measured through this gateway (base URL), over `replicas` ready
    /// replicas; empty = straight to the replica on `node`.
    #[serde(default)]
    pub gateway: String,
    /// Ready replicas behind the gateway; 0 when measured straight.
    #[serde(default)]
    pub replicas: u32,
}

/// One measured point: medians over the runs, with the smallest and
/// largest run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchPoint {
    /// Tokens in the slot's cache before the measured prompt.
    pub depth: u32,
    /// Parallel streams.
    pub concurrency: u32,
    /// Prompt tokens per stream.
    pub prompt_tokens: u32,
    /// Generated tokens per stream.
    pub gen_tokens: u32,
    /// Runs the figures are taken over.
    pub runs: u32,
    /// Prompt processing tokens/s (all streams): median, min, max.
    pub pp: Spread,
    /// Generation tokens/s (all streams): median, min, max.
    pub tg: Spread,
    /// Time to first token, ms: median, min, max.
    pub ttft_ms: Spread,
}

/// The median of several runs and their range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spread {
    /// The median.
    pub median: f64,
    /// The smallest run.
    pub min: f64,
    /// The largest run.
    pub max: f64,
}

impl Spread {
    /// Median, min and max of `values` (zeros when empty).
    pub fn of(values: &[f64]) -> Spread {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }
}

/// One `haloctl bench` result on one node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchResult {
    /// What the figures depend on.
    pub setup: BenchSetup,
    /// The placement measured.
    pub placement: String,
    /// When it was measured, Unix ms.
    pub at_unix_ms: u64,
    /// The points, in the order measured.
    pub points: Vec<BenchPoint>,
}

impl BenchSetup {
    /// What differs from `other`, in words (`build`, `context`, …); empty
    /// when both describe the same measurement conditions.
    pub fn differences(&self, other: &BenchSetup) -> Vec<&'static str> {
        let mut d = Vec::new();
        let mut check = |differs: bool, what: &'static str| {
            if differs {
                d.push(what);
            }
        };
        check(self.model != other.model, "model");
        check(
            self.model_id != other.model_id || self.model_file_bytes != other.model_file_bytes,
            "file",
        );
        check(self.node != other.node, "node");
        check(self.llama_build != other.llama_build, "build");
        check(self.context_size != other.context_size, "context");
        check(self.slots != other.slots, "slots");
        check(
            self.cache_type_k != other.cache_type_k || self.cache_type_v != other.cache_type_v,
            "cache types",
        );
        check(
            self.flash_attention != other.flash_attention,
            "flash attention",
        );
        check(self.threads != other.threads, "threads");
        check(
            self.gateway != other.gateway || self.replicas != other.replicas,
            "path",
        );
        d
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConversionError {
    ConversionError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn figure(field: &'static str, v: f64) -> Result<f64, ConversionError> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(invalid(field, format!("{v} is not a finite figure >= 0")))
    }
}

fn spread(field: &'static str, median: f64, min: f64, max: f64) -> Result<Spread, ConversionError> {
    let s = Spread {
        median: figure(field, median)?,
        min: figure(field, min)?,
        max: figure(field, max)?,
    };
    if s.min > s.median || s.median > s.max {
        return Err(invalid(
            field,
            format!(
                "min {} <= median {} <= max {} does not hold",
                s.min, s.median, s.max
            ),
        ));
    }
    Ok(s)
}

fn cache_name(field: &'static str, v: &str) -> Result<String, ConversionError> {
    if v.is_empty() || super::CacheType::ALL.iter().any(|c| c.name() == v) {
        Ok(v.to_owned())
    } else {
        Err(invalid(field, "not a llama.cpp cache type"))
    }
}

impl TryFrom<v1::BenchSetup> for BenchSetup {
    type Error = ConversionError;
    fn try_from(s: v1::BenchSetup) -> Result<Self, Self::Error> {
        check_name("setup.model", &s.model)?;
        check_name("setup.node", &s.node)?;
        super::check_model_id(&s.model_id).map_err(|e| invalid("setup.model_id", e.to_string()))?;
        if s.llama_build.len() > MAX_BUILD_LEN || s.llama_build.chars().any(char::is_control) {
            return Err(invalid(
                "setup.llama_build",
                format!("at most {MAX_BUILD_LEN} bytes of printable text"),
            ));
        }
        if s.context_size == 0 || s.slots == 0 {
            return Err(invalid("setup", "context_size and slots are at least 1"));
        }
        if s.gateway.len() > MAX_BUILD_LEN
            || !(s.gateway.is_empty()
                || s.gateway.starts_with("http://")
                || s.gateway.starts_with("https://"))
            || s.gateway
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(invalid(
                "setup.gateway",
                "empty or an http(s) URL without spaces",
            ));
        }
        if !["on", "off", "auto"].contains(&s.flash_attention.as_str()) {
            return Err(invalid("setup.flash_attention", "on, off or auto"));
        }
        Ok(BenchSetup {
            cache_type_k: cache_name("setup.cache_type_k", &s.cache_type_k)?,
            cache_type_v: cache_name("setup.cache_type_v", &s.cache_type_v)?,
            model: s.model,
            model_id: s.model_id,
            model_file_bytes: s.model_file_bytes,
            node: s.node,
            llama_build: s.llama_build,
            context_size: s.context_size,
            slots: s.slots,
            flash_attention: s.flash_attention,
            threads: s.threads,
            gateway: s.gateway,
            replicas: s.replicas,
        })
    }
}

impl From<BenchSetup> for v1::BenchSetup {
    fn from(s: BenchSetup) -> Self {
        v1::BenchSetup {
            model: s.model,
            model_id: s.model_id,
            model_file_bytes: s.model_file_bytes,
            node: s.node,
            llama_build: s.llama_build,
            context_size: s.context_size,
            slots: s.slots,
            cache_type_k: s.cache_type_k,
            cache_type_v: s.cache_type_v,
            flash_attention: s.flash_attention,
            threads: s.threads,
            gateway: s.gateway,
            replicas: s.replicas,
        }
    }
}

impl TryFrom<v1::BenchPoint> for BenchPoint {
    type Error = ConversionError;
    fn try_from(p: v1::BenchPoint) -> Result<Self, Self::Error> {
        if p.concurrency == 0 || p.runs == 0 || p.prompt_tokens == 0 || p.gen_tokens == 0 {
            return Err(invalid(
                "points",
                "concurrency, runs, prompt_tokens and gen_tokens are at least 1",
            ));
        }
        Ok(BenchPoint {
            depth: p.depth,
            concurrency: p.concurrency,
            prompt_tokens: p.prompt_tokens,
            gen_tokens: p.gen_tokens,
            runs: p.runs,
            pp: spread(
                "points.pp",
                p.pp_tokens_per_second,
                p.pp_min_tokens_per_second,
                p.pp_max_tokens_per_second,
            )?,
            tg: spread(
                "points.tg",
                p.tg_tokens_per_second,
                p.tg_min_tokens_per_second,
                p.tg_max_tokens_per_second,
            )?,
            ttft_ms: spread("points.ttft", p.ttft_ms, p.ttft_min_ms, p.ttft_max_ms)?,
        })
    }
}

impl From<BenchPoint> for v1::BenchPoint {
    fn from(p: BenchPoint) -> Self {
        v1::BenchPoint {
            depth: p.depth,
            concurrency: p.concurrency,
            prompt_tokens: p.prompt_tokens,
            gen_tokens: p.gen_tokens,
            runs: p.runs,
            pp_tokens_per_second: p.pp.median,
            pp_min_tokens_per_second: p.pp.min,
            pp_max_tokens_per_second: p.pp.max,
            tg_tokens_per_second: p.tg.median,
            tg_min_tokens_per_second: p.tg.min,
            tg_max_tokens_per_second: p.tg.max,
            ttft_ms: p.ttft_ms.median,
            ttft_min_ms: p.ttft_ms.min,
            ttft_max_ms: p.ttft_ms.max,
        }
    }
}

impl TryFrom<v1::BenchResult> for BenchResult {
    type Error = ConversionError;
    fn try_from(r: v1::BenchResult) -> Result<Self, Self::Error> {
        let setup = BenchSetup::try_from(r.setup.ok_or(ConversionError::Missing("setup"))?)?;
        check_name("placement", &r.placement)?;
        if r.points.is_empty() || r.points.len() > MAX_POINTS {
            return Err(invalid(
                "points",
                format!("1 to {MAX_POINTS} points; got {}", r.points.len()),
            ));
        }
        if r.at_unix_ms == 0 {
            return Err(ConversionError::Missing("at_unix_ms"));
        }
        Ok(BenchResult {
            setup,
            placement: r.placement,
            at_unix_ms: r.at_unix_ms,
            points: r
                .points
                .into_iter()
                .map(BenchPoint::try_from)
                .collect::<Result<_, _>>()?,
        })
    }
}

impl From<BenchResult> for v1::BenchResult {
    fn from(r: BenchResult) -> Self {
        v1::BenchResult {
            setup: Some(r.setup.into()),
            placement: r.placement,
            at_unix_ms: r.at_unix_ms,
            points: r.points.into_iter().map(Into::into).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire() -> v1::BenchResult {
        BenchResult {
            setup: BenchSetup {
                model: "tiny".into(),
                model_id: "tiny.gguf".into(),
                model_file_bytes: 500_000,
                node: "halo1".into(),
                llama_build: "11434 (abc)".into(),
                context_size: 512,
                slots: 2,
                cache_type_k: String::new(),
                cache_type_v: "q8_0".into(),
                flash_attention: "auto".into(),
                threads: 0,
                gateway: String::new(),
                replicas: 0,
            },
            placement: "tiny".into(),
            at_unix_ms: 1,
            points: vec![BenchPoint {
                depth: 0,
                concurrency: 1,
                prompt_tokens: 64,
                gen_tokens: 16,
                runs: 3,
                pp: Spread::of(&[3.0, 1.0, 2.0]),
                tg: Spread::of(&[4.0, 2.0]),
                ttft_ms: Spread::of(&[5.0]),
            }],
        }
        .into()
    }

    #[test]
    fn a_result_survives_the_wire() {
        let r = BenchResult::try_from(wire()).expect("valid");
        assert_eq!(
            r.points[0].pp,
            Spread {
                median: 2.0,
                min: 1.0,
                max: 3.0
            }
        );
        assert_eq!(r.points[0].tg.median, 3.0);
        assert_eq!(v1::BenchResult::from(r), wire());
    }

    #[test]
    fn results_that_describe_no_measurement_are_refused() {
        type Spoil = Box<dyn Fn(&mut v1::BenchResult)>;
        let bad: Vec<(&str, Spoil)> = vec![
            ("setup", Box::new(|r| r.setup = None)),
            (
                "setup.node",
                Box::new(|r| r.setup.as_mut().expect("setup").node = "../x".into()),
            ),
            (
                "setup.model_id",
                Box::new(|r| r.setup.as_mut().expect("setup").model_id = "/etc/passwd".into()),
            ),
            (
                "setup.cache_type_k",
                Box::new(|r| r.setup.as_mut().expect("setup").cache_type_k = "q9".into()),
            ),
            (
                "setup.gateway",
                Box::new(|r| r.setup.as_mut().expect("setup").gateway = "file:///x".into()),
            ),
            (
                "setup.flash_attention",
                Box::new(|r| r.setup.as_mut().expect("setup").flash_attention = "yes".into()),
            ),
            ("points", Box::new(|r| r.points.clear())),
            (
                "points.pp",
                Box::new(|r| r.points[0].pp_tokens_per_second = f64::NAN),
            ),
            (
                "points.tg",
                Box::new(|r| r.points[0].tg_min_tokens_per_second = 100.0),
            ),
            ("points", Box::new(|r| r.points[0].concurrency = 0)),
        ];
        for (field, f) in bad {
            let mut w = wire();
            f(&mut w);
            let e = BenchResult::try_from(w).expect_err(field);
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn setups_name_what_differs() {
        let a = BenchResult::try_from(wire()).expect("valid").setup;
        let mut b = a.clone();
        assert!(a.differences(&b).is_empty());
        b.llama_build = "11500 (def)".into();
        b.slots = 4;
        assert_eq!(a.differences(&b), vec!["build", "slots"]);
    }
}
