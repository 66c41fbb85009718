//! falcon-quantize signalled mid-write: nothing partial survives one or two Ctrl-C or a
//! SIGTERM, and what a killed run leaves is removed by the next run in that directory, but
//! never the file of a run that is still writing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use common::*;

/// A bf16 checkpoint with Falcon-7B's widths and two layers (1.4 GB): big enough to signal a
/// conversion mid-write. Shared by the tests that run at the same time, removed after the last.
fn checkpoint() -> Arc<tempfile::TempDir> {
    static SHARED: Mutex<Weak<tempfile::TempDir>> = Mutex::new(Weak::new());
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = slot.upgrade() {
        return dir;
    }
    let dir = tempfile::tempdir().unwrap();
    let o = quantize(&[
        "synth",
        "--shape",
        "falcon-7b",
        "--layers",
        "2",
        "-o",
        dir.path().join("ck").to_str().unwrap(),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = Arc::new(dir);
    *slot = Arc::downgrade(&dir);
    dir
}

/// Starts a slow conversion (f32, one thread) of the shared checkpoint into `out`.
fn start(ck: &tempfile::TempDir, out: &Path) -> Child {
    Command::new(quantize_bin())
        .args([
            ck.path().join("ck").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--type",
            "f32",
            "--threads",
            "1",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The temporary files in `dir`.
fn partials(dir: &Path) -> Vec<PathBuf> {
    entries(dir)
        .into_iter()
        .filter(|n| n.ends_with(convert::partial::SUFFIX))
        .map(|n| dir.join(n))
        .collect()
}

/// Waits until `child` has written more than 1 MiB into a temporary file in `dir` other than
/// `except`, and returns that file.
fn wait_for_partial(
    dir: &Path,
    child: &mut Child,
    except: Option<&Path>,
    stderr: &Stderr,
) -> PathBuf {
    let started = Instant::now();
    loop {
        let found = partials(dir).into_iter().find(|p| {
            Some(p.as_path()) != except && std::fs::metadata(p).is_ok_and(|m| m.len() > 1 << 20)
        });
        if let Some(p) = found {
            return p;
        }
        if let Some(status) = child.try_wait().unwrap() {
            // Give the reader a moment to collect what the child said.
            std::thread::sleep(Duration::from_millis(200));
            panic!(
                "finished ({status}) before it could be signalled: {}",
                stderr.0.lock().unwrap()
            );
        }
        assert!(started.elapsed().as_secs() < 300, "no output after 300 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child, whose pid stays valid until it is waited for.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill {sig}");
}

/// Collects a child's stderr as it comes.
struct Stderr(Arc<Mutex<String>>, std::thread::JoinHandle<()>);

impl Stderr {
    fn of(child: &mut Child) -> Stderr {
        use std::io::Read;
        let text = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = text.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Stderr(text, reader)
    }

    /// Waits until the text holds `needle`.
    fn wait_for(&self, needle: &str) {
        let started = Instant::now();
        while !self.0.lock().unwrap().contains(needle) {
            assert!(
                started.elapsed().as_secs() < 60,
                "no {needle:?} in {:?}",
                self.0.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn finish(self) -> String {
        self.1.join().unwrap();
        Arc::try_unwrap(self.0).unwrap().into_inner().unwrap()
    }
}

/// Signals a conversion mid-write with `signals`, each after the one before was taken (the
/// program says so on stderr; signals sent at once would merge into one), and checks that it
/// exits with 130 and leaves nothing in the output directory.
fn interrupted_leaves_nothing(signals: &[i32]) {
    let ck = checkpoint();
    let out_dir = tempfile::tempdir().unwrap();
    let mut child = start(&ck, &out_dir.path().join("model.gguf"));
    let stderr = Stderr::of(&mut child);
    wait_for_partial(out_dir.path(), &mut child, None, &stderr);
    for (i, &s) in signals.iter().enumerate() {
        if i > 0 {
            stderr.wait_for("interrupt again to stop at once");
        }
        signal(&child, s);
    }
    let status = child.wait().unwrap();
    let err = stderr.finish();
    assert_eq!(status.code(), Some(130), "{signals:?}: {err}");
    assert!(err.contains("interrupted"), "{signals:?}: {err}");
    assert!(
        entries(out_dir.path()).is_empty(),
        "{signals:?} left behind: {:?}",
        entries(out_dir.path())
    );
}

#[test]
fn one_ctrl_c_leaves_nothing() {
    interrupted_leaves_nothing(&[libc::SIGINT]);
}

/// Regression: the second Ctrl-C exited at once, leaving the temporary file.
#[test]
fn two_quick_ctrl_c_leave_nothing() {
    interrupted_leaves_nothing(&[libc::SIGINT, libc::SIGINT]);
}

#[test]
fn sigterm_leaves_nothing() {
    interrupted_leaves_nothing(&[libc::SIGTERM]);
}

#[test]
fn a_killed_runs_file_is_removed_by_the_next_run_but_a_live_runs_is_not() {
    let ck = checkpoint();
    let out_dir = tempfile::tempdir().unwrap();
    let dir = out_dir.path();

    // SIGKILL cannot be caught: the temporary file stays.
    let mut killed = start(&ck, &dir.join("a.gguf"));
    let killed_err = Stderr::of(&mut killed);
    let stale = wait_for_partial(dir, &mut killed, None, &killed_err);
    signal(&killed, libc::SIGKILL);
    killed.wait().unwrap();
    assert_eq!(
        partials(dir),
        std::slice::from_ref(&stale),
        "what SIGKILL leaves"
    );

    // The next conversion into the directory removes it.
    let mut live = start(&ck, &dir.join("b.gguf"));
    let live_err = Stderr::of(&mut live);
    let writing = wait_for_partial(dir, &mut live, Some(&stale), &live_err);
    assert!(!stale.exists(), "the killed run's file is still there");

    // Another conversion into the directory leaves the live one's file alone.
    let o = quantize(&[
        ck.path().join("ck").to_str().unwrap(),
        "-o",
        dir.join("c.gguf").to_str().unwrap(),
        "--vocab-only",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(writing.exists(), "the live run's file was removed");
    assert!(
        live.try_wait().unwrap().is_none(),
        "the live run stopped: {:?}",
        live.try_wait()
    );

    signal(&live, libc::SIGINT);
    let status = live.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{}", live_err.finish());
    assert_eq!(entries(dir), ["c.gguf"]);
}
