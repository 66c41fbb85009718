//! Output files that are never seen half-written.
//!
//! A [`PartialFile`] is a temporary file beside the destination, named
//! `.<name>.<random>.falcon-partial`, renamed into place by [`PartialFile::persist`] only when
//! complete and flushed. Nothing partial survives:
//!
//! - an error or a cancelled run: dropping a `PartialFile` removes it;
//! - a signal that must end the process at once (a second Ctrl-C): the handler calls
//!   [`remove_all`], which removes every partial file of this process, then exits;
//! - a run killed outright (SIGKILL, power loss): the writer holds an exclusive `flock` on its
//!   partial file for as long as it writes, and [`PartialFile::create`] first removes every
//!   partial file in the directory that nobody holds ([`remove_stale`]). A file another live
//!   process is writing is locked, so it is left alone.
//!
//! ```no_run
//! use std::io::Write;
//! let mut out = convert::partial::PartialFile::create("model.gguf".as_ref())?;
//! out.file().write_all(b"GGUF")?;
//! out.persist()?;
//! # Ok::<(), std::io::Error>(())
//! ```

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::sys;

/// The end of every partial file's name.
pub const SUFFIX: &str = ".falcon-partial";

/// The partial files this process is writing, for [`remove_all`].
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<PathBuf>> {
    // A panic while the list was held leaves it consistent (every change is one push or
    // remove): keep using it.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A file being written beside its destination.
#[derive(Debug)]
pub struct PartialFile {
    tmp: Option<tempfile::NamedTempFile>,
    dest: PathBuf,
}

impl PartialFile {
    /// Removes the stale partial files of `dest`'s directory ([`remove_stale`]), then creates a
    /// new partial file there, locked for as long as it lives.
    ///
    /// # Errors
    /// The directory cannot be read or written.
    pub fn create(dest: &Path) -> io::Result<PartialFile> {
        let dir = parent(dest);
        // Best effort: a directory that cannot be listed can still be written to.
        let _ = remove_stale(&dir);
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        loop {
            // Created and listed under one lock, so that `remove_all` never misses it.
            let mut live = live();
            let tmp = tempfile::Builder::new()
                .prefix(&format!(".{name}."))
                .suffix(SUFFIX)
                .tempfile_in(&dir)?;
            // On a file system without locks, the file is left unlocked: cleaners then cannot
            // lock it either, and leave it alone.
            if sys::lock_exclusive(tmp.as_file()).is_ok()
                // A cleaner in another process may have locked the new file before us, found
                // it unlocked and removed it: then start over with a new name.
                && !sys::still_linked(tmp.as_file(), tmp.path())?
            {
                continue;
            }
            live.push(tmp.path().to_path_buf());
            return Ok(PartialFile {
                tmp: Some(tmp),
                dest: dest.to_path_buf(),
            });
        }
    }

    /// The open file, for writing.
    pub fn file(&self) -> &File {
        self.tmp
            .as_ref()
            .expect("present until persisted")
            .as_file()
    }

    /// Where the file is while it is written.
    pub fn path(&self) -> &Path {
        self.tmp.as_ref().expect("present until persisted").path()
    }

    /// The destination.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Gives the file the permissions a plain `create` would have, flushes it to disk and
    /// renames it to its destination (replacing any file there), then makes the rename durable.
    ///
    /// # Errors
    /// Any of these steps fails; the partial file is then removed.
    pub fn persist(mut self) -> io::Result<()> {
        let tmp = self.tmp.take().expect("present until persisted");
        sys::set_default_permissions(tmp.as_file())?;
        tmp.as_file().sync_all()?;
        {
            let mut live = live();
            let path = tmp.path().to_path_buf();
            let result = tmp.persist(&self.dest);
            live.retain(|p| *p != path);
            if let Err(e) = result {
                // Dropping the returned file removes it.
                return Err(e.error);
            }
        }
        if let Ok(d) = File::open(parent(&self.dest)) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let mut live = live();
            let path = tmp.path().to_path_buf();
            // Closing the temporary file removes it.
            drop(tmp);
            live.retain(|p| *p != path);
        }
    }
}

fn parent(dest: &Path) -> PathBuf {
    match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Removes every partial file this process is writing. For signal handlers that end the
/// process at once: call it, then exit. Later writes to those files go nowhere; their
/// `persist` fails.
pub fn remove_all() {
    let mut live = live();
    for p in live.drain(..) {
        let _ = std::fs::remove_file(p);
    }
}

/// Removes the partial files in `dir` left by runs that ended without cleaning up (killed,
/// power loss): those that no process holds locked. Returns what was removed.
///
/// # Errors
/// `dir` cannot be read.
pub fn remove_stale(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with('.') && name.ends_with(SUFFIX)) {
            continue;
        }
        let path = entry.path();
        // Only regular files: never follow a link planted in a shared directory.
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        match sys::try_lock_exclusive(&file) {
            // A live writer holds it.
            Ok(false) => continue,
            Ok(true) => {}
            Err(_) => continue,
        }
        // Locked by us now: still the same file under that name?
        if sys::still_linked(&file, &path).unwrap_or(false) && std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// `remove_all` acts on the whole process: these tests take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn persist_renames_and_drop_removes() {
        let _turn = serial();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("m.gguf");
        let p = PartialFile::create(&dest).unwrap();
        let name = p.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(".m.gguf.") && name.ends_with(SUFFIX),
            "{name}"
        );
        p.file().write_all(b"GGUF").unwrap();
        p.persist().unwrap();
        assert_eq!(names(dir.path()), ["m.gguf"]);
        assert_eq!(std::fs::read(&dest).unwrap(), b"GGUF");

        let p = PartialFile::create(&dest).unwrap();
        p.file().write_all(b"half").unwrap();
        drop(p);
        assert_eq!(names(dir.path()), ["m.gguf"]);
        assert_eq!(std::fs::read(&dest).unwrap(), b"GGUF");
    }

    #[test]
    fn remove_all_removes_the_files_being_written() {
        let _turn = serial();
        let dir = tempfile::tempdir().unwrap();
        let p = PartialFile::create(&dir.path().join("x")).unwrap();
        assert!(p.path().exists());
        remove_all();
        assert!(!p.path().exists());
        // Persisting afterwards fails; nothing appears at the destination.
        assert!(p.persist().is_err());
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn stale_files_are_removed_but_locked_ones_kept() {
        let _turn = serial();
        let dir = tempfile::tempdir().unwrap();
        let live = PartialFile::create(&dir.path().join("live")).unwrap();
        let stale = dir.path().join(format!(".dead.abc123{SUFFIX}"));
        std::fs::write(&stale, b"left by a killed run").unwrap();
        // Not ours: other names, and directories, are never touched.
        let other = dir.path().join(".notes.partial");
        std::fs::write(&other, b"x").unwrap();
        std::fs::create_dir(dir.path().join(format!(".d{SUFFIX}"))).unwrap();

        let removed = remove_stale(dir.path()).unwrap();
        assert_eq!(removed, std::slice::from_ref(&stale));
        assert!(!stale.exists());
        assert!(live.path().exists() && other.exists());
        // Creating a partial file cleans up the same way.
        std::fs::write(&stale, b"again").unwrap();
        let next = PartialFile::create(&dir.path().join("next")).unwrap();
        assert!(!stale.exists() && live.path().exists() && next.path().exists());
    }
}
