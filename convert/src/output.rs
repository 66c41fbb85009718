//! An output file that appears at its destination only when complete: written to a temporary
//! file in the destination directory (deleted if dropped), flushed, given the usual
//! permissions and renamed into place.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::ConvertError;

#[derive(Debug)]
pub(crate) struct Output {
    out: PathBuf,
    parent: PathBuf,
    tmp: tempfile::NamedTempFile,
}

impl Output {
    /// Creates the temporary file for `out`, after checking that the destination directory
    /// exists and has room for `len` bytes.
    pub(crate) fn create(out: &Path, len: u64) -> Result<Output, ConvertError> {
        let parent = match out.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(ConvertError::write(
                out,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the destination directory does not exist",
                ),
            ));
        }
        if let Some(available) = crate::sys::free_space(&parent) {
            if available < len {
                return Err(ConvertError::NoSpace {
                    path: out.to_path_buf(),
                    needed: len,
                    available,
                });
            }
        }
        let file_name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out.gguf".into());
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{file_name}."))
            .suffix(".partial")
            .tempfile_in(&parent)
            .map_err(|e| ConvertError::write(out, e))?;
        Ok(Output {
            out: out.to_path_buf(),
            parent,
            tmp,
        })
    }

    /// A handle on the temporary file to write through.
    pub(crate) fn file(&self) -> Result<File, ConvertError> {
        self.tmp
            .as_file()
            .try_clone()
            .map_err(|e| ConvertError::write(&self.out, e))
    }

    /// Flushes the file to disk and renames it into place.
    pub(crate) fn commit(self) -> Result<(), ConvertError> {
        let out = &self.out;
        self.tmp
            .as_file()
            .sync_all()
            .map_err(|e| ConvertError::write(out, e))?;
        crate::sys::set_default_permissions(self.tmp.as_file())
            .map_err(|e| ConvertError::write(out, e))?;
        self.tmp
            .persist(out)
            .map_err(|e| ConvertError::write(out, e.error))?;
        // Make the rename itself durable.
        if let Ok(d) = File::open(&self.parent) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}
