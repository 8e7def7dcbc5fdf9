//! (alloc) Offline update bundles, `.ecbundle` version 1 (normative spec in `models/README.md`).
//!
//! A bundle carries task files to devices that have no network, signed by a key the device's
//! store trusts (DESIGN §6, §9). Little-endian:
//!
//! ```text
//! 0   header (64 bytes)
//!       0  magic "EDGECLU\0"
//!       8  version u16 = 1, flags u16 = 0
//!      12  task count u32            (1 ..= MAX_TASKS)
//!      16  manifest length u64
//!      24  tasks length u64          (sum of the task files' lengths)
//!      32  backbone digest [32]      (every task was learned on it)
//! 64  manifest: one entry per task, in the order of the task files
//!       0  task digest [32], file length u64, version u32, name length u16, dependency count u16
//!      48  name (UTF-8), dependencies (task digests, 32 bytes each, as the task's depends_on)
//! ..  tasks: the `.ect` files, back to back
//! ..  signature block (100 bytes): kind u32 (0 unsigned, 1 ed25519), public key [32],
//!     signature [64]; all zero when unsigned
//! ..  trailer: SHA-256 of everything before it [32]
//! ```
//!
//! The ed25519 signature is over the 48 bytes `"edgecl bundle v1" ‖ SHA-256(bytes before the
//! signature field)`: header, manifest, tasks, the kind and the public key. Every byte of a
//! bundle is covered by the trailer; every byte but the signature itself by the signature.
//!
//! Reading is bounded: the header's lengths are checked against limits and against the bytes
//! present before anything is sliced or allocated; a manifest entry's variable parts are
//! checked against the manifest's remaining bytes before they are copied. [`open`] checks the
//! trailer and the signature (against the trusted keys) before it parses the manifest or
//! decodes any task, so unauthenticated bytes meet as little code as possible.

use super::keys::{KeyId, SigningKey, VerifyingKey};
use super::task::{self, check_name, NameError, TaskError};
use super::{sha256, Digest, Hex};
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

pub const MAGIC: [u8; 8] = *b"EDGECLU\0";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 64;
/// Fixed part of a manifest entry.
pub const ENTRY_LEN: usize = 48;
pub const SIGNATURE_BLOCK_LEN: usize = 100;
pub const TRAILER_LEN: usize = 32;
/// Most tasks one bundle may carry.
pub const MAX_TASKS: u32 = 1024;
/// Largest task file a bundle may carry (256 MiB).
pub const MAX_TASK_FILE_LEN: u64 = 256 << 20;
/// Largest bundle (1 GiB); also the bound on the manifest and tasks lengths.
pub const MAX_BUNDLE_LEN: u64 = 1 << 30;
/// Domain separation: what a bundle signature signs starts with these 16 bytes, so that a
/// signature made for anything else cannot pass as a bundle signature.
pub const SIGNING_CONTEXT: &[u8; 16] = b"edgecl bundle v1";

const KIND_UNSIGNED: u32 = 0;
const KIND_ED25519: u32 = 1;

/// One task in a bundle: its manifest entry and its task file's bytes (validated: the file
/// decodes, and its digest, name, version, dependencies and backbone are the manifest's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundledTask<'a> {
    pub name: String,
    pub version: u32,
    pub digest: Digest,
    /// Digests of the tasks it relies on, oldest first (the task's `depends_on`).
    pub depends_on: Vec<Digest>,
    /// The `.ect` file, byte for byte.
    pub bytes: &'a [u8],
}

/// What a bundle's signature block says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureStatus {
    /// The bundle says it is unsigned (kind 0, key and signature zero).
    Unsigned,
    /// Signed, and the signature verifies with this key (whether the key is trusted is a
    /// separate question: see [`open`]).
    Valid { key: VerifyingKey },
    /// Signed, but the signature does not verify with the recorded key (or the recorded key is
    /// not a valid ed25519 key).
    Invalid { key: [u8; 32] },
}

impl SignatureStatus {
    /// The id of the recorded key, if the bundle is signed.
    pub fn key_id(&self) -> Option<KeyId> {
        match self {
            SignatureStatus::Unsigned => None,
            SignatureStatus::Valid { key } => Some(KeyId::of(key.as_bytes())),
            SignatureStatus::Invalid { key } => Some(KeyId::of(key)),
        }
    }
}

/// A validated bundle. Its task files borrow from the bundle's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle<'a> {
    pub backbone: Digest,
    pub tasks: Vec<BundledTask<'a>>,
    /// From [`open`]: `Valid` (by a trusted key) or `Unsigned` (when allowed); from
    /// [`inspect`]: any.
    pub signature: SignatureStatus,
}

/// A dependency that neither the bundle nor the receiving store has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingDependency {
    /// The bundled task that needs it.
    pub task: String,
    pub digest: Digest,
}

impl Bundle<'_> {
    /// The key that signed the bundle, when its signature is valid.
    pub fn signer(&self) -> Option<&VerifyingKey> {
        match &self.signature {
            SignatureStatus::Valid { key } => Some(key),
            _ => None,
        }
    }

    /// Refuses a bundle made for another backbone than the store's (`expected`).
    pub fn check_backbone(&self, expected: &Digest) -> Result<(), BundleError> {
        if &self.backbone != expected {
            return Err(BundleError::WrongBackbone { bundle: self.backbone, expected: *expected });
        }
        Ok(())
    }

    /// The dependencies of bundled tasks that are neither in the bundle nor in `present` (the
    /// digests of the tasks a store has), in bundle order. Installing is possible only when
    /// this is empty.
    pub fn missing_dependencies(&self, present: &[Digest]) -> Vec<MissingDependency> {
        let mut missing = Vec::new();
        for t in &self.tasks {
            for d in &t.depends_on {
                let have = present.contains(d) || self.tasks.iter().any(|o| &o.digest == d);
                if !have && !missing.iter().any(|m: &MissingDependency| &m.digest == d && m.task == t.name) {
                    missing.push(MissingDependency { task: t.name.clone(), digest: *d });
                }
            }
        }
        missing
    }

    pub fn task(&self, name: &str) -> Option<&BundledTask<'_>> {
        self.tasks.iter().find(|t| t.name == name)
    }
}

/// Why a bundle was refused (or could not be made). Each names what is wrong and the message
/// says what to do.
#[derive(Clone, Debug, PartialEq)]
pub enum BundleError {
    /// The file is shorter than its header or than the sections its header declares.
    Truncated {
        needed: u64,
        available: u64,
    },
    /// Not a bundle (wrong magic bytes).
    BadMagic,
    UnsupportedVersion {
        found: u16,
        supported: u16,
    },
    /// A header field that must hold a fixed value does not.
    BadHeader {
        field: &'static str,
    },
    /// A length or count beyond what a reader accepts.
    TooLarge {
        field: &'static str,
        value: u64,
        max: u64,
    },
    /// Bytes after the trailer.
    TrailingBytes {
        extra: u64,
    },
    /// The trailer is not the SHA-256 of the bundle: it was damaged in transfer.
    ChecksumMismatch {
        recorded: Digest,
        computed: Digest,
    },
    /// The signature block is malformed (unknown kind, or an unsigned bundle with key bytes).
    BadSignatureBlock {
        what: &'static str,
    },
    /// The signature does not verify: the bundle was modified after signing.
    BadSignature {
        key: KeyId,
    },
    /// Validly signed, but by a key the store does not trust.
    UntrustedKey {
        key: KeyId,
    },
    /// Unsigned, and unsigned bundles were not allowed.
    Unsigned,
    /// A bundle with no task.
    NoTasks,
    /// The manifest is malformed.
    Manifest {
        what: &'static str,
    },
    /// A task name that could escape a store directory or is otherwise invalid.
    BadName {
        name: String,
        error: NameError,
    },
    /// Two tasks with the same name.
    DuplicateName {
        name: String,
    },
    /// The same task file twice.
    DuplicateTask {
        name: String,
        other: String,
        digest: Digest,
    },
    /// An embedded task file is not valid. `task` is its manifest name, or `#i` when
    /// making a bundle from files.
    Task {
        task: String,
        error: TaskError,
    },
    /// A task file disagrees with its manifest entry on `field`.
    Mismatch {
        task: String,
        field: &'static str,
    },
    /// A task was learned on another backbone than the bundle's.
    TaskBackbone {
        task: String,
        task_backbone: Digest,
        bundle: Digest,
    },
    /// The bundle is for another backbone than the store's.
    WrongBackbone {
        bundle: Digest,
        expected: Digest,
    },
}

/// At most 80 characters of a name, for messages.
struct Short<'a>(&'a str);

impl fmt::Display for Short<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(80) {
            Some((i, _)) => write!(f, "{:?}… ({} bytes)", &self.0[..i], self.0.len()),
            None => write!(f, "{:?}", self.0),
        }
    }
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use BundleError::*;
        match self {
            Truncated { needed, available } => write!(
                f,
                "bundle is truncated: it needs {needed} bytes but only {available} are there (copy it again)"
            ),
            BadMagic => f.write_str("not an edgecl bundle (wrong magic bytes; expected a .ecbundle file)"),
            UnsupportedVersion { found, supported } => write!(
                f,
                "bundle format version {found} is not supported (this build reads version {supported}); use a matching edgecl"
            ),
            BadHeader { field } => write!(f, "corrupt bundle header: field `{field}` is invalid"),
            TooLarge { field, value, max } => write!(
                f,
                "bundle {field} is {value}, more than the {max} a reader accepts (the file is corrupt or hostile; \
                 split large updates into several bundles)"
            ),
            TrailingBytes { extra } => write!(f, "{extra} unexpected bytes after the bundle's trailer (the file is corrupt)"),
            ChecksumMismatch { recorded, computed } => write!(
                f,
                "bundle checksum mismatch: the trailer records {} but the contents hash to {} (damaged in transfer; copy it again)",
                Hex(recorded),
                Hex(computed)
            ),
            BadSignatureBlock { what } => write!(f, "corrupt bundle signature block: {what}"),
            BadSignature { key } => write!(
                f,
                "bad bundle signature (key {key}): the bundle was modified after it was signed; do not install it"
            ),
            UntrustedKey { key } => write!(
                f,
                "bundle is signed by key {key}, which this store does not trust (add its .pub with `edgecl keys trust` \
                 if you trust it)"
            ),
            Unsigned => f.write_str("bundle is unsigned; sign it with `edgecl bundle create --key`, or allow unsigned bundles explicitly"),
            NoTasks => f.write_str("a bundle must carry at least one task"),
            Manifest { what } => write!(f, "corrupt bundle manifest: {what}"),
            BadName { name, error } => write!(f, "bundle task name {} refused: {error}", Short(name)),
            DuplicateName { name } => write!(f, "bundle carries two tasks named {}; a name may appear once", Short(name)),
            DuplicateTask { name, other, digest } => write!(
                f,
                "bundle carries the same task file twice ({} and {}, digest {}); each task may appear once",
                Short(name),
                Short(other),
                Hex(digest)
            ),
            Task { task, error } => write!(f, "bundled task {}: {error}", Short(task)),
            Mismatch { task, field } => write!(
                f,
                "bundled task {}: the task file's {field} differs from the manifest's (the bundle is corrupt or forged)",
                Short(task)
            ),
            TaskBackbone { task, task_backbone, bundle } => write!(
                f,
                "bundled task {} was learned on backbone {} but the bundle is for backbone {}; bundle only tasks of one backbone",
                Short(task),
                Hex(task_backbone),
                Hex(bundle)
            ),
            WrongBackbone { bundle, expected } => write!(
                f,
                "the bundle is for backbone {} but this store's backbone is {}; install it on a store with that backbone",
                Hex(bundle),
                Hex(expected)
            ),
        }
    }
}

impl core::error::Error for BundleError {}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn digest_at(b: &[u8], at: usize) -> Digest {
    b[at..at + 32].try_into().expect("32 bytes")
}

/// The sections of a bundle whose header, lengths, trailer and signature block are valid.
struct Frame<'a> {
    backbone: Digest,
    count: u32,
    manifest: &'a [u8],
    tasks: &'a [u8],
    signature: SignatureStatus,
}

/// What the signature signs, given the bytes before the signature field.
fn signed_message(before_signature: &[u8]) -> [u8; 48] {
    let mut m = [0u8; 48];
    m[..16].copy_from_slice(SIGNING_CONTEXT);
    m[16..].copy_from_slice(&sha256(before_signature));
    m
}

fn frame(bytes: &[u8]) -> Result<Frame<'_>, BundleError> {
    let available = bytes.len() as u64;
    let head = &bytes[..bytes.len().min(8)];
    if head != &MAGIC[..head.len()] {
        return Err(BundleError::BadMagic);
    }
    if bytes.len() < HEADER_LEN {
        return Err(BundleError::Truncated { needed: HEADER_LEN as u64, available });
    }
    let version = u16_at(bytes, 8);
    if version != VERSION {
        return Err(BundleError::UnsupportedVersion { found: version, supported: VERSION });
    }
    if u16_at(bytes, 10) != 0 {
        return Err(BundleError::BadHeader { field: "flags" });
    }
    let count = u32_at(bytes, 12);
    if count == 0 {
        return Err(BundleError::NoTasks);
    }
    if count > MAX_TASKS {
        return Err(BundleError::TooLarge { field: "task count", value: count.into(), max: MAX_TASKS.into() });
    }
    let manifest_len = u64_at(bytes, 16);
    let tasks_len = u64_at(bytes, 24);
    for (field, value) in [("manifest length", manifest_len), ("tasks length", tasks_len)] {
        if value > MAX_BUNDLE_LEN {
            return Err(BundleError::TooLarge { field, value, max: MAX_BUNDLE_LEN });
        }
    }
    // Each term is at most 2^30, so the sum cannot overflow.
    let fixed = (HEADER_LEN + SIGNATURE_BLOCK_LEN + TRAILER_LEN) as u64;
    let total = fixed + manifest_len + tasks_len;
    if total > MAX_BUNDLE_LEN {
        return Err(BundleError::TooLarge { field: "length", value: total, max: MAX_BUNDLE_LEN });
    }
    if total > available {
        return Err(BundleError::Truncated { needed: total, available });
    }
    if total < available {
        return Err(BundleError::TrailingBytes { extra: available - total });
    }
    // From here on every offset is within `bytes`.
    let (m, t) = (manifest_len as usize, tasks_len as usize);
    let end = bytes.len() - TRAILER_LEN;
    let recorded = digest_at(bytes, end);
    let computed = sha256(&bytes[..end]);
    if recorded != computed {
        return Err(BundleError::ChecksumMismatch { recorded, computed });
    }
    let sig_at = HEADER_LEN + m + t;
    let block = &bytes[sig_at..end];
    let key: [u8; 32] = block[4..36].try_into().expect("32 bytes");
    let sig: [u8; 64] = block[36..100].try_into().expect("64 bytes");
    let signature = match u32_at(block, 0) {
        KIND_UNSIGNED => {
            if block[4..].iter().any(|&b| b != 0) {
                return Err(BundleError::BadSignatureBlock {
                    what: "an unsigned bundle must have zero key and signature bytes",
                });
            }
            SignatureStatus::Unsigned
        }
        KIND_ED25519 => {
            let msg = signed_message(&bytes[..sig_at + 36]);
            let sig = ed25519_dalek::Signature::from_bytes(&sig);
            match VerifyingKey::from_bytes(&key) {
                Ok(k) if !k.is_weak() && k.verify_strict(&msg, &sig).is_ok() => SignatureStatus::Valid { key: k },
                _ => SignatureStatus::Invalid { key },
            }
        }
        _ => {
            return Err(BundleError::BadSignatureBlock {
                what: "unknown signature kind (this build knows 0 = unsigned, 1 = ed25519)",
            })
        }
    };
    Ok(Frame {
        backbone: digest_at(bytes, 32),
        count,
        manifest: &bytes[HEADER_LEN..HEADER_LEN + m],
        tasks: &bytes[HEADER_LEN + m..sig_at],
        signature,
    })
}

/// Parses the manifest and checks every task file against it.
fn content(f: Frame<'_>) -> Result<Bundle<'_>, BundleError> {
    let count = f.count as usize;
    let man = f.manifest;
    // count ≤ MAX_TASKS, so this bounds the allocation below by the bytes present.
    if count.saturating_mul(ENTRY_LEN) > man.len() {
        return Err(BundleError::Manifest { what: "shorter than its task count requires" });
    }
    let mut entries: Vec<(BundledTask<'_>, u64)> = Vec::with_capacity(count);
    let mut pos = 0usize;
    for _ in 0..count {
        let fixed = man.get(pos..pos + ENTRY_LEN).ok_or(BundleError::Manifest { what: "an entry is truncated" })?;
        let digest = digest_at(fixed, 0);
        let len = u64_at(fixed, 32);
        let version = u32_at(fixed, 40);
        let name_len = u16_at(fixed, 44) as usize;
        let deps = u16_at(fixed, 46) as usize;
        pos += ENTRY_LEN;
        let name = man
            .get(pos..pos + name_len)
            .ok_or(BundleError::Manifest { what: "a name runs past the manifest's end" })?;
        pos += name_len;
        let dep_bytes = man
            .get(pos..pos + deps * 32)
            .ok_or(BundleError::Manifest { what: "a dependency list runs past the manifest's end" })?;
        pos += deps * 32;
        let name = match core::str::from_utf8(name) {
            Ok(s) => String::from(s),
            Err(_) => {
                let name = String::from_utf8_lossy(name).into_owned();
                return Err(BundleError::BadName {
                    name,
                    error: NameError::BadChar { ch: char::REPLACEMENT_CHARACTER },
                });
            }
        };
        if let Err(error) = check_name(&name) {
            return Err(BundleError::BadName { name, error });
        }
        if len > MAX_TASK_FILE_LEN {
            return Err(BundleError::TooLarge { field: "task file length", value: len, max: MAX_TASK_FILE_LEN });
        }
        if version == 0 {
            return Err(BundleError::Manifest { what: "a task has version 0 (versions start at 1)" });
        }
        let depends_on = dep_bytes.chunks_exact(32).map(|c| c.try_into().expect("32 bytes")).collect();
        entries.push((BundledTask { name, version, digest, depends_on, bytes: &[] }, len));
    }
    if pos != man.len() {
        return Err(BundleError::Manifest { what: "bytes after the last entry" });
    }
    let mut names: BTreeMap<&str, ()> = BTreeMap::new();
    let mut digests: BTreeMap<Digest, &str> = BTreeMap::new();
    for (t, _) in &entries {
        // The same file twice is named as such before it is named as a name clash.
        if let Some(other) = digests.insert(t.digest, &t.name) {
            return Err(BundleError::DuplicateTask { name: t.name.clone(), other: other.into(), digest: t.digest });
        }
        if names.insert(&t.name, ()).is_some() {
            return Err(BundleError::DuplicateName { name: t.name.clone() });
        }
    }
    // Each length is at most 2^28 and there are at most 2^10, so the sum cannot overflow.
    let sum: u64 = entries.iter().map(|(_, l)| l).sum();
    if sum != f.tasks.len() as u64 {
        return Err(BundleError::Manifest { what: "the task file lengths do not add up to the tasks section" });
    }
    let mut at = 0usize;
    let mut tasks = Vec::with_capacity(count);
    for (mut t, len) in entries {
        let bytes = &f.tasks[at..at + len as usize];
        at += len as usize;
        let file = task::decode(bytes).map_err(|error| BundleError::Task { task: t.name.clone(), error })?;
        let mismatch = |field| BundleError::Mismatch { task: t.name.clone(), field };
        if file.digest != t.digest {
            return Err(mismatch("digest"));
        }
        if file.task.name != t.name {
            return Err(mismatch("name"));
        }
        if file.task.version != t.version {
            return Err(mismatch("version"));
        }
        if file.task.depends_on != t.depends_on {
            return Err(mismatch("dependency list"));
        }
        if file.backbone != f.backbone {
            return Err(BundleError::TaskBackbone { task: t.name, task_backbone: file.backbone, bundle: f.backbone });
        }
        t.bytes = bytes;
        tasks.push(t);
    }
    Ok(Bundle { backbone: f.backbone, tasks, signature: f.signature })
}

/// Validates a bundle completely without requiring trust: its signature status is reported
/// (valid by key K, invalid, or unsigned), not enforced. For showing a bundle to a person;
/// installing must use [`open`].
pub fn inspect(bytes: &[u8]) -> Result<Bundle<'_>, BundleError> {
    content(frame(bytes)?)
}

/// Opens a bundle for installing: the structure and trailer are checked, then the signature
/// must verify with one of `trusted` (or the bundle must be unsigned and `allow_unsigned`
/// set), and only then are the manifest and the task files parsed and cross-checked.
///
/// The caller still checks the store's side: [`Bundle::check_backbone`] and
/// [`Bundle::missing_dependencies`], names and versions against installed tasks.
pub fn open<'a>(bytes: &'a [u8], trusted: &[VerifyingKey], allow_unsigned: bool) -> Result<Bundle<'a>, BundleError> {
    let f = frame(bytes)?;
    match &f.signature {
        SignatureStatus::Unsigned if !allow_unsigned => return Err(BundleError::Unsigned),
        SignatureStatus::Unsigned => {}
        SignatureStatus::Invalid { key } => return Err(BundleError::BadSignature { key: KeyId::of(key) }),
        SignatureStatus::Valid { key } => {
            if !trusted.contains(key) {
                return Err(BundleError::UntrustedKey { key: KeyId::of(key.as_bytes()) });
            }
        }
    }
    content(f)
}

/// Makes a bundle of task files (`.ect` bytes, in the order given; put dependencies before the
/// tasks that need them) learned on `backbone`, signed by `signer` or unsigned. Refuses
/// exactly what [`open`] would refuse: the result is checked with [`inspect`] before it is
/// returned.
pub fn create(backbone: &Digest, tasks: &[&[u8]], signer: Option<&SigningKey>) -> Result<Vec<u8>, BundleError> {
    if tasks.is_empty() {
        return Err(BundleError::NoTasks);
    }
    if tasks.len() > MAX_TASKS as usize {
        return Err(BundleError::TooLarge { field: "task count", value: tasks.len() as u64, max: MAX_TASKS.into() });
    }
    let mut manifest = Vec::new();
    let mut tasks_len = 0u64;
    for (i, bytes) in tasks.iter().enumerate() {
        let file = task::decode(bytes).map_err(|error| BundleError::Task { task: format!("#{i}"), error })?;
        let t = &file.task;
        if let Err(error) = check_name(&t.name) {
            return Err(BundleError::BadName { name: t.name.clone(), error });
        }
        if bytes.len() as u64 > MAX_TASK_FILE_LEN {
            let value = bytes.len() as u64;
            return Err(BundleError::TooLarge { field: "task file length", value, max: MAX_TASK_FILE_LEN });
        }
        let deps = u16::try_from(t.depends_on.len()).map_err(|_| BundleError::TooLarge {
            field: "dependency count",
            value: t.depends_on.len() as u64,
            max: u16::MAX.into(),
        })?;
        manifest.extend_from_slice(&file.digest);
        manifest.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        manifest.extend_from_slice(&t.version.to_le_bytes());
        // check_name bounds the name to 64 bytes.
        manifest.extend_from_slice(&(t.name.len() as u16).to_le_bytes());
        manifest.extend_from_slice(&deps.to_le_bytes());
        manifest.extend_from_slice(t.name.as_bytes());
        for d in &t.depends_on {
            manifest.extend_from_slice(d);
        }
        tasks_len += bytes.len() as u64;
    }
    let total = (HEADER_LEN + SIGNATURE_BLOCK_LEN + TRAILER_LEN + manifest.len()) as u64 + tasks_len;
    if total > MAX_BUNDLE_LEN {
        return Err(BundleError::TooLarge { field: "length", value: total, max: MAX_BUNDLE_LEN });
    }
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(tasks.len() as u32).to_le_bytes());
    out.extend_from_slice(&(manifest.len() as u64).to_le_bytes());
    out.extend_from_slice(&tasks_len.to_le_bytes());
    out.extend_from_slice(backbone);
    out.extend_from_slice(&manifest);
    for t in tasks {
        out.extend_from_slice(t);
    }
    match signer {
        None => out.extend_from_slice(&[0u8; SIGNATURE_BLOCK_LEN]),
        Some(key) => {
            use ed25519_dalek::Signer as _;
            out.extend_from_slice(&KIND_ED25519.to_le_bytes());
            out.extend_from_slice(key.verifying_key().as_bytes());
            let sig = key.sign(&signed_message(&out));
            out.extend_from_slice(&sig.to_bytes());
        }
    }
    let trailer = sha256(&out);
    out.extend_from_slice(&trailer);
    inspect(&out)?;
    Ok(out)
}

#[cfg(test)]
mod tests;
