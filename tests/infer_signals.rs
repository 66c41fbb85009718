//! Ctrl-C or SIGTERM while `falcon-infer` quantizes a checkpoint directory into its cache:
//! nothing partial is left in the checkpoint's directory, and the exit status is 130.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A bf16 checkpoint with Falcon-7B's widths and two layers (1.4 GB), slow enough to signal.
fn checkpoint(dir: &Path) -> PathBuf {
    let ck = dir.join("ck");
    let o = Command::new(env!("CARGO_BIN_EXE_falcon-quantize"))
        .args([
            "synth",
            "--shape",
            "falcon-7b",
            "--layers",
            "2",
            "--quiet",
            "-o",
        ])
        .arg(&ck)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ck
}

fn start(ck: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_falcon-infer"))
        .arg("-m")
        .arg(ck)
        .args(["--bits", "8", "-p", "Hello", "-n", "1", "--threads", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(convert::partial::SUFFIX) || n.ends_with(".gguf"))
        .collect()
}

/// Waits until the cache file is being written (more than 1 MiB in a partial file).
fn wait_for_partial(dir: &Path, child: &mut Child) {
    let t = Instant::now();
    loop {
        let writing = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .ends_with(convert::partial::SUFFIX)
                    && e.metadata().is_ok_and(|m| m.len() > 1 << 20)
            });
        if writing {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be signalled"
        );
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "no cache file after 300 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

fn wait(mut child: Child) -> (Option<i32>, String) {
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code(), err)
}

#[test]
fn infer_interrupted_while_quantizing_leaves_nothing_partial() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = checkpoint(tmp.path());
    // One Ctrl-C, two in quick succession, and SIGTERM.
    for signals in [
        &[libc::SIGINT][..],
        &[libc::SIGINT, libc::SIGINT],
        &[libc::SIGTERM],
    ] {
        let mut child = start(&ck);
        wait_for_partial(&ck, &mut child);
        for &s in signals {
            signal(&child, s);
            std::thread::sleep(Duration::from_millis(30));
        }
        let (code, err) = wait(child);
        assert_eq!(code, Some(130), "{signals:?}: {err}");
        assert!(
            partials(&ck).is_empty(),
            "{signals:?} left {:?}",
            partials(&ck)
        );
    }
}
