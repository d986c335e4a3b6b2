//! The identity of the model file an instance loaded: device, inode, size
//! and modification time, taken when the instance is created. A running
//! llama-server keeps reading the file it mapped, whatever happens to the
//! name; a restart opens the name again. So the agent compares the name's
//! identity with the recorded one while the instance runs (reported on the
//! instance) and before every restart (refused when they differ: the
//! controller sized and placed the file it was asked to run, not whatever
//! now has its name).

pub use crate::state::FileIdentity;
use std::path::Path;

/// How the file `path` names now differs from `loaded`, in words; `None`
/// while it is the same file.
pub fn change(
    path: &Path,
    loaded: &FileIdentity,
    now: &std::io::Result<FileIdentity>,
) -> Option<String> {
    let now = match now {
        Ok(now) if now == loaded => return None,
        Ok(now) => now,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some(format!(
                "the model file {} was deleted since the instance started",
                path.display()
            ));
        }
        Err(e) => {
            return Some(format!(
                "the model file {} cannot be read: {e}",
                path.display()
            ));
        }
    };
    let mut what = Vec::new();
    if (now.dev, now.ino) != (loaded.dev, loaded.ino) {
        what.push(format!("another file: inode {} → {}", loaded.ino, now.ino));
    }
    if now.size != loaded.size {
        what.push(format!("size {} → {} bytes", loaded.size, now.size));
    }
    if (now.mtime_secs, now.mtime_nsec) != (loaded.mtime_secs, loaded.mtime_nsec) {
        what.push(format!(
            "modified at unix {} → {}",
            loaded.mtime_secs, now.mtime_secs
        ));
    }
    Some(format!(
        "the model file {} was replaced since the instance started ({})",
        path.display(),
        what.join(", ")
    ))
}

/// The model path of a llama-server argv (the value after `-m`).
pub fn model_path(argv: &[String]) -> Option<&Path> {
    argv.windows(2)
        .find(|w| w[0] == "-m")
        .map(|w| Path::new(w[1].as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_same_file_is_unchanged_and_a_rewrite_rename_or_delete_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, b"GGUF one").expect("write");
        let loaded = FileIdentity::of(&path).expect("stat");
        assert_eq!(change(&path, &loaded, &FileIdentity::of(&path)), None);

        // Written in place: same inode, other size.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b" more"))
            .expect("append");
        let c = change(&path, &loaded, &FileIdentity::of(&path)).expect("changed");
        assert!(
            c.contains("was replaced") && c.contains("size 8 → 13 bytes"),
            "{c}"
        );
        assert!(!c.contains("inode"), "{c}");

        // Another file renamed over the name: another inode.
        let loaded = FileIdentity::of(&path).expect("stat");
        let other = dir.path().join("new.gguf");
        std::fs::write(&other, b"GGUF one more").expect("write");
        std::fs::rename(&other, &path).expect("rename");
        let c = change(&path, &loaded, &FileIdentity::of(&path)).expect("changed");
        assert!(c.contains("another file: inode"), "{c}");

        std::fs::remove_file(&path).expect("rm");
        let c = change(&path, &loaded, &FileIdentity::of(&path)).expect("changed");
        assert!(c.ends_with("was deleted since the instance started"), "{c}");
    }

    #[test]
    fn the_model_path_follows_dash_m() {
        let argv: Vec<String> = ["llama-server", "-m", "/models/a.gguf", "--port", "1"]
            .map(String::from)
            .to_vec();
        assert_eq!(model_path(&argv), Some(Path::new("/models/a.gguf")));
        assert_eq!(model_path(&argv[..1]), None);
    }
}
