//! (alloc) Task files, `.ect` version 3 (normative spec in `models/README.md`; version 2 is
//! read too):
//!
//! ```text
//! 0   magic "EDGECLT\0"
//! 8   version u16 = 3, flags u16 = 0, reserved u32 = 0
//! 16  payload length u64
//! 24  backbone digest [32]   (the .ecb digest the task was learned on)
//! 56  task digest [32]       (SHA-256 of the payload: the task's identity, used by dependents)
//! 88  reserved [8] = 0
//! 96  payload: postcard-encoded `adapter::Task`
//! ..  trailer: SHA-256 of header and payload [32]
//! ```
//! Decoding checks the sizes before touching the payload, both digests, then decodes; a
//! decoded task is still checked against its backbone when its network is built.

use super::{sha256, Digest, FormatError, Hex};
use crate::adapter::Task;
use alloc::vec::Vec;

pub use super::task_view::{HEADER_LEN, MAGIC, OLDEST_READ, TRAILER_LEN, VERSION};

/// Longest task name a store accepts (it becomes a file name, `NAME.ect`).
pub const MAX_NAME_LEN: usize = 64;

/// Why a task name cannot be used: names become file names inside a store, so they must not
/// be able to escape it or collide with the store's own files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameError {
    Empty,
    TooLong {
        len: usize,
    },
    /// A character outside `A-Z a-z 0-9 . _ -`.
    BadChar {
        ch: char,
    },
    /// Names starting with `.` (hidden files, `.`, `..`) are reserved.
    LeadingDot,
}

impl core::fmt::Display for NameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NameError::Empty => f.write_str("a task name cannot be empty"),
            NameError::TooLong { len } => write!(f, "a task name has at most {MAX_NAME_LEN} bytes, this one has {len}"),
            NameError::BadChar { ch } => {
                write!(f, "a task name may use only letters, digits, '.', '_' and '-', not {ch:?}")
            }
            NameError::LeadingDot => f.write_str("a task name cannot start with '.'"),
        }
    }
}

/// Checks that `name` can name a task: 1 to [`MAX_NAME_LEN`] bytes of ASCII letters, digits,
/// `.`, `_`, `-`, not starting with `.` — so never a path (`a/b`, `../x`, `/etc/x`).
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: name.len() });
    }
    if let Some(ch) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(NameError::BadChar { ch });
    }
    if name.starts_with('.') {
        return Err(NameError::LeadingDot);
    }
    Ok(())
}

/// A decoded task file.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskFile {
    pub backbone: Digest,
    pub digest: Digest,
    pub task: Task,
}

/// Why a task file was rejected.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskError {
    Format(FormatError),
    /// The payload does not decode as a task.
    Payload,
    /// The task was learned on another backbone.
    WrongBackbone {
        task: Digest,
        backbone: Digest,
    },
}

impl core::fmt::Display for TaskError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TaskError::Format(e) => e.fmt(f),
            TaskError::Payload => f.write_str("corrupt task file: the payload does not decode as a task"),
            TaskError::WrongBackbone { task, backbone } => write!(
                f,
                "the task was learned on backbone {} but this backbone is {}; use the backbone it was learned on",
                Hex(task),
                Hex(backbone)
            ),
        }
    }
}

impl core::error::Error for TaskError {}

impl From<FormatError> for TaskError {
    fn from(e: FormatError) -> Self {
        TaskError::Format(e)
    }
}

/// Serialises `task`, learned on the backbone with digest `backbone`.
pub fn encode(task: &Task, backbone: &Digest) -> Vec<u8> {
    let payload = postcard::to_allocvec(task).expect("a task always serialises");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(backbone);
    out.extend_from_slice(&sha256(&payload));
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&payload);
    let trailer = sha256(&out);
    out.extend_from_slice(&trailer);
    out
}

/// The task digest of an encoded file (no validation beyond its length).
pub fn digest_of(bytes: &[u8]) -> Option<Digest> {
    bytes.get(56..88).map(|d| d.try_into().expect("32 bytes"))
}

/// Validates and decodes a task file: the checks of [`super::task_view::open`] (header,
/// length, trailer, task digest), then the payload.
pub fn decode(bytes: &[u8]) -> Result<TaskFile, TaskError> {
    let f = super::task_view::open(bytes)?;
    let v2;
    let payload = if f.version == 2 {
        // Version 2 ends before `softmax`; its tasks were all trained over their classes,
        // which is variant 0. (The digest stays the one the file records.)
        v2 = [f.payload, &[0]].concat();
        &v2[..]
    } else {
        f.payload
    };
    let (task, rest) = postcard::take_from_bytes::<Task>(payload).map_err(|_| TaskError::Payload)?;
    if !rest.is_empty() {
        return Err(TaskError::Payload);
    }
    Ok(TaskFile { backbone: f.backbone, digest: f.digest, task })
}

impl TaskFile {
    /// Checks that the task belongs to the backbone with digest `backbone`.
    pub fn check_backbone(&self, backbone: &Digest) -> Result<(), TaskError> {
        if &self.backbone != backbone {
            return Err(TaskError::WrongBackbone { task: self.backbone, backbone: *backbone });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{Components, Mask, Method};

    fn sample() -> Task {
        Task {
            name: "t0".into(),
            labels: alloc::vec!["a".into(), "b".into()],
            method: Method::Supsup,
            components: Components {
                masks: alloc::vec![Mask { len: 40, words: alloc::vec![7, 1] }],
                ..Default::default()
            },
            depends_on: alloc::vec![[3; 32]],
            config: "{}".into(),
            metrics: alloc::vec![("train_accuracy".into(), 0.5)],
            created_at: 1,
            version: 1,
            softmax: crate::adapter::Softmax::All,
        }
    }

    #[test]
    fn round_trip_and_backbone_binding() {
        let bytes = encode(&sample(), &[9; 32]);
        let f = decode(&bytes).unwrap();
        assert_eq!(f.task, sample());
        assert_eq!(f.backbone, [9; 32]);
        assert_eq!(Some(f.digest), digest_of(&bytes));
        assert!(f.check_backbone(&[9; 32]).is_ok());
        let e = f.check_backbone(&[8; 32]).unwrap_err().to_string();
        assert!(e.contains(&"09".repeat(32)) && e.contains(&"08".repeat(32)), "{e}");
    }

    #[test]
    fn every_truncation_and_many_mutations_are_rejected_without_panic() {
        let bytes = encode(&sample(), &[9; 32]);
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "truncated to {n}");
        }
        let mut r = crate::rng::SplitMix64::new(1);
        for _ in 0..2000 {
            let mut b = bytes.clone();
            let i = r.below(b.len());
            b[i] ^= 1 << r.below(8);
            assert!(decode(&b).is_err(), "a flipped bit at {i} went unnoticed");
        }
    }

    /// `task` as a version 2 file: the payload without `softmax`, header and digests to match.
    fn encode_v2(task: &Task, backbone: &Digest) -> Vec<u8> {
        let v3 = encode(task, backbone);
        let payload = &v3[HEADER_LEN..v3.len() - TRAILER_LEN - 1];
        assert_eq!(v3[v3.len() - TRAILER_LEN - 1], 0, "softmax `classes` is one zero byte");
        let mut out = v3[..HEADER_LEN].to_vec();
        out[8..10].copy_from_slice(&2u16.to_le_bytes());
        out[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        out[56..88].copy_from_slice(&sha256(payload));
        out.extend_from_slice(payload);
        let trailer = sha256(&out);
        out.extend_from_slice(&trailer);
        out
    }

    #[test]
    fn version_2_files_read_as_trained_over_their_classes() {
        let mut t = sample();
        t.softmax = crate::adapter::Softmax::Classes;
        let v2 = encode_v2(&t, &[9; 32]);
        let f = decode(&v2).unwrap();
        assert_eq!(f.task, t);
        // Its identity is its own payload's digest, not that of the version 3 re-encoding.
        assert_eq!(f.digest, sha256(&v2[HEADER_LEN..v2.len() - TRAILER_LEN]));
        assert_ne!(Some(f.digest), digest_of(&encode(&t, &[9; 32])));
        let view = super::super::task_view::open(&v2).unwrap();
        assert_eq!((view.version, view.task().unwrap().softmax), (2, crate::adapter::Softmax::Classes));
        // A version 3 payload under a version 2 header has a byte too many, and the reverse
        // lacks one: both are refused.
        let mut mislabelled = encode(&t, &[9; 32]);
        mislabelled[8] = 2;
        let body = mislabelled.len() - TRAILER_LEN;
        let trailer = sha256(&mislabelled[..body]);
        mislabelled[body..].copy_from_slice(&trailer);
        assert_eq!(decode(&mislabelled), Err(TaskError::Payload));
        let v = super::super::task_view::open(&mislabelled).unwrap();
        assert_eq!(v.task().unwrap_err().kind, super::super::task_view::PayloadErrorKind::Trailing);
        let mut short = v2.clone();
        short[8] = 3;
        let body = short.len() - TRAILER_LEN;
        let trailer = sha256(&short[..body]);
        short[body..].copy_from_slice(&trailer);
        assert_eq!(decode(&short), Err(TaskError::Payload));
        for n in 0..v2.len() {
            assert!(decode(&v2[..n]).is_err(), "truncated to {n}");
        }
        // Versions 1 and 4 are refused by number.
        for (version, older) in [(1u16, true), (4, false)] {
            let mut b = v2.clone();
            b[8..10].copy_from_slice(&version.to_le_bytes());
            let e = decode(&b).unwrap_err();
            assert_eq!(e, TaskError::Format(FormatError::UnsupportedVersion { found: version, supported: VERSION }));
            assert_eq!(e.to_string().contains("older"), older, "{e}");
        }
    }

    #[test]
    fn names_cannot_escape_a_directory() {
        for ok in ["a", "task-1", "Split_2.v3", &"x".repeat(MAX_NAME_LEN)] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(check_name(""), Err(NameError::Empty));
        assert_eq!(check_name(&"x".repeat(10_000)), Err(NameError::TooLong { len: 10_000 }));
        assert_eq!(check_name("../x"), Err(NameError::BadChar { ch: '/' }));
        assert_eq!(check_name("/etc/x"), Err(NameError::BadChar { ch: '/' }));
        assert_eq!(check_name("a/b"), Err(NameError::BadChar { ch: '/' }));
        assert_eq!(check_name("a\\b"), Err(NameError::BadChar { ch: '\\' }));
        assert_eq!(check_name("é"), Err(NameError::BadChar { ch: 'é' }));
        assert_eq!(check_name(".."), Err(NameError::LeadingDot));
        assert_eq!(check_name(".hidden"), Err(NameError::LeadingDot));
    }
}
