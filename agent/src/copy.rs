//! Model copies between agents. The sender ([`send_part`]) streams one part
//! of a model file its own scan lists, hashing every byte (the ones before
//! the requested offset are read and hashed, not sent), and ends with the
//! part's size and SHA-256. The receiver ([`Copies::pull`]) asks the sender
//! what the model is (ListModels), checks the room on the disk of its first
//! model directory, and writes each part to `.NAME.partial` beside its final
//! name, hashing as it writes (and the bytes already there when it resumes);
//! a part whose size and hash match the sender's is fsynced and renamed into
//! place, one that does not is deleted. The network never names a path: the
//! sender resolves ids with its scan, the receiver writes only the ids the
//! sender lists, checked with [`crate::scan::check_model_id`] and kept inside
//! its model directories. One copy per model runs at a time, in its own
//! task: a caller that leaves does not stop it, and a second caller follows
//! the same copy.

use crate::supervisor::Supervisor;
use proto::domain::{CopyProgress, CopyState};
use proto::v1;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Bytes per message of a FetchModel stream (the agent's response limit
/// is 16 MiB).
pub const CHUNK_BYTES: usize = 1 << 20;
/// Longest wait for the sender's next message before a copy fails.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Shortest interval between two progress reports.
const REPORT_EVERY: Duration = Duration::from_millis(250);

/// Why a copy or a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The sender does not list the model (or the part).
    #[error("{node} does not list model `{id}`")]
    NotListed {
        /// The sending node.
        node: String,
        /// The model id.
        id: String,
    },
    /// The receiving disk lacks the room.
    #[error(
        "not enough room in {dir}: the copy needs {} more, plus a margin of {}, and {} is free",
        proto::units::bytes(*need),
        proto::units::bytes(*margin),
        proto::units::bytes(*free)
    )]
    NoRoom {
        /// The model directory written to.
        dir: String,
        /// Bytes still to write.
        need: u64,
        /// Bytes kept free.
        margin: u64,
        /// Bytes free now.
        free: u64,
    },
    /// A different file already has the model's name here.
    #[error("a different file is already at `{id}` ({}); it is not overwritten", proto::units::bytes(*size))]
    Different {
        /// The part's id.
        id: String,
        /// Its size here.
        size: u64,
    },
    /// The bytes received do not match what the sender says it sent.
    #[error("{id}: {what}; the partial file was deleted")]
    Mismatch {
        /// The part's id.
        id: String,
        /// What differed, with both values.
        what: String,
    },
    /// The sender broke the protocol or went away.
    #[error("sender {node}: {why}")]
    Sender {
        /// The sending node.
        node: String,
        /// What happened.
        why: String,
    },
    /// A fetch asked for bytes beyond the part's end.
    #[error("offset {offset} is beyond the part's {size} bytes")]
    BadOffset {
        /// As asked.
        offset: u64,
        /// The part's size.
        size: u64,
    },
    /// A file operation on this node failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CopyError {
    let context = context.into();
    move |source| CopyError::Io { context, source }
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of the first `len` bytes of `file` (from its start), read in
/// chunks. Blocking.
fn hash_prefix(file: &mut std::fs::File, len: u64) -> std::io::Result<ring::digest::Context> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    file.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut left = len;
    while left > 0 {
        let want = usize::try_from(left.min(CHUNK_BYTES as u64)).unwrap_or(CHUNK_BYTES);
        file.read_exact(&mut buf[..want])?;
        ctx.update(&buf[..want]);
        left -= want as u64;
    }
    Ok(ctx)
}

/// The sender's side of FetchModel: reads `path` from its start, hashing
/// everything, sends the bytes from `offset` in [`CHUNK_BYTES`] messages
/// and then the size and digest. Blocking: run it on the blocking pool.
/// Ends early when the receiver goes away.
pub fn send_part(
    path: &Path,
    offset: u64,
    tx: &mpsc::Sender<Result<v1::ModelChunk, tonic::Status>>,
) -> Result<(), CopyError> {
    let mut file = std::fs::File::open(path).map_err(io("opening the model"))?;
    let size = file
        .metadata()
        .map_err(io("reading the model's size"))?
        .len();
    if offset > size {
        return Err(CopyError::BadOffset { offset, size });
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut pos = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io("reading the model"))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        let end = pos + n as u64;
        if end > offset {
            let skip = usize::try_from(offset.saturating_sub(pos)).unwrap_or(0);
            let chunk = v1::ModelChunk {
                offset: pos + skip as u64,
                data: buf[skip..n].to_vec(),
                ..Default::default()
            };
            if tx.blocking_send(Ok(chunk)).is_err() {
                return Ok(());
            }
        }
        pos = end;
    }
    if pos != size {
        return Err(CopyError::Io {
            context: format!("the part changed while it was read ({size} bytes, then {pos})"),
            source: std::io::ErrorKind::InvalidData.into(),
        });
    }
    let last = v1::ModelChunk {
        offset: pos,
        last: true,
        size_bytes: pos,
        sha256: ctx.finish().as_ref().to_vec(),
        ..Default::default()
    };
    let _ = tx.blocking_send(Ok(last));
    Ok(())
}

/// A pull as the receiver's service is asked for it.
#[derive(Debug, Clone)]
pub struct Pull {
    /// Model id on the sender, and here.
    pub model_id: String,
    /// The sender's gRPC address.
    pub source_address: String,
    /// The sender's node name.
    pub source_node: String,
}

/// The copies running on this node, one per model id.
#[derive(Debug, Clone, Default)]
pub struct Copies {
    running: Arc<Mutex<HashMap<String, watch::Receiver<CopyProgress>>>>,
}

impl Copies {
    /// Follows the running copy of `pull.model_id`, or starts one in its
    /// own task (it runs to its end whoever watches).
    pub fn pull(
        &self,
        supervisor: &Supervisor,
        pull: Pull,
        shutdown: CancellationToken,
    ) -> watch::Receiver<CopyProgress> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = running.get(&pull.model_id)
            && !rx.borrow().state.is_final()
        {
            return rx.clone();
        }
        let first = CopyProgress {
            model_id: pull.model_id.clone(),
            from_node: pull.source_node.clone(),
            to_node: supervisor.node().name,
            bytes_total: 0,
            bytes_done: 0,
            resumed_from_bytes: 0,
            elapsed_ms: 0,
            state: CopyState::Copying,
            sha256: Vec::new(),
            message: String::new(),
        };
        let (tx, rx) = watch::channel(first);
        running.insert(pull.model_id.clone(), rx.clone());
        let sup = supervisor.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let id = pull.model_id.clone();
            let from = pull.source_node.clone();
            let result = tokio::select! {
                r = run(&sup, &pull, &tx, started) => r,
                () = shutdown.cancelled() => Err(CopyError::Sender {
                    node: from.clone(),
                    why: "the receiving agent is shutting down; copy again to resume".into(),
                }),
            };
            let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            match result {
                Ok(()) => {
                    let p = tx.borrow().clone();
                    tracing::info!(model = %id, from = %from, bytes = p.bytes_total, elapsed_ms, "copy {}", p.state.name());
                }
                Err(e) => {
                    tracing::warn!(model = %id, from = %from, "copy failed: {e}");
                    tx.send_modify(|p| {
                        p.state = CopyState::Failed;
                        p.message = e.to_string();
                        p.elapsed_ms = elapsed_ms;
                    });
                }
            }
        });
        rx
    }
}

/// A gRPC client for the sending agent, with this agent's own certificate
/// when it has one.
async fn sender_client(
    supervisor: &Supervisor,
    pull: &Pull,
) -> Result<v1::agent_service_client::AgentServiceClient<tonic::transport::Channel>, CopyError> {
    use tonic::transport::Endpoint;
    let err = |why: String| CopyError::Sender {
        node: pull.source_node.clone(),
        why,
    };
    let ep = match &supervisor.config().tls {
        None => Endpoint::from_shared(format!("http://{}", pull.source_address))
            .map_err(|e| err(e.to_string()))?,
        Some(files) => {
            let tls = files.client_config().map_err(|e| err(e.to_string()))?;
            Endpoint::from_shared(format!("https://{}", pull.source_address))
                .and_then(|e| e.tls_config(tls))
                .map_err(|e| err(e.to_string()))?
        }
    };
    let ep = ep
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    Ok(
        v1::agent_service_client::AgentServiceClient::new(ep.connect_lazy())
            .max_decoding_message_size(proto::limits::AGENT.max_response_bytes)
            .max_encoding_message_size(proto::limits::AGENT.max_request_bytes),
    )
}

/// One part to receive: its id and where it goes.
#[derive(Debug)]
struct Target {
    id: String,
    dest: PathBuf,
    partial: PathBuf,
}

/// Where part `id` goes under `dir`: the final name and `.NAME.partial`
/// beside it, its directory created and checked to be inside `dirs`.
fn target(dir: &Path, dirs: &[PathBuf], id: &str) -> Result<Target, CopyError> {
    crate::scan::check_model_id(id).map_err(|why| CopyError::Sender {
        node: "sender".into(),
        why: format!("lists a part id this node refuses: {why}"),
    })?;
    let dest = dir.join(id);
    let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
        return Err(CopyError::Sender {
            node: "sender".into(),
            why: format!("part id `{}` names no file", id.escape_debug()),
        });
    };
    std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    let canonical = parent
        .canonicalize()
        .map_err(io(format!("resolving {}", parent.display())))?;
    if !crate::scan::is_inside(dirs, &canonical) {
        return Err(CopyError::Sender {
            node: "sender".into(),
            why: format!(
                "part `{}` would land outside the model directories",
                id.escape_debug()
            ),
        });
    }
    let mut partial_name = std::ffi::OsString::from(".");
    partial_name.push(name);
    partial_name.push(".partial");
    Ok(Target {
        id: id.to_owned(),
        dest: canonical.join(name),
        partial: canonical.join(partial_name),
    })
}

/// Free bytes for an unprivileged writer on the file system of `dir`.
fn free_bytes(dir: &Path) -> Result<u64, CopyError> {
    let s = rustix::fs::statvfs(dir).map_err(|e| CopyError::Io {
        context: format!("statvfs {}", dir.display()),
        source: e.into(),
    })?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

fn file_len(p: &Path) -> Option<u64> {
    std::fs::symlink_metadata(p)
        .ok()
        .filter(std::fs::Metadata::is_file)
        .map(|m| m.len())
}

/// The whole pull: what the sender lists, the room, then each part.
async fn run(
    sup: &Supervisor,
    pull: &Pull,
    tx: &watch::Sender<CopyProgress>,
    started: Instant,
) -> Result<(), CopyError> {
    let mut client = sender_client(sup, pull).await?;
    let sender_err = |why: String| CopyError::Sender {
        node: pull.source_node.clone(),
        why,
    };
    let listed = client
        .list_models(v1::ListModelsRequest { rescan: true })
        .await
        .map_err(|s| sender_err(s.message().to_owned()))?
        .into_inner();
    let model = listed
        .models
        .into_iter()
        .find(|m| m.id == pull.model_id)
        .ok_or_else(|| CopyError::NotListed {
            node: pull.source_node.clone(),
            id: pull.model_id.clone(),
        })?;
    let dirs = sup.config().model_dirs.clone();
    let dir = dirs.first().cloned().ok_or_else(|| CopyError::Io {
        context: "this node has no model directory".into(),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    let targets = model
        .parts
        .iter()
        .map(|id| target(&dir, &dirs, id))
        .collect::<Result<Vec<_>, _>>()?;
    if targets.is_empty() {
        return Err(sender_err(format!(
            "lists `{}` without parts",
            pull.model_id
        )));
    }
    let total = model.file_size_bytes;
    // What is here already: finished parts and partial ones.
    let have: u64 = targets
        .iter()
        .map(|t| {
            file_len(&t.dest)
                .or_else(|| file_len(&t.partial))
                .unwrap_or(0)
        })
        .sum();
    let need = total.saturating_sub(have);
    let margin = sup.config().copy_disk_margin_bytes;
    let free = free_bytes(&dir)?;
    if need > 0 && need.saturating_add(margin) > free {
        return Err(CopyError::NoRoom {
            dir: dir.display().to_string(),
            need,
            margin,
            free,
        });
    }
    tx.send_modify(|p| p.bytes_total = total);
    let rate = sup.config().copy_rate_limit_bytes;
    let mut state = CopyState::AlreadyPresent;
    let mut done = 0u64;
    // Bytes sent over the link by this copy, before the current part.
    let mut moved = 0u64;
    let mut sums = Vec::new();
    for (index, t) in targets.iter().enumerate() {
        let part = u32::try_from(index).unwrap_or(u32::MAX);
        if let Some(size) = file_len(&t.dest) {
            // Already here: identical (size and hash), or refused.
            if targets.len() == 1 && size != total {
                return Err(CopyError::Different {
                    id: t.id.clone(),
                    size,
                });
            }
            let (sent_size, sent_sum) = sender_digest(&mut client, pull, part, size).await?;
            let dest = t.dest.clone();
            let here = tokio::task::spawn_blocking(move || {
                let mut f = std::fs::File::open(&dest)?;
                hash_prefix(&mut f, size).map(|c| c.finish().as_ref().to_vec())
            })
            .await
            .map_err(|e| sender_err(e.to_string()))?
            .map_err(io(format!("reading {}", t.id)))?;
            if sent_size != size || sent_sum != here {
                return Err(CopyError::Different {
                    id: t.id.clone(),
                    size,
                });
            }
            done += size;
            sums.push(hex(&here));
            tx.send_modify(|p| {
                p.bytes_done = done.min(p.bytes_total);
                p.resumed_from_bytes = p.bytes_done.min(p.resumed_from_bytes + size);
            });
            continue;
        }
        state = CopyState::Done;
        let mut first = true;
        let mut part_moved = 0u64;
        let sum = receive_part(
            &mut client,
            pull,
            part,
            t,
            total.saturating_sub(done),
            |written, resumed| {
                let now = done + written;
                if first && resumed > 0 {
                    tx.send_modify(|p| p.resumed_from_bytes += resumed);
                }
                first = false;
                part_moved = written.saturating_sub(resumed);
                // The cap: never ahead of `rate` bytes a second since start.
                let sent = moved + part_moved;
                let wait = (rate > 0)
                    .then(|| Duration::from_secs_f64(sent as f64 / rate as f64))
                    .and_then(|due| due.checked_sub(started.elapsed()));
                let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(0);
                tx.send_if_modified(|p| {
                    let due = p.elapsed_ms + REPORT_EVERY.as_millis() as u64 <= elapsed_ms;
                    p.bytes_done = now.min(p.bytes_total);
                    if due {
                        p.elapsed_ms = elapsed_ms;
                    }
                    due
                });
                wait
            },
        )
        .await?;
        moved += part_moved;
        done += file_len(&t.dest).unwrap_or(0);
        sums.push(sum);
    }
    if state == CopyState::Done {
        // The new file is listed before the copy says done.
        sup.rescan().await;
    }
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    tx.send_modify(|p| {
        p.bytes_done = done.min(p.bytes_total);
        p.elapsed_ms = elapsed_ms;
        p.state = state;
        p.sha256 = sums;
        if state == CopyState::AlreadyPresent {
            p.message = "an identical file is already there; nothing was copied".into();
        }
    });
    Ok(())
}

/// The sender's size and digest of one part (a fetch from its end: every
/// byte hashed there, none sent).
async fn sender_digest(
    client: &mut v1::agent_service_client::AgentServiceClient<tonic::transport::Channel>,
    pull: &Pull,
    part: u32,
    offset: u64,
) -> Result<(u64, Vec<u8>), CopyError> {
    let err = |why: String| CopyError::Sender {
        node: pull.source_node.clone(),
        why,
    };
    let mut stream = client
        .fetch_model(v1::FetchModelRequest {
            model_id: pull.model_id.clone(),
            part,
            offset,
        })
        .await
        .map_err(|s| err(s.message().to_owned()))?
        .into_inner();
    match tokio::time::timeout(IDLE_TIMEOUT, stream.message()).await {
        Err(_) => Err(err("no answer within 60 s".into())),
        Ok(Err(s)) => Err(err(s.message().to_owned())),
        Ok(Ok(None)) => Err(err("the stream ended without a digest".into())),
        Ok(Ok(Some(c))) if c.last => Ok((c.size_bytes, c.sha256)),
        // The sender's part is longer than the file here: not the same.
        Ok(Ok(Some(_))) => Ok((u64::MAX, Vec::new())),
    }
}

/// Receives one part into its partial file (resuming from its length),
/// verifies it and renames it into place; the hex digest. `progress` is
/// told the bytes written so far (and, once, the bytes resumed) and says
/// how long to wait for the rate cap.
async fn receive_part(
    client: &mut v1::agent_service_client::AgentServiceClient<tonic::transport::Channel>,
    pull: &Pull,
    part: u32,
    t: &Target,
    most: u64,
    mut progress: impl FnMut(u64, u64) -> Option<Duration>,
) -> Result<String, CopyError> {
    let err = |why: String| CopyError::Sender {
        node: pull.source_node.clone(),
        why,
    };
    let partial = t.partial.clone();
    let (mut file, ctx, resumed) = tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::OpenOptionsExt;
        // A symlink planted under the partial name is not followed.
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&partial)?;
        let len = f.metadata()?.len();
        let ctx = hash_prefix(&mut f, len)?;
        f.seek(SeekFrom::Start(len))?;
        Ok::<_, std::io::Error>((f, ctx, len))
    })
    .await
    .map_err(|e| err(e.to_string()))?
    .map_err(io(format!("opening {}", t.partial.display())))?;
    let mut ctx = Some(ctx);
    let mut written = resumed;
    if let Some(wait) = progress(written, resumed) {
        tokio::time::sleep(wait).await;
    }
    let mut stream = client
        .fetch_model(v1::FetchModelRequest {
            model_id: pull.model_id.clone(),
            part,
            offset: resumed,
        })
        .await
        .map_err(|s| err(s.message().to_owned()))?
        .into_inner();
    let mismatch = |what: String| {
        let _ = std::fs::remove_file(&t.partial);
        CopyError::Mismatch {
            id: t.id.clone(),
            what,
        }
    };
    let (size, sum) = loop {
        let chunk = match tokio::time::timeout(IDLE_TIMEOUT, stream.message()).await {
            Err(_) => return Err(err("nothing received for 60 s".into())),
            Ok(Err(s)) => return Err(err(s.message().to_owned())),
            Ok(Ok(None)) => return Err(err("the stream ended before the part did".into())),
            Ok(Ok(Some(c))) => c,
        };
        if chunk.offset != written {
            return Err(mismatch(format!(
                "a chunk at offset {} arrived where {written} was due",
                chunk.offset
            )));
        }
        if chunk.last {
            break (chunk.size_bytes, chunk.sha256);
        }
        let n = chunk.data.len() as u64;
        if written + n > most {
            return Err(mismatch(format!(
                "the sender sent more than the {} it listed",
                proto::units::bytes(most)
            )));
        }
        let mut c = ctx
            .take()
            .unwrap_or_else(|| ring::digest::Context::new(&ring::digest::SHA256));
        let (f, c) = tokio::task::spawn_blocking(move || {
            file.write_all(&chunk.data)?;
            c.update(&chunk.data);
            Ok::<_, std::io::Error>((file, c))
        })
        .await
        .map_err(|e| err(e.to_string()))?
        .map_err(io(format!("writing {}", t.partial.display())))?;
        file = f;
        ctx = Some(c);
        written += n;
        if let Some(wait) = progress(written, resumed) {
            tokio::time::sleep(wait).await;
        }
    };
    let ours = ctx
        .take()
        .map(|c| c.finish().as_ref().to_vec())
        .unwrap_or_default();
    if size != written {
        return Err(mismatch(format!(
            "{written} bytes received, the sender says {size}"
        )));
    }
    if sum != ours {
        return Err(mismatch(format!(
            "SHA-256 {} here, {} on the sender",
            hex(&ours),
            hex(&sum)
        )));
    }
    let (partial, dest) = (t.partial.clone(), t.dest.clone());
    tokio::task::spawn_blocking(move || {
        file.sync_all()?;
        drop(file);
        std::fs::rename(&partial, &dest)?;
        if let Some(parent) = dest.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok::<_, std::io::Error>(())
    })
    .await
    .map_err(|e| err(e.to_string()))?
    .map_err(io(format!("renaming {} into place", t.id)))?;
    Ok(hex(&ours))
}

impl From<CopyError> for tonic::Status {
    fn from(e: CopyError) -> Self {
        use tonic::Code;
        let code = match &e {
            CopyError::NotListed { .. } => Code::NotFound,
            CopyError::NoRoom { .. } => Code::ResourceExhausted,
            CopyError::Different { .. } => Code::AlreadyExists,
            CopyError::Mismatch { .. } => Code::DataLoss,
            CopyError::Sender { .. } => Code::Unavailable,
            CopyError::BadOffset { .. } => Code::OutOfRange,
            CopyError::Io { .. } => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_land_inside_the_model_directory_beside_a_hidden_partial_name() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("models");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let dir = dir.canonicalize().expect("canonical");
        let dirs = [dir.clone()];
        let t = target(&dir, &dirs, "sub/x.gguf").expect("a plain id");
        assert_eq!(t.dest, dir.join("sub/x.gguf"));
        assert_eq!(t.partial, dir.join("sub/.x.gguf.partial"));
        for bad in ["../x.gguf", "/etc/x.gguf", "a/../../x.gguf", ""] {
            assert!(target(&dir, &dirs, bad).is_err(), "{bad:?} accepted");
        }
        // A directory symlink leading out of the model directory.
        std::os::unix::fs::symlink(tmp.path(), dir.join("out")).expect("symlink");
        let e = target(&dir, &dirs, "out/x.gguf").expect_err("escaping symlink");
        assert!(
            e.to_string().contains("outside the model directories"),
            "{e}"
        );
    }

    #[test]
    fn a_fetch_from_an_offset_sends_the_rest_and_hashes_the_whole_part() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("m.gguf");
        let data: Vec<u8> = (0..(3 * CHUNK_BYTES + 123))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&path, &data).expect("write");
        let offset = CHUNK_BYTES as u64 + 5;
        let (tx, mut rx) = mpsc::channel(16);
        send_part(&path, offset, &tx).expect("send");
        drop(tx);
        let mut got = Vec::new();
        let mut last = None;
        while let Some(m) = rx.blocking_recv() {
            let m = m.expect("chunk");
            if m.last {
                last = Some(m);
            } else {
                assert_eq!(m.offset, offset + got.len() as u64);
                got.extend_from_slice(&m.data);
            }
        }
        assert!(got == data[offset as usize..], "the bytes after the offset");
        let last = last.expect("a last message");
        assert_eq!(last.size_bytes, data.len() as u64);
        let want = ring::digest::digest(&ring::digest::SHA256, &data);
        assert_eq!(last.sha256, want.as_ref());
        // Beyond the end: refused with the numbers.
        let (tx, _rx) = mpsc::channel(1);
        let e = send_part(&path, data.len() as u64 + 1, &tx).expect_err("beyond the end");
        assert!(e.to_string().contains("is beyond the part's"), "{e}");
    }
}
