//! A checkpoint directory is quantized once into a cache file and reused until it changes.

mod infer_support;

use infer_support::*;

fn run(dir: &std::path::Path, bits: &str, cache_home: &std::path::Path) -> std::process::Output {
    infer_env(
        &[
            "-m",
            dir.to_str().unwrap(),
            "--bits",
            bits,
            "-p",
            "Hello",
            "-n",
            "4",
            "--temp",
            "0",
        ],
        &[("XDG_CACHE_HOME", cache_home)],
    )
}

fn ggufs(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".gguf"))
        .collect();
    v.sort();
    v
}

#[test]
fn infer_checkpoint_is_quantized_once_and_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let cache_home = tmp.path().join("cache");
    copy_dir(&smallest_fixture(), &ck);

    let first = run(&ck, "8", &cache_home);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stderr(&first).contains("quantizing"), "{}", stderr(&first));
    let files = ggufs(&ck);
    assert_eq!(
        files.len(),
        1,
        "one cache file next to the checkpoint: {files:?}"
    );
    assert!(
        stderr(&first).contains(&files[0]),
        "the cache location is named"
    );

    let second = run(&ck, "8", &cache_home);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("using cached"),
        "{}",
        stderr(&second)
    );
    assert_eq!(stdout(&first), stdout(&second));

    // Another width is another file.
    let four = run(&ck, "4", &cache_home);
    assert!(four.status.success(), "{}", stderr(&four));
    assert_eq!(ggufs(&ck).len(), 2);

    // A changed checkpoint is quantized again and the stale file replaced.
    let cfg = ck.join("config.json");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push('\n');
    std::fs::write(&cfg, text).unwrap();
    let third = run(&ck, "8", &cache_home);
    assert!(third.status.success(), "{}", stderr(&third));
    assert!(stderr(&third).contains("quantizing"), "{}", stderr(&third));
    assert_eq!(
        ggufs(&ck).len(),
        2,
        "stale 8-bit file removed: {:?}",
        ggufs(&ck)
    );
}

#[test]
fn infer_corrupt_cache_file_is_recreated() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    copy_dir(&smallest_fixture(), &ck);
    let first = run(&ck, "8", tmp.path());
    assert!(first.status.success(), "{}", stderr(&first));
    let file = ck.join(&ggufs(&ck)[0]);
    std::fs::write(&file, b"GGUF garbage").unwrap();
    let again = run(&ck, "8", tmp.path());
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stderr(&again).contains("re-creating"), "{}", stderr(&again));
    assert_eq!(stdout(&first), stdout(&again));
}

/// The unprivileged user and group the read-only test runs as when the tests run as root (as
/// CI does): `nobody`.
const NOBODY: u32 = 65534;

/// Whether every directory above `path`, and `path` itself, lets other users through.
fn reachable_by_others(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.ancestors().all(|p| {
        p.as_os_str().is_empty()
            || std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    })
}

#[test]
fn infer_read_only_checkpoint_caches_in_user_cache_dir() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let ck = root.join("ck");
    let cache_home = root.join("cache");
    copy_dir(&smallest_fixture(), &ck);
    std::fs::create_dir(&cache_home).unwrap();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let as_root = unsafe { libc::geteuid() } == 0;

    let mut bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_falcon-infer"));
    if as_root {
        // Root writes through any permission: run falcon-infer as `nobody` instead, for whom
        // the checkpoint (owned by root) is read-only and the cache directory is its own.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = std::ffi::CString::new(cache_home.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: chown with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::chown(c.as_ptr(), NOBODY, NOBODY) }, 0);
        if !reachable_by_others(&bin) {
            let copy = root.join("falcon-infer");
            std::fs::copy(&bin, &copy).unwrap();
            bin = copy;
        }
    }
    std::fs::set_permissions(&ck, std::fs::Permissions::from_mode(0o555)).unwrap();
    if !as_root {
        assert!(
            std::fs::write(ck.join("probe"), b"").is_err(),
            "permissions do not stop this user's writes: the test cannot run"
        );
    }

    let mut cmd = std::process::Command::new(&bin);
    cmd.args([
        "-m",
        ck.to_str().unwrap(),
        "--bits",
        "8",
        "-p",
        "Hello",
        "-n",
        "4",
        "--temp",
        "0",
    ])
    .stdin(std::process::Stdio::null())
    .env("XDG_CACHE_HOME", &cache_home)
    .env("HOME", &cache_home);
    if as_root {
        // SAFETY: runs in the forked child before exec and only makes async-signal-safe
        // system calls (setgroups, setgid, setuid) with no memory of the parent's.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(NOBODY) != 0
                    || libc::setuid(NOBODY) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let o = cmd.output().expect("running falcon-infer");
    std::fs::set_permissions(&ck, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(ggufs(&ck).is_empty(), "wrote into the read-only checkpoint");
    assert!(
        stderr(&o).contains(cache_home.to_str().unwrap()),
        "{}",
        stderr(&o)
    );
    let cached: Vec<std::path::PathBuf> = walk(&cache_home)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    assert_eq!(
        cached.len(),
        1,
        "one cached model under {}: {cached:?}",
        cache_home.display()
    );
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
