//! Large events kept in files of their own, next to the database: one file
//! per event, `<id>.json`, holding the event's JSON as served.
//!
//! A message of tens of MiB written into the database costs a copy in the
//! database's write buffer and, with redb's power-of-two page allocation, up
//! to twice its length written (see docs/BENCHMARKS.md). A file takes one
//! write and one `fsync`. The inbox writer keeps the order that makes a crash
//! safe: a file is written and synced (with its directory) before the row
//! that names it commits, and removed only after the row's removal commits;
//! a file without a row (a crash between the two) is removed at start.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::BufWriter;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::node::Event;
use crate::store::StoreError;

/// Events whose payload is at least this long go to a file of their own.
pub(super) const OWN_FILE_FROM: u64 = 1 << 20;

/// The directory of the inbox's files.
#[derive(Debug)]
pub(super) struct Files {
    dir: PathBuf,
}

impl Files {
    /// The directory `dir`, created (owner only) if missing.
    pub(super) fn open(dir: PathBuf) -> Result<Self, StoreError> {
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| at(&dir, e))?;
            // The new directory's entry must last as long as the files in it.
            if let Some(parent) = dir.parent() {
                sync(parent)?;
            }
        }
        Ok(Self { dir })
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes `event`'s JSON to the file of event `id` and syncs it; the
    /// directory entry is synced by [`Files::sync_dir`].
    pub(super) fn write(&self, id: u64, event: &Event) -> Result<(), StoreError> {
        let path = self.path(id);
        let file = File::create(&path).map_err(|e| at(&path, e))?;
        let mut out = BufWriter::new(file);
        serde_json::to_writer(&mut out, event)?;
        let file = out.into_inner().map_err(|e| at(&path, e.into_error()))?;
        file.sync_all().map_err(|e| at(&path, e))
    }

    /// Makes the files written so far part of the directory for good.
    pub(super) fn sync_dir(&self) -> Result<(), StoreError> {
        sync(&self.dir)
    }

    /// The JSON of event `id`, or `None` if it has no file.
    pub(super) fn read(&self, id: u64) -> Result<Option<String>, StoreError> {
        let path = self.path(id);
        match fs::read_to_string(&path) {
            Ok(json) => Ok(Some(json)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(at(&path, e)),
        }
    }

    /// Removes the file of event `id`; one already gone is not an error.
    pub(super) fn remove(&self, id: u64) {
        let path = self.path(id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an inbox file");
            }
            _ => {}
        }
    }

    /// Removes every file not named in `keep` (left by a crash); returns how
    /// many went.
    pub(super) fn remove_others(&self, keep: &HashSet<u64>) -> Result<usize, StoreError> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir).map_err(|e| at(&self.dir, e))? {
            let entry = entry.map_err(|e| at(&self.dir, e))?;
            if !entry
                .file_type()
                .map_err(|e| at(&entry.path(), e))?
                .is_file()
            {
                continue;
            }
            let name = entry.file_name();
            let id = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| n.parse::<u64>().ok());
            if id.is_none_or(|id| !keep.contains(&id)) {
                let path = entry.path();
                fs::remove_file(&path).map_err(|e| at(&path, e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Syncs directory `dir`, so that the entries made in it last.
fn sync(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| at(dir, e))
}

fn at(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::from(format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_no_row_names_are_removed_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = Files::open(dir.path().join("inbox")).expect("open");
        for name in ["1.json", "2.json", "3.json.tmp", "notes"] {
            fs::write(dir.path().join("inbox").join(name), "{}").expect("write");
        }
        fs::create_dir(dir.path().join("inbox").join("4.json")).expect("mkdir");
        let removed = files.remove_others(&HashSet::from([1])).expect("clean");
        assert_eq!(removed, 3);
        let mut left: Vec<_> = fs::read_dir(dir.path().join("inbox"))
            .expect("list")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["1.json", "4.json"],
            "a directory is not ours to remove"
        );
        assert_eq!(files.read(1).expect("read").as_deref(), Some("{}"));
        files.remove(1);
        files.remove(1);
        assert_eq!(
            files.read(1).expect("read"),
            None,
            "gone; removing twice is fine"
        );
    }
}
