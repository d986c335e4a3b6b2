//! What the agent must remember across its own restarts: the instances it
//! started (with the exact argv and the identity of the live process, so it
//! can re-adopt them), the start request ids it has answered, and the
//! highest leader revision it has seen. One JSON file in the state
//! directory, replaced atomically (write a temp file, fsync, rename, fsync
//! the directory), and an exclusive `flock` on `agent.lock` so two agents
//! never share a state directory.

use crate::procfs::ProcessId;
use proto::domain::{InstanceKind, InstanceOptions, ObservedBuffers};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Version of the state file's schema.
pub const STATE_VERSION: u32 = 1;
/// Largest state file read.
const MAX_STATE_BYTES: u64 = 16 << 20;
/// Most stopped instances remembered (for idempotent retries).
pub const MAX_STOPPED_RECORDS: usize = 64;

/// Why the state directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Another process holds the state directory's lock.
    #[error("state dir {} is in use by another halo-agent{}", dir.display(), holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// The pid written in the lock file, if readable.
        holder: Option<u32>,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The state file is not valid.
    #[error("{}: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Whether an instance should be running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Desired {
    /// Keep a process running; restart after failures.
    Running,
    /// Stopped on request.
    Stopped,
}

/// One instance the agent created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Instance id.
    pub id: String,
    /// The start request id that created it.
    pub request_id: String,
    /// llama-server or ggml-rpc-server (records written before RPC servers
    /// existed are llama-servers).
    #[serde(default)]
    pub kind: InstanceKind,
    /// Model id.
    pub model_id: String,
    /// Options as requested.
    pub options: InstanceOptions,
    /// Placement generation from the request.
    pub generation: u64,
    /// The port clients use: llama-server's HTTP port, or the port the
    /// agent accepts an RPC server's one allowed client on.
    pub port: u16,
    /// ggml-rpc-server only: the loopback port the server itself listens
    /// on, behind the agent's filtering proxy on `port`.
    #[serde(default)]
    pub internal_port: Option<u16>,
    /// The exact argv (program first) every process of this instance runs.
    pub argv: Vec<String>,
    /// When it was created (Unix ms).
    pub created_at_unix_ms: u64,
    /// Running or stopped on request.
    pub desired: Desired,
    /// The live process, when there is one.
    pub process: Option<ProcessId>,
    /// ggml-rpc-server only: its live proxy process (in its group).
    #[serde(default)]
    pub proxy: Option<ProcessId>,
    /// Restarts after failures.
    pub restart_count: u32,
    /// Last failure's reason.
    pub last_error: String,
    /// Buffers parsed from the current process's load log.
    pub observed: Option<ObservedBuffers>,
    /// When it was stopped (Unix ms), for pruning.
    pub stopped_at_unix_ms: Option<u64>,
    /// llama-server only: the model file it was started with, which every
    /// restart must find again under the same name (records written before
    /// this was kept take the file found at their next start).
    #[serde(default)]
    pub model_file: Option<FileIdentity>,
    /// The estimate the start request carried, bytes (0: none).
    #[serde(default)]
    pub estimate_bytes: u64,
    /// Set when the kernel killed the process for lack of memory; such an
    /// instance is not restarted.
    #[serde(default)]
    pub oom_kill: Option<proto::domain::OomKill>,
}

/// The whole state file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    /// Schema version.
    pub version: u32,
    /// Highest `leader_revision` seen on a mutating request.
    pub highest_leader_revision: u64,
    /// Instances, running and stopped.
    pub instances: Vec<InstanceRecord>,
}

/// The state directory, locked for this process.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    // Held for the agent's lifetime; the kernel drops the lock when the
    // process dies, kill -9 included.
    _lock: File,
}

impl StateStore {
    /// Locks `dir` (which must exist) for this process.
    pub fn open(dir: &Path) -> Result<StateStore, StateError> {
        let path = dir.join("agent.lock");
        let lock = proto::fsutil::lock_exclusive(&path).map_err(|e| match e {
            proto::fsutil::LockError::Busy { holder } => StateError::Locked {
                dir: dir.to_owned(),
                holder,
            },
            proto::fsutil::LockError::Io(source) => StateError::Io { path, source },
        })?;
        std::fs::create_dir_all(dir.join("instances")).map_err(|source| StateError::Io {
            path: dir.join("instances"),
            source,
        })?;
        Ok(StateStore {
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The per-instance directory (API key, log file).
    pub fn instance_dir(&self, id: &str) -> PathBuf {
        self.dir.join("instances").join(id)
    }

    fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Reads the state file; an absent file is an empty state.
    pub fn load(&self) -> Result<StateFile, StateError> {
        let path = self.path();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(StateFile {
                    version: STATE_VERSION,
                    ..StateFile::default()
                });
            }
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let mut buf = Vec::new();
        file.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut buf)
            .map_err(|source| StateError::Io {
                path: path.clone(),
                source,
            })?;
        if buf.len() as u64 > MAX_STATE_BYTES {
            return Err(StateError::Corrupt {
                path,
                reason: format!("larger than {MAX_STATE_BYTES} bytes"),
            });
        }
        let state: StateFile = serde_json::from_slice(&buf).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if state.version != STATE_VERSION {
            return Err(StateError::Corrupt {
                path,
                reason: format!(
                    "version {} (this agent reads {STATE_VERSION})",
                    state.version
                ),
            });
        }
        Ok(state)
    }

    /// Replaces the state file atomically.
    pub fn save(&self, state: &StateFile) -> Result<(), StateError> {
        let path = self.path();
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &bytes, 0o600).map_err(|source| StateError::Io { path, source })
    }
}

/// The one atomic write (`proto::fsutil`), also used for instances' API
/// key files.
pub use proto::fsutil::write_atomic;

/// What tells one file apart from another under the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Device of the file system.
    pub dev: u64,
    /// Inode number: a file renamed over the name, or written anew after a
    /// delete, has another.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds since the Unix epoch.
    pub mtime_secs: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: i64,
}

impl FileIdentity {
    /// The identity of the file `path` names now (symlinks followed).
    pub fn of(path: &Path) -> std::io::Result<FileIdentity> {
        let m = std::fs::metadata(path)?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_secs: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> InstanceRecord {
        InstanceRecord {
            estimate_bytes: 0,
            oom_kill: None,
            id: id.into(),
            request_id: format!("req-{id}"),
            kind: InstanceKind::LlamaServer,
            model_id: "tiny.gguf".into(),
            options: InstanceOptions::default(),
            generation: 3,
            port: 8100,
            internal_port: None,
            argv: vec!["llama-server".into(), "-m".into(), "/m/tiny.gguf".into()],
            created_at_unix_ms: 1,
            desired: Desired::Running,
            process: Some(ProcessId {
                pid: 42,
                start_ticks: 7,
            }),
            proxy: None,
            restart_count: 0,
            last_error: String::new(),
            observed: None,
            stopped_at_unix_ms: None,
            model_file: None,
        }
    }

    #[test]
    fn a_record_without_kind_is_a_llama_server_and_rpc_servers_round_trip() {
        let mut json = serde_json::to_value(record("a")).expect("json");
        let obj = json.as_object_mut().expect("object");
        obj.remove("kind");
        obj.remove("internal_port");
        obj.remove("proxy");
        obj.remove("estimate_bytes");
        let old: InstanceRecord = serde_json::from_value(json).expect("old record");
        assert_eq!(old, record("a"));
        let rpc = InstanceRecord {
            kind: InstanceKind::RpcServer,
            internal_port: Some(40123),
            proxy: Some(ProcessId {
                pid: 43,
                start_ticks: 8,
            }),
            model_id: String::new(),
            ..record("b")
        };
        let text = serde_json::to_string(&rpc).expect("json");
        assert!(text.contains("\"RpcServer\""), "{text}");
        assert_eq!(
            serde_json::from_str::<InstanceRecord>(&text).expect("back"),
            rpc
        );
    }

    #[test]
    fn state_survives_a_save_and_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        assert_eq!(store.load().expect("empty").instances, vec![]);
        let state = StateFile {
            version: STATE_VERSION,
            highest_leader_revision: 9,
            instances: vec![record("a"), record("b")],
        };
        store.save(&state).expect("save");
        assert_eq!(store.load().expect("load"), state);
        // No temp file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn a_second_store_on_the_same_dir_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = StateStore::open(dir.path()).expect("open");
        let e = StateStore::open(dir.path()).expect_err("locked");
        assert!(
            e.to_string().contains(&format!(
                "in use by another halo-agent (pid {})",
                std::process::id()
            )),
            "{e}"
        );
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        std::fs::write(
            dir.path().join("state.json"),
            b"{\"version\": 1, \"instances\": [",
        )
        .expect("write");
        assert!(matches!(store.load(), Err(StateError::Corrupt { .. })));
    }
}
