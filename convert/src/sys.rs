//! The few operating-system facts the standard library does not give.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Free bytes for an unprivileged writer on the file system holding `dir`, if it can be known.
pub fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the right
    // type; statvfs fills it completely when it returns 0.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so the struct is initialized.
    let st = unsafe { st.assume_init() };
    // The field types are u32 on some 32-bit targets: widen portably.
    #[allow(clippy::useless_conversion)]
    Some(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

/// Gives a file the permissions a plain `create` would have (0666 less the umask): temporary
/// files are created 0600, and the finished output should not stay that way.
pub fn set_default_permissions(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: umask only swaps the process's file-creation mask; it is set back at once. A file
    // created by another thread in between would get mode 0666 & !0o077, no more permissive
    // than the user's own mask would allow.
    let mask = unsafe {
        let m = libc::umask(0o077);
        libc::umask(m);
        m
    };
    // mode_t is narrower than u32 on some systems.
    #[allow(clippy::useless_conversion)]
    let mask = u32::from(mask);
    file.set_permissions(std::fs::Permissions::from_mode(0o666 & !mask))
}

/// Takes an exclusive `flock` on `file`, waiting for it. It is released when the file is closed
/// (by every descriptor of it), including when the process dies.
pub fn lock_exclusive(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor `file` keeps open; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Takes an exclusive `flock` on `file` if no other open file holds one: `Ok(false)` when one
/// does.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: as in `lock_exclusive`.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Whether `path` still names the file open as `file` (it was not removed or replaced).
pub fn still_linked(file: &File, path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let open = file.metadata()?;
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(m.dev() == open.dev() && m.ino() == open.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}
