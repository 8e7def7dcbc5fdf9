//! Bundles (`.ecbundle`) and signing keys: the format round-trips and matches its spec (an
//! encoder written here from `models/README.md` produces the same bytes as `bundle::create`),
//! hostile input is refused with the named error and never panics, and the CLI's `keys` and
//! `bundle` commands work on a small store laid out by hand.

use edgecl::adapter::{Components, Mask, Method, Softmax, Task};
use edgecl::format::bundle::{self, BundleError, MissingDependency, SignatureStatus};
use edgecl::format::keys::{KeyId, SigningKey};
use edgecl::format::task::{self, NameError, TaskError};
use edgecl::format::{sha256, Digest};
use edgecl::rng::SplitMix64;
use std::path::Path;
use std::process::Output;

mod common;
use common::{edgecl, fails, ok, tempdir};

const BB: Digest = [0xbb; 32];

fn sample(name: &str, deps: &[Digest], version: u32) -> Task {
    Task {
        name: name.into(),
        labels: vec!["x".into(), "y".into()],
        method: Method::Exssnet,
        components: Components {
            masks: vec![Mask { len: 70, words: vec![0xdead_beef, 3, 1] }],
            overlay: vec![vec![0.5, -1.25]],
            ..Default::default()
        },
        depends_on: deps.to_vec(),
        config: "{}".into(),
        metrics: vec![("train_accuracy".into(), 0.75)],
        created_at: 1_700_000_000,
        version,
        softmax: Softmax::Classes,
    }
}

fn file(name: &str, deps: &[Digest], version: u32) -> Vec<u8> {
    task::encode(&sample(name, deps, version), &BB)
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// One manifest entry, as the spec lays it out.
#[derive(Clone)]
struct Entry {
    digest: Digest,
    len: u64,
    version: u32,
    name: Vec<u8>,
    deps: Vec<Digest>,
}

fn entry_of(bytes: &[u8]) -> Entry {
    let f = task::decode(bytes).unwrap();
    Entry {
        digest: f.digest,
        len: bytes.len() as u64,
        version: f.task.version,
        name: f.task.name.into_bytes(),
        deps: f.task.depends_on,
    }
}

/// An independent `.ecbundle` writer following `models/README.md`, with every field
/// settable so that tests can build hostile bundles that still carry a valid trailer and,
/// with a signer, a valid signature.
#[derive(Clone)]
struct Raw {
    count: Option<u32>,
    manifest_len: Option<u64>,
    tasks_len: Option<u64>,
    backbone: Digest,
    entries: Vec<Entry>,
    files: Vec<Vec<u8>>,
}

impl Raw {
    fn of(files: &[&[u8]]) -> Raw {
        Raw {
            count: None,
            manifest_len: None,
            tasks_len: None,
            backbone: BB,
            entries: files.iter().map(|f| entry_of(f)).collect(),
            files: files.iter().map(|f| f.to_vec()).collect(),
        }
    }

    fn build(&self, signer: Option<&SigningKey>) -> Vec<u8> {
        let mut manifest = Vec::new();
        for e in &self.entries {
            manifest.extend_from_slice(&e.digest);
            manifest.extend_from_slice(&e.len.to_le_bytes());
            manifest.extend_from_slice(&e.version.to_le_bytes());
            manifest.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            manifest.extend_from_slice(&(e.deps.len() as u16).to_le_bytes());
            manifest.extend_from_slice(&e.name);
            for d in &e.deps {
                manifest.extend_from_slice(d);
            }
        }
        let tasks: Vec<u8> = self.files.concat();
        let mut out = b"EDGECLU\0".to_vec();
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.count.unwrap_or(self.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.manifest_len.unwrap_or(manifest.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.tasks_len.unwrap_or(tasks.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.backbone);
        out.extend_from_slice(&manifest);
        out.extend_from_slice(&tasks);
        match signer {
            None => out.extend_from_slice(&[0; 100]),
            Some(k) => {
                use ed25519_dalek::Signer as _;
                out.extend_from_slice(&1u32.to_le_bytes());
                out.extend_from_slice(k.verifying_key().as_bytes());
                let mut msg = b"edgecl bundle v1".to_vec();
                msg.extend_from_slice(&sha256(&out));
                out.extend_from_slice(&k.sign(&msg).to_bytes());
            }
        }
        let t = sha256(&out);
        out.extend_from_slice(&t);
        out
    }
}

/// Recomputes the trailer after a deliberate change (as a forger, or a consistent
/// corruption, would).
fn fix_trailer(b: &mut [u8]) {
    let end = b.len() - 32;
    let t = sha256(&b[..end]);
    b[end..].copy_from_slice(&t);
}

/// Opens as a store that trusts key 1 and allows unsigned bundles would.
fn open_lenient(b: &[u8]) -> Result<bundle::Bundle<'_>, BundleError> {
    bundle::open(b, &[key(1).verifying_key()], true)
}

fn three() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let a = file("a", &[], 1);
    let da = task::digest_of(&a).unwrap();
    let b = file("b", &[da], 2);
    let db = task::digest_of(&b).unwrap();
    let c = file("c.v2", &[da, db], 7);
    (a, b, c)
}

#[test]
fn round_trip_and_the_spec_encoder_agree_byte_for_byte() {
    let (a, b, c) = three();
    let k = key(1);
    for signer in [Some(&k), None] {
        let made = bundle::create(&BB, &[&a, &b, &c], signer).unwrap();
        assert_eq!(made, Raw::of(&[&a, &b, &c]).build(signer), "create differs from the spec");
        let opened = bundle::open(&made, &[key(9).verifying_key(), k.verifying_key()], signer.is_none()).unwrap();
        assert_eq!(opened.backbone, BB);
        let names: Vec<_> = opened.tasks.iter().map(|t| (t.name.as_str(), t.version, t.bytes)).collect();
        assert_eq!(names, vec![("a", 1, &a[..]), ("b", 2, &b[..]), ("c.v2", 7, &c[..])]);
        assert_eq!(opened.tasks[2].depends_on, vec![task::digest_of(&a).unwrap(), task::digest_of(&b).unwrap()]);
        assert_eq!(opened.signer(), signer.map(|s| s.verifying_key()).as_ref());
        assert!(opened.missing_dependencies(&[]).is_empty());
        assert_eq!(opened.check_backbone(&BB), Ok(()));
        assert_eq!(bundle::inspect(&made).unwrap(), opened);
    }
}

#[test]
fn every_truncation_is_refused_as_truncated() {
    let (a, b, _) = three();
    let made = bundle::create(&BB, &[&a, &b], Some(&key(1))).unwrap();
    for n in 0..made.len() {
        let e = open_lenient(&made[..n]).unwrap_err();
        assert!(matches!(e, BundleError::Truncated { available, .. } if available == n as u64), "at {n}: {e:?}");
        assert_eq!(bundle::inspect(&made[..n]).unwrap_err(), e);
    }
    let mut longer = made.clone();
    longer.push(0);
    assert_eq!(open_lenient(&longer).unwrap_err(), BundleError::TrailingBytes { extra: 1 });
}

/// Every byte of a bundle is checked: by the trailer, and — when a mutation also recomputes
/// the trailer — by the signature (signed) or by the cross-checks between header, manifest,
/// signature block and the task files' own digests (unsigned). So no mutation survives.
#[test]
fn random_mutations_are_all_refused_even_with_a_recomputed_trailer() {
    let (a, b, c) = three();
    let mut r = SplitMix64::new(2026);
    for signer in [Some(key(1)), None] {
        let made = bundle::create(&BB, &[&a, &b, &c], signer.as_ref()).unwrap();
        for round in 0..1500 {
            let mut m = made.clone();
            let i = r.below(m.len());
            let flip = 1 + r.below(255) as u8;
            m[i] ^= flip;
            let e = open_lenient(&m).unwrap_err();
            if i < m.len() - 32 {
                assert!(
                    matches!(
                        e,
                        BundleError::ChecksumMismatch { .. }
                            | BundleError::BadMagic
                            | BundleError::UnsupportedVersion { .. }
                            | BundleError::BadHeader { .. }
                            | BundleError::NoTasks
                            | BundleError::TooLarge { .. }
                            | BundleError::Truncated { .. }
                            | BundleError::TrailingBytes { .. }
                    ),
                    "byte {i}: {e:?}"
                );
            }
            if i < m.len() - 32 {
                fix_trailer(&mut m);
                let e2 = open_lenient(&m);
                assert!(e2.is_err(), "round {round}: byte {i} ^ {flip:#x} with a recomputed trailer was accepted");
                if signer.is_some() && (64..m.len() - 132).contains(&i) {
                    // Manifest and task bytes: the signature no longer verifies.
                    assert!(matches!(e2, Err(BundleError::BadSignature { .. })), "byte {i}: {e2:?}");
                }
            }
        }
    }
}

#[test]
fn arbitrary_bytes_never_panic() {
    let (a, _, _) = three();
    let made = bundle::create(&BB, &[&a], None).unwrap();
    let mut r = SplitMix64::new(7);
    for round in 0..1000 {
        let len = r.below(600);
        let mut g: Vec<u8> = (0..len).map(|_| r.next_u64() as u8).collect();
        if round % 2 == 0 {
            // A valid header prefix, so that parsing goes past the magic.
            let n = g.len().min(64);
            g[..n].copy_from_slice(&made[..n]);
        }
        assert!(bundle::inspect(&g).is_err());
        assert!(open_lenient(&g).is_err());
    }
}

#[test]
fn trust_is_enforced_and_named() {
    let (a, _, _) = three();
    let signed_by_2 = bundle::create(&BB, &[&a], Some(&key(2))).unwrap();
    let id2 = KeyId::of(key(2).verifying_key().as_bytes());
    assert_eq!(
        bundle::open(&signed_by_2, &[key(1).verifying_key()], true),
        Err(BundleError::UntrustedKey { key: id2 })
    );
    assert_eq!(bundle::open(&signed_by_2, &[], true), Err(BundleError::UntrustedKey { key: id2 }));
    let msg = bundle::open(&signed_by_2, &[], true).unwrap_err().to_string();
    assert!(msg.contains(&id2.to_string()) && msg.contains("keys trust"), "{msg}");
    // inspect reports without enforcing.
    assert_eq!(
        bundle::inspect(&signed_by_2).unwrap().signature,
        SignatureStatus::Valid { key: key(2).verifying_key() }
    );

    let unsigned = bundle::create(&BB, &[&a], None).unwrap();
    assert_eq!(bundle::open(&unsigned, &[key(1).verifying_key()], false), Err(BundleError::Unsigned));
    assert!(bundle::open(&unsigned, &[], true).is_ok());

    // Key 2's signature presented as key 1's (trusted) key: the signature does not verify.
    let mut forged = signed_by_2.clone();
    let at = forged.len() - 132 + 4;
    forged[at..at + 32].copy_from_slice(key(1).verifying_key().as_bytes());
    fix_trailer(&mut forged);
    let id1 = KeyId::of(key(1).verifying_key().as_bytes());
    assert_eq!(bundle::open(&forged, &[key(1).verifying_key()], false), Err(BundleError::BadSignature { key: id1 }));
    assert!(matches!(bundle::inspect(&forged).unwrap().signature, SignatureStatus::Invalid { .. }));

    // A signed bundle relabelled as unsigned keeps its key bytes: refused, not downgraded.
    let mut relabelled = signed_by_2.clone();
    let at = relabelled.len() - 132;
    relabelled[at] = 0;
    fix_trailer(&mut relabelled);
    assert!(matches!(open_lenient(&relabelled), Err(BundleError::BadSignatureBlock { .. })));
    relabelled[at] = 2;
    fix_trailer(&mut relabelled);
    assert!(matches!(open_lenient(&relabelled), Err(BundleError::BadSignatureBlock { .. })));
}

#[test]
fn backbones_must_match() {
    let (a, _, _) = three();
    let made = bundle::create(&BB, &[&a], None).unwrap();
    let b = open_lenient(&made).unwrap();
    let other = [0x11; 32];
    assert_eq!(b.check_backbone(&other), Err(BundleError::WrongBackbone { bundle: BB, expected: other }));
    // A task of another backbone inside the bundle.
    let foreign = task::encode(&sample("f", &[], 1), &other);
    let e = BundleError::TaskBackbone { task: "f".into(), task_backbone: other, bundle: BB };
    assert_eq!(bundle::create(&BB, &[&a, &foreign], None), Err(e.clone()));
    assert_eq!(open_lenient(&Raw::of(&[&a, &foreign]).build(Some(&key(1)))), Err(e));
}

#[test]
fn missing_dependencies_are_reported() {
    let (a, b, c) = three();
    let da = task::digest_of(&a).unwrap();
    let db = task::digest_of(&b).unwrap();
    let made = bundle::create(&BB, &[&c], Some(&key(1))).unwrap();
    let bundle = open_lenient(&made).unwrap();
    let miss = |d| MissingDependency { task: "c.v2".into(), digest: d };
    assert_eq!(bundle.missing_dependencies(&[]), vec![miss(da), miss(db)]);
    assert_eq!(bundle.missing_dependencies(&[db]), vec![miss(da)]);
    assert_eq!(bundle.missing_dependencies(&[da, db]), vec![]);
    // In the bundle counts as present.
    let with_b = bundle::create(&BB, &[&b, &c], None).unwrap();
    let b2 = open_lenient(&with_b).unwrap();
    assert_eq!(b2.missing_dependencies(&[]), vec![MissingDependency { task: "b".into(), digest: da }, miss(da)]);
}

#[test]
fn hostile_names_are_refused_by_name() {
    let long = "n".repeat(10_000);
    let cases: [(&str, NameError); 5] = [
        ("../x", NameError::BadChar { ch: '/' }),
        ("/etc/x", NameError::BadChar { ch: '/' }),
        ("a/b", NameError::BadChar { ch: '/' }),
        ("", NameError::Empty),
        (&long, NameError::TooLong { len: 10_000 }),
    ];
    let ok = file("ok", &[], 1);
    for (name, error) in cases {
        let f = file(name, &[], 1);
        let want = BundleError::BadName { name: name.into(), error };
        assert_eq!(bundle::create(&BB, &[&ok, &f], Some(&key(1))), Err(want.clone()), "{name:.20}");
        // Also when a forger writes it straight into a validly signed bundle.
        let raw = Raw::of(&[&ok, &f]).build(Some(&key(1)));
        assert_eq!(bundle::open(&raw, &[key(1).verifying_key()], false), Err(want.clone()), "{name:.20}");
        assert!(want.to_string().len() < 400, "messages stay short: {}", want);
    }
    // A manifest name that is not UTF-8.
    let mut raw = Raw::of(&[&ok]);
    raw.entries[0].name = vec![b'o', 0xff];
    assert!(matches!(
        open_lenient(&raw.build(None)),
        Err(BundleError::BadName { error: NameError::BadChar { .. }, .. })
    ));
}

#[test]
fn duplicates_are_refused() {
    let (a, _, _) = three();
    let da = task::digest_of(&a).unwrap();
    let want = BundleError::DuplicateTask { name: "a".into(), other: "a".into(), digest: da };
    assert_eq!(bundle::create(&BB, &[&a, &a], None), Err(want.clone()));
    assert_eq!(open_lenient(&Raw::of(&[&a, &a]).build(Some(&key(1)))), Err(want));
    let a2 = file("a", &[], 2);
    let want = BundleError::DuplicateName { name: "a".into() };
    assert_eq!(bundle::create(&BB, &[&a, &a2], None), Err(want.clone()));
    assert_eq!(open_lenient(&Raw::of(&[&a, &a2]).build(None)), Err(want));
}

#[test]
fn lengths_claiming_2_pow_40_bytes_and_other_limits() {
    let (a, b, _) = three();
    let base = Raw::of(&[&a, &b]);
    let big = 1u64 << 40;
    let mut r = base.clone();
    r.manifest_len = Some(big);
    assert_eq!(
        open_lenient(&r.build(Some(&key(1)))),
        Err(BundleError::TooLarge { field: "manifest length", value: big, max: bundle::MAX_BUNDLE_LEN })
    );
    let mut r = base.clone();
    r.tasks_len = Some(big);
    assert_eq!(
        open_lenient(&r.build(None)),
        Err(BundleError::TooLarge { field: "tasks length", value: big, max: bundle::MAX_BUNDLE_LEN })
    );
    // Within the limit but more than is there.
    let mut r = base.clone();
    r.tasks_len = Some(1 << 29);
    assert!(matches!(open_lenient(&r.build(None)), Err(BundleError::Truncated { .. })));
    // A manifest entry's file length, inside a validly signed bundle.
    let mut r = base.clone();
    r.entries[1].len = big;
    assert_eq!(
        open_lenient(&r.build(Some(&key(1)))),
        Err(BundleError::TooLarge { field: "task file length", value: big, max: bundle::MAX_TASK_FILE_LEN })
    );
    // Lengths that do not add up.
    let mut r = base.clone();
    r.entries[0].len -= 1;
    r.entries[1].len += 1;
    assert!(matches!(open_lenient(&r.build(None)), Err(BundleError::Task { .. })));
    let mut r = base.clone();
    r.entries[1].len += 1;
    assert!(matches!(open_lenient(&r.build(None)), Err(BundleError::Manifest { .. })));
    // Task counts.
    let mut r = base.clone();
    r.count = Some(u32::MAX);
    assert!(matches!(open_lenient(&r.build(None)), Err(BundleError::TooLarge { field: "task count", .. })));
    let mut r = base.clone();
    r.count = Some(3);
    assert!(matches!(open_lenient(&r.build(None)), Err(BundleError::Manifest { .. })));
    let mut r = base.clone();
    r.count = Some(0);
    assert_eq!(open_lenient(&r.build(None)), Err(BundleError::NoTasks));
    assert_eq!(bundle::create(&BB, &[], None), Err(BundleError::NoTasks));
    // A name length and a dependency count that run past the manifest.
    let mut m = Raw::of(&[&a, &b]).build(None);
    // Set b's dependency count (entry 2 starts after entry 1: 48 + 1 name byte) to 0xFFFF.
    let at = 64 + 49 + 46;
    m[at..at + 2].copy_from_slice(&u16::MAX.to_le_bytes());
    fix_trailer(&mut m);
    assert!(matches!(open_lenient(&m), Err(BundleError::Manifest { .. })), "{:?}", open_lenient(&m));
    let mut m = Raw::of(&[&a, &b]).build(None);
    let at = 64 + 44;
    m[at..at + 2].copy_from_slice(&u16::MAX.to_le_bytes());
    fix_trailer(&mut m);
    assert!(matches!(open_lenient(&m), Err(BundleError::Manifest { .. })));
}

#[test]
fn manifest_and_task_files_must_agree() {
    let (a, b, _) = three();
    let db = task::digest_of(&b).unwrap();
    type Change = Box<dyn Fn(&mut Raw)>;
    let cases: Vec<(Change, &str)> = vec![
        (Box::new(|r: &mut Raw| r.entries[0].version = 5), "version"),
        (Box::new(|r: &mut Raw| r.entries[0].name = b"z".to_vec()), "name"),
        (Box::new(|r: &mut Raw| r.entries[0].digest = [3; 32]), "digest"),
        (Box::new(move |r: &mut Raw| r.entries[0].deps = vec![db]), "dependency list"),
    ];
    for (change, field) in cases {
        let mut r = Raw::of(&[&a, &b]);
        change(&mut r);
        assert_eq!(
            open_lenient(&r.build(Some(&key(1)))),
            Err(BundleError::Mismatch { task: String::from_utf8(r.entries[0].name.clone()).unwrap(), field })
        );
    }
    let mut r = Raw::of(&[&a]);
    r.entries[0].version = 0;
    assert!(matches!(open_lenient(&r.build(None)), Err(BundleError::Manifest { .. })));
    // A corrupt embedded task file.
    let mut r = Raw::of(&[&a]);
    r.files[0][150] ^= 1;
    assert!(matches!(
        open_lenient(&r.build(Some(&key(1)))),
        Err(BundleError::Task { error: TaskError::Format(_), .. })
    ));
    // Not task files at all.
    assert!(matches!(bundle::create(&BB, &[b"hello"], None), Err(BundleError::Task { .. })));
}

// ---------------------------------------------------------------------------------------
// CLI

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(o)).expect("valid JSON")
}

/// A store by the on-disk contract: backbone.ecb and current/NAME.ect, with tasks a, b (on a)
/// and solo; returns the digests of a and b.
fn make_store(d: &Path) -> (Digest, Digest) {
    std::fs::create_dir_all(d.join("st/current")).unwrap();
    ok(&edgecl(d, &["init", "--arch", "lenet", "--seed", "3", "-o", "st/backbone.ecb"]));
    let bb = std::fs::read(d.join("st/backbone.ecb")).unwrap();
    let digest = edgecl::format::ecb::Header::parse(&bb).unwrap().digest;
    let a = task::encode(&sample("a", &[], 1), &digest);
    let da = task::digest_of(&a).unwrap();
    let b = task::encode(&sample("b", &[da], 1), &digest);
    let solo = task::encode(&sample("solo", &[], 4), &digest);
    for (n, f) in [("a", &a), ("b", &b), ("solo", &solo)] {
        std::fs::write(d.join(format!("st/current/{n}.ect")), f).unwrap();
    }
    (da, task::digest_of(&b).unwrap())
}

#[cfg(unix)]
#[test]
fn cli_keys_gen_is_private_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempdir("keys");
    let out = ok(&edgecl(&d, &["keys", "gen", "rel"]));
    assert!(out.contains("key id "), "{out}");
    let mode = |p: &str| std::fs::metadata(d.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("rel.key"), 0o600);
    assert_ne!(mode("rel.pub") & 0o400, 0, "the public key is readable");
    let secret = std::fs::read(d.join("rel.key")).unwrap();
    let public = std::fs::read(d.join("rel.pub")).unwrap();
    let s = edgecl::format::keys::decode_secret(&secret).unwrap();
    let p = edgecl::format::keys::decode_public(&public).unwrap();
    assert_eq!((s.key.verifying_key(), s.name.as_str()), (p.key, "rel"));
    assert!(out.contains(&p.id().to_string()), "{out}");
    // Never overwrites, and leaves both files as they were.
    fails(&edgecl(&d, &["keys", "gen", "rel"]), "refusing to overwrite");
    assert_eq!(std::fs::read(d.join("rel.key")).unwrap(), secret);
    std::fs::remove_file(d.join("rel.key")).unwrap();
    fails(&edgecl(&d, &["keys", "gen", "rel"]), "rel.pub exists");
    assert!(!d.join("rel.key").exists(), "no secret key written when the public one is in the way");
    // A new pair is a different key, written by --json too.
    let j = json(&edgecl(&d, &["keys", "gen", "other", "--json"]));
    assert_ne!(j["key_id"].as_str().unwrap(), p.id().to_string());
    assert_eq!(j["secret"], "other.key");
    fails(&edgecl(&d, &["keys", "gen", "bad name"]), "key name");
    // No temporary files left behind.
    let stray: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

#[test]
fn cli_bundle_create_inspect_and_trust() {
    let d = tempdir("create");
    let (da, db) = make_store(&d);
    ok(&edgecl(&d, &["keys", "gen", "rel"]));

    // b depends on a: a is included, and said so.
    let out = ok(&edgecl(&d, &["bundle", "create", "--store", "st", "--key", "rel.key", "b", "-o", "u.ecbundle"]));
    assert!(out.contains("including a v1: a dependency of b"), "{out}");
    let bytes = std::fs::read(d.join("u.ecbundle")).unwrap();
    let b = bundle::inspect(&bytes).unwrap();
    assert_eq!(b.tasks.iter().map(|t| t.digest).collect::<Vec<_>>(), vec![da, db]);
    assert_eq!(b.tasks[0].bytes, std::fs::read(d.join("st/current/a.ect")).unwrap());

    // --json of create.
    let j = json(&edgecl(
        &d,
        &["bundle", "create", "--store", "st", "--key", "rel.key", "solo", "b", "-o", "v.ecbundle", "--json"],
    ));
    for k in ["file", "bytes", "backbone", "signed", "key_id", "tasks"] {
        assert!(j.get(k).is_some(), "create --json lacks {k}: {j}");
    }
    let names: Vec<(&str, bool)> = j["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["included_as_dependency"].as_bool().unwrap()))
        .collect();
    assert_eq!(names, vec![("solo", false), ("a", true), ("b", false)]);
    assert_eq!(j["signed"], true);

    // inspect without a store.
    let out = ok(&edgecl(&d, &["bundle", "inspect", "u.ecbundle"]));
    assert!(out.contains("signature  valid, key") && out.contains("2 tasks"), "{out}");
    // With the store: the key is not trusted yet → refused, exit 1, JSON says why.
    let o = edgecl(&d, &["bundle", "inspect", "u.ecbundle", "--store", "st", "--json"]);
    assert!(!o.status.success());
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in ["file", "format_version", "bytes", "backbone", "signature", "tasks", "store"] {
        assert!(j.get(k).is_some(), "inspect --json lacks {k}: {j}");
    }
    for k in ["status", "key_id", "public_key", "trusted"] {
        assert!(j["signature"].get(k).is_some(), "signature lacks {k}");
    }
    for k in ["name", "version", "digest", "bytes", "depends_on", "store_version"] {
        assert!(j["tasks"][0].get(k).is_some(), "task lacks {k}");
    }
    assert_eq!((j["signature"]["status"].as_str(), j["signature"]["trusted"].as_bool()), (Some("valid"), Some(false)));
    assert_eq!(j["store"]["would_install"], false);
    assert!(j["store"]["refusals"][0].as_str().unwrap().contains("does not trust"), "{j}");

    // Trust it: now installable.
    let out = ok(&edgecl(&d, &["keys", "trust", "rel.pub", "--store", "st"]));
    assert!(out.contains("trusting key"), "{out}");
    assert!(d.join("st/keys/rel.pub").exists());
    assert!(ok(&edgecl(&d, &["keys", "trust", "rel.pub", "--store", "st"])).contains("already trusted"));
    let j = json(&edgecl(&d, &["bundle", "inspect", "u.ecbundle", "--store", "st", "--json"]));
    assert_eq!((j["signature"]["trusted"].as_bool(), j["store"]["would_install"].as_bool()), (Some(true), Some(true)));
    assert_eq!(j["store"]["backbone_matches"], true);
    assert_eq!(j["tasks"][1]["depends_on"][0].as_str().unwrap(), edgecl::format::Hex(&da).to_string());

    // Unsigned: refused by inspect --store unless allowed.
    ok(&edgecl(&d, &["bundle", "create", "--store", "st", "--unsigned", "solo", "-o", "n.ecbundle"]));
    fails(&edgecl(&d, &["bundle", "inspect", "n.ecbundle", "--store", "st"]), "unsigned");
    ok(&edgecl(&d, &["bundle", "inspect", "n.ecbundle", "--store", "st", "--allow-unsigned"]));
    fails(&edgecl(&d, &["bundle", "create", "--store", "st", "solo", "-o", "x.ecbundle"]), "--key");

    // Against a store without task a (another device): the missing dependency is named.
    let d2 = d.join("other");
    std::fs::create_dir_all(&d2).unwrap();
    make_store(&d2);
    std::fs::remove_file(d2.join("st/current/a.ect")).unwrap();
    std::fs::create_dir_all(d2.join("st/keys")).unwrap();
    std::fs::copy(d.join("rel.pub"), d2.join("st/keys/rel.pub")).unwrap();
    let only_b = bundle::create(&b.backbone, &[b.tasks[1].bytes], None).unwrap();
    std::fs::write(d2.join("b.ecbundle"), only_b).unwrap();
    let o = edgecl(&d2, &["bundle", "inspect", "b.ecbundle", "--store", "st", "--allow-unsigned", "--json"]);
    assert!(!o.status.success());
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["store"]["missing_dependencies"][0]["digest"].as_str().unwrap(), edgecl::format::Hex(&da).to_string());

    // Errors a user meets.
    fails(
        &edgecl(&d, &["bundle", "create", "--store", "st", "--unsigned", "nope", "-o", "x.ecbundle"]),
        "no task \"nope\"",
    );
    fails(&edgecl(&d, &["bundle", "create", "--store", "st", "--unsigned", "../a", "-o", "x.ecbundle"]), "task name");
    fails(
        &edgecl(&d, &["bundle", "create", "--store", "st", "--key", "rel.pub", "a", "-o", "x.ecbundle"]),
        "secret key",
    );
    fails(&edgecl(&d, &["bundle", "create", "--store", "st", "--unsigned", "a", "-o", "no/dir/x.ecbundle"]), "writing");
    assert!(!d.join("x.ecbundle").exists());
    let mut bad = bytes.clone();
    bad[100] ^= 1;
    std::fs::write(d.join("bad.ecbundle"), &bad).unwrap();
    fails(&edgecl(&d, &["bundle", "inspect", "bad.ecbundle"]), "checksum mismatch");
    fails(&edgecl(&d, &["bundle", "inspect", "st/current/a.ect"]), "not an edgecl bundle");
    let stray: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "temporary files left: {stray:?}");
}
