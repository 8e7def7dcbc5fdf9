//! (alloc) ed25519 key files for signed bundles (normative spec in `models/README.md`).
//!
//! Two small text files per key pair, UTF-8, one field per line, `\n` line ends:
//!
//! ```text
//! NAME.key                              NAME.pub
//! edgecl-ed25519-secret-key v1          edgecl-ed25519-public-key v1
//! name NAME                             name NAME
//! id 0123456789abcdef                   id 0123456789abcdef
//! secret <64 hex digits: the seed>      public <64 hex digits: the key>
//! ```
//!
//! The key id is the first 8 bytes of SHA-256 of the 32-byte public key, in hex. A secret key
//! file records it too, so that a reader notices a damaged or hand-edited file (the id is
//! recomputed from the key and must match). Text, so that a person can see which key a file
//! holds with `cat`; a public key file is what a device's store trusts (`STORE/keys/*.pub`).
//!
//! With std: [`generate`] draws a seed from the operating system, [`write_pair`] writes both
//! files without ever overwriting one and with the secret key file never readable by anyone
//! but its owner, and [`load_trusted`] reads a store's `keys/` directory.

use super::{sha256, Hex};
use alloc::string::{String, ToString};
use core::fmt;
pub use ed25519_dalek::{SigningKey, VerifyingKey};

const SECRET_TAG: &str = "edgecl-ed25519-secret-key v1";
const PUBLIC_TAG: &str = "edgecl-ed25519-public-key v1";
/// Longest accepted key file: the four lines with a 64-byte name, with room to spare.
pub const MAX_KEY_FILE_LEN: usize = 1024;

/// A key's id: the first 8 bytes of SHA-256 of its 32-byte public key; shown in hex.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn of(public: &[u8; 32]) -> KeyId {
        let d = sha256(public);
        KeyId(d[..8].try_into().expect("8 bytes"))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Hex(&self.0).fmt(f)
    }
}

/// Why a key file was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyError {
    /// Longer than [`MAX_KEY_FILE_LEN`].
    TooLarge { len: usize },
    /// Not UTF-8 text.
    NotText,
    /// The first line is not the expected tag (e.g. a public key given where a secret key is
    /// expected).
    WrongKind { expected: &'static str },
    /// A line is missing, extra, or not `FIELD VALUE`.
    BadLine { line: usize, expected: &'static str },
    /// The name is not a valid task/key name.
    BadName(super::task::NameError),
    /// The key is not 64 hex digits, or not a valid ed25519 public key.
    BadKey,
    /// The recorded id is not the id of the key in the file.
    IdMismatch { recorded: String, computed: KeyId },
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::TooLarge { len } => {
                write!(f, "{len} bytes is too long for a key file (at most {MAX_KEY_FILE_LEN}); is this a key file?")
            }
            KeyError::NotText => f.write_str("a key file is text, this one is not UTF-8"),
            KeyError::WrongKind { expected } => write!(
                f,
                "not an edgecl {expected} key file (its first line must be `{}`)",
                if *expected == "secret" { SECRET_TAG } else { PUBLIC_TAG }
            ),
            KeyError::BadLine { line, expected } => {
                write!(f, "corrupt key file: line {line} should be `{expected} ...`")
            }
            KeyError::BadName(e) => write!(f, "bad key name: {e}"),
            KeyError::BadKey => f.write_str("corrupt key file: the key is not a valid ed25519 key in 64 hex digits"),
            KeyError::IdMismatch { recorded, computed } => write!(
                f,
                "corrupt key file: it records id {recorded} but its key has id {computed} (the file was damaged or edited; use an intact copy)"
            ),
        }
    }
}

impl core::error::Error for KeyError {}

/// A parsed public key file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKeyFile {
    pub name: String,
    pub key: VerifyingKey,
}

impl PublicKeyFile {
    pub fn id(&self) -> KeyId {
        KeyId::of(self.key.as_bytes())
    }
}

/// A parsed secret key file (the key is zeroed when dropped).
pub struct SecretKeyFile {
    pub name: String,
    pub key: SigningKey,
}

impl SecretKeyFile {
    pub fn id(&self) -> KeyId {
        KeyId::of(self.key.verifying_key().as_bytes())
    }
    pub fn public(&self) -> PublicKeyFile {
        PublicKeyFile { name: self.name.clone(), key: self.key.verifying_key() }
    }
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (nib(b[2 * i])? << 4) | nib(b[2 * i + 1])?;
    }
    Some(out)
}

fn encode(tag: &str, name: &str, id: KeyId, field: &str, key: &[u8; 32]) -> String {
    let mut s = String::with_capacity(200);
    use fmt::Write as _;
    // Writing to a String cannot fail.
    let _ = write!(s, "{tag}\nname {name}\nid {id}\n{field} {}\n", Hex(key));
    s
}

/// The text of a public key file.
pub fn encode_public(name: &str, key: &VerifyingKey) -> String {
    encode(PUBLIC_TAG, name, KeyId::of(key.as_bytes()), "public", key.as_bytes())
}

/// The text of a secret key file. The caller should not keep the returned string longer than
/// needed: it holds the secret.
pub fn encode_secret(name: &str, key: &SigningKey) -> String {
    encode(SECRET_TAG, name, KeyId::of(key.verifying_key().as_bytes()), "secret", &key.to_bytes())
}

/// Splits a key file into its name, recorded id and key bytes, checking the layout strictly.
fn parse(
    bytes: &[u8],
    tag: &str,
    kind: &'static str,
    field: &'static str,
) -> Result<(String, String, [u8; 32]), KeyError> {
    if bytes.len() > MAX_KEY_FILE_LEN {
        return Err(KeyError::TooLarge { len: bytes.len() });
    }
    let text = core::str::from_utf8(bytes).map_err(|_| KeyError::NotText)?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let mut lines = text.split('\n');
    if lines.next() != Some(tag) {
        return Err(KeyError::WrongKind { expected: kind });
    }
    let mut value = |line: usize, key: &'static str| -> Result<&str, KeyError> {
        lines
            .next()
            .and_then(|l| l.strip_prefix(key))
            .and_then(|l| l.strip_prefix(' '))
            .ok_or(KeyError::BadLine { line, expected: key })
    };
    let name = value(2, "name")?;
    let id = value(3, "id")?;
    let key = value(4, field)?;
    if lines.next().is_some() {
        return Err(KeyError::BadLine { line: 5, expected: "(end of file)" });
    }
    super::task::check_name(name).map_err(KeyError::BadName)?;
    let key = hex32(key).ok_or(KeyError::BadKey)?;
    Ok((name.to_string(), id.to_string(), key))
}

fn check_id(recorded: String, public: &[u8; 32]) -> Result<(), KeyError> {
    let computed = KeyId::of(public);
    if recorded != computed.to_string() {
        return Err(KeyError::IdMismatch { recorded, computed });
    }
    Ok(())
}

/// Parses a public key file.
pub fn decode_public(bytes: &[u8]) -> Result<PublicKeyFile, KeyError> {
    let (name, id, raw) = parse(bytes, PUBLIC_TAG, "public", "public")?;
    check_id(id, &raw)?;
    let key = VerifyingKey::from_bytes(&raw).map_err(|_| KeyError::BadKey)?;
    if key.is_weak() {
        return Err(KeyError::BadKey);
    }
    Ok(PublicKeyFile { name, key })
}

/// Parses a secret key file.
pub fn decode_secret(bytes: &[u8]) -> Result<SecretKeyFile, KeyError> {
    let (name, id, mut seed) = parse(bytes, SECRET_TAG, "secret", "secret")?;
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);
    check_id(id, key.verifying_key().as_bytes())?;
    Ok(SecretKeyFile { name, key })
}

#[cfg(feature = "std")]
pub use self::fs::{generate, load_trusted, write_pair, write_public};

#[cfg(feature = "std")]
mod fs {
    use super::*;
    use alloc::vec::Vec;
    use std::io::{self, Write};
    use std::path::{Path, PathBuf};

    /// A new key pair from the operating system's random number generator.
    pub fn generate() -> io::Result<SigningKey> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| io::Error::other(format!("no randomness from the OS: {e}")))?;
        let key = SigningKey::from_bytes(&seed);
        seed.fill(0);
        Ok(key)
    }

    /// Writes `bytes` to a new file `path` with permission bits `mode`, atomically and never
    /// replacing an existing file: the bytes go to a temporary file in the same directory that
    /// is created with `mode` (so it is never more readable, not even for an instant), synced,
    /// then hard-linked to `path` (which fails if `path` exists) and unlinked.
    pub(crate) fn write_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().ok_or_else(|| io::Error::other("the path has no file name"))?;
        let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
        #[cfg(not(unix))]
        let _ = mode;
        let result = (|| {
            let mut f = opts.open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::hard_link(&tmp, path)
        })();
        let _ = std::fs::remove_file(&tmp);
        result?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Writes `DIR/NAME.key` (mode 0600) and `DIR/NAME.pub` (mode 0644) for `key`, where
    /// `base` is `DIR/NAME`. Refuses (`AlreadyExists`) when either file exists, before writing
    /// anything. Returns the two paths.
    pub fn write_pair(base: &Path, key: &SigningKey) -> io::Result<(PathBuf, PathBuf)> {
        let name = base.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        super::super::task::check_name(&name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("key name {name:?}: {e}")))?;
        let with = |ext: &str| {
            let mut p = base.as_os_str().to_owned();
            p.push(ext);
            PathBuf::from(p)
        };
        let (secret, public) = (with(".key"), with(".pub"));
        for p in [&secret, &public] {
            if std::fs::symlink_metadata(p).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists; refusing to overwrite a key (choose another name)", p.display()),
                ));
            }
        }
        let mut text = encode_secret(&name, key).into_bytes();
        let r = write_new(&secret, &text, 0o600);
        text.fill(0);
        r.map_err(|e| io::Error::new(e.kind(), format!("writing {}: {e}", secret.display())))?;
        if let Err(e) = write_new(&public, encode_public(&name, &key.verifying_key()).as_bytes(), 0o644) {
            let _ = std::fs::remove_file(&secret);
            return Err(io::Error::new(e.kind(), format!("writing {}: {e}", public.display())));
        }
        Ok((secret, public))
    }

    /// Adds a public key to a store's trusted keys as `STORE/keys/NAME.pub` (the name recorded
    /// in the key file). Returns the path and whether it was newly added (`false`: this exact
    /// key was already trusted under that name). Refuses when another key has that name.
    pub fn write_public(keys_dir: &Path, key: &PublicKeyFile) -> io::Result<(PathBuf, bool)> {
        std::fs::create_dir_all(keys_dir)?;
        let path = keys_dir.join(format!("{}.pub", key.name));
        if let Ok(old) = read_limited(&path) {
            return match decode_public(&old) {
                Ok(k) if k.key == key.key => Ok((path, false)),
                _ => Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and holds another key; remove it first or rename the key", path.display()),
                )),
            };
        }
        write_new(&path, encode_public(&key.name, &key.key).as_bytes(), 0o644)?;
        Ok((path, true))
    }

    fn read_limited(path: &Path) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let mut buf = Vec::new();
        std::fs::File::open(path)?.take(MAX_KEY_FILE_LEN as u64 + 1).read_to_end(&mut buf)?;
        Ok(buf)
    }

    /// Reads every `*.pub` file of a store's `keys/` directory (a missing directory means no
    /// trusted key). A file that does not parse is an error naming it: a store must not
    /// silently trust fewer keys than its owner put there.
    pub fn load_trusted(keys_dir: &Path) -> io::Result<Vec<PublicKeyFile>> {
        let entries = match std::fs::read_dir(keys_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut paths: Vec<PathBuf> = Vec::new();
        for e in entries {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "pub") {
                paths.push(p);
            }
        }
        paths.sort();
        let mut keys = Vec::with_capacity(paths.len());
        for p in paths {
            let bytes = read_limited(&p)?;
            let k = decode_public(&bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", p.display())))?;
            keys.push(k);
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn key_files_round_trip_and_are_checked() {
        let k = key(7);
        let s = encode_secret("dev", &k);
        let p = encode_public("dev", &k.verifying_key());
        let id = KeyId::of(k.verifying_key().as_bytes());
        assert!(s.starts_with(SECRET_TAG) && s.contains(&alloc::format!("id {id}\n")), "{s}");
        assert_eq!(id.to_string().len(), 16);
        let ds = decode_secret(s.as_bytes()).unwrap();
        assert_eq!((ds.name.as_str(), ds.key.to_bytes(), ds.id()), ("dev", k.to_bytes(), id));
        let dp = decode_public(p.as_bytes()).unwrap();
        assert_eq!((dp.name.as_str(), dp.key, dp.id()), ("dev", k.verifying_key(), id));
        // Kinds are not interchangeable.
        assert_eq!(decode_secret(p.as_bytes()).err(), Some(KeyError::WrongKind { expected: "secret" }));
        assert_eq!(decode_public(s.as_bytes()).err(), Some(KeyError::WrongKind { expected: "public" }));
        // A changed key digit is caught by the id.
        let at = p.find("public ").unwrap() + 7;
        let digit = if &p[at..at + 1] == "0" { "1" } else { "0" };
        let bad = alloc::format!("{}{digit}{}", &p[..at], &p[at + 1..]);
        assert!(matches!(decode_public(bad.as_bytes()), Err(KeyError::IdMismatch { .. } | KeyError::BadKey)));
        let other = encode_public("dev", &key(8).verifying_key());
        let swapped =
            alloc::format!("{}{}", &p[..p.find("public ").unwrap()], &other[other.find("public ").unwrap()..]);
        assert!(matches!(decode_public(swapped.as_bytes()), Err(KeyError::IdMismatch { .. })));
        assert!(matches!(decode_public(b"\xff\xfe"), Err(KeyError::NotText)));
        assert!(matches!(decode_public(&[b'a'; 2000]), Err(KeyError::TooLarge { len: 2000 })));
        let extra = alloc::format!("{p}more\n");
        assert_eq!(
            decode_public(extra.as_bytes()).err(),
            Some(KeyError::BadLine { line: 5, expected: "(end of file)" })
        );
        let bad_name = p.replacen("name dev", "name ../x", 1);
        assert!(matches!(decode_public(bad_name.as_bytes()), Err(KeyError::BadName(_))));
        // Every truncation is refused without panicking.
        for n in 0..p.len() - 1 {
            assert!(decode_public(&p.as_bytes()[..n]).is_err(), "truncated to {n}");
            assert!(decode_secret(&s.as_bytes()[..n]).is_err(), "truncated to {n}");
        }
    }
}
