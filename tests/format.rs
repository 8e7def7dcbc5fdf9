//! The `.ecb` file: round trips, hostile bytes, digests.

use edgecl::backbone::Backbone;
use edgecl::format::ecb::{EcbView, HEADER_LEN};
use edgecl::format::graph::{Op, WeightFormat};
use edgecl::format::FormatError;
use edgecl::import::init::{random_backbone, Arch};
use edgecl::import::{IrOp, IrWeights};

/// init → write → open gives the same graph and bit-identical weights, for every arch and
/// both weight formats; writing again gives the same bytes.
#[test]
fn round_trip_init_write_open() {
    for arch in Arch::ALL {
        for format in [WeightFormat::I8, WeightFormat::F32] {
            let ir = random_backbone(arch, 10, 42);
            let bytes = ir.emit(format);
            assert_eq!(bytes, ir.emit(format), "emit is deterministic");
            assert_eq!(bytes, random_backbone(arch, 10, 42).emit(format), "the seed regenerates the file");
            let bb = Backbone::open(&bytes).unwrap();
            bb.verify().unwrap();
            assert_eq!(bb.view().graph.provenance.seed, Some(42));
            assert_eq!(bb.layers().len(), ir.layers.len());
            for ((input, irop), l) in ir.layers.iter().zip(bb.layers()) {
                assert_eq!(*input, l.input);
                let (w, s) = match (&l.op, irop) {
                    (Op::Conv2d(c), IrOp::Conv { weight, .. }) => ((c.weight, c.scale), weight),
                    (Op::Linear(c), IrOp::Linear { weight, .. }) => ((c.weight, c.scale), weight),
                    (Op::BatchNorm(b), IrOp::BatchNorm { mean, var, affine, .. }) => {
                        assert_eq!(bb.view().f32s(b.mean), &mean[..]);
                        assert_eq!(bb.view().f32s(b.var), &var[..]);
                        assert_eq!(b.gamma.is_some(), affine.is_some());
                        continue;
                    }
                    (op, IrOp::Plain(p)) => {
                        assert_eq!(op, p);
                        continue;
                    }
                    (op, ir) => panic!("layer kinds differ: {op:?} vs {ir:?}"),
                };
                let IrWeights::I8 { q, scale } = s else { panic!("init makes int8 weights") };
                match format {
                    WeightFormat::I8 => {
                        assert_eq!(bb.view().i8s(w.0), &q[..]);
                        assert_eq!(bb.view().f32s(w.1.unwrap()), &scale[..]);
                    }
                    WeightFormat::F32 => {
                        let deq: Vec<f32> = edgecl::import::dequantize(q, scale);
                        assert_eq!(bb.view().f32s(w.0), &deq[..]);
                        assert!(w.1.is_none());
                    }
                }
            }
        }
    }
}

fn sample_file() -> Vec<u8> {
    // gemresnet18 has every tensor-carrying record kind (conv, linear, norm) plus add and pools.
    random_backbone(Arch::GemResnet18, 5, 1).emit(WeightFormat::I8)
}

/// Opening hostile bytes returns an error or a backbone, never panics; used with
/// `catch_unwind` so one failure names its input.
fn open_never_panics(bytes: &[u8], what: &str) -> Option<FormatError> {
    let r = std::panic::catch_unwind(|| Backbone::open(bytes).err());
    match r {
        Ok(e) => e,
        Err(_) => panic!("Backbone::open panicked on {what}"),
    }
}

#[test]
fn every_truncation_is_a_named_error() {
    let bytes = sample_file();
    // Copy into a fresh aligned buffer each time (a Vec<u64> backing store) so that alignment is
    // never the reason for a rejection.
    for cut in 0..bytes.len() {
        let e = open_never_panics(&bytes[..cut], &format!("truncation to {cut} bytes"));
        let e = e.unwrap_or_else(|| panic!("a file truncated to {cut} bytes opened"));
        assert!(matches!(e, FormatError::Truncated { .. } | FormatError::BadLayout { .. }), "cut {cut}: {e}");
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn random_mutations_never_panic_and_are_caught_by_verify() {
    let bytes = sample_file();
    let mut rng = edgecl::import::init::SplitMix64::new(99);
    let mut rejected_at_open = 0;
    for round in 0..2000 {
        let mut m = bytes.clone();
        let flips = 1 + (rng.next_u64() % 4) as usize;
        // Half the mutations hit the header and graph, where structure lives.
        let region = if round % 2 == 0 { 512.min(m.len()) } else { m.len() };
        for _ in 0..flips {
            let at = (rng.next_u64() as usize) % region;
            m[at] ^= 1 + (rng.next_u64() % 255) as u8;
        }
        match open_never_panics(&m, &format!("mutation round {round}")) {
            Some(_) => rejected_at_open += 1,
            None => {
                // Structure intact: the digest still catches the change, unless the flip only
                // touched the digest itself (then the recorded digest is what changed).
                let bb = Backbone::open(&m).unwrap();
                let mut scratch = vec![0.0; bb.scratch_len(&edgecl::kernels::Kernels::best_fast(), 1)];
                let x = vec![0.5; bb.input_shape().len()];
                // Forward on a structurally valid file never fails or panics.
                let _ = bb.forward(&edgecl::kernels::Kernels::best_fast(), &x, 1, &mut scratch);
                assert!(bb.verify().is_err(), "round {round}: a modified file verified");
            }
        }
    }
    assert!(rejected_at_open > 500, "most structural mutations are caught at open ({rejected_at_open})");
}

#[test]
fn bad_digest_names_both_digests() {
    let mut bytes = sample_file();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    let bb = Backbone::open(&bytes).unwrap();
    let e = bb.verify().unwrap_err();
    let FormatError::DigestMismatch { recorded, computed } = e else { panic!("{e}") };
    let msg = e.to_string();
    assert!(msg.contains(&edgecl::format::Hex(&recorded).to_string()));
    assert!(msg.contains(&edgecl::format::Hex(&computed).to_string()));
    assert_ne!(recorded, computed);
}

#[test]
fn header_fields_are_checked() {
    let good = sample_file();
    let cases: [(usize, u8, &str); 5] =
        [(0, b'X', "magic"), (8, 2, "version"), (10, 64, "header length"), (12, 1, "flags"), (100, 1, "reserved")];
    for (at, v, what) in cases {
        let mut b = good.clone();
        b[at] = v;
        assert!(EcbView::parse(&b).is_err(), "{what} not checked");
    }
    let mut extra = good.clone();
    extra.push(0);
    assert_eq!(EcbView::parse(&extra).unwrap_err(), FormatError::TrailingBytes { extra: 1 });
    assert!(good.len() > HEADER_LEN);
}

#[test]
fn misaligned_buffers_are_rejected_not_misread() {
    let good = sample_file();
    let mut shifted = vec![0u8; good.len() + 1];
    shifted[1..].copy_from_slice(&good);
    // Vec<u8> allocations are at least 8-aligned in practice, so offset 1 is misaligned.
    if !(shifted[1..].as_ptr() as usize).is_multiple_of(4) {
        assert_eq!(Backbone::open(&shifted[1..]).unwrap_err(), FormatError::BufferMisaligned);
    }
}

/// The task files committed for the firmware were written in format version 2 (before
/// `softmax`): they still decode, read as trained over their classes, keep the digest their
/// file records, and load through the allocation-free view the firmware uses.
#[test]
fn version_2_task_files_still_load() {
    use edgecl::adapter::Softmax;
    use edgecl::format::{sha256, task, task_view};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware/data");
    let bb_bytes = std::fs::read(dir.join("backbone.ecb")).unwrap();
    let bb = Backbone::open(&bb_bytes).unwrap();
    for name in ["clothes.ect", "shoes-bags.ect", "all10.ect"] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 2, "{name} is no longer a version 2 file");
        let f = task::decode(&bytes).unwrap();
        f.check_backbone(&bb.digest()).unwrap();
        assert_eq!(f.task.softmax, Softmax::Classes, "{name}");
        assert_eq!(f.digest, sha256(&bytes[task::HEADER_LEN..bytes.len() - task::TRAILER_LEN]), "{name}");
        let v = task_view::open(&bytes).unwrap();
        let view = v.task().unwrap();
        assert_eq!((v.version, view.softmax, view.name), (2, Softmax::Classes, f.task.name.as_str()));
        let need = edgecl::backbone::fixed::needs(&bb, &bytes).unwrap();
        let (mut words, mut floats) = (vec![0u32; need.words], vec![0f32; need.floats]);
        let fixed =
            edgecl::backbone::fixed::FixedTask::<16>::load(&bb, &bytes, &mut &mut words[..], &mut &mut floats[..]);
        assert_eq!(fixed.unwrap().digest, f.digest, "{name}");
    }
}
