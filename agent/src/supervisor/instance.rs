//! One instance's task: spawn (or take over an adopted process), watch it
//! through `GET /health` and process exit, restart it with exponential
//! back-off after failures, and terminate it on a stop request.
//!
//! States: `Starting` (spawning) → `Loading` (the process runs, `/health`
//! refuses or answers 503) → `Ready` (200) → on exit or a stalled load
//! `Failed` (reason: exit code or signal plus the last log lines) → back-off
//! → `Starting`…; a stop request goes `Stopping` → `Stopped` from any state.
//! A process this run spawned is watched through its child handle (exit
//! status known); an adopted one by polling pid + start time.
//!
//! Liveness: a ready llama-server's `/health` is probed every
//! `health_period` with a `health_timeout` deadline. llama-server answers it
//! from its HTTP threads, not the thread that generates, so a busy server
//! answers at once (milliseconds under a long generation); a probe that
//! gets no answer, or anything but 200, fails. `health_failures` failures
//! in a row make the instance `Unhealthy` (published, so the gateway stops
//! routing to it), then its process group is killed with SIGKILL (a hung
//! or stopped process acts on nothing else) → `Failed` → back-off →
//! restart. One answer resets the count.
//!
//! Model file: at each probe period the file after `-m` is compared with
//! the identity recorded when the instance was created
//! ([`super::modelfile`]); a deleted or replaced file is reported on the
//! instance (the process keeps what it mapped), and a spawn is refused
//! while the name holds another file.
//!
//! A ggml-rpc-server is `Loading` until its loopback port accepts a TCP
//! connection, then `Ready`. Its proxy ([`super::rpcproxy`]) is a second
//! process in its group, watched with it: either one exiting fails the
//! instance and ends the other. It is never restarted: after `Failed` the
//! task only waits for the stop.

use super::cgroup::{self, InstanceCgroup};
use super::health::health;
use super::logs::LogTail;
use super::modelfile::{self, FileIdentity};
use super::oom::OomWatch;
use super::rpcproxy::{PROXY_ARG, ProxyArgs};
use super::{Inner, argv};
use crate::loadlog::LoadLog;
use crate::procfs::{self, ProcessId};
use proto::domain::{InstanceKind, InstanceState, LogLine};
use proto::units::now_unix_ms;
use rustix::process::Signal;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// Poll period while the model loads: the Ready event follows `/health`
/// turning 200 by at most this (plus one request).
const LOADING_POLL: Duration = Duration::from_millis(25);
/// Poll period once ready (log tail, liveness of adopted processes).
const READY_POLL: Duration = Duration::from_millis(500);
/// Deadline of one `/health` request while the model loads.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Grace after SIGKILL before a process counts as stuck.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Log lines quoted in a failure reason.
const REASON_LINES: usize = 12;
/// Log lines a stopped instance keeps in memory (its file keeps the rest).
const STOPPED_RING_LINES: usize = 100;

/// A process the task watches (with an RPC server's proxy process).
// One per instance task, moved a handful of times in its life.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Running {
    /// Spawned by this agent run: its exit status will be known.
    Owned {
        child: Child,
        id: ProcessId,
        proxy: Option<(Child, ProcessId)>,
    },
    /// Found alive on boot; watched by polling.
    Adopted {
        id: ProcessId,
        proxy: Option<ProcessId>,
    },
}

/// How watching a process ended.
#[derive(Debug)]
enum Outcome {
    /// The agent is shutting down: leave the process running.
    Shutdown,
    /// A stop was requested.
    Stop,
    /// The process exited (reason) after being ready for a while (or not).
    Exited { reason: String, ready_for: Duration },
    /// The model did not become ready in time; the process still runs.
    Stalled { reason: String },
    /// A ready llama-server failed its liveness probes; the process still
    /// runs (hung or stopped).
    Unhealthy { reason: String, ready_for: Duration },
    /// The kernel killed llama-server for lack of memory.
    OomKilled {
        reason: String,
        kill: proto::domain::OomKill,
    },
}

/// Longest wait, on a stop, for the requests in progress to finish.
pub(super) const DRAIN_MAX: Duration = Duration::from_secs(15);
/// How often `/slots` is read while draining.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// How an instance task begins.
#[derive(Debug, Clone, Copy)]
pub(super) enum Begin {
    /// Spawn a process.
    Spawn,
    /// Watch a process found alive on boot (and whether it is ready).
    Adopted(ProcessId, bool),
    /// An RPC server that failed before: only wait for the stop.
    Failed,
}

/// Whether an instance at `addr` is ready: llama-server's `/health` answers
/// 200; a ggml-rpc-server accepts a TCP connection (it serves one client
/// at a time and takes an immediate close as a client that left).
pub(super) async fn probe_ready(kind: InstanceKind, addr: SocketAddr, deadline: Duration) -> bool {
    match kind {
        InstanceKind::LlamaServer => health(addr, deadline).await == Some(200),
        InstanceKind::RpcServer => {
            tokio::time::timeout(deadline, tokio::net::TcpStream::connect(addr))
                .await
                .is_ok_and(|r| r.is_ok())
        }
    }
}

/// How a back-off wait ended.
enum Wake {
    Elapsed,
    Stop,
    Shutdown,
}

/// The task of one instance.
#[derive(Debug)]
pub(super) struct InstanceTask {
    inner: Arc<Inner>,
    id: String,
    kind: InstanceKind,
    stop: CancellationToken,
    finished: CancellationToken,
    tail: LogTail,
    load: LoadLog,
    begin: Begin,
    /// The instance's memory cgroup, when the agent makes them.
    cgroup: Option<InstanceCgroup>,
}

impl InstanceTask {
    pub(super) fn new(
        inner: Arc<Inner>,
        id: String,
        kind: InstanceKind,
        stop: CancellationToken,
        finished: CancellationToken,
        log: std::path::PathBuf,
        begin: Begin,
    ) -> InstanceTask {
        let tail = LogTail::new(log, inner.config.max_log_bytes);
        InstanceTask {
            inner,
            id,
            kind,
            stop,
            finished,
            tail,
            load: LoadLog::default(),
            begin,
            cgroup: None,
        }
    }

    /// The program's name, for reasons and logs.
    fn program(&self) -> &'static str {
        match self.kind {
            InstanceKind::LlamaServer => "llama-server",
            InstanceKind::RpcServer => "ggml-rpc-server",
        }
    }

    /// Runs until the instance is stopped or the agent shuts down.
    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        // A back-off after a failure ended: the next process is a restart.
        let mut restarting = false;
        let mut next = match self.begin {
            Begin::Spawn => None,
            Begin::Failed => {
                // A failed RPC server's proxy exits by itself once it sees
                // its server gone; make sure of it, so no stray process
                // keeps the public port.
                let proxy = self
                    .inner
                    .table()
                    .instances
                    .get(&self.id)
                    .and_then(|s| s.record.proxy);
                if let Some(p) = proxy.filter(|p| procfs::is_alive(*p)) {
                    end_adopted_proxy(p).await;
                }
                self.wait_for_stop(&shutdown).await;
                return;
            }
            Begin::Adopted(id, ready) => {
                self.cgroup = self
                    .inner
                    .config
                    .instance_cgroup
                    .as_ref()
                    .and_then(|c| InstanceCgroup::existing(c, &self.id));
                self.tail.seek_back(super::ADOPT_LOG_BYTES);
                self.drain_log();
                let proxy = match self.kind {
                    InstanceKind::LlamaServer => None,
                    InstanceKind::RpcServer => {
                        let recorded = self
                            .inner
                            .table()
                            .instances
                            .get(&self.id)
                            .and_then(|s| s.record.proxy);
                        match recorded.filter(|p| procfs::is_alive(*p)) {
                            Some(p) => Some(p),
                            None => {
                                // Unreachable without its proxy: of no use
                                // to its host.
                                terminate_adopted(id, self.inner.config.stop_timeout).await;
                                let reason = "the RPC proxy was gone when the agent started; \
                                              ggml-rpc-server stopped, not restarted"
                                    .to_owned();
                                self.failed(reason).await;
                                self.wait_for_stop(&shutdown).await;
                                return;
                            }
                        }
                    }
                };
                Some((Running::Adopted { id, proxy }, ready))
            }
        };
        loop {
            if self.stop.is_cancelled() {
                if let Some((running, _)) = next.take() {
                    self.drain().await;
                    self.terminate(running).await;
                }
                self.stopped().await;
                return;
            }
            if shutdown.is_cancelled() {
                return;
            }
            let (mut running, ready) = match next.take() {
                Some(r) => r,
                None => match self.spawn().await {
                    Ok(r) => {
                        // A restart counts once a process runs again (a
                        // refused spawn is not one).
                        if std::mem::take(&mut restarting) {
                            self.count_restart();
                        }
                        (r, false)
                    }
                    Err(reason) => {
                        failures = failures.saturating_add(1);
                        self.failed(reason).await;
                        if self.kind == InstanceKind::RpcServer {
                            self.wait_for_stop(&shutdown).await;
                            return;
                        }
                        match self.back_off(failures, &shutdown).await {
                            Wake::Elapsed => restarting = true,
                            Wake::Stop => {}
                            Wake::Shutdown => return,
                        }
                        continue;
                    }
                },
            };
            match self.watch(&mut running, ready, &shutdown).await {
                Outcome::Shutdown => return,
                Outcome::Stop => {
                    self.drain().await;
                    self.terminate(running).await;
                    self.stopped().await;
                    return;
                }
                Outcome::Exited { reason, ready_for } => {
                    failures = if ready_for >= self.inner.config.restart_stable {
                        1
                    } else {
                        failures.saturating_add(1)
                    };
                    // The other process of an RPC server's pair.
                    self.end_rest(running).await;
                    self.failed(reason).await;
                }
                Outcome::OomKilled { reason, kill } => {
                    tracing::warn!(instance = %self.id, "{}", kill.describe(self.program()));
                    self.inner
                        .update(&self.id, |s| s.record.oom_kill = Some(kill));
                    self.failed(reason).await;
                    // Not restarted: it would be killed again. The
                    // controller sizes it by what it used and places it.
                    self.wait_for_stop(&shutdown).await;
                    return;
                }
                Outcome::Stalled { reason } => {
                    self.terminate(running).await;
                    failures = failures.saturating_add(1);
                    self.failed(reason).await;
                }
                Outcome::Unhealthy { reason, ready_for } => {
                    tracing::warn!(instance = %self.id, "unhealthy: {reason}; killing it");
                    self.inner
                        .set_state(&self.id, InstanceState::Unhealthy, Some(reason.clone()));
                    self.kill(running).await;
                    failures = if ready_for >= self.inner.config.restart_stable {
                        1
                    } else {
                        failures.saturating_add(1)
                    };
                    let reason = format!("{reason}; killed with SIGKILL");
                    let reason = self.with_last_lines(reason);
                    self.failed(reason).await;
                }
            }
            if self.kind == InstanceKind::RpcServer {
                self.wait_for_stop(&shutdown).await;
                return;
            }
            match self.back_off(failures, &shutdown).await {
                Wake::Elapsed => restarting = true,
                Wake::Stop => {}
                Wake::Shutdown => return,
            }
        }
    }

    /// Spawns llama-server with the recorded argv, stdout and stderr
    /// appended to the log file, in its own process group, with a cleared
    /// environment. Records its identity before reporting it.
    async fn spawn(&mut self) -> Result<Running, String> {
        let inner = self.inner.clone();
        inner.set_state(&self.id, InstanceState::Starting, None);
        let Some((argv, restarts)) = inner
            .table()
            .instances
            .get(&self.id)
            .map(|s| (s.record.argv.clone(), s.record.restart_count))
        else {
            return Err("instance record vanished".into());
        };
        let Some((program, args)) = argv.split_first() else {
            return Err("empty argv".into());
        };
        if self.kind == InstanceKind::LlamaServer {
            self.check_model_before_spawn(&argv).await?;
        }
        let procs = match (&inner.config.instance_cgroup, self.kind) {
            (Some(config), InstanceKind::LlamaServer) => {
                let estimate = inner
                    .table()
                    .instances
                    .get(&self.id)
                    .map_or(0, |s| s.record.estimate_bytes);
                let cg = InstanceCgroup::prepare(config, &self.id, estimate)?;
                let procs = cg.procs_path()?;
                self.cgroup = Some(cg);
                Some(procs)
            }
            _ => None,
        };
        // An RPC server's public port is its proxy's: bound before the
        // server exists, so a port in use fails the start cleanly.
        let public = match self.kind {
            InstanceKind::LlamaServer => None,
            InstanceKind::RpcServer => Some(self.bind_public()?),
        };
        let log_path = self.tail.path().to_owned();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&log_path)
            .and_then(|mut f| {
                use std::io::Write;
                // Tail from before the marker so it shows in the ring.
                self.tail.seek_end();
                writeln!(
                    f,
                    "----- halo-agent: starting {} (restart {restarts}) at unix ms {} -----",
                    self.program(),
                    now_unix_ms()
                )?;
                Ok(f)
            })
            .map_err(|e| format!("cannot open log {}: {e}", log_path.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("cannot open log {}: {e}", log_path.display()))?;
        let dir = log_path
            .parent()
            .map(std::path::Path::to_owned)
            .unwrap_or_default();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .envs(argv::environment())
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .process_group(0)
            .kill_on_drop(false);
        if let Some(procs) = procs {
            // SAFETY: the closure runs in the child between fork and exec
            // and makes only system calls (open, write, close): nothing
            // that allocates or takes a lock.
            unsafe {
                cmd.pre_exec(move || cgroup::join_in_child(&procs));
            }
        }
        let mut child = cmd.spawn().map_err(|e| match &self.cgroup {
            Some(cg) => format!(
                "cannot start {program} in cgroup {}: {e}",
                cg.dir().display()
            ),
            None => format!("cannot start {program}: {e}"),
        })?;
        let Some(pid) = child.id() else {
            return Err(format!(
                "{} exited before it could be recorded",
                self.program()
            ));
        };
        // Raising a child's OOM score needs no privilege; failing to is
        // logged, not fatal (the instance still runs).
        if let Err(e) = std::fs::write(
            format!("/proc/{pid}/oom_score_adj"),
            super::INSTANCE_OOM_SCORE_ADJ.to_string(),
        ) {
            tracing::warn!(instance = %self.id, pid, "cannot set oom_score_adj: {e}");
        }
        // The child is not reaped until we wait, so its stat is readable.
        let start_ticks = procfs::start_ticks(pid).unwrap_or(0);
        let id = ProcessId { pid, start_ticks };
        let proxy = match public {
            None => None,
            Some(listener) => match self.spawn_proxy(listener, id, &log_path, &dir) {
                Ok(p) => Some(p),
                Err(reason) => {
                    // Not reaped yet, so the group is still the server's.
                    signal(pid, Signal::KILL);
                    let _ = tokio::time::timeout(KILL_WAIT, child.wait()).await;
                    return Err(reason);
                }
            },
        };
        self.load = LoadLog::default();
        let proxy_id = proxy.as_ref().map(|(_, p)| *p);
        inner.update(&self.id, |s| {
            s.record.process = Some(id);
            s.record.proxy = proxy_id;
            s.record.observed = None;
        });
        if let Err(e) = inner.persist().await {
            tracing::error!(instance = %self.id, "recording pid {pid} failed: {e}");
        }
        tracing::info!(instance = %self.id, pid, "spawned {}", self.program());
        inner.set_state(&self.id, InstanceState::Loading, None);
        Ok(Running::Owned { child, id, proxy })
    }

    /// A llama-server's model file must be the one the instance was created
    /// with, and still resolve inside the model directories (a symlink may
    /// have been swapped since). A record without an identity (written
    /// before identities were kept) takes the file found now.
    async fn check_model_before_spawn(&self, argv: &[String]) -> Result<(), String> {
        let Some(path) = modelfile::model_path(argv).map(std::path::Path::to_owned) else {
            return Err("the recorded command line names no model file (-m)".into());
        };
        let recorded = self
            .inner
            .table()
            .instances
            .get(&self.id)
            .and_then(|s| s.record.model_file);
        let stat_path = path.clone();
        let now = tokio::task::spawn_blocking(move || FileIdentity::of(&stat_path))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let change = match &recorded {
            Some(loaded) => modelfile::change(&path, loaded, &now),
            None => now
                .as_ref()
                .err()
                .map(|e| format!("the model file {} cannot be read: {e}", path.display())),
        };
        self.inner.update(&self.id, |s| {
            s.model_file_changed = change.clone().unwrap_or_default();
        });
        if let Some(change) = change {
            return Err(format!(
                "{change}; not restarted: it would load a different file under the same \
                 name (stop the instance and start the model again to load the file there now)"
            ));
        }
        if recorded.is_none()
            && let Ok(id) = now
        {
            self.inner
                .update(&self.id, |s| s.record.model_file = Some(id));
        }
        let inside = path
            .canonicalize()
            .is_ok_and(|p| crate::scan::is_inside(&self.inner.config.model_dirs, &p));
        if !inside {
            return Err(format!(
                "the model file {} now resolves outside the model directories",
                path.display()
            ));
        }
        Ok(())
    }

    /// Compares a running llama-server's model file with the one it was
    /// started with and publishes a change (once per change).
    async fn watch_model_file(&self) {
        let found = self.inner.table().instances.get(&self.id).and_then(|s| {
            let path = modelfile::model_path(&s.record.argv)?.to_owned();
            Some((path, s.record.model_file?))
        });
        let Some((path, loaded)) = found else {
            return;
        };
        let stat_path = path.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || FileIdentity::of(&stat_path)).await
        else {
            return;
        };
        let change = modelfile::change(&path, &loaded, &now).unwrap_or_default();
        let mut changed = false;
        self.inner.update(&self.id, |s| {
            if s.model_file_changed != change {
                s.model_file_changed.clone_from(&change);
                changed = true;
            }
        });
        if changed {
            if change.is_empty() {
                tracing::info!(instance = %self.id, "the model file is the one loaded again");
            } else {
                tracing::warn!(instance = %self.id, "{change}; the instance keeps running from what it loaded, a restart will be refused");
            }
            self.inner.emit_instance(&self.id);
        }
    }

    /// Watches a process until it exits, stalls, or a stop or shutdown.
    async fn watch(
        &mut self,
        running: &mut Running,
        already_ready: bool,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let inner = self.inner.clone();
        let Some(addr) = inner
            .table()
            .instances
            .get(&self.id)
            .map(|s| inner.ready_addr(&s.record))
        else {
            return Outcome::Stop;
        };
        let since = Instant::now();
        let mut ready_at = already_ready.then(Instant::now);
        let mut tick = new_interval(if already_ready {
            READY_POLL
        } else {
            LOADING_POLL
        });
        let c = &inner.config;
        let (period, timeout, threshold) = (c.health_period, c.health_timeout, c.health_failures);
        // Liveness probes and model file checks (llama-server only: an RPC
        // server's port accepts at the kernel's backlog whatever the process
        // does, so connecting proves nothing once it is up).
        let mut live = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        live.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let watch_live = self.kind == InstanceKind::LlamaServer;
        let mut probe: std::pin::Pin<Box<dyn Future<Output = Option<u16>> + Send>> =
            Box::pin(std::future::pending());
        // What it uses and the OOM counters, for telling an OOM kill apart.
        let pid = match running {
            Running::Owned { id, .. } | Running::Adopted { id, .. } => id.pid,
        };
        let mut oom = watch_live.then(|| OomWatch::new(&inner.probe, pid, self.cgroup.clone()));
        let mut probing = false;
        let mut failed_probes: u32 = 0;
        loop {
            let program = self.program();
            let exited = async {
                match running {
                    Running::Owned {
                        child,
                        proxy: Some((proxy, _)),
                        ..
                    } => tokio::select! {
                        s = child.wait() => Some((program, s)),
                        s = proxy.wait() => Some(("the RPC proxy", s)),
                    },
                    Running::Owned { child, .. } => Some((program, child.wait().await)),
                    Running::Adopted { .. } => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = self.stop.cancelled() => return Outcome::Stop,
                () = shutdown.cancelled() => return Outcome::Shutdown,
                status = exited => {
                    self.drain_log();
                    if let Some((who, Ok(st))) = &status
                        && *who == program
                        && killed_by_sigkill(*st)
                        && let Some(out) = self.oom_verdict(oom.as_ref())
                    {
                        return out;
                    }
                    let reason = match status {
                        Some((who, Ok(status))) => describe_exit(who, status),
                        Some((who, Err(e))) => format!("waiting for {who} failed: {e}"),
                        None => format!("{program} exited"),
                    };
                    return Outcome::Exited {
                        reason: self.with_last_lines(reason),
                        ready_for: ready_at.map_or(Duration::ZERO, |t| t.elapsed()),
                    };
                }
                code = &mut probe, if probing => {
                    probing = false;
                    if code == Some(200) {
                        if failed_probes > 0 {
                            tracing::info!(instance = %self.id, "/health answered again after {failed_probes} failed probe(s)");
                        }
                        failed_probes = 0;
                        continue;
                    }
                    failed_probes += 1;
                    let what = match code {
                        None => format!("no answer within {} ms", timeout.as_millis()),
                        Some(code) => format!("HTTP {code}"),
                    };
                    tracing::info!(instance = %self.id, "/health probe failed ({failed_probes} of {threshold} in a row): {what}");
                    if failed_probes >= threshold {
                        return Outcome::Unhealthy {
                            reason: format!(
                                "{} failed {failed_probes} /health probes in a row (every {} ms, last: {what})",
                                self.program(),
                                period.as_millis()
                            ),
                            ready_for: ready_at.map_or(Duration::ZERO, |t| t.elapsed()),
                        };
                    }
                    continue;
                }
                _ = live.tick(), if watch_live => {
                    self.watch_model_file().await;
                    if ready_at.is_some() && !probing {
                        probe = Box::pin(health(addr, timeout));
                        probing = true;
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            self.drain_log();
            if let Some(w) = &mut oom {
                w.sample(&inner.probe);
            }
            if let Running::Adopted {
                proxy: Some(proxy), ..
            } = running
                && !procfs::is_alive(*proxy)
            {
                let reason = format!(
                    "the RPC proxy (pid {}) exited; status unknown (adopted after an agent restart)",
                    proxy.pid
                );
                return Outcome::Exited {
                    reason: self.with_last_lines(reason),
                    ready_for: ready_at.map_or(Duration::ZERO, |t| t.elapsed()),
                };
            }
            if let Running::Adopted { id, .. } = running
                && !procfs::is_alive(*id)
            {
                // Not its parent: the cause is unknown, but a counter that
                // rose tells an OOM kill.
                if let Some(out) = self.oom_verdict(oom.as_ref()) {
                    return out;
                }
                let reason = format!(
                    "{} (pid {}) exited; status unknown (adopted after an agent restart, not its child)",
                    self.program(),
                    id.pid
                );
                return Outcome::Exited {
                    reason: self.with_last_lines(reason),
                    ready_for: ready_at.map_or(Duration::ZERO, |t| t.elapsed()),
                };
            }
            if ready_at.is_some() {
                continue;
            }
            if probe_ready(self.kind, addr, HEALTH_TIMEOUT).await {
                // Lines printed before the server answered hold the buffers.
                self.drain_log();
                let observed = match self.kind {
                    // This node's buffers: a split host's RPC devices are
                    // other nodes' memory, reported by their agents.
                    InstanceKind::LlamaServer => self.load.local_buffers(),
                    InstanceKind::RpcServer => None,
                };
                inner.update(&self.id, |s| {
                    if observed.is_some() {
                        s.record.observed = observed;
                    }
                });
                inner.set_state(&self.id, InstanceState::Ready, None);
                if let Err(e) = inner.persist().await {
                    tracing::error!(instance = %self.id, "state write failed: {e}");
                }
                ready_at = Some(Instant::now());
                tick = new_interval(READY_POLL);
            } else if since.elapsed() > inner.config.load_timeout {
                let reason = format!(
                    "{} did not become ready within {}s (load_timeout_secs)",
                    match self.kind {
                        InstanceKind::LlamaServer => "the model",
                        InstanceKind::RpcServer => "ggml-rpc-server",
                    },
                    inner.config.load_timeout.as_secs()
                );
                return Outcome::Stalled {
                    reason: self.with_last_lines(reason),
                };
            }
        }
    }

    /// After the process died of a SIGKILL the agent did not send: the
    /// OOM kill, when a counter says so.
    fn oom_verdict(&self, watch: Option<&OomWatch>) -> Option<Outcome> {
        let estimate = self
            .inner
            .table()
            .instances
            .get(&self.id)
            .map_or(0, |s| s.record.estimate_bytes);
        let kill = watch?.verdict(&self.inner.probe, estimate)?;
        let reason = format!(
            "{}; not restarted here, where it would be killed again: the controller sizes \
             it by what it used and places it where that fits",
            kill.describe(self.program())
        );
        Some(Outcome::OomKilled {
            reason: self.with_last_lines(reason),
            kill,
        })
    }

    /// Reads new log lines into the ring, the followers and the load log.
    fn drain_log(&mut self) {
        let lines = self.tail.read_lines();
        if lines.is_empty() {
            return;
        }
        for l in &lines {
            self.load.feed(l);
        }
        let at = now_unix_ms();
        self.inner.update(&self.id, |s| {
            for line in lines {
                let line = LogLine {
                    at_unix_ms: at,
                    line,
                };
                // No followers is fine.
                let _ = s.log_tx.send(line.clone());
                s.ring.push(line);
            }
        });
    }

    fn with_last_lines(&self, reason: String) -> String {
        let lines = self
            .inner
            .table()
            .instances
            .get(&self.id)
            .map(|s| s.ring.last(REASON_LINES))
            .unwrap_or_default();
        if lines.is_empty() {
            return reason;
        }
        let mut s = format!("{reason}; last log lines:");
        for l in lines {
            s.push('\n');
            s.push_str(&l.line);
        }
        s
    }

    /// Records a failure (the process is gone) and publishes it.
    async fn failed(&mut self, reason: String) {
        if let Some(cg) = &self.cgroup {
            cg.remove();
        }
        tracing::warn!(instance = %self.id, "instance failed: {}", reason.lines().next().unwrap_or_default());
        self.inner.update(&self.id, |s| {
            s.record.process = None;
            s.record.proxy = None;
        });
        self.inner
            .set_state(&self.id, InstanceState::Failed, Some(reason));
        if let Err(e) = self.inner.persist().await {
            tracing::error!(instance = %self.id, "state write failed: {e}");
        }
    }

    /// After an RPC server failed: waits for the stop (the process is
    /// gone) or the agent's shutdown; nothing is restarted.
    async fn wait_for_stop(&mut self, shutdown: &CancellationToken) {
        tokio::select! {
            () = self.stop.cancelled() => self.stopped().await,
            () = shutdown.cancelled() => {}
        }
    }

    /// Binds an RPC server's public port (the instance host and port).
    fn bind_public(&self) -> Result<std::net::TcpListener, String> {
        let port = self
            .inner
            .table()
            .instances
            .get(&self.id)
            .map(|s| s.record.port)
            .ok_or("instance record vanished")?;
        let addr = SocketAddr::new(self.inner.config.instance_host, port);
        std::net::TcpListener::bind(addr)
            .map_err(|e| format!("cannot listen on {addr} for ggml-rpc-server: {e}"))
    }

    /// Starts an RPC server's proxy: this agent's binary in proxy mode, in
    /// the server's process group, the listening socket as its stdin, its
    /// output in the instance's log.
    fn spawn_proxy(
        &self,
        listener: std::net::TcpListener,
        server: ProcessId,
        log_path: &std::path::Path,
        dir: &std::path::Path,
    ) -> Result<(Child, ProcessId), String> {
        let (internal, client) = self
            .inner
            .table()
            .instances
            .get(&self.id)
            .and_then(|s| Some((s.record.internal_port?, s.record.options.rpc_client?)))
            .ok_or("the record has no loopback port or allowed client")?;
        let args = ProxyArgs {
            target: SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), internal),
            allow: client,
            server,
        };
        let open = || {
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(log_path)
                .map_err(|e| format!("cannot open log {}: {e}", log_path.display()))
        };
        let pgid = i32::try_from(server.pid).map_err(|_| "pid out of range".to_owned())?;
        // `/proc/self/exe`: this very binary, even if the file was replaced
        // since the agent started.
        let child = Command::new("/proc/self/exe")
            .arg(PROXY_ARG)
            .args(args.to_args())
            .env_clear()
            .envs(argv::environment())
            .current_dir(dir)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(listener)))
            .stdout(Stdio::from(open()?))
            .stderr(Stdio::from(open()?))
            .process_group(pgid)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("cannot start the RPC proxy: {e}"))?;
        let pid = child
            .id()
            .ok_or("the RPC proxy exited before it could be recorded")?;
        let start_ticks = procfs::start_ticks(pid).unwrap_or(0);
        tracing::info!(instance = %self.id, pid, "spawned the RPC proxy");
        Ok((child, ProcessId { pid, start_ticks }))
    }

    /// After one process of an RPC server's pair (server, proxy) exited,
    /// ends the other; nothing for a llama-server.
    async fn end_rest(&mut self, running: Running) {
        if self.kind == InstanceKind::LlamaServer {
            return;
        }
        let grace = self.inner.config.stop_timeout;
        match running {
            Running::Owned {
                mut child,
                id,
                proxy,
            } => {
                if matches!(child.try_wait(), Ok(None)) {
                    // The proxy exited; the server (not reaped: its group
                    // is still its own) goes too.
                    self.terminate(Running::Owned {
                        child,
                        id,
                        proxy: None,
                    })
                    .await;
                }
                if let Some((mut p, _)) = proxy {
                    // It exits by itself once the server is gone.
                    if tokio::time::timeout(KILL_WAIT, p.wait()).await.is_err() {
                        let _ = p.start_kill();
                        let _ = tokio::time::timeout(KILL_WAIT, p.wait()).await;
                    }
                }
            }
            Running::Adopted { id, proxy } => {
                terminate_adopted(id, grace).await;
                if let Some(p) = proxy {
                    end_adopted_proxy(p).await;
                }
            }
        }
    }

    fn count_restart(&self) {
        self.inner.update(&self.id, |s| {
            s.record.restart_count = s.record.restart_count.saturating_add(1)
        });
    }

    /// Waits the back-off for the `failures`-th failure in a row:
    /// initial × 2^(failures-1), capped.
    async fn back_off(&self, failures: u32, shutdown: &CancellationToken) -> Wake {
        let c = &self.inner.config;
        let delay =
            proto::backoff::Backoff::new(c.restart_backoff, c.restart_backoff_max).delay(failures);
        tracing::info!(instance = %self.id, "restarting in {delay:?}");
        tokio::select! {
            () = tokio::time::sleep(delay) => Wake::Elapsed,
            () = self.stop.cancelled() => Wake::Stop,
            () = shutdown.cancelled() => Wake::Shutdown,
        }
    }

    /// SIGKILL to the process group at once, then a bounded wait: for a
    /// process that stopped answering, which would act on nothing gentler.
    async fn kill(&mut self, running: Running) {
        match running {
            Running::Owned { mut child, id, .. } => {
                // Not reaped yet, so the pid and group are still ours.
                signal(id.pid, Signal::KILL);
                if tokio::time::timeout(KILL_WAIT, child.wait()).await.is_err() {
                    tracing::error!(instance = %self.id, pid = id.pid, "still running after SIGKILL");
                }
            }
            Running::Adopted { id, .. } => {
                if procfs::is_alive(id) {
                    signal(id.pid, Signal::KILL);
                }
                if !wait_gone(id, KILL_WAIT).await {
                    tracing::error!(instance = %self.id, pid = id.pid, "still running after SIGKILL");
                }
            }
        }
        self.drain_log();
    }

    /// SIGTERM to the process group, a bounded wait, then SIGKILL.
    async fn terminate(&mut self, running: Running) {
        let grace = self.inner.config.stop_timeout;
        match running {
            Running::Owned {
                mut child,
                id,
                proxy,
            } => {
                // Not reaped yet, so the pid (and group, with the proxy)
                // are still ours.
                signal(id.pid, Signal::TERM);
                if tokio::time::timeout(grace, child.wait()).await.is_err() {
                    tracing::warn!(instance = %self.id, pid = id.pid, "no exit {grace:?} after SIGTERM; sending SIGKILL");
                    signal(id.pid, Signal::KILL);
                    if tokio::time::timeout(KILL_WAIT, child.wait()).await.is_err() {
                        tracing::error!(instance = %self.id, pid = id.pid, "still running after SIGKILL");
                    }
                }
                if let Some((mut p, _)) = proxy
                    && tokio::time::timeout(KILL_WAIT, p.wait()).await.is_err()
                {
                    let _ = p.start_kill();
                    let _ = tokio::time::timeout(KILL_WAIT, p.wait()).await;
                }
            }
            Running::Adopted { id, proxy } => {
                terminate_adopted(id, grace).await;
                if let Some(p) = proxy {
                    end_adopted_proxy(p).await;
                }
            }
        }
        self.drain_log();
    }

    /// Before a stop's SIGTERM: lets the requests a llama-server is
    /// answering finish (its `/slots` shows none processing), for at most
    /// [`DRAIN_MAX`]. The instance is already `Stopping` on the watch
    /// stream, so gateways send it nothing new; an unplace or a move then
    /// cuts no answer short.
    async fn drain(&self) {
        if self.kind != InstanceKind::LlamaServer {
            return;
        }
        let Some((addr, key)) = self
            .inner
            .table()
            .instances
            .get(&self.id)
            .map(|s| (self.inner.ready_addr(&s.record), s.api_key.clone()))
        else {
            return;
        };
        let end = Instant::now() + DRAIN_MAX;
        let mut waited = false;
        while Instant::now() < end {
            match super::health::busy_slots(addr, &key, DRAIN_POLL * 5).await {
                Some(n) if n > 0 => {
                    if !waited {
                        tracing::info!(instance = %self.id, busy = n, "waiting for requests in progress before stopping");
                        waited = true;
                    }
                    tokio::time::sleep(DRAIN_POLL).await;
                }
                _ => return,
            }
        }
        tracing::warn!(instance = %self.id, "requests still in progress after {DRAIN_MAX:?}; stopping anyway");
    }

    async fn stopped(&mut self) {
        if let Some(cg) = &self.cgroup {
            cg.remove();
        }
        self.inner.update(&self.id, |s| {
            s.record.process = None;
            s.record.proxy = None;
            s.ring.keep_last(STOPPED_RING_LINES);
        });
        self.inner.set_state(&self.id, InstanceState::Stopped, None);
        if let Err(e) = self.inner.persist().await {
            tracing::error!(instance = %self.id, "state write failed: {e}");
        }
        self.finished.cancel();
    }
}

/// Terminates a process this run did not spawn: each signal only after
/// checking that pid + start time still name it.
pub(super) async fn terminate_adopted(id: ProcessId, grace: Duration) {
    if !procfs::is_alive(id) {
        return;
    }
    signal(id.pid, Signal::TERM);
    if wait_gone(id, grace).await {
        return;
    }
    if procfs::is_alive(id) {
        tracing::warn!(
            pid = id.pid,
            "no exit {grace:?} after SIGTERM; sending SIGKILL"
        );
        signal(id.pid, Signal::KILL);
        if !wait_gone(id, KILL_WAIT).await {
            tracing::error!(pid = id.pid, "still running after SIGKILL");
        }
    }
}

/// Ends an adopted RPC proxy: it exits by itself within a poll of its
/// server being gone (and took the group's SIGTERM); SIGKILL after a grace,
/// only while pid + start time still name it.
async fn end_adopted_proxy(p: ProcessId) {
    if wait_gone(p, KILL_WAIT).await {
        return;
    }
    if procfs::is_alive(p) {
        tracing::warn!(pid = p.pid, "RPC proxy still running; sending SIGKILL");
        if let Err(e) = procfs::signal_process(p.pid, Signal::KILL) {
            tracing::warn!(pid = p.pid, "signal failed: {e}");
        }
    }
}

async fn wait_gone(id: ProcessId, deadline: Duration) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if !procfs::is_alive(id) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    !procfs::is_alive(id)
}

fn signal(pgid: u32, sig: Signal) {
    match procfs::signal_group(pgid, sig) {
        Ok(true) => {}
        Ok(false) => tracing::debug!(pgid, "process group already gone"),
        Err(e) => tracing::warn!(pgid, "signal failed: {e}"),
    }
}

fn new_interval(period: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval(period);
    i.set_missed_tick_behavior(MissedTickBehavior::Delay);
    i
}

/// Whether the process died of SIGKILL.
fn killed_by_sigkill(status: ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(9)
}

fn describe_exit(program: &str, status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("{program} exited with code {code}"),
        (None, Some(sig)) => format!("{program} was killed by {}", procfs::signal_name(sig)),
        _ => format!("{program} ended: {status}"),
    }
}
