//! `edgecl keys …` and `edgecl bundle …`: signing keys and signed offline bundles of tasks.
//!
//! A store is read by its on-disk contract only: the backbone is `STORE/backbone.ecb`, the
//! current tasks are `STORE/current/NAME.ect`, trusted keys are `STORE/keys/*.pub`.
//!
//! `bundle create` includes the tasks that the named ones depend on (found by digest among the
//! store's current tasks) and says so: a task whose dependencies are missing on the device
//! cannot be installed, and re-sending a task a device already has costs only bytes (the store
//! recognises it by digest). A dependency the store does not have is an error.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use edgecl::format::bundle::{self, Bundle, SignatureStatus, MAX_BUNDLE_LEN, MAX_TASK_FILE_LEN};
use edgecl::format::keys::{self, KeyId, PublicKeyFile};
use edgecl::format::task::{self, check_name};
use edgecl::format::Digest;
use edgecl::format::Hex;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Generate an ed25519 key pair for signing bundles: NAME.key (the secret, created with
    /// mode 0600) and NAME.pub (give this one to devices). Never overwrites a file.
    ///
    /// Example: edgecl keys gen release   (writes release.key and release.pub)
    Gen {
        /// Path without extension; its last part is the key's name (letters, digits, . _ -).
        name: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Trust a public key in a store: bundles signed by it may then be installed there. Copies
    /// it to STORE/keys/NAME.pub.
    ///
    /// Example: edgecl keys trust release.pub --store /var/lib/edgecl
    Trust {
        /// The public key file (NAME.pub).
        key: PathBuf,
        /// The store that should trust it.
        #[arg(long)]
        store: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum BundleCmd {
    /// Pack tasks of a store (and the tasks they depend on) into one signed bundle file.
    ///
    /// Example: edgecl bundle create --store st --key release.key shoes bags -o update.ecbundle
    Create {
        /// The store whose current tasks to pack (STORE/backbone.ecb, STORE/current/NAME.ect).
        #[arg(long)]
        store: PathBuf,
        /// Secret key file (from `edgecl keys gen`).
        #[arg(long, required_unless_present = "unsigned", conflicts_with = "unsigned")]
        key: Option<PathBuf>,
        /// Make an unsigned bundle (stores install it only when explicitly allowed).
        #[arg(long)]
        unsigned: bool,
        /// Task names, as in the store.
        #[arg(required = true)]
        tasks: Vec<String>,
        /// The bundle file to write (.ecbundle); written whole or not at all.
        #[arg(short, long)]
        output: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Check a bundle and show its tasks and signature. With --store, also whether that store
    /// would install it (exit status 1 if not).
    Inspect {
        file: PathBuf,
        /// A store to check trust, backbone, dependencies and versions against.
        #[arg(long)]
        store: Option<PathBuf>,
        /// With --store: treat an unsigned bundle as installable (as `install --allow-unsigned`).
        #[arg(long, requires = "store")]
        allow_unsigned: bool,
        /// Machine-readable output (printed even when the store would refuse the bundle).
        #[arg(long)]
        json: bool,
    },
}

pub fn keys_cmd(cmd: KeysCmd) -> Result<()> {
    match cmd {
        KeysCmd::Gen { name, json } => {
            let key = keys::generate().context("generating a key")?;
            let (secret, public) = keys::write_pair(&name, &key)?;
            let id = KeyId::of(key.verifying_key().as_bytes());
            if json {
                out!("{}", json!({"secret": secret, "public": public, "key_id": id.to_string()}));
            } else {
                out!("wrote {} (secret, mode 0600: keep it off devices) and {}", secret.display(), public.display());
                out!("key id {id}");
            }
            Ok(())
        }
        KeysCmd::Trust { key, store } => {
            let k = read_public(&key)?;
            let (path, added) = keys::write_public(&store.join("keys"), &k)?;
            if added {
                out!("trusting key {} ({}) in {}: wrote {}", k.id(), k.name, store.display(), path.display());
            } else {
                out!("key {} ({}) is already trusted in {}", k.id(), k.name, store.display());
            }
            Ok(())
        }
    }
}

pub fn bundle_cmd(cmd: BundleCmd) -> Result<()> {
    match cmd {
        BundleCmd::Create { store, key, unsigned: _, tasks, output, json } => {
            create(&store, key.as_deref(), &tasks, &output, json)
        }
        BundleCmd::Inspect { file, store, allow_unsigned, json } => {
            inspect(&file, store.as_deref(), allow_unsigned, json)
        }
    }
}

/// Reads at most `max` bytes of a file; a longer file is an error before it is read.
fn read_limited(path: &Path, max: u64, what: &str) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max {
        bail!("{} has {len} bytes, more than a {what} may have ({max})", path.display());
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut buf).with_context(|| format!("reading {}", path.display()))?;
    if buf.len() as u64 > max {
        bail!("{} is larger than a {what} may be ({max} bytes)", path.display());
    }
    Ok(buf)
}

fn read_public(path: &Path) -> Result<PublicKeyFile> {
    let bytes = read_limited(path, keys::MAX_KEY_FILE_LEN as u64, "key file")?;
    keys::decode_public(&bytes).with_context(|| format!("{} is not a valid public key file", path.display()))
}

/// A store's current state, read by its on-disk contract.
struct Store {
    backbone: Digest,
    /// Current tasks by name: digest, version, dependencies, file bytes.
    tasks: BTreeMap<String, StoredTask>,
}

struct StoredTask {
    digest: Digest,
    version: u32,
    depends_on: Vec<Digest>,
    bytes: Vec<u8>,
}

fn read_store(dir: &Path) -> Result<Store> {
    let bb_path = dir.join("backbone.ecb");
    let (map, p) = crate::open_backbone(&bb_path).with_context(|| format!("{} is not a store", dir.display()))?;
    let backbone = crate::backbone(&map, &p)?.digest();
    let cur = dir.join("current");
    let mut tasks = BTreeMap::new();
    let entries = std::fs::read_dir(&cur).with_context(|| format!("reading {}", cur.display()))?;
    for e in entries {
        let path = e?.path();
        if path.extension().is_none_or(|x| x != "ect") {
            continue;
        }
        let bytes = read_limited(&path, MAX_TASK_FILE_LEN, "task file")?;
        let f = task::decode(&bytes).with_context(|| format!("{} is not a valid task file", path.display()))?;
        f.check_backbone(&backbone).with_context(|| format!("{}", path.display()))?;
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if stem != f.task.name {
            bail!("{} holds task {:?}; a store names each file after its task", path.display(), f.task.name);
        }
        let t = f.task;
        tasks.insert(t.name, StoredTask { digest: f.digest, version: t.version, depends_on: t.depends_on, bytes });
    }
    Ok(Store { backbone, tasks })
}

/// The store's tasks for `names`, with every task they depend on first (each once, a
/// dependency before its dependents); the flag is true for tasks added as dependencies.
fn with_dependencies<'s>(store: &'s Store, names: &[String]) -> Result<Vec<(&'s str, &'s StoredTask, bool)>> {
    let by_digest: BTreeMap<Digest, (&str, &StoredTask)> =
        store.tasks.iter().map(|(n, t)| (t.digest, (n.as_str(), t))).collect();
    let mut order: Vec<(&str, &StoredTask, bool)> = Vec::new();
    // Iterative depth-first post-order; the store's digests form a DAG (a digest covers the
    // dependency list), and `order` doubles as the visited set.
    fn visit<'s>(
        name: &'s str,
        t: &'s StoredTask,
        requested: bool,
        by_digest: &BTreeMap<Digest, (&'s str, &'s StoredTask)>,
        order: &mut Vec<(&'s str, &'s StoredTask, bool)>,
        depth: usize,
    ) -> Result<()> {
        if let Some(o) = order.iter_mut().find(|o| o.0 == name) {
            o.2 &= !requested;
            return Ok(());
        }
        if depth > bundle::MAX_TASKS as usize {
            bail!("dependency chain of {name} is longer than a bundle can carry");
        }
        for d in &t.depends_on {
            let Some(&(dn, dt)) = by_digest.get(d) else {
                bail!(
                    "task {name} depends on task {} which is not in the store's current tasks; \
                     a bundle must carry every dependency",
                    Hex(d)
                );
            };
            visit(dn, dt, false, by_digest, order, depth + 1)?;
        }
        if let Some(o) = order.iter_mut().find(|o| o.0 == name) {
            o.2 &= !requested;
        } else {
            order.push((name, t, !requested));
        }
        Ok(())
    }
    for n in names {
        check_name(n).map_err(|e| anyhow::anyhow!("task name {n:?}: {e}"))?;
        let Some((name, t)) = store.tasks.get_key_value(n) else {
            bail!("the store has no task {n:?} (see its current/ directory)");
        };
        visit(name, t, true, &by_digest, &mut order, 0)?;
    }
    Ok(order)
}

/// Writes `bytes` to `path` through a new temporary file in the same directory, fsync, rename,
/// and an fsync of the directory: `path` holds either its old contents or the whole bundle.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().context("the output path has no file name")?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

fn create(store_dir: &Path, key: Option<&Path>, names: &[String], output: &Path, json_out: bool) -> Result<()> {
    let signer = match key {
        Some(p) => {
            #[cfg(unix)]
            if let Ok(m) = std::fs::metadata(p) {
                use std::os::unix::fs::PermissionsExt;
                if m.permissions().mode() & 0o077 != 0 {
                    eprintln!("warning: {} is readable by other users; `chmod 600` it", p.display());
                }
            }
            let bytes = read_limited(p, keys::MAX_KEY_FILE_LEN as u64, "key file")?;
            Some(
                keys::decode_secret(&bytes)
                    .with_context(|| format!("{} is not a valid secret key file", p.display()))?,
            )
        }
        None => None,
    };
    let store = read_store(store_dir)?;
    let order = with_dependencies(&store, names)?;
    let files: Vec<&[u8]> = order.iter().map(|(_, t, _)| &t.bytes[..]).collect();
    let bytes = bundle::create(&store.backbone, &files, signer.as_ref().map(|s| &s.key))?;
    write_durably(output, &bytes)?;
    let key_id = signer.as_ref().map(|s| s.id().to_string());
    if json_out {
        let tasks: Vec<_> = order
            .iter()
            .map(|(n, t, dep)| {
                json!({"name": n, "version": t.version, "digest": Hex(&t.digest).to_string(), "bytes": t.bytes.len(),
                       "included_as_dependency": dep})
            })
            .collect();
        out!(
            "{}",
            json!({"file": output, "bytes": bytes.len(), "backbone": Hex(&store.backbone).to_string(),
                   "signed": key_id.is_some(), "key_id": key_id, "tasks": tasks})
        );
        return Ok(());
    }
    for (n, t, dep) in &order {
        if *dep {
            let needed_by: Vec<&str> =
                order.iter().filter(|(_, o, _)| o.depends_on.contains(&t.digest)).map(|(m, _, _)| *m).collect();
            out!("including {n} v{}: a dependency of {}", t.version, needed_by.join(", "));
        }
    }
    let how = match &key_id {
        Some(id) => format!("signed by key {id}"),
        None => "UNSIGNED".to_string(),
    };
    out!("wrote {} ({} tasks, {} bytes, {how})", output.display(), order.len(), bytes.len());
    Ok(())
}

/// What a store would say to a bundle: its refusals (empty: it would install).
struct Verdict {
    trusted: Option<bool>,
    backbone_matches: bool,
    missing: Vec<bundle::MissingDependency>,
    refusals: Vec<String>,
}

fn verdict(bytes: &[u8], b: &Bundle, store: &Store, trusted: &[PublicKeyFile], allow_unsigned: bool) -> Verdict {
    let keys: Vec<_> = trusted.iter().map(|k| k.key).collect();
    let mut refusals = Vec::new();
    if let Err(e) = bundle::open(bytes, &keys, allow_unsigned) {
        refusals.push(e.to_string());
    }
    let trusted = b.signer().map(|k| keys.contains(k));
    let backbone_matches = b.check_backbone(&store.backbone).map_err(|e| refusals.push(e.to_string())).is_ok();
    let present: Vec<Digest> = store.tasks.values().map(|t| t.digest).collect();
    let missing = b.missing_dependencies(&present);
    for m in &missing {
        refusals.push(format!(
            "task {} needs task {}, which neither the bundle nor the store has",
            m.task,
            Hex(&m.digest)
        ));
    }
    for t in &b.tasks {
        if let Some(s) = store.tasks.get(&t.name) {
            if s.digest != t.digest && t.version <= s.version {
                refusals.push(format!(
                    "task {} v{} would not replace the store's v{} (a replacement needs a higher version)",
                    t.name, t.version, s.version
                ));
            }
        }
    }
    Verdict { trusted, backbone_matches, missing, refusals }
}

fn inspect(file: &Path, store_dir: Option<&Path>, allow_unsigned: bool, json_out: bool) -> Result<()> {
    let bytes = read_limited(file, MAX_BUNDLE_LEN, "bundle")?;
    let b = bundle::inspect(&bytes).with_context(|| format!("{} is not a valid bundle", file.display()))?;
    let store = match store_dir {
        Some(d) => {
            let s = read_store(d)?;
            let trusted = keys::load_trusted(&d.join("keys")).context("reading the store's trusted keys")?;
            Some((d, verdict(&bytes, &b, &s, &trusted, allow_unsigned), s))
        }
        None => None,
    };
    let (status, key) = match &b.signature {
        SignatureStatus::Unsigned => ("unsigned", None),
        SignatureStatus::Valid { key } => ("valid", Some(*key.as_bytes())),
        SignatureStatus::Invalid { key } => ("invalid", Some(*key)),
    };
    let key_id = b.signature.key_id();
    if json_out {
        let tasks: Vec<_> = b
            .tasks
            .iter()
            .map(|t| {
                let deps: Vec<String> = t.depends_on.iter().map(|d| Hex(d).to_string()).collect();
                let stored = store.as_ref().and_then(|(_, _, s)| s.tasks.get(&t.name)).map(|s| s.version);
                json!({"name": t.name, "version": t.version, "digest": Hex(&t.digest).to_string(), "bytes": t.bytes.len(),
                       "depends_on": deps, "store_version": stored})
            })
            .collect();
        let store_json = store.as_ref().map(|(d, v, _)| {
            let missing: Vec<_> =
                v.missing.iter().map(|m| json!({"task": m.task, "digest": Hex(&m.digest).to_string()})).collect();
            json!({"path": d, "backbone_matches": v.backbone_matches, "missing_dependencies": missing,
                   "would_install": v.refusals.is_empty(), "refusals": v.refusals})
        });
        let trusted = store.as_ref().and_then(|(_, v, _)| v.trusted);
        out!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "file": file, "format_version": bundle::VERSION, "bytes": bytes.len(),
                "backbone": Hex(&b.backbone).to_string(),
                "signature": {"status": status, "key_id": key_id.map(|k| k.to_string()),
                              "public_key": key.map(|k| Hex(&k).to_string()), "trusted": trusted},
                "tasks": tasks, "store": store_json,
            }))?
        );
    } else {
        out!("{}: edgecl bundle v{}, {} tasks, {} bytes", file.display(), bundle::VERSION, b.tasks.len(), bytes.len());
        out!("backbone   {}", Hex(&b.backbone));
        let trust = match store.as_ref().and_then(|(d, v, _)| v.trusted.map(|t| (d, t))) {
            Some((d, true)) => format!(", trusted by {}", d.display()),
            Some((d, false)) => format!(", NOT trusted by {}", d.display()),
            None => String::new(),
        };
        match (&b.signature, key_id) {
            (SignatureStatus::Unsigned, _) => out!("signature  none (unsigned)"),
            (SignatureStatus::Valid { .. }, Some(id)) => out!("signature  valid, key {id}{trust}"),
            (_, id) => out!(
                "signature  INVALID (recorded key {}): modified after signing",
                id.map(|i| i.to_string()).unwrap_or_default()
            ),
        }
        out!("\n{:<24} {:>7} {:>9}  {:<16}  depends on", "task", "version", "bytes", "digest");
        for t in &b.tasks {
            let deps: Vec<String> = t.depends_on.iter().map(|d| Hex(&d[..8]).to_string()).collect();
            out!(
                "{:<24} {:>7} {:>9}  {:<16}  {}",
                t.name,
                t.version,
                t.bytes.len(),
                Hex(&t.digest[..8]),
                deps.join(" ")
            );
        }
        if let Some((d, v, _)) = &store {
            if v.refusals.is_empty() {
                out!("\n{} would install this bundle", d.display());
            } else {
                out!("\n{} would refuse this bundle:", d.display());
                for r in &v.refusals {
                    out!("  - {r}");
                }
            }
        }
    }
    if let Some((d, v, _)) = &store {
        if !v.refusals.is_empty() {
            bail!("{} would refuse {}: {}", d.display(), file.display(), v.refusals[0]);
        }
    } else if status == "invalid" {
        bail!("the signature of {} is invalid: do not install it", file.display());
    }
    Ok(())
}
