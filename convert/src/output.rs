//! An output file that appears at its destination only when complete: written to a
//! [`PartialFile`] in the destination directory (deleted if dropped, by a second Ctrl-C's
//! [`crate::partial::remove_all`], or by the next run after a kill), flushed, given the usual
//! permissions and renamed into place.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::ConvertError;
use crate::partial::PartialFile;

#[derive(Debug)]
pub(crate) struct Output {
    out: PathBuf,
    tmp: PartialFile,
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
        let tmp = PartialFile::create(out).map_err(|e| ConvertError::write(out, e))?;
        Ok(Output {
            out: out.to_path_buf(),
            tmp,
        })
    }

    /// A handle on the temporary file to write through.
    pub(crate) fn file(&self) -> Result<File, ConvertError> {
        self.tmp
            .file()
            .try_clone()
            .map_err(|e| ConvertError::write(&self.out, e))
    }

    /// Flushes the file to disk and renames it into place (durably).
    pub(crate) fn commit(self) -> Result<(), ConvertError> {
        let out = self.out;
        self.tmp.persist().map_err(|e| ConvertError::write(&out, e))
    }
}
