//! Models on disk: walks the configured model directories for GGUF files,
//! groups split sets (`NAME-00001-of-00003.gguf`…) into one model, and reads
//! each header with [`crate::gguf`]. Results are cached by path, size and
//! mtime of every part, so a rescan re-parses only what changed. A file that
//! does not parse is listed as broken with the reason, never hidden, never
//! fatal.
//!
//! A model's id is its path relative to its model directory. It is the only
//! handle the network uses: a start request names an id from the last scan
//! and the agent resolves it to a path here. Symlinks are followed only when
//! their target stays inside the model directories (checked on the
//! canonical path, at scan time and again at start); directory symlinks are
//! not descended.

use crate::gguf::{self, read::parse_split_name, read::split_part_name};
use proto::domain::{ModelFile, ModelStatus};
use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

/// Deepest directory level walked below a model directory.
pub const MAX_DEPTH: usize = 16;
/// Most directory entries looked at in one scan.
pub const MAX_ENTRIES: usize = 200_000;
/// Longest model id accepted from the network.
pub const MAX_MODEL_ID_LEN: usize = proto::domain::model::MAX_MODEL_ID_LEN;

/// A model found by a scan, with the file the agent would load.
#[derive(Debug, Clone, PartialEq)]
pub struct ScannedModel {
    /// What is reported.
    pub file: ModelFile,
    /// Canonical path of the file (part 1 of a split set).
    pub path: PathBuf,
}

/// (size, mtime) of each part: what decides whether a cached parse holds.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// The scanner and its parse cache.
#[derive(Debug)]
pub struct Scanner {
    dirs: Vec<PathBuf>,
    cache: HashMap<PathBuf, (Fingerprint, ModelFile)>,
    models: Vec<ScannedModel>,
    parses: u64,
}

/// One `.gguf` file found by the walk.
#[derive(Debug)]
struct Found {
    /// Path relative to the model dir, `/`-separated.
    id: String,
    /// The path as walked (may be a symlink).
    path: PathBuf,
    /// Set when the file is a symlink leaving the model directories.
    escapes: bool,
}

impl Scanner {
    /// A scanner over canonical model directories (as [`crate::config`]
    /// validates them).
    pub fn new(dirs: Vec<PathBuf>) -> Scanner {
        Scanner {
            dirs,
            cache: HashMap::new(),
            models: Vec::new(),
            parses: 0,
        }
    }

    /// The model directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Models of the last scan, ordered by directory then id.
    pub fn models(&self) -> &[ScannedModel] {
        &self.models
    }

    /// Headers parsed since this scanner was made (cache misses).
    pub fn parse_count(&self) -> u64 {
        self.parses
    }

    /// Walks every model directory and refreshes the model list. Blocking
    /// (file system and header reads): run it off the async runtime.
    pub fn scan(&mut self) -> &[ScannedModel] {
        let mut budget = MAX_ENTRIES;
        let mut models = Vec::new();
        let mut live = HashMap::new();
        for (index, dir) in self.dirs.clone().iter().enumerate() {
            let mut found = Vec::new();
            walk(&self.dirs, dir, dir, 0, &mut budget, &mut found);
            for (id, parts) in group(found) {
                if let Some(model) = self.describe(index as u32, dir, &id, &parts, &mut live) {
                    models.push(model);
                }
            }
        }
        self.cache = live;
        self.models = models;
        &self.models
    }

    /// The model with this id (the first directory's when two hold it).
    pub fn lookup(&self, id: &str) -> Option<&ScannedModel> {
        self.models.iter().find(|m| m.file.id == id)
    }

    /// Canonical path of part `part` (0: the first or only file) of a
    /// model this scan lists, when it is a regular file inside the model
    /// directories; what a copy's sender reads, and nothing else.
    pub fn part_path(&self, id: &str, part: usize) -> Option<PathBuf> {
        let m = self.lookup(id)?;
        let part_id = m.file.parts.get(part)?;
        let dir = self.dirs.get(m.file.dir_index as usize)?;
        let path = dir.join(part_id).canonicalize().ok()?;
        (is_inside(&self.dirs, &path) && path.is_file()).then_some(path)
    }

    /// One model from its parts (part 1 first; a lone part 1 for a single
    /// file); `None` for an empty group.
    fn describe(
        &mut self,
        dir_index: u32,
        dir: &Path,
        id: &str,
        group: &Group,
        live: &mut HashMap<PathBuf, (Fingerprint, ModelFile)>,
    ) -> Option<ScannedModel> {
        let parts: Vec<String> = group.parts.iter().map(|f| f.id.clone()).collect();
        let first = group.parts.first()?;
        let sizes: Fingerprint = group
            .parts
            .iter()
            .map(|f| {
                let meta = std::fs::metadata(&f.path).ok();
                (
                    f.path.clone(),
                    meta.as_ref().map_or(0, |m| m.len()),
                    meta.and_then(|m| m.modified().ok()),
                )
            })
            .collect();
        let file_size_bytes = sizes.iter().map(|(_, s, _)| *s).sum();
        let canonical = first
            .path
            .canonicalize()
            .unwrap_or_else(|_| first.path.clone());
        let broken = |reason: String| ModelFile {
            id: id.to_owned(),
            dir_index,
            file_size_bytes,
            parts: parts.clone(),
            status: ModelStatus::Broken(reason),
        };
        let file = if let Some(f) = group.parts.iter().find(|f| f.escapes) {
            broken(format!(
                "{}: symlink leads outside the model directories; refused",
                f.id
            ))
        } else if let Some(reason) = &group.missing_first {
            broken(reason.clone())
        } else if let Some((fp, cached)) = self.cache.get(&first.path)
            && *fp == sizes
            && cached.dir_index == dir_index
        {
            cached.clone()
        } else {
            self.parses += 1;
            let status = match gguf::read_model(&first.path) {
                Ok(model) => match gguf::model_params(&model) {
                    Ok(p) => ModelStatus::Ok(Box::new(p)),
                    Err(e) => ModelStatus::Broken(relative_reason(dir, &e.to_string())),
                },
                Err(e) => ModelStatus::Broken(relative_reason(dir, &e.to_string())),
            };
            ModelFile {
                id: id.to_owned(),
                dir_index,
                file_size_bytes,
                parts: parts.clone(),
                status,
            }
        };
        live.insert(first.path.clone(), (sizes, file.clone()));
        Some(ScannedModel {
            file,
            path: canonical,
        })
    }
}

/// Error text with the model directory's prefix cut, so reasons read as
/// model ids rather than the node's file system layout.
fn relative_reason(dir: &Path, reason: &str) -> String {
    reason.replace(&format!("{}/", dir.display()), "")
}

fn walk(
    dirs: &[PathBuf],
    root: &Path,
    dir: &Path,
    depth: usize,
    budget: &mut usize,
    out: &mut Vec<Found>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        tracing::warn!(dir = %dir.display(), "model dir unreadable");
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        if *budget == 0 {
            tracing::warn!(root = %root.display(), "model scan stopped at {MAX_ENTRIES} entries");
            return;
        }
        *budget -= 1;
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let Some(id) = relative_id(root, &path) else {
            tracing::warn!(path = %path.display(), "skipping a name that is not UTF-8");
            continue;
        };
        if kind.is_dir() {
            if depth < MAX_DEPTH {
                walk(dirs, root, &path, depth + 1, budget, out);
            }
            continue;
        }
        if !id.ends_with(".gguf") {
            continue;
        }
        if kind.is_symlink() {
            // Only files whose canonical target stays inside the model
            // directories count; anything else is reported and refused.
            let escapes = match path.canonicalize() {
                Ok(target) => !is_inside(dirs, &target) || !target.is_file(),
                Err(_) => true,
            };
            out.push(Found { id, path, escapes });
        } else if kind.is_file() {
            out.push(Found {
                id,
                path,
                escapes: false,
            });
        }
    }
}

/// Whether a canonical path lies inside one of the (canonical) model dirs.
pub fn is_inside(dirs: &[PathBuf], canonical: &Path) -> bool {
    dirs.iter().any(|d| canonical.starts_with(d))
}

fn relative_id(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    let parts: Option<Vec<&str>> = rel
        .components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect();
    Some(parts?.join("/"))
}

/// The parts of one model; `missing_first` explains a split set whose part
/// 1 is absent.
#[derive(Debug)]
struct Group {
    parts: Vec<Found>,
    missing_first: Option<String>,
}

/// Groups split parts under their part 1; single files stand alone.
fn group(found: Vec<Found>) -> BTreeMap<String, Group> {
    let mut models: BTreeMap<String, Group> = BTreeMap::new();
    let mut splits: BTreeMap<(String, u32), Vec<(u32, Found)>> = BTreeMap::new();
    for f in found {
        let (parent, name) = match f.id.rsplit_once('/') {
            Some((p, n)) => (format!("{p}/"), n.to_owned()),
            None => (String::new(), f.id.clone()),
        };
        match parse_split_name(&name) {
            Some((prefix, no, count)) if count > 1 => {
                splits
                    .entry((format!("{parent}{prefix}"), count))
                    .or_default()
                    .push((no, f));
            }
            _ => {
                models.insert(
                    f.id.clone(),
                    Group {
                        parts: vec![f],
                        missing_first: None,
                    },
                );
            }
        }
    }
    for ((prefix, count), mut parts) in splits {
        parts.sort_by_key(|(no, _)| *no);
        let Some((first_no, first_found)) = parts.first() else {
            continue;
        };
        let first_no = *first_no;
        let lowest_id = first_found.id.clone();
        let first_id = split_part_name(&prefix, 1, count);
        let missing_first = (first_no != 1)
            .then(|| format!("split set of {count} parts without its first part `{first_id}`"));
        let id = if first_no == 1 { first_id } else { lowest_id };
        models.insert(
            id,
            Group {
                parts: parts.into_iter().map(|(_, f)| f).collect(),
                missing_first,
            },
        );
    }
    models
}

/// Why a model id from the network is refused before any lookup, when it
/// could never name a model (`..`, absolute, NUL…). Such ids are hostile or
/// broken clients, and get a specific error rather than "unknown". The one
/// definition is [`proto::domain::check_model_id`], shared with the
/// controller's catalog.
pub fn check_model_id(id: &str) -> Result<(), &'static str> {
    proto::domain::check_model_id(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::fixtures::write_tiny_llama;

    #[test]
    fn a_scan_lists_good_broken_and_escaping_files_and_caches_parses() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let models = tmp.path().join("models");
        std::fs::create_dir_all(models.join("sub")).expect("mkdir");
        write_tiny_llama(&models.join("tiny.gguf"), 1).expect("tiny");
        write_tiny_llama(&models.join("sub/other.gguf"), 2).expect("tiny");
        let full = std::fs::read(models.join("tiny.gguf")).expect("read");
        std::fs::write(models.join("cut.gguf"), &full[..full.len() / 3]).expect("cut");
        std::fs::write(models.join("notes.txt"), b"not a model").expect("txt");
        let outside = tmp.path().join("outside.gguf");
        write_tiny_llama(&outside, 3).expect("tiny");
        std::os::unix::fs::symlink(&outside, models.join("escape.gguf")).expect("symlink");
        std::os::unix::fs::symlink(models.join("tiny.gguf"), models.join("alias.gguf"))
            .expect("symlink");

        let dir = models.canonicalize().expect("canonical");
        let mut s = Scanner::new(vec![dir.clone()]);
        let list: Vec<(String, bool)> = s
            .scan()
            .iter()
            .map(|m| {
                (
                    m.file.id.clone(),
                    matches!(m.file.status, ModelStatus::Ok(_)),
                )
            })
            .collect();
        assert_eq!(
            list,
            vec![
                ("alias.gguf".into(), true),
                ("cut.gguf".into(), false),
                ("escape.gguf".into(), false),
                ("sub/other.gguf".into(), true),
                ("tiny.gguf".into(), true),
            ]
        );
        let cut = s.lookup("cut.gguf").expect("cut");
        let ModelStatus::Broken(reason) = &cut.file.status else {
            panic!("cut is not broken")
        };
        // The reason names the file relative to the model dir, and where it broke.
        assert!(reason.starts_with("cut.gguf: at byte "), "{reason}");
        let ModelStatus::Broken(reason) = &s.lookup("escape.gguf").expect("escape").file.status
        else {
            panic!("escape is not broken")
        };
        assert!(reason.contains("outside the model directories"), "{reason}");
        assert_eq!(
            s.lookup("alias.gguf").expect("alias").path,
            dir.join("tiny.gguf")
        );

        let parsed = s.parse_count();
        s.scan();
        assert_eq!(
            s.parse_count(),
            parsed,
            "unchanged files are not parsed again"
        );
        write_tiny_llama(&models.join("sub/other.gguf"), 9).expect("rewrite");
        // Same size, so make the mtime differ for certain.
        let f = std::fs::File::options()
            .write(true)
            .open(models.join("sub/other.gguf"))
            .expect("open");
        f.set_modified(SystemTime::UNIX_EPOCH).expect("mtime");
        s.scan();
        assert_eq!(s.parse_count(), parsed + 1);
    }

    #[test]
    fn split_parts_are_one_model_and_a_lone_later_part_is_broken() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().canonicalize().expect("canonical");
        for n in [
            "big-00001-of-00002.gguf",
            "big-00002-of-00002.gguf",
            "orphan-00002-of-00003.gguf",
        ] {
            std::fs::write(dir.join(n), b"GGUF").expect("write");
        }
        let mut s = Scanner::new(vec![dir]);
        let got: Vec<(String, Vec<String>, bool)> = s
            .scan()
            .iter()
            .map(|m| {
                (
                    m.file.id.clone(),
                    m.file.parts.clone(),
                    matches!(m.file.status, ModelStatus::Broken(_)),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "big-00001-of-00002.gguf".into(),
                    vec![
                        "big-00001-of-00002.gguf".into(),
                        "big-00002-of-00002.gguf".into()
                    ],
                    true // 4-byte files do not parse
                ),
                (
                    "orphan-00002-of-00003.gguf".into(),
                    vec!["orphan-00002-of-00003.gguf".into()],
                    true
                ),
            ]
        );
        let ModelStatus::Broken(r) = &s.models()[1].file.status else {
            panic!()
        };
        assert!(
            r.contains("without its first part `orphan-00001-of-00003.gguf`"),
            "{r}"
        );
    }

    #[test]
    fn hostile_model_ids_are_refused_before_lookup() {
        for id in [
            "",
            "../x.gguf",
            "a/../../x",
            "/etc/passwd",
            "a\0b",
            "./x",
            "a//b",
            "a\\b",
        ] {
            assert!(check_model_id(id).is_err(), "{id:?}");
        }
        for id in [
            "tiny.gguf",
            "sub/dir/model-00001-of-00002.gguf",
            "x..y.gguf",
        ] {
            assert_eq!(check_model_id(id), Ok(()), "{id:?}");
        }
    }
}
