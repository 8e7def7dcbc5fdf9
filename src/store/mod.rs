//! (std) The task store: one backbone and the installed tasks of a device, changed only by
//! whole generations, so that a power cut at any instant leaves either the old or the new
//! state (DESIGN §6).
//!
//! ```text
//! DIR/backbone.ecb              a copy of the backbone, written once by `init`
//! DIR/generations/000041/       one consistent state: NAME.ect task files, NAME.scores (KKT
//!                               scores, optional), and `index` (the tasks, in order)
//! DIR/generations/000042/       the next state; unchanged files are hard links to the old ones
//! DIR/current -> generations/000042    swapped by one rename
//! DIR/keys/                     trusted ed25519 public keys for bundles
//! DIR/lock                      held by writers (File::lock); readers never lock
//! ```
//!
//! Invariants:
//! - Files are never rewritten in place (a process may have them mapped): a change writes new
//!   files into a temporary directory (`generations/.tmp-NNNNNN-PID`) and hard-links the
//!   unchanged ones, then publishes the directory (`store/gen.rs` gives the exact order).
//! - `current` always names a complete generation, and it is the highest published one.
//!   Readers only ever follow `current` and read its `index`; temporary directories and files
//!   not in the index are never taken for tasks.
//! - Every generation is closed under dependencies and ordered: each task comes after the
//!   tasks whose digests it lists in `depends_on` (ExSSNeT chains). The order is that of the
//!   index: installation order, a replaced task moving to the end.
//! - A change is checked completely before its first write; a refused change leaves the store
//!   as it was, and a change that changes nothing makes no generation (idempotent installs).
//!
//! Decisions:
//! - Replacing a task (same name) needs a strictly higher `version`; the same digest again is a
//!   no-op; anything else is a refused downgrade.
//! - Removing (or replacing) a task that other tasks depend on is refused, naming them. Keeping
//!   a removed task's overlay alive for its dependents would leave hidden state that no `tasks
//!   list` shows and that could never be removed; refusing keeps "what is listed is what is
//!   stored". Remove the dependents first, newest first.
//! - `rollback` is a change like any other: it builds the next generation with the contents of
//!   the current one's predecessor, and records the generation it rolled back from as the new
//!   one's predecessor. A second rollback therefore undoes the first (the two latest states
//!   swap, as A/B update systems do); history is never rewritten.
//! - `gc` keeps the current generation and its predecessor (what `rollback` needs) and removes
//!   the rest. Changes do not gc by themselves: old generations cost only directory entries
//!   while their files are shared as hard links.
//!
//! The store does not know how tasks are trained (DESIGN §2), and it prints nothing.

mod error;
mod gen;

pub use error::StoreError;
pub use gen::Entry;

use crate::backbone::Backbone;
use crate::format::ecb::{Header, HEADER_LEN};
use crate::format::task::{check_name, decode, TaskFile};
use crate::format::Digest;
use gen::{Generation, Io, Planned, Source};
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The backbone's file name inside a store.
pub const BACKBONE: &str = "backbone.ecb";
/// The directory of trusted public keys inside a store.
pub const KEYS: &str = "keys";
const LOCK: &str = "lock";
/// Largest task (or scores) file a store reads.
pub const MAX_TASK_BYTES: u64 = 1 << 30;

/// An open store: its directory, its backbone's digest and the generation that was current
/// when it was opened. A `Store` is a snapshot: changes made through it (or by other
/// processes) are seen after [`Store::reload`].
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    backbone: Digest,
    gen: Generation,
}

/// One task of a generation, read from its file.
#[derive(Clone, Debug)]
pub struct StoredTask {
    pub name: String,
    /// `DIR/generations/NNNNNN/NAME.ect`.
    pub path: PathBuf,
    pub file: TaskFile,
    /// Size of the task file.
    pub bytes: u64,
    /// `NAME.scores` beside the task file, when the generation has one.
    pub scores: Option<PathBuf>,
}

/// A task offered to a change: the `.ect` bytes, optional KKT scores, and where it came from
/// (a file name, "bundle entry 3"), which error messages name.
#[derive(Clone, Debug)]
pub struct NewTask {
    pub bytes: Vec<u8>,
    pub scores: Option<Vec<u8>>,
    pub origin: String,
}

/// What a committed change did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The generation current after the change.
    pub generation: u32,
    /// Whether a new generation was made (false when nothing changed).
    pub created: bool,
    pub added: Vec<String>,
    /// (name, old version, new version).
    pub replaced: Vec<(String, u32, u32)>,
    pub removed: Vec<String>,
    /// Offered tasks that were installed already (same digest).
    pub unchanged: Vec<String>,
}

/// What [`Store::verify`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verification {
    pub generation: u32,
    pub tasks: usize,
    /// Empty when the store is sound.
    pub problems: Vec<String>,
}

impl Verification {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What [`Store::gc`] kept and removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gc {
    pub kept: Vec<u32>,
    /// Paths relative to the store directory.
    pub removed: Vec<String>,
}

/// Reads a whole file into 8-byte-aligned memory (a backbone's f32 tensors need 4), without
/// `unsafe` and without mapping it.
fn read_aligned(path: &Path) -> Result<(Vec<u64>, usize), StoreError> {
    let mut f = File::open(path).map_err(StoreError::io("opening", path))?;
    let len = f.metadata().map_err(StoreError::io("reading the size of", path))?.len();
    let n =
        usize::try_from(len).map_err(|_| StoreError::TooLarge { path: path.into(), len, max: usize::MAX as u64 })?;
    let mut buf = vec![0u64; n.div_ceil(8)];
    f.read_exact(&mut bytemuck::cast_slice_mut::<u64, u8>(&mut buf)[..n]).map_err(StoreError::io("reading", path))?;
    Ok((buf, n))
}

/// Validates a backbone file completely (structure and digest); returns its digest.
fn check_backbone(path: &Path) -> Result<Digest, StoreError> {
    let (buf, n) = read_aligned(path)?;
    let bytes = &bytemuck::cast_slice::<u64, u8>(&buf)[..n];
    let err = |error| StoreError::Backbone { path: path.into(), error };
    let bb = Backbone::open(bytes).map_err(err)?;
    bb.verify().map_err(err)?;
    Ok(bb.digest())
}

/// Takes the writer lock (blocks while another writer holds it).
fn lock(dir: &Path) -> Result<File, StoreError> {
    let p = dir.join(LOCK);
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(StoreError::io("opening", &p))?;
    f.lock().map_err(StoreError::io("locking", &p))?;
    Ok(f)
}

/// Reads and decodes one task file of a generation, checking it against its index entry.
fn read_task(dir: &Path, n: u32, e: &Entry, backbone: &Digest) -> Result<StoredTask, StoreError> {
    let gdir = gen::gen_dir(dir, n);
    let path = gdir.join(format!("{}.ect", e.name));
    let bytes = gen::read_capped(&path, MAX_TASK_BYTES)?;
    let corrupt = |what: String| StoreError::Corrupt { path: path.clone(), what };
    let file = decode(&bytes).map_err(|err| corrupt(format!("the task file does not decode: {err}")))?;
    if file.digest != e.digest {
        return Err(corrupt("the task file's digest differs from the index".into()));
    }
    if file.task.name != e.name {
        return Err(corrupt(format!("the file holds task '{}', the index says '{}'", file.task.name, e.name)));
    }
    if &file.backbone != backbone {
        return Err(StoreError::WrongBackbone { name: e.name.clone(), task: file.backbone, store: *backbone });
    }
    let scores = e.scores.then(|| gdir.join(format!("{}.scores", e.name)));
    Ok(StoredTask { name: e.name.clone(), path, file, bytes: bytes.len() as u64, scores })
}

impl Store {
    /// Creates a store in `dir` (new or empty) for the backbone at `backbone`, which is
    /// validated completely and copied to `DIR/backbone.ecb`; the first generation (000001)
    /// holds no tasks. An `init` interrupted before it finished can simply be run again.
    pub fn init(dir: &Path, backbone: &Path) -> Result<Store, StoreError> {
        if fs::symlink_metadata(dir.join(gen::CURRENT)).is_ok() {
            return Err(StoreError::AlreadyStore { dir: dir.into() });
        }
        match fs::read_dir(dir) {
            Ok(entries) => {
                for e in entries {
                    let e = e.map_err(StoreError::io("listing", dir))?;
                    let name = e.file_name().to_string_lossy().into_owned();
                    let ours = [BACKBONE, ".backbone.ecb.tmp", gen::GENERATIONS, KEYS, LOCK].contains(&name.as_str())
                        || name.starts_with(gen::TMP_LINK_PREFIX);
                    if !ours {
                        return Err(StoreError::NotEmpty { dir: dir.into() });
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("listing", dir)(e)),
        }
        let (buf, n) = read_aligned(backbone)?;
        let bytes = &bytemuck::cast_slice::<u64, u8>(&buf)[..n];
        let err = |error| StoreError::Backbone { path: backbone.into(), error };
        Backbone::open(bytes).and_then(|bb| bb.verify()).map_err(err)?;
        for d in [dir.to_path_buf(), dir.join(gen::GENERATIONS), dir.join(KEYS)] {
            fs::create_dir_all(&d).map_err(StoreError::io("creating directory", &d))?;
        }
        let _lock = lock(dir)?;
        let mut io = Io::from_env();
        let tmp = dir.join(".backbone.ecb.tmp");
        let _ = fs::remove_file(&tmp);
        io.write(&tmp, bytes)?;
        io.rename(&tmp, &dir.join(BACKBONE))?;
        io.sync_dir(dir)?;
        gen::clean(dir, 0, None)?;
        gen::write_generation(dir, 1, None, &[], &mut io)?;
        Store::open(dir)
    }

    /// Opens the store in `dir`: reads the backbone's header (its digest and layout, not the
    /// whole file: see [`Store::verify`]) and the current generation's index.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let bpath = dir.join(BACKBONE);
        let gen = Store::current(dir)?;
        let mut f = match File::open(&bpath) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Corrupt { path: bpath, what: "the backbone file is missing".into() })
            }
            Err(e) => return Err(StoreError::io("opening", bpath)(e)),
        };
        let len = f.metadata().map_err(StoreError::io("reading the size of", &bpath))?.len();
        let mut head = Vec::with_capacity(HEADER_LEN);
        (&mut f).take(HEADER_LEN as u64).read_to_end(&mut head).map_err(StoreError::io("reading", &bpath))?;
        let h =
            Header::parse_prefix(&head, len).map_err(|error| StoreError::Backbone { path: bpath.clone(), error })?;
        Ok(Store { dir: dir.into(), backbone: h.digest, gen })
    }

    /// The current generation's index. A reader that lost a race with `gc` (its generation
    /// removed between reading `current` and the index) tries again.
    fn current(dir: &Path) -> Result<Generation, StoreError> {
        for _ in 0..5 {
            let n = gen::read_current(dir)?.ok_or_else(|| StoreError::NoStore { dir: dir.into() })?;
            if let Some(g) = gen::load(dir, n)? {
                return Ok(g);
            }
        }
        let link = dir.join(gen::CURRENT);
        Err(StoreError::Corrupt { path: link, what: "`current` names a generation that does not exist".into() })
    }

    /// Re-reads `current` (to see changes made since this store was opened).
    pub fn reload(&mut self) -> Result<(), StoreError> {
        self.gen = Store::current(&self.dir)?;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// `DIR/backbone.ecb`.
    pub fn backbone_path(&self) -> PathBuf {
        self.dir.join(BACKBONE)
    }
    /// The digest every task of this store must have been learned on.
    pub fn backbone_digest(&self) -> Digest {
        self.backbone
    }
    /// The current generation's number.
    pub fn generation(&self) -> u32 {
        self.gen.number
    }
    /// The generation the current one was built from (what `rollback` returns to).
    pub fn predecessor(&self) -> Option<u32> {
        self.gen.parent
    }
    /// `DIR/generations/NNNNNN` of the current generation.
    pub fn generation_dir(&self) -> PathBuf {
        gen::gen_dir(&self.dir, self.gen.number)
    }
    /// The current generation's index (names, digests, scores flags), in order, without
    /// reading any task file.
    pub fn entries(&self) -> &[Entry] {
        &self.gen.entries
    }

    /// Every task of the current generation, decoded and checked against the index and the
    /// backbone digest, in order (dependencies first).
    pub fn tasks(&self) -> Result<Vec<StoredTask>, StoreError> {
        self.gen.entries.iter().map(|e| read_task(&self.dir, self.gen.number, e, &self.backbone)).collect()
    }

    /// One task by name.
    pub fn task(&self, name: &str) -> Result<StoredTask, StoreError> {
        let e = self.gen.entries.iter().find(|e| e.name == name).ok_or_else(|| self.no_such(name))?;
        read_task(&self.dir, self.gen.number, e, &self.backbone)
    }

    fn no_such(&self, name: &str) -> StoreError {
        StoreError::NoSuchTask {
            name: name.into(),
            available: self.gen.entries.iter().map(|e| e.name.clone()).collect(),
        }
    }

    /// Names of the tasks that depend on task `name` (whose `depends_on` holds its digest).
    pub fn dependents(&self, name: &str) -> Result<Vec<String>, StoreError> {
        let e = self.gen.entries.iter().find(|e| e.name == name).ok_or_else(|| self.no_such(name))?;
        Ok(self.tasks()?.into_iter().filter(|t| t.file.task.depends_on.contains(&e.digest)).map(|t| t.name).collect())
    }

    /// Starts a change: takes the writer lock (held until the change is committed or
    /// dropped) and reads the generation that is current now, which the change builds on.
    pub fn change(&self) -> Result<Change<'_>, StoreError> {
        let lock = lock(&self.dir)?;
        let base = Store::current(&self.dir)?;
        Ok(Change { store: self, _lock: lock, base, puts: Vec::new(), removes: Vec::new() })
    }

    /// Installs `tasks` all-or-nothing in one generation (the step a bundle install or an
    /// update hook runs). Each task must decode, have a valid name, belong to this backbone,
    /// not downgrade an installed task, and have its dependencies installed or in `tasks`.
    /// Installing tasks that are all installed already makes no generation (an installed task
    /// offered again keeps the scores file it has, if any).
    pub fn install_tasks(&self, tasks: Vec<NewTask>) -> Result<Outcome, StoreError> {
        let mut c = self.change()?;
        for t in tasks {
            c.put(t)?;
        }
        c.commit()
    }

    /// Removes task `name` through a new generation; refused while other tasks depend on it.
    pub fn remove(&self, name: &str) -> Result<Outcome, StoreError> {
        let mut c = self.change()?;
        c.remove(name)?;
        c.commit()
    }

    /// Makes the predecessor's contents current again, through a new generation whose
    /// predecessor is the generation rolled back from: a second rollback undoes the first.
    pub fn rollback(&self) -> Result<Outcome, StoreError> {
        let _lock = lock(&self.dir)?;
        let base = Store::current(&self.dir)?;
        let none = StoreError::NoPredecessor { generation: base.number };
        let p = base.parent.ok_or(none)?;
        let prev = gen::load(&self.dir, p)?.ok_or(StoreError::NoPredecessor { generation: base.number })?;
        let number = next_number(&base)?;
        gen::clean(&self.dir, base.number, None)?;
        let pdir = gen::gen_dir(&self.dir, p);
        let planned: Vec<Planned> = prev
            .entries
            .iter()
            .map(|e| Planned {
                entry: e.clone(),
                task: Source::Link(pdir.join(format!("{}.ect", e.name))),
                scores: e.scores.then(|| Source::Link(pdir.join(format!("{}.scores", e.name)))),
            })
            .collect();
        gen::write_generation(&self.dir, number, Some(base.number), &planned, &mut Io::from_env())?;
        let names = |g: &Generation| -> Vec<(String, Digest)> {
            g.entries.iter().map(|e| (e.name.clone(), e.digest)).collect()
        };
        let (before, after) = (names(&base), names(&prev));
        Ok(Outcome {
            generation: number,
            created: true,
            added: after.iter().filter(|a| !before.contains(a)).map(|a| a.0.clone()).collect(),
            removed: before.iter().filter(|b| !after.contains(b)).map(|b| b.0.clone()).collect(),
            ..Outcome::default()
        })
    }

    /// Checks the current generation completely: the backbone's digest recomputed, every task
    /// file read, decoded (checksums) and matched with the index and the backbone, every
    /// dependency present and ordered before its dependent, every recorded scores file present.
    pub fn verify(&self) -> Result<Verification, StoreError> {
        let mut problems = Vec::new();
        match check_backbone(&self.backbone_path()) {
            Ok(d) if d != self.backbone => {
                problems.push("the backbone's digest changed since the store was opened".into())
            }
            Ok(_) => {}
            Err(e) => problems.push(e.to_string()),
        }
        let mut seen: Vec<Digest> = Vec::new();
        for e in &self.gen.entries {
            match read_task(&self.dir, self.gen.number, e, &self.backbone) {
                Ok(t) => {
                    for d in &t.file.task.depends_on {
                        if !seen.contains(d) {
                            let later = self.gen.entries.iter().any(|x| &x.digest == d);
                            problems.push(format!(
                                "task '{}' depends on task {} which is {}",
                                e.name,
                                crate::format::Hex(d),
                                if later { "listed after it" } else { "not in the store" }
                            ));
                        }
                    }
                    if let Some(s) = &t.scores {
                        if !s.is_file() {
                            problems.push(format!("{} is missing", s.display()));
                        }
                    }
                }
                Err(err) => problems.push(err.to_string()),
            }
            seen.push(e.digest);
        }
        Ok(Verification { generation: self.gen.number, tasks: self.gen.entries.len(), problems })
    }

    /// Removes every generation except the current one and its predecessor, and whatever
    /// interrupted writers left behind.
    pub fn gc(&self) -> Result<Gc, StoreError> {
        let _lock = lock(&self.dir)?;
        let base = Store::current(&self.dir)?;
        let mut kept = vec![base.number];
        kept.extend(base.parent);
        let removed = gen::clean(&self.dir, base.number, Some(&kept))?;
        let present = gen::list(&self.dir)?;
        kept.retain(|k| present.contains(k));
        Ok(Gc { kept, removed })
    }
}

fn next_number(base: &Generation) -> Result<u32, StoreError> {
    match base.number.checked_add(1) {
        Some(n) if n <= gen::MAX_GENERATION => Ok(n),
        _ => Err(StoreError::TooManyGenerations),
    }
}

struct Put {
    file: TaskFile,
    bytes: Vec<u8>,
    scores: Option<Vec<u8>>,
}

/// A change being prepared: tasks to put and names to remove, checked as a whole and written
/// as one generation by [`Change::commit`]. Holds the writer lock; dropping it without
/// committing changes nothing.
pub struct Change<'s> {
    store: &'s Store,
    _lock: File,
    base: Generation,
    puts: Vec<Put>,
    removes: Vec<String>,
}

/// A task of the generation being planned.
struct Slot {
    entry: Entry,
    version: u32,
    depends_on: Vec<Digest>,
    /// `Some(i)`: `puts[i]`; `None`: kept from the base generation.
    put: Option<usize>,
}

impl Change<'_> {
    /// The generation this change builds on.
    pub fn base_generation(&self) -> u32 {
        self.base.number
    }

    /// Adds or replaces a task. The bytes are decoded and checked now (format, checksums,
    /// name, backbone); versions and dependencies are checked by [`Change::commit`].
    pub fn put(&mut self, t: NewTask) -> Result<(), StoreError> {
        let file = decode(&t.bytes).map_err(|error| StoreError::BadTask { origin: t.origin.clone(), error })?;
        let name = &file.task.name;
        check_name(name).map_err(|error| StoreError::BadName {
            origin: t.origin.clone(),
            name: name.clone(),
            error,
        })?;
        if file.backbone != self.store.backbone {
            return Err(StoreError::WrongBackbone {
                name: name.clone(),
                task: file.backbone,
                store: self.store.backbone,
            });
        }
        if let Some(p) = self.puts.iter().find(|p| &p.file.task.name == name) {
            if p.file.digest == file.digest {
                return Ok(());
            }
            return Err(StoreError::Duplicate { name: name.clone() });
        }
        self.puts.push(Put { file, bytes: t.bytes, scores: t.scores });
        Ok(())
    }

    /// Removes a task of the base generation (refused at commit while others depend on it).
    pub fn remove(&mut self, name: &str) -> Result<(), StoreError> {
        if !self.base.entries.iter().any(|e| e.name == name) {
            return Err(StoreError::NoSuchTask {
                name: name.into(),
                available: self.base.entries.iter().map(|e| e.name.clone()).collect(),
            });
        }
        if !self.removes.iter().any(|r| r == name) {
            self.removes.push(name.into());
        }
        Ok(())
    }

    /// Checks the change as a whole and, if it changes anything, writes it as the next
    /// generation and makes that current.
    pub fn commit(self) -> Result<Outcome, StoreError> {
        let dir = &self.store.dir;
        let mut out = Outcome { generation: self.base.number, ..Outcome::default() };
        // Removed tasks are not read, so that a damaged task file can still be removed.
        let mut gone: Vec<(Digest, String, bool)> = Vec::new();
        let mut slots: Vec<Slot> = Vec::new();
        for e in &self.base.entries {
            if self.removes.contains(&e.name) {
                gone.push((e.digest, e.name.clone(), false));
                out.removed.push(e.name.clone());
                continue;
            }
            let t = read_task(dir, self.base.number, e, &self.store.backbone)?;
            let task = t.file.task;
            slots.push(Slot { entry: e.clone(), version: task.version, depends_on: task.depends_on, put: None });
        }
        for i in dependency_order(&self.puts) {
            let p = &self.puts[i];
            let (name, digest, version) = (&p.file.task.name, p.file.digest, p.file.task.version);
            let entry = Entry { name: name.clone(), digest, scores: p.scores.is_some() };
            let slot = Slot { entry, version, depends_on: p.file.task.depends_on.clone(), put: Some(i) };
            match slots.iter().position(|s| &s.entry.name == name) {
                Some(k) if slots[k].entry.digest == digest => out.unchanged.push(name.clone()),
                Some(k) if version > slots[k].version => {
                    let old = slots.remove(k);
                    out.replaced.push((name.clone(), old.version, version));
                    gone.push((old.entry.digest, name.clone(), true));
                    slots.push(slot);
                }
                Some(k) => {
                    return Err(StoreError::Downgrade {
                        name: name.clone(),
                        installed: slots[k].version,
                        offered: version,
                    })
                }
                None => {
                    out.added.push(name.clone());
                    slots.push(slot);
                }
            }
        }
        check_closed(&slots, &gone)?;
        if out.added.is_empty() && out.replaced.is_empty() && out.removed.is_empty() {
            return Ok(out);
        }
        let number = next_number(&self.base)?;
        gen::clean(dir, self.base.number, None)?;
        let bdir = gen::gen_dir(dir, self.base.number);
        let mut puts: Vec<Option<Put>> = self.puts.into_iter().map(Some).collect();
        let planned: Vec<Planned> = slots
            .into_iter()
            .map(|s| match s.put.and_then(|i| puts[i].take()) {
                Some(p) => {
                    Planned { entry: s.entry, task: Source::Bytes(p.bytes), scores: p.scores.map(Source::Bytes) }
                }
                None => Planned {
                    task: Source::Link(bdir.join(format!("{}.ect", s.entry.name))),
                    scores: s.entry.scores.then(|| Source::Link(bdir.join(format!("{}.scores", s.entry.name)))),
                    entry: s.entry,
                },
            })
            .collect();
        gen::write_generation(dir, number, Some(self.base.number), &planned, &mut Io::from_env())?;
        out.generation = number;
        out.created = true;
        Ok(out)
    }
}

/// The order in which to append `puts`: each after the puts it depends on, otherwise as
/// given (a stable topological order; a dependency cycle, impossible with digests, is left in
/// the given order and caught by [`check_closed`]).
fn dependency_order(puts: &[Put]) -> Vec<usize> {
    let mut order: Vec<usize> = Vec::with_capacity(puts.len());
    while order.len() < puts.len() {
        let ready = (0..puts.len()).find(|&i| {
            !order.contains(&i)
                && puts[i]
                    .file
                    .task
                    .depends_on
                    .iter()
                    .all(|d| puts.iter().enumerate().all(|(j, q)| &q.file.digest != d || order.contains(&j)))
        });
        match ready {
            Some(i) => order.push(i),
            None => order.extend((0..puts.len()).filter(|i| !order.contains(i)).collect::<Vec<_>>()),
        }
    }
    order
}

/// Every dependency of every slot must be an earlier slot. `gone` lists the digests this
/// change removes (false) or replaces (true), to name the task at fault.
fn check_closed(slots: &[Slot], gone: &[(Digest, String, bool)]) -> Result<(), StoreError> {
    for (i, s) in slots.iter().enumerate() {
        for d in &s.depends_on {
            if slots[..i].iter().any(|x| &x.entry.digest == d) {
                continue;
            }
            if let Some((_, name, replacing)) = gone.iter().find(|g| &g.0 == d) {
                let dependents =
                    slots.iter().filter(|x| x.depends_on.contains(d)).map(|x| x.entry.name.clone()).collect();
                return Err(StoreError::HasDependents { name: name.clone(), dependents, replacing: *replacing });
            }
            return Err(StoreError::MissingDependency { name: s.entry.name.clone(), digest: *d });
        }
    }
    Ok(())
}
