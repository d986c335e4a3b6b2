//! Durable files, defined once for the agent's state file and the
//! controller's embedded store: [`write_atomic`] replaces a file so that a
//! crash leaves either the old or the new content, and [`lock_exclusive`]
//! takes the `flock` that keeps a second process off the same data.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `bytes` to `path` through a temp file in the same directory
/// (`.NAME.tmp`, created with `mode` before the umask): write, fsync,
/// rename over, fsync the directory. A crash leaves either the old or the
/// new file, never a torn one, and once this returns the new one survives
/// power loss.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Why [`lock_exclusive`] did not take the lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("held by another process{}", holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Busy {
        /// The pid the holder wrote into the lock file, if readable.
        holder: Option<u32>,
    },
    /// The lock file could not be opened, locked or written.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Opens (or creates) the lock file `path`, takes an exclusive `flock`
/// without waiting and writes this process's pid into it. The lock lasts
/// as long as the returned file is open; the kernel drops it when the
/// process dies, kill -9 included.
pub fn lock_exclusive(path: &Path) -> Result<File, LockError> {
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if let Err(e) = rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        if e == rustix::io::Errno::WOULDBLOCK {
            let mut s = String::new();
            let _ = lock.read_to_string(&mut s);
            return Err(LockError::Busy {
                holder: s.trim().parse().ok(),
            });
        }
        return Err(LockError::Io(e.into()));
    }
    lock.set_len(0)?;
    writeln!(lock, "{}", std::process::id())?;
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_the_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one", 0o600).expect("first write");
        write_atomic(&path, b"two", 0o600).expect("second write");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["state.json"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.lock");
        let held = lock_exclusive(&path).expect("first lock");
        match lock_exclusive(&path) {
            Err(LockError::Busy { holder }) => assert_eq!(holder, Some(std::process::id())),
            other => panic!("expected Busy, got {other:?}"),
        }
        drop(held);
        lock_exclusive(&path).expect("lock again once released");
    }
}
