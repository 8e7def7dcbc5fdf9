//! Helpers shared by the tests that run the real `edgecl` binary.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `edgecl ARGS…` in `dir`, with a fixed creation time (`SOURCE_DATE_EPOCH`) so task files are
/// reproducible, and without a fault hook inherited from the environment.
pub fn bin(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_edgecl"));
    c.args(args).current_dir(dir).env("SOURCE_DATE_EPOCH", "1700000000").env_remove("EDGECL_FAULT_AFTER");
    c
}

/// Runs [`bin`] to completion.
pub fn edgecl(dir: &Path, args: &[&str]) -> Output {
    bin(dir, args).output().expect("run edgecl")
}

/// A fresh directory for one test, named after the test binary, `name` and the process.
pub fn tempdir(name: &str) -> TempDir {
    TempDir::new(&format!("edgecl-{}-{name}", env!("CARGO_CRATE_NAME")))
}

/// A directory under the system temp folder that is removed when dropped, unless the thread is
/// panicking: a failed test leaves its files for inspection.
pub struct TempDir(PathBuf);

impl TempDir {
    /// `prefix-PID`, emptied if a previous run left it.
    pub fn new(prefix: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The standard output of a run that must succeed.
pub fn ok(o: &Output) -> String {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// The standard error of a run that must fail with a message containing `needle` (and no panic).
pub fn fails(o: &Output, needle: &str) -> String {
    assert!(!o.status.success(), "unexpectedly succeeded: {}", String::from_utf8_lossy(&o.stdout));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.contains(needle), "error does not mention {needle:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}
