//! What can go wrong with a store, each with what to do about it.

use crate::format::task::{NameError, TaskError};
use crate::format::{Digest, FormatError, Hex};
use std::fmt;
use std::path::PathBuf;

/// Why a store operation failed. Every refusal happens before the first write of a change, so
/// a refused change leaves the store exactly as it was.
#[derive(Debug)]
pub enum StoreError {
    /// `DIR/current` is missing: not a store, or an `init` that never finished.
    NoStore { dir: PathBuf },
    /// `init` on a directory that already holds a store.
    AlreadyStore { dir: PathBuf },
    /// `init` on a directory that holds files that are not a store's.
    NotEmpty { dir: PathBuf },
    /// A file system operation failed.
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    /// The backbone file is not a valid backbone (or, in `verify`, its digest does not match).
    Backbone { path: PathBuf, error: FormatError },
    /// The store's own structure (the `current` link, a generation index) is damaged.
    Corrupt { path: PathBuf, what: String },
    /// A task (file in the store, or bytes offered for installation) does not decode.
    BadTask { origin: String, error: TaskError },
    /// A task's name cannot be a file name in the store.
    BadName { origin: String, name: String, error: NameError },
    /// A task learned on another backbone.
    WrongBackbone { name: String, task: Digest, store: Digest },
    /// A task with this name is installed and the offered one is not a higher version.
    Downgrade { name: String, installed: u32, offered: u32 },
    /// The same name twice, with different contents, in one change.
    Duplicate { name: String },
    /// A task depends on a task that is neither in the store nor in the change.
    MissingDependency { name: String, digest: Digest },
    /// The change removes or replaces tasks that others still depend on.
    HasDependents { name: String, dependents: Vec<String>, replacing: bool },
    /// No task of that name in the current generation.
    NoSuchTask { name: String, available: Vec<String> },
    /// `rollback` with no predecessor generation on disk.
    NoPredecessor { generation: u32 },
    /// Generation numbers have six digits.
    TooManyGenerations,
    /// A file larger than the store accepts; nothing was allocated for it.
    TooLarge { path: PathBuf, len: u64, max: u64 },
}

impl StoreError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { what, path, source }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::NoStore { dir } => write!(
                f,
                "no store at {}: run `edgecl store init {} --backbone FILE.ecb` first",
                dir.display(),
                dir.display()
            ),
            StoreError::AlreadyStore { dir } => {
                write!(f, "{} already holds a store; use it with --store {}", dir.display(), dir.display())
            }
            StoreError::NotEmpty { dir } => write!(
                f,
                "{} is not empty and is not a store; give a new or empty directory",
                dir.display()
            ),
            StoreError::Io { what, path, source } => write!(f, "{what} {}: {source}", path.display()),
            StoreError::Backbone { path, error } => {
                write!(f, "{} is not a valid backbone: {error}", path.display())
            }
            StoreError::Corrupt { path, what } => write!(
                f,
                "the store is damaged at {}: {what}; `edgecl store verify` checks it and `edgecl store rollback` returns to the previous generation",
                path.display()
            ),
            StoreError::BadTask { origin, error } => write!(f, "{origin} is not a valid task file: {error}"),
            StoreError::BadName { origin, name, error } => {
                write!(f, "{origin}: task name {name:?} cannot be used in a store: {error}")
            }
            StoreError::WrongBackbone { name, task, store } => write!(
                f,
                "task '{name}' was learned on backbone {} but this store's backbone is {}; install it into a store of that backbone",
                Hex(task),
                Hex(store)
            ),
            StoreError::Downgrade { name, installed, offered } => {
                if offered == installed {
                    write!(
                        f,
                        "task '{name}' version {installed} is installed with other contents; a replacement needs a higher version than {installed}"
                    )
                } else {
                    write!(
                        f,
                        "refusing to downgrade task '{name}' from version {installed} to {offered}; remove it first (`edgecl tasks remove {name}`) if you really want the older one"
                    )
                }
            }
            StoreError::Duplicate { name } => {
                write!(f, "task '{name}' appears twice with different contents in one change; give one of them")
            }
            StoreError::MissingDependency { name, digest } => write!(
                f,
                "task '{name}' depends on task {} which is neither installed nor part of this change; install that task first or together with it",
                Hex(digest)
            ),
            StoreError::HasDependents { name, dependents, replacing } => {
                let list = dependents.iter().map(|d| format!("'{d}'")).collect::<Vec<_>>().join(", ");
                let verb = if *replacing { "replace" } else { "remove" };
                write!(
                    f,
                    "cannot {verb} task '{name}': {list} depend{} on it (ExSSNeT tasks read the masks and weights of earlier tasks); remove {} first, newest first",
                    if dependents.len() == 1 { "s" } else { "" },
                    if dependents.len() == 1 { "it" } else { "them" }
                )
            }
            StoreError::NoSuchTask { name, available } => {
                if available.is_empty() {
                    write!(f, "no task '{name}': the store holds no tasks")
                } else {
                    write!(f, "no task '{name}' in the store; it holds {}", available.join(", "))
                }
            }
            StoreError::NoPredecessor { generation } => write!(
                f,
                "generation {generation:06} has no previous generation on disk to roll back to"
            ),
            StoreError::TooManyGenerations => {
                f.write_str("the store has used all 999999 generation numbers; copy its tasks into a new store")
            }
            StoreError::TooLarge { path, len, max } => {
                write!(f, "{} has {len} bytes, more than the {max} a store accepts", path.display())
            }
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
