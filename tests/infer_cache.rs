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

#[test]
fn infer_read_only_checkpoint_caches_in_user_cache_dir() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let cache_home = tmp.path().join("cache");
    copy_dir(&smallest_fixture(), &ck);
    std::fs::set_permissions(&ck, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(ck.join("probe"), b"").is_ok() {
        // Running as root: permissions do not stop writes, nothing to test.
        let _ = std::fs::remove_file(ck.join("probe"));
        std::fs::set_permissions(&ck, std::fs::Permissions::from_mode(0o755)).unwrap();
        return;
    }
    let o = run(&ck, "8", &cache_home);
    std::fs::set_permissions(&ck, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(ggufs(&ck).is_empty());
    assert!(
        stderr(&o).contains(cache_home.to_str().unwrap()),
        "{}",
        stderr(&o)
    );
}
