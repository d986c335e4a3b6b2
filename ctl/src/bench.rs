//! `haloctl bench NAME`: measures a placed model on each of its ready
//! replicas (or `--node`'s) through llama-server's own API and keeps the
//! result in the controller; `--history NAME` shows the kept results.
//!
//! Every input is checked before anything is sent to a llama-server: the
//! placement exists and each measured replica is ready, every concurrency
//! fits the instance's slots and every depth + prompt + generated tokens
//! fits a slot's context, and `--yes` was given (a placed model may serve
//! users, whose requests slow down while it runs). A refusal measures and
//! keeps nothing.
//!
//! How a point is measured (depth D, C streams, one run): stream `s` uses
//! slot `s`; with D > 0 its slot is first given a fixed D-token prefix
//! (`cache_prompt`, not timed), then each stream sends prefix + P fresh
//! tokens at once and generates G tokens, end of text ignored. Prompts are
//! token ids, so counts are exact, and the server's `timings` say how many
//! it took from the cache and processed; a run where they differ from what
//! was asked fails instead of reporting a wrong figure. Prompt tokens/s =
//! Σ `prompt_n` / max `prompt_ms`, generation tokens/s = Σ `predicted_n` /
//! max `predicted_ms` (with one stream, llama-server's own per-second
//! figures); time to first token is the client's (a new connection, as a
//! client that just arrived), the slowest stream's.

use crate::Failure;
use crate::cli::BenchArgs;
use crate::client::Target;
use crate::llamahttp::{Measured, Props, Server};
use crate::output::{Format, Table, print, print_json};
use proto::domain::{BenchPoint, BenchResult, BenchSetup, Spread};
use proto::v1;
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::time::Duration;

/// `haloctl bench -o json` and `--history -o json`: one object per node
/// and measurement.
#[derive(Debug, Serialize, PartialEq)]
pub struct BenchJson {
    /// What the figures depend on.
    pub setup: BenchSetup,
    /// The placement measured.
    pub placement: String,
    /// When, Unix ms.
    pub at_unix_ms: u64,
    /// The points.
    pub points: Vec<PointJson>,
}

/// One point of [`BenchJson`].
#[derive(Debug, Serialize, PartialEq)]
pub struct PointJson {
    /// Tokens already in the slot's cache.
    pub depth: u32,
    /// Parallel streams.
    pub concurrency: u32,
    /// Prompt tokens per stream.
    pub prompt_tokens: u32,
    /// Generated tokens per stream.
    pub gen_tokens: u32,
    /// Runs.
    pub runs: u32,
    /// Prompt processing tokens/s (all streams): median, min, max.
    pub pp_tokens_per_second: Spread,
    /// Generation tokens/s (all streams): median, min, max.
    pub tg_tokens_per_second: Spread,
    /// Time to first token, ms: median, min, max.
    pub ttft_ms: Spread,
}

impl From<&BenchResult> for BenchJson {
    fn from(r: &BenchResult) -> Self {
        BenchJson {
            setup: r.setup.clone(),
            placement: r.placement.clone(),
            at_unix_ms: r.at_unix_ms,
            points: r
                .points
                .iter()
                .map(|p| PointJson {
                    depth: p.depth,
                    concurrency: p.concurrency,
                    prompt_tokens: p.prompt_tokens,
                    gen_tokens: p.gen_tokens,
                    runs: p.runs,
                    pp_tokens_per_second: p.pp,
                    tg_tokens_per_second: p.tg,
                    ttft_ms: p.ttft_ms,
                })
                .collect(),
        }
    }
}

/// A rate as a person reads it.
pub fn rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn range(s: &Spread) -> String {
    format!("{}-{}", rate(s.min), rate(s.max))
}

/// One line describing a setup.
pub fn setup_line(s: &BenchSetup) -> String {
    let or_default = |v: &str| {
        if v.is_empty() {
            "f16".to_owned()
        } else {
            v.to_owned()
        }
    };
    let place = if s.gateway.is_empty() {
        s.node.clone()
    } else {
        format!(
            "{} replica{} through the gateway {} on {}",
            s.replicas,
            if s.replicas == 1 { "" } else { "s" },
            s.gateway,
            s.node
        )
    };
    format!(
        "{} on {}: llama.cpp {}, context {} ({} slot{}), KV {}/{}, flash attention {}, threads {}",
        s.model,
        place,
        if s.llama_build.is_empty() {
            "(unknown build)"
        } else {
            &s.llama_build
        },
        s.context_size,
        s.slots,
        if s.slots == 1 { "" } else { "s" },
        or_default(&s.cache_type_k),
        or_default(&s.cache_type_v),
        s.flash_attention,
        if s.threads == 0 {
            "default".to_owned()
        } else {
            s.threads.to_string()
        },
    )
}

/// The table of fresh results: a setup line per node, then its points.
pub fn render_results(results: &[BenchJson]) -> String {
    let mut out = String::new();
    for r in results {
        out.push_str(&setup_line(&r.setup));
        out.push('\n');
    }
    let mut t = Table::new([
        "NODE",
        "DEPTH",
        "STREAMS",
        "PROMPT",
        "GEN",
        "RUNS",
        "PP T/S",
        "(MIN-MAX)",
        "TG T/S",
        "(MIN-MAX)",
        "TTFT MS",
    ]);
    for r in results {
        for p in &r.points {
            t.row([
                r.setup.node.clone(),
                p.depth.to_string(),
                p.concurrency.to_string(),
                p.prompt_tokens.to_string(),
                p.gen_tokens.to_string(),
                p.runs.to_string(),
                rate(p.pp_tokens_per_second.median),
                range(&p.pp_tokens_per_second),
                rate(p.tg_tokens_per_second.median),
                range(&p.tg_tokens_per_second),
                rate(p.ttft_ms.median),
            ]);
        }
    }
    out.push_str(&t.render());
    out
}

/// `YYYY-MM-DD HH:MM` (UTC) of a Unix time in ms.
pub fn date(unix_ms: u64) -> String {
    let secs = i64::try_from(unix_ms / 1000).unwrap_or(i64::MAX);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        ),
        Err(_) => "-".into(),
    }
}

/// The `--history` table: one row per kept point, each setup (file, node,
/// build, settings) lettered and described once, so figures measured under
/// different conditions are never read as one series.
pub fn render_history(model: &str, results: &[BenchJson]) -> String {
    if results.is_empty() {
        return format!(
            "no kept bench results for {model} (`haloctl bench {model} --yes` makes one)\n"
        );
    }
    let mut setups: Vec<&BenchSetup> = Vec::new();
    for r in results {
        if !setups.contains(&&r.setup) {
            setups.push(&r.setup);
        }
    }
    let letter = |s: &BenchSetup| {
        let i = setups.iter().position(|x| *x == s).unwrap_or(0);
        setup_letter(i)
    };
    let mut out = String::new();
    for (i, s) in setups.iter().enumerate() {
        out.push_str(&format!("{}: {}\n", setup_letter(i), setup_line(s)));
    }
    let mut t = Table::new([
        "SETUP", "AT (UTC)", "NODE", "DEPTH", "STREAMS", "PROMPT", "GEN", "RUNS", "PP T/S",
        "TG T/S", "TTFT MS",
    ]);
    for r in results {
        for p in &r.points {
            t.row([
                letter(&r.setup),
                date(r.at_unix_ms),
                r.setup.node.clone(),
                p.depth.to_string(),
                p.concurrency.to_string(),
                p.prompt_tokens.to_string(),
                p.gen_tokens.to_string(),
                p.runs.to_string(),
                rate(p.pp_tokens_per_second.median),
                rate(p.tg_tokens_per_second.median),
                rate(p.ttft_ms.median),
            ]);
        }
    }
    out.push_str(&t.render());
    out
}

fn setup_letter(i: usize) -> String {
    let a = b'A' + (i % 26) as u8;
    if i < 26 {
        char::from(a).to_string()
    } else {
        format!("{}{}", char::from(a), i / 26)
    }
}

/// The setup a placement's replica on `node` runs with now (build from
/// the node's agent); what kept results are compared with.
pub fn current_setup(
    p: &v1::Placement,
    node: &str,
    llama_build: &str,
    file_bytes: u64,
    slot_ctx: Option<u32>,
) -> BenchSetup {
    let o = p.options.clone().unwrap_or_default();
    let cache = |raw: i32| {
        proto::domain::CacheType::from_wire("cache_type", raw)
            .ok()
            .flatten()
            .map(|c| c.name().to_owned())
            .unwrap_or_default()
    };
    let slots = o.parallel.max(1);
    BenchSetup {
        model: p.model.clone(),
        model_id: p.model_id.clone(),
        model_file_bytes: file_bytes,
        node: node.to_owned(),
        llama_build: llama_build.to_owned(),
        context_size: if o.context_size > 0 {
            o.context_size
        } else {
            slot_ctx.map_or(0, |c| c.saturating_mul(slots))
        },
        slots,
        cache_type_k: cache(o.cache_type_k),
        cache_type_v: cache(o.cache_type_v),
        flash_attention: match o.flash_attention {
            Some(true) => "on",
            Some(false) => "off",
            None => "auto",
        }
        .to_owned(),
        threads: o.threads.unwrap_or(0),
        gateway: String::new(),
        replicas: 0,
    }
}

/// One replica to measure.
struct Target1 {
    placement: String,
    node: String,
    server: Server,
    props: Props,
    setup: BenchSetup,
    /// Through a gateway: no slot pinned, the placement named as model.
    via_gateway: bool,
}

/// A gateway to measure through: its base URL and node.
struct Gateway {
    url: String,
    node: String,
}

/// `haloctl bench`.
pub fn run(t: &Target, a: &BenchArgs) -> Result<(), Failure> {
    let rt = crate::client::runtime()?;
    rt.block_on(async {
        if a.history {
            return history(t, a).await;
        }
        let (targets, gateway) = prepare(t, a).await?;
        let mut results = Vec::new();
        match gateway {
            Some(gw) => results.push(through_gateway(t, a, &targets, &gw).await?),
            None => {
                for tg in &targets {
                    results.push(measure(a, tg).await?);
                }
            }
        }
        let json: Vec<BenchJson> = results.iter().map(BenchJson::from).collect();
        match a.output {
            Format::Json => print_json(&json)?,
            Format::Table => print(&render_results(&json)),
        }
        if a.no_store {
            return Ok(());
        }
        let mut c = t.connect().await?;
        for r in results {
            let node = r.setup.node.clone();
            c.put_bench_result(v1::PutBenchResultRequest {
                result: Some(r.into()),
            })
            .await
            .map_err(|s| match t.status(s) {
                Failure::Refused(m) | Failure::Usage(m) => Failure::Refused(format!(
                    "the result on {node} was measured but not kept: {m}"
                )),
                f => f,
            })?;
        }
        if a.output == Format::Table {
            eprintln!(
                "haloctl: kept (`haloctl bench --history {}` shows it)",
                a.name
            );
        }
        Ok(())
    })
}

/// Resolves NAME to a placement and checks everything before measuring.
async fn prepare(t: &Target, a: &BenchArgs) -> Result<(Vec<Target1>, Option<Gateway>), Failure> {
    let refused = |m: String| Failure::Refused(m);
    let mut c = t.connect().await?;
    let placements = c
        .list_placements(v1::ListPlacementsRequest {})
        .await
        .map_err(|s| t.status(s))?
        .into_inner()
        .placements;
    let p = find_placement(&placements, &a.name).map_err(refused)?;
    let catalog = c
        .list_catalog(v1::ListCatalogRequest {})
        .await
        .map_err(|s| t.status(s))?
        .into_inner()
        .entries;
    let file_bytes = catalog
        .iter()
        .find(|e| e.name == p.model)
        .map_or(0, |e| e.file_size_bytes);
    let nodes = c
        .list_nodes(v1::ListNodesRequest {})
        .await
        .map_err(|s| t.status(s))?
        .into_inner()
        .nodes;
    let endpoints = c
        .endpoints(v1::EndpointsRequest {})
        .await
        .map_err(|s| t.status(s))?
        .into_inner()
        .endpoints;
    let mut replicas: Vec<&v1::Replica> = p.replicas.iter().collect();
    if let Some(n) = &a.node {
        replicas.retain(|r| &r.node == n);
        if replicas.is_empty() {
            let on: Vec<&str> = p.replicas.iter().map(|r| r.node.as_str()).collect();
            return Err(refused(format!(
                "placement `{}` has no replica on node `{n}` (its replicas are on: {})",
                p.name,
                if on.is_empty() {
                    "none".to_owned()
                } else {
                    on.join(", ")
                }
            )));
        }
    }
    if replicas.is_empty() {
        return Err(refused(format!(
            "placement `{}` has no replicas: nothing to measure",
            p.name
        )));
    }
    // Every measured replica must be ready.
    for r in &replicas {
        let state = r.instance.as_ref().map(|i| i.state);
        if state != Some(v1::InstanceState::Ready as i32) {
            let what = match &r.instance {
                Some(i) => proto::domain::InstanceState::from_wire(i.state)
                    .map_or("unknown", proto::domain::InstanceState::as_str)
                    .to_owned(),
                None if !r.start_refused.is_empty() => format!("not started ({})", r.start_refused),
                None => "not started yet".to_owned(),
            };
            return Err(refused(format!(
                "placement `{}` is not ready on {}: its instance is {what}; nothing was measured \
                 (`haloctl status` shows it; bench a ready placement, or pick one with --node)",
                p.name, r.node
            )));
        }
    }
    let mut depths = a.depth.clone();
    depths.dedup();
    let mut out = Vec::new();
    for r in replicas {
        let Some(e) = endpoints
            .iter()
            .find(|e| e.placement == p.name && e.node == r.node)
        else {
            return Err(refused(format!(
                "placement `{}` on {}: the controller lists no ready endpoint for it",
                p.name, r.node
            )));
        };
        if e.api_key.is_empty() {
            return Err(refused(format!(
                "the controller gave no API key for `{}` on {}: benchmarking talks to \
                 llama-server directly and needs an admin certificate",
                p.name, r.node
            )));
        }
        let server = Server::new(&e.base_url, &e.api_key);
        let props = server.props().await.map_err(|e| {
            Failure::Other(e.context(format!(
                "asking `{}` on {} for its settings",
                p.name, r.node
            )))
        })?;
        // Through a gateway the streams spread over every replica's slots
        // (checked below, in all).
        for &cc in a.concurrency.iter().filter(|_| !a.gateway) {
            if cc > props.total_slots {
                return Err(refused(format!(
                    "--concurrency {cc}: `{}` on {} has {} slot{} (one stream needs one slot; \
                     place it with more `parallel` to measure more streams)",
                    p.name,
                    r.node,
                    props.total_slots,
                    if props.total_slots == 1 { "" } else { "s" }
                )));
            }
        }
        for &d in &depths {
            let need = u64::from(d) + u64::from(a.prompt_tokens) + u64::from(a.gen_tokens);
            if need > u64::from(props.slot_ctx) {
                return Err(refused(format!(
                    "--depth {d}: {d} + {} prompt + {} generated tokens = {need} exceed the \
                     context of a slot of `{}` on {} ({} tokens); nothing was measured",
                    a.prompt_tokens, a.gen_tokens, p.name, r.node, props.slot_ctx
                )));
            }
        }
        let build = nodes
            .iter()
            .filter_map(|n| n.node.as_ref())
            .find(|n| n.name == r.node)
            .map(|n| n.llama_version.clone())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| props.build_info.clone());
        let setup = current_setup(p, &r.node, &build, file_bytes, Some(props.slot_ctx));
        out.push(Target1 {
            placement: p.name.clone(),
            node: r.node.clone(),
            server,
            props,
            setup,
            via_gateway: false,
        });
    }
    let gateway = if a.gateway {
        if let Some(&d) = depths.iter().find(|&&d| d > 0) {
            return Err(refused(format!(
                "--depth {d} with --gateway: the gateway picks the replica of each request, so \
                 no prefix can be put in a slot first; measure depths without --gateway"
            )));
        }
        let slots: u32 = out.iter().map(|t| t.props.total_slots).sum();
        if let Some(&cc) = a.concurrency.iter().find(|&&cc| cc > slots) {
            return Err(refused(format!(
                "--concurrency {cc} with --gateway: the ready replicas of `{}` have {slots} \
                 slots in all",
                p.name
            )));
        }
        let gw = nodes.iter().find_map(|n| {
            let id = n.node.as_ref()?;
            let usable = id.gateway_url.starts_with("http://")
                || (id.gateway_url.starts_with("https://") && t.ca_pem.is_some());
            (n.status == v1::NodeStatus::Ready as i32 && usable).then(|| Gateway {
                url: id.gateway_url.clone(),
                node: id.name.clone(),
            })
        });
        Some(gw.ok_or_else(|| {
            refused(
                "--gateway: no ready node serves a gateway haloctl can reach \
                 (`gateway_listen` in an agent's config; an HTTPS one needs haloctl's \
                 certificate files, whose CA signed it); measure without --gateway"
                    .to_owned(),
            )
        })?)
    } else {
        None
    };
    if !a.yes {
        return Err(refused(format!(
            "`{}` may be serving users: a benchmark takes its slots while it runs and slows \
             their requests (the placement is not changed). Run again with --yes to measure",
            p.name
        )));
    }
    Ok((out, gateway))
}

/// Measures the streams through `gw` with a temporary user key scoped to
/// the placement (made here, revoked when done, whatever happened).
async fn through_gateway(
    t: &Target,
    a: &BenchArgs,
    replicas: &[Target1],
    gw: &Gateway,
) -> Result<BenchResult, Failure> {
    let Some(first) = replicas.first() else {
        return Err(Failure::Refused("no ready replica to measure".into()));
    };
    let mut c = t.connect().await?;
    let key_name = format!("bench-{}", proto::units::now_unix_ms());
    let key = c
        .create_key(v1::CreateKeyRequest {
            name: key_name.clone(),
            models: vec![first.placement.clone()],
            expires_days: 1,
            ..Default::default()
        })
        .await
        .map_err(|s| t.status(s))?
        .into_inner()
        .secret;
    let mut setup = first.setup.clone();
    setup.node.clone_from(&gw.node);
    setup.gateway.clone_from(&gw.url);
    setup.replicas = u32::try_from(replicas.len()).unwrap_or(u32::MAX);
    let target = || -> Result<Target1, Failure> {
        Ok(Target1 {
            placement: first.placement.clone(),
            node: format!("the gateway on {}", gw.node),
            server: match &t.ca_pem {
                Some(ca) => Server::with_ca(&gw.url, &key, ca).map_err(|e| {
                    Failure::Other(e.context(format!("TLS settings for the gateway {}", gw.url)))
                })?,
                None => Server::new(&gw.url, &key),
            },
            props: Props {
                total_slots: replicas.iter().map(|r| r.props.total_slots).sum(),
                ..first.props.clone()
            },
            setup,
            via_gateway: true,
        })
    };
    // The gateway learns the key from the controller within a second or
    // two: not inside the first measured run. The key is revoked below
    // whatever happens here.
    let r = match target() {
        Ok(target) => match target.server.wait_models(Duration::from_secs(10)).await {
            Ok(()) => measure(a, &target).await,
            Err(e) => Err(Failure::Other(
                e.context(format!("the gateway {} did not take the key", gw.url)),
            )),
        },
        Err(e) => Err(e),
    };
    if let Err(s) = c
        .revoke_key(v1::RevokeKeyRequest {
            name: key_name.clone(),
        })
        .await
    {
        eprintln!(
            "haloctl: could not revoke the temporary key `{key_name}` ({}); it expires in a \
             day, or `haloctl keys revoke {key_name}`",
            s.message()
        );
    }
    r
}

/// The placement named `name`, else the only placement of catalog model
/// `name`.
pub fn find_placement<'a>(
    placements: &'a [v1::Placement],
    name: &str,
) -> Result<&'a v1::Placement, String> {
    if let Some(p) = placements.iter().find(|p| p.name == name) {
        return Ok(p);
    }
    let of_model: Vec<&v1::Placement> = placements.iter().filter(|p| p.model == name).collect();
    match of_model.as_slice() {
        [p] => Ok(p),
        [] => Err(format!(
            "no placement named `{name}` (`haloctl status` lists them; `haloctl place` makes one)"
        )),
        many => Err(format!(
            "`{name}` is placed {} times ({}): name the placement",
            many.len(),
            many.iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Deterministic token ids: a small generator (splitmix64) over the middle
/// of the vocabulary, away from the special tokens at either end.
fn tokens(n_vocab: u32, seed: u64, n: u32) -> Vec<u32> {
    let lo = n_vocab / 4;
    let span = u64::from((n_vocab / 2).saturating_sub(lo).max(1));
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            lo + (z % span) as u32
        })
        .collect()
}

struct Progress {
    tty: bool,
}

impl Progress {
    fn show(&self, line: &str) {
        let mut e = std::io::stderr().lock();
        if self.tty {
            let _ = write!(e, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(e, "{line}");
        }
        let _ = e.flush();
    }

    fn done(&self) {
        if self.tty {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[2K");
        }
    }
}

/// Measures every point on one replica.
async fn measure(a: &BenchArgs, t: &Target1) -> Result<BenchResult, Failure> {
    let progress = Progress {
        tty: std::io::stderr().is_terminal() && a.output == Format::Table,
    };
    let mut depths = a.depth.clone();
    depths.dedup();
    let mut concs = a.concurrency.clone();
    concs.dedup();
    let total = depths.len() * concs.len();
    let mut points = Vec::new();
    let mut seed = proto::units::now_unix_ms();
    for &depth in &depths {
        for &cc in &concs {
            // Each stream's slot holds its prefix before the timed runs.
            let prefixes: Vec<Vec<u32>> = (0..cc)
                .map(|s| {
                    tokens(
                        t.props.n_vocab,
                        0x5eed_0000 + u64::from(depth) * 1000 + u64::from(s),
                        depth,
                    )
                })
                .collect();
            let (mut pp, mut tg, mut ttft) = (Vec::new(), Vec::new(), Vec::new());
            for run in 1..=a.runs {
                progress.show(&format!(
                    "haloctl: bench {} on {}: depth {depth}, {cc} stream{}, run {run}/{} (point {} of {total})",
                    t.setup.model,
                    t.node,
                    if cc == 1 { "" } else { "s" },
                    a.runs,
                    points.len() + 1
                ));
                if depth > 0 {
                    let fills = (0..cc).map(|s| {
                        let server = t.server.clone();
                        let prefix = prefixes[s as usize].clone();
                        async move { server.fill(s, &prefix).await }
                    });
                    for f in join_all(fills).await {
                        f.map_err(|e| {
                            Failure::Other(e.context(format!("filling the cache on {}", t.node)))
                        })?;
                    }
                }
                let streams = (0..cc).map(|s| {
                    seed = seed.wrapping_add(7919);
                    let mut prompt = prefixes[s as usize].clone();
                    prompt.extend(tokens(t.props.n_vocab, seed, a.prompt_tokens));
                    let server = t.server.clone();
                    let gen_tokens = a.gen_tokens;
                    let (slot, model) = if t.via_gateway {
                        (None, Some(t.placement.clone()))
                    } else {
                        (Some(s), None)
                    };
                    async move {
                        server
                            .complete(slot, model.as_deref(), &prompt, gen_tokens, depth > 0)
                            .await
                    }
                });
                let measured: Vec<Measured> = join_all(streams.collect::<Vec<_>>())
                    .await
                    .into_iter()
                    .collect::<anyhow::Result<_>>()
                    .map_err(|e| Failure::Other(e.context(format!("measuring on {}", t.node))))?;
                for m in &measured {
                    check_counts(a, depth, m).map_err(|e| {
                        Failure::Other(anyhow::anyhow!("on {}: {e}; nothing was kept", t.node))
                    })?;
                }
                let max = |f: fn(&Measured) -> f64| measured.iter().map(f).fold(0.0, f64::max);
                let sum = |f: fn(&Measured) -> u64| measured.iter().map(f).sum::<u64>() as f64;
                let pp_ms = max(|m| m.timings.prompt_ms);
                let tg_ms = max(|m| m.timings.predicted_ms);
                pp.push(per_second(sum(|m| m.timings.prompt_n), pp_ms));
                tg.push(per_second(sum(|m| m.timings.predicted_n), tg_ms));
                ttft.push(max(|m| m.ttft_ms));
            }
            points.push(BenchPoint {
                depth,
                concurrency: cc,
                prompt_tokens: a.prompt_tokens,
                gen_tokens: a.gen_tokens,
                runs: a.runs,
                pp: Spread::of(&pp),
                tg: Spread::of(&tg),
                ttft_ms: Spread::of(&ttft),
            });
        }
    }
    progress.done();
    Ok(BenchResult {
        setup: t.setup.clone(),
        placement: t.placement.clone(),
        at_unix_ms: proto::units::now_unix_ms(),
        points,
    })
}

fn per_second(n: f64, ms: f64) -> f64 {
    if ms > 0.0 { n * 1000.0 / ms } else { 0.0 }
}

/// The server processed and generated what was asked: the depth came from
/// the cache, the prompt was processed (one token more when llama-server
/// re-evaluates the last cached one), and every token was generated.
fn check_counts(a: &BenchArgs, depth: u32, m: &Measured) -> Result<(), String> {
    let t = m.timings;
    let (want_p, want_g) = (u64::from(a.prompt_tokens), u64::from(a.gen_tokens));
    if t.predicted_n != want_g {
        return Err(format!(
            "llama-server generated {} tokens where {want_g} were asked",
            t.predicted_n
        ));
    }
    if t.prompt_n < want_p || t.prompt_n > want_p + 1 {
        return Err(format!(
            "llama-server processed {} prompt tokens ({} from its cache) where {want_p} new \
             tokens after a cached depth of {depth} were sent",
            t.prompt_n, t.cache_n
        ));
    }
    Ok(())
}

async fn join_all<F, T>(futs: impl IntoIterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(v) => out.push(v),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    out
}

/// `haloctl bench --history NAME`.
async fn history(t: &Target, a: &BenchArgs) -> Result<(), Failure> {
    let mut c = t.connect().await?;
    let placements = c
        .list_placements(v1::ListPlacementsRequest {})
        .await
        .map_err(|s| t.status(s))?
        .into_inner()
        .placements;
    let model = match find_placement(&placements, &a.name) {
        Ok(p) => p.model.clone(),
        Err(_) => a.name.clone(),
    };
    let catalog = c
        .list_catalog(v1::ListCatalogRequest {})
        .await
        .map_err(|s| t.status(s))?
        .into_inner()
        .entries;
    let resp = c
        .list_bench_results(v1::ListBenchResultsRequest {
            model: model.clone(),
        })
        .await
        .map_err(|s| t.status(s))?
        .into_inner();
    if resp.results.is_empty() && !catalog.iter().any(|e| e.name == model) {
        return Err(Failure::Refused(format!(
            "`{}` is neither a placement nor a catalog model (`haloctl models` lists them)",
            a.name
        )));
    }
    let results: Vec<BenchJson> = resp
        .results
        .into_iter()
        .filter_map(|r| BenchResult::try_from(r).ok())
        .filter(|r| a.node.as_ref().is_none_or(|n| &r.setup.node == n))
        .map(|r| BenchJson::from(&r))
        .collect();
    match a.output {
        Format::Json => print_json(&results)?,
        Format::Table => print(&render_history(&model, &results)),
    }
    Ok(())
}
