//! Generations on disk: the index file of a generation, the crash-safe writer that builds the
//! next generation beside the current one and swaps `current`, and the fault hook that the
//! power-cut tests use.
//!
//! The writer's order is what makes a power cut harmless: every file of the new generation is
//! written and fsync'd inside a temporary directory that readers never look at, the directory
//! is fsync'd and renamed to its final name, its parent is fsync'd, and only then does one
//! rename of a fresh symlink over `current` publish it (followed by an fsync of the store
//! directory, so that the publication itself is durable). Before that rename readers see the
//! old generation; after it, the new one, complete.

use super::StoreError;
use crate::format::task::check_name;
use crate::format::Digest;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Directory of the generations, inside the store directory.
pub(crate) const GENERATIONS: &str = "generations";
/// The symlink that names the current generation.
pub(crate) const CURRENT: &str = "current";
/// The file in each generation that lists its tasks, in order.
pub(crate) const INDEX: &str = "index";
/// First line of an index file.
const INDEX_MAGIC: &str = "edgecl-store-generation 1";
/// Index files are small (one line per task); a larger one is not ours.
const MAX_INDEX_BYTES: u64 = 1 << 20;
/// Highest generation number (six digits).
pub(crate) const MAX_GENERATION: u32 = 999_999;
/// Prefix of the temporary directory a writer builds a generation in.
pub(crate) const TMP_PREFIX: &str = ".tmp-";
/// Prefix of the temporary symlink renamed over `current`.
pub(crate) const TMP_LINK_PREFIX: &str = ".current-";

/// One task of a generation, as its index lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// The task digest (`.ect` header), the identity dependents refer to.
    pub digest: Digest,
    /// Whether `NAME.scores` (KKT scores) sits beside `NAME.ect`.
    pub scores: bool,
}

/// A generation's index: its number, the generation it was built from, and its tasks in
/// order (every task after the tasks it depends on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Generation {
    pub number: u32,
    pub parent: Option<u32>,
    pub entries: Vec<Entry>,
}

pub(crate) fn gen_name(n: u32) -> String {
    format!("{n:06}")
}

pub(crate) fn gen_dir(dir: &Path, n: u32) -> PathBuf {
    dir.join(GENERATIONS).join(gen_name(n))
}

/// A generation directory name: exactly six ASCII digits.
pub(crate) fn parse_gen_name(s: &str) -> Option<u32> {
    if s.len() == 6 && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

fn hex32(s: &str) -> Option<Digest> {
    if s.len() != 64 {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, out) in d.iter_mut().enumerate() {
        *out = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(d)
}

impl Generation {
    /// The index file's text:
    ///
    /// ```text
    /// edgecl-store-generation 1
    /// number 000042
    /// parent 000041            (or: parent none)
    /// task NAME DIGEST scores  (or: task NAME DIGEST -), one line per task, in order
    /// end 2                    (the number of tasks: a truncated index never parses)
    /// ```
    pub fn emit(&self) -> String {
        let mut s = format!("{INDEX_MAGIC}\nnumber {}\n", gen_name(self.number));
        match self.parent {
            Some(p) => s += &format!("parent {}\n", gen_name(p)),
            None => s += "parent none\n",
        }
        for e in &self.entries {
            let flag = if e.scores { "scores" } else { "-" };
            s += &format!("task {} {} {flag}\n", e.name, crate::format::Hex(&e.digest));
        }
        s += &format!("end {}\n", self.entries.len());
        s
    }

    /// Parses an index file; `Err` says what is wrong. Hostile text gives an error, never a
    /// panic: names are checked as task names, digests as 64 hex digits, duplicates refused.
    pub fn parse(text: &str) -> Result<Generation, String> {
        let mut lines = text.split('\n');
        if lines.next() != Some(INDEX_MAGIC) {
            return Err(format!("the index does not start with {INDEX_MAGIC:?}"));
        }
        let number = lines
            .next()
            .and_then(|l| l.strip_prefix("number "))
            .and_then(parse_gen_name)
            .ok_or("the index has no valid `number` line")?;
        let parent = match lines.next().and_then(|l| l.strip_prefix("parent ")) {
            Some("none") => None,
            Some(p) => Some(parse_gen_name(p).ok_or("the index has an invalid `parent` line")?),
            None => return Err("the index has no `parent` line".into()),
        };
        let mut entries: Vec<Entry> = Vec::new();
        let mut end = None;
        for (i, line) in lines.enumerate() {
            if let Some(count) = end {
                // Only the empty string after the final newline may follow `end`.
                if line.is_empty() && count == entries.len() {
                    end = Some(usize::MAX);
                    continue;
                }
                return Err(format!(
                    "the index says `end {count}` but lists {} tasks, or has text after it",
                    entries.len()
                ));
            }
            if let Some(n) = line.strip_prefix("end ") {
                let n: usize = n.parse().map_err(|_| format!("line {} of the index: bad `end` line", i + 4))?;
                end = Some(n);
                continue;
            }
            let bad = || format!("line {} of the index is not `task NAME DIGEST scores|-`", i + 4);
            let f: Vec<&str> = line.split(' ').collect();
            let ["task", name, digest, flag] = f[..] else { return Err(bad()) };
            check_name(name).map_err(|e| format!("line {} of the index: {e}", i + 4))?;
            let digest = hex32(digest).ok_or_else(bad)?;
            let scores = match flag {
                "scores" => true,
                "-" => false,
                _ => return Err(bad()),
            };
            if entries.iter().any(|e| e.name == name || e.digest == digest) {
                return Err(format!("the index lists task '{name}' (or its digest) twice"));
            }
            entries.push(Entry { name: name.into(), digest, scores });
        }
        if end != Some(usize::MAX) {
            return Err("the index does not end with `end N` and a newline (written partially?)".into());
        }
        Ok(Generation { number, parent, entries })
    }
}

/// The generation `current` names, or `None` when there is no `current` link.
pub(crate) fn read_current(dir: &Path) -> Result<Option<u32>, StoreError> {
    let link = dir.join(CURRENT);
    let target = match fs::read_link(&link) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            return Err(StoreError::Corrupt { path: link, what: "`current` is not a symlink".into() })
        }
        Err(e) => return Err(StoreError::io("reading the link", link)(e)),
    };
    let n = target.to_str().and_then(|t| t.strip_prefix("generations/")).and_then(parse_gen_name).ok_or_else(|| {
        StoreError::Corrupt {
            path: link.clone(),
            what: format!("`current` points at {:?}, not at generations/NNNNNN", target),
        }
    })?;
    Ok(Some(n))
}

/// Reads at most `max` bytes of `path`, refusing larger files before allocating for them.
pub(crate) fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, StoreError> {
    let f = File::open(path).map_err(StoreError::io("opening", path))?;
    let len = f.metadata().map_err(StoreError::io("reading the size of", path))?.len();
    if len > max {
        return Err(StoreError::TooLarge { path: path.into(), len, max });
    }
    let mut buf = Vec::with_capacity(len as usize);
    // `take` also bounds a file that grows while it is read.
    f.take(max + 1).read_to_end(&mut buf).map_err(StoreError::io("reading", path))?;
    if buf.len() as u64 > max {
        return Err(StoreError::TooLarge { path: path.into(), len: buf.len() as u64, max });
    }
    Ok(buf)
}

/// Loads generation `n`'s index. `Ok(None)` when the generation directory does not exist.
pub(crate) fn load(dir: &Path, n: u32) -> Result<Option<Generation>, StoreError> {
    let path = gen_dir(dir, n).join(INDEX);
    let bytes = match read_capped(&path, MAX_INDEX_BYTES) {
        Ok(b) => b,
        Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let corrupt = |what: String| StoreError::Corrupt { path: path.clone(), what };
    let text = std::str::from_utf8(&bytes).map_err(|_| corrupt("the index is not UTF-8".into()))?;
    let g = Generation::parse(text).map_err(corrupt)?;
    if g.number != n {
        return Err(corrupt(format!("the index says generation {} but lies in {}", gen_name(g.number), gen_name(n))));
    }
    Ok(Some(g))
}

/// The fault hook of the power-cut tests: `EDGECL_FAULT_AFTER=N` aborts the process right
/// after the N-th file operation (write, fsync, mkdir, link, rename, symlink) of a change, as a
/// power cut would stop it. Reading the variable once per change is all it costs when unset.
pub(crate) struct Io {
    left: Option<u64>,
}

impl Io {
    pub fn from_env() -> Io {
        Io { left: std::env::var("EDGECL_FAULT_AFTER").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0) }
    }

    fn done(&mut self) {
        if let Some(n) = &mut self.left {
            *n -= 1;
            if *n == 0 {
                std::process::abort();
            }
        }
    }

    fn mkdir(&mut self, p: &Path) -> Result<(), StoreError> {
        fs::create_dir(p).map_err(StoreError::io("creating directory", p))?;
        self.done();
        Ok(())
    }

    /// Writes a new file (never an existing one) and fsyncs it.
    pub fn write(&mut self, p: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let mut f = File::create_new(p).map_err(StoreError::io("creating", p))?;
        f.write_all(bytes).map_err(StoreError::io("writing", p))?;
        self.done();
        f.sync_all().map_err(StoreError::io("syncing", p))?;
        self.done();
        Ok(())
    }

    /// Hard-links `from` as `to`; copies where the file system has no hard links (FAT).
    fn link(&mut self, from: &Path, to: &Path) -> Result<(), StoreError> {
        match fs::hard_link(from, to) {
            Ok(()) => {
                self.done();
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::io("linking", from)(e)),
            Err(_) => {
                let bytes = fs::read(from).map_err(StoreError::io("reading", from))?;
                self.write(to, &bytes)
            }
        }
    }

    pub fn sync_dir(&mut self, p: &Path) -> Result<(), StoreError> {
        File::open(p).and_then(|d| d.sync_all()).map_err(StoreError::io("syncing directory", p))?;
        self.done();
        Ok(())
    }

    pub fn rename(&mut self, from: &Path, to: &Path) -> Result<(), StoreError> {
        fs::rename(from, to).map_err(StoreError::io("renaming", from))?;
        self.done();
        Ok(())
    }

    fn symlink(&mut self, target: &Path, link: &Path) -> Result<(), StoreError> {
        std::os::unix::fs::symlink(target, link).map_err(StoreError::io("creating the symlink", link))?;
        self.done();
        Ok(())
    }
}

/// Where a file of the next generation comes from.
pub(crate) enum Source {
    /// An unchanged file of an earlier generation: hard-linked, never copied or rewritten.
    Link(PathBuf),
    /// A new file's bytes.
    Bytes(Vec<u8>),
}

/// One task of the next generation.
pub(crate) struct Planned {
    pub entry: Entry,
    pub task: Source,
    pub scores: Option<Source>,
}

/// Builds generation `number` from `files` and makes it current. Must be called with the
/// writer lock held and `number` free (see [`clean`]).
pub(crate) fn write_generation(
    dir: &Path,
    number: u32,
    parent: Option<u32>,
    files: &[Planned],
    io: &mut Io,
) -> Result<(), StoreError> {
    let gens = dir.join(GENERATIONS);
    let tmp = gens.join(format!("{TMP_PREFIX}{}-{}", gen_name(number), std::process::id()));
    let result = (|| {
        io.mkdir(&tmp)?;
        for p in files {
            for (src, ext) in [(Some(&p.task), "ect"), (p.scores.as_ref(), "scores")] {
                let to = tmp.join(format!("{}.{ext}", p.entry.name));
                match src {
                    Some(Source::Link(from)) => io.link(from, &to)?,
                    Some(Source::Bytes(b)) => io.write(&to, b)?,
                    None => {}
                }
            }
        }
        let g = Generation { number, parent, entries: files.iter().map(|p| p.entry.clone()).collect() };
        io.write(&tmp.join(INDEX), g.emit().as_bytes())?;
        io.sync_dir(&tmp)?;
        io.rename(&tmp, &gen_dir(dir, number))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result?;
    io.sync_dir(&gens)?;
    swap_current(dir, number, io)
}

/// Points `current` at generation `number` with one rename of a fresh symlink.
fn swap_current(dir: &Path, number: u32, io: &mut Io) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{TMP_LINK_PREFIX}{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    io.symlink(&Path::new(GENERATIONS).join(gen_name(number)), &tmp)?;
    if let Err(e) = io.rename(&tmp, &dir.join(CURRENT)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    io.sync_dir(dir)
}

/// Numbers of the complete generation directories present (temporary ones excluded).
pub(crate) fn list(dir: &Path) -> Result<Vec<u32>, StoreError> {
    let gens = dir.join(GENERATIONS);
    let mut out = Vec::new();
    for e in fs::read_dir(&gens).map_err(StoreError::io("listing", &gens))? {
        let e = e.map_err(StoreError::io("listing", &gens))?;
        if let Some(n) = e.file_name().to_str().and_then(parse_gen_name) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Removes what interrupted writers leave behind: temporary generation directories, temporary
/// `current` links, and generations numbered above `current` (complete, but never published,
/// so no reader can have seen them). With `keep`, also every other generation not in `keep`
/// (gc). Writer lock held. Returns the names removed.
pub(crate) fn clean(dir: &Path, current: u32, keep: Option<&[u32]>) -> Result<Vec<String>, StoreError> {
    let mut removed = Vec::new();
    let gens = dir.join(GENERATIONS);
    for e in fs::read_dir(&gens).map_err(StoreError::io("listing", &gens))? {
        let e = e.map_err(StoreError::io("listing", &gens))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let drop = if name.starts_with(TMP_PREFIX) {
            true
        } else if let Some(n) = parse_gen_name(&name) {
            n > current || keep.is_some_and(|k| !k.contains(&n))
        } else {
            false
        };
        if drop {
            let p = e.path();
            let r = if e.file_type().is_ok_and(|t| t.is_dir()) { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
            r.map_err(StoreError::io("removing", &p))?;
            removed.push(format!("{GENERATIONS}/{name}"));
        }
    }
    for e in fs::read_dir(dir).map_err(StoreError::io("listing", dir))? {
        let e = e.map_err(StoreError::io("listing", dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(TMP_LINK_PREFIX) {
            let p = e.path();
            fs::remove_file(&p).map_err(StoreError::io("removing", &p))?;
            removed.push(name);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trip() {
        let g = Generation {
            number: 42,
            parent: Some(41),
            entries: vec![
                Entry { name: "a".into(), digest: [1; 32], scores: true },
                Entry { name: "b-2.x".into(), digest: [0xab; 32], scores: false },
            ],
        };
        assert_eq!(Generation::parse(&g.emit()), Ok(g.clone()));
        let root = Generation { number: 1, parent: None, entries: vec![] };
        assert_eq!(Generation::parse(&root.emit()), Ok(root));
        // Every truncation of a valid index is refused: a partial write is never taken for a
        // shorter list of tasks.
        let text = g.emit();
        for n in 0..text.len() {
            assert!(Generation::parse(&text[..n]).is_err(), "truncated to {n}: {:?}", &text[..n]);
        }
    }

    #[test]
    fn hostile_indexes_are_refused() {
        let head = "edgecl-store-generation 1\nnumber 000002\nparent 000001\n";
        let d = "00".repeat(32);
        assert!(Generation::parse(&format!("{head}task a {d} -\nend 1\n")).is_ok());
        for bad in [
            format!("{head}task ../x {d} -\nend 1\n"),
            format!("{head}task a/b {d} -\nend 1\n"),
            format!("{head}task .hidden {d} -\nend 1\n"),
            format!("{head}task a {} -\nend 1\n", "0".repeat(63)),
            format!("{head}task a {} -\nend 1\n", "zz".repeat(32)),
            format!("{head}task a {d} maybe\nend 1\n"),
            format!("{head}task a {d} -\ntask a {} -\nend 2\n", "11".repeat(32)),
            format!("{head}task a {d} - extra\nend 1\n"),
            format!("{head}\ntask a {d} -\nend 1\n"),
            format!("{head}task a {d} -\nend 2\n"),
            format!("{head}task a {d} -\nend 1\nend 1\n"),
            format!("{head}task a {d} -\nend 1"),
            format!("{head}task a {d} -\n"),
            "edgecl-store-generation 2\nnumber 000002\nparent none\nend 0\n".into(),
            "edgecl-store-generation 1\nnumber 2\nparent none\nend 0\n".into(),
            "edgecl-store-generation 1\nnumber 000002\nparent 1\nend 0\n".into(),
        ] {
            assert!(Generation::parse(&bad).is_err(), "accepted {bad:?}");
        }
        assert_eq!(parse_gen_name("000007"), Some(7));
        for bad in ["7", "0000007", "00000a", "+00007", ".tmp-000001-5"] {
            assert_eq!(parse_gen_name(bad), None, "{bad}");
        }
    }
}
