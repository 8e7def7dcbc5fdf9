use super::*;
use crate::adapter::{Components, Head, Mask, NormState, Quantized, Task};
use crate::rng::SplitMix64;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// The view as an owned task, to compare with postcard's decoding.
fn owned(v: &TaskView) -> Task {
    let vec = |f: F32s| f.iter().collect::<Vec<f32>>();
    let quantized =
        |q: QuantizedBytes| Quantized { scale: q.scale, steps: (0..q.len()).filter_map(|i| q.step(i)).collect() };
    Task {
        name: v.name.to_string(),
        labels: v.labels.iter().map(|s| s.to_string()).collect(),
        method: v.method,
        components: Components {
            masks: v.masks.iter().map(|m| Mask { len: m.len, words: m.words.iter().collect() }).collect(),
            overlay: v.overlay.iter().map(vec).collect(),
            reprogram: v.reprogram.iter().map(quantized).collect(),
            norms: v
                .norms
                .iter()
                .map(|n| NormState {
                    mean: vec(n.mean),
                    var: vec(n.var),
                    gamma: n.gamma.map(vec),
                    beta: n.beta.map(vec),
                })
                .collect(),
            shifts: v.shifts.iter().map(quantized).collect(),
            head: v.head.map(|h| Head {
                inputs: h.inputs,
                outputs: h.outputs,
                weight: vec(h.weight),
                bias: vec(h.bias),
            }),
            dense: v.dense.iter().map(vec).collect(),
        },
        depends_on: v.depends_on.iter().collect(),
        config: v.config.to_string(),
        metrics: v.metrics.iter().map(|(n, x)| (n.to_string(), x)).collect(),
        created_at: v.created_at,
        version: v.version,
        softmax: v.softmax,
    }
}

fn floats(r: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.uniform(-2.0, 2.0)).collect()
}

fn steps(r: &mut SplitMix64, n: usize) -> Quantized {
    Quantized { scale: r.uniform(0.0, 0.1), steps: (0..n).map(|_| r.below(256) as u8 as i8).collect() }
}

/// A task with every component present, odd lengths, large varints and non-ASCII text.
fn full_task(seed: u64) -> Task {
    let mut r = SplitMix64::new(seed);
    let words = |r: &mut SplitMix64, n: usize| (0..n).map(|i| (r.next_u64() >> (i % 33)) as u32).collect();
    Task {
        name: "tâche-1".into(),
        labels: ["a", "", "ß✓", "long label"].iter().map(|s| s.to_string()).collect(),
        method: Method::ALL[(seed % 5) as usize],
        components: Components {
            masks: alloc::vec![
                Mask { len: 70, words: words(&mut r, 3) },
                Mask { len: 0, words: Vec::new() },
                Mask { len: u64::MAX, words: words(&mut r, 40) },
            ],
            overlay: alloc::vec![floats(&mut r, 5), Vec::new(), floats(&mut r, 1)],
            reprogram: alloc::vec![steps(&mut r, 18)],
            norms: alloc::vec![
                NormState { mean: floats(&mut r, 3), var: floats(&mut r, 3), gamma: None, beta: None },
                NormState {
                    mean: floats(&mut r, 2),
                    var: floats(&mut r, 2),
                    gamma: Some(floats(&mut r, 2)),
                    beta: Some(Vec::new()),
                },
            ],
            shifts: alloc::vec![steps(&mut r, 4), steps(&mut r, 0)],
            head: Some(Head { inputs: 3, outputs: 300, weight: floats(&mut r, 9), bias: floats(&mut r, 3) }),
            dense: alloc::vec![floats(&mut r, 7)],
        },
        depends_on: alloc::vec![[7; 32], [0xff; 32]],
        config: "{\"epochs\": 3}".into(),
        metrics: alloc::vec![("train_accuracy".into(), 0.97), ("nan".into(), f64::NAN)],
        created_at: u64::MAX - 5,
        version: u32::MAX,
        softmax: Softmax::All,
    }
}

fn minimal_task() -> Task {
    Task {
        name: String::new(),
        labels: Vec::new(),
        method: Method::Linear,
        components: Components::default(),
        depends_on: Vec::new(),
        config: String::new(),
        metrics: Vec::new(),
        created_at: 0,
        version: 0,
        softmax: Softmax::Classes,
    }
}

/// postcard's verdict on a payload, as re-encoded bytes (bitwise equal even with NaNs).
fn postcard_decode(p: &[u8]) -> Option<Vec<u8>> {
    match postcard::take_from_bytes::<Task>(p) {
        Ok((t, [])) => Some(postcard::to_allocvec(&t).unwrap()),
        _ => None,
    }
}

fn view_decode(p: &[u8]) -> Option<Vec<u8>> {
    TaskView::parse(p).ok().map(|v| postcard::to_allocvec(&owned(&v)).unwrap())
}

#[test]
fn views_equal_the_alloc_decoder() {
    for t in (0..5).map(full_task).chain([minimal_task()]) {
        let p = postcard::to_allocvec(&t).unwrap();
        let v = TaskView::parse(&p).unwrap();
        assert_eq!(postcard::to_allocvec(&owned(&v)).unwrap(), p, "{}", t.method.name());
        assert_eq!(v.classes(), t.labels.len());
        if t.components.masks.is_empty() {
            continue; // the minimal task
        }
        assert_eq!(v.labels.get(2), t.labels.get(2).map(|s| s.as_str()));
        assert_eq!(v.labels.get(99), None);
        let r = v.reprogram.get(0).unwrap();
        let want = &t.components.reprogram[0];
        assert_eq!((r.scale, r.step(17)), (want.scale, Some(want.steps[17])));
        assert_eq!((r.step(18), r.step(usize::MAX)), (None, None));
        let mut k = [0f32; 18];
        assert!(r.decode_to(Base::Identity3x3, &mut k) && !r.decode_to(Base::Zero, &mut [0.0; 17]));
        assert_eq!(&k[..], &want.values(Base::Identity3x3)[..]);
        let m = v.masks.get(0).unwrap();
        let mut words = [0u32; 3];
        assert!(m.words.copy_to(&mut words));
        assert_eq!(&words[..], &t.components.masks[0].words[..]);
        assert!(!m.words.copy_to(&mut [0u32; 2]), "a short buffer is refused");
        let h = v.head.unwrap();
        let mut w = [0f32; 9];
        assert!(h.weight.copy_to(&mut w) && !h.weight.copy_to(&mut [0.0; 8]));
        assert_eq!(&w[..], &t.components.head.as_ref().unwrap().weight[..]);
    }
}

#[test]
fn every_truncation_is_an_error_that_names_a_field() {
    let p = postcard::to_allocvec(&full_task(2)).unwrap();
    for n in 0..p.len() {
        let e = TaskView::parse(&p[..n]).unwrap_err();
        assert_eq!(e.kind, PayloadErrorKind::Truncated, "cut at {n}: {e}");
        assert!(e.offset <= n, "cut at {n}: {e}");
    }
    let mut long = p.clone();
    long.push(0);
    let e = TaskView::parse(&long).unwrap_err();
    assert_eq!((e.kind, e.offset), (PayloadErrorKind::Trailing, p.len()));
}

/// Bit flips, byte overwrites and huge varints: the view accepts exactly what postcard
/// accepts, with the same values, and never panics.
#[test]
fn mutated_payloads_agree_with_postcard() {
    let mut r = SplitMix64::new(9);
    let (mut accepted, mut rejected) = (0, 0);
    for seed in 0..5 {
        let p = postcard::to_allocvec(&full_task(seed)).unwrap();
        for _ in 0..3000 {
            let mut b = p.clone();
            for _ in 0..1 + r.below(3) {
                let i = r.below(b.len());
                match r.below(4) {
                    0 => b[i] ^= 1 << r.below(8),
                    1 => b[i] = 0xff,
                    2 => b[i] = 0x80,
                    _ => b[i] = r.below(256) as u8,
                }
            }
            let want = postcard_decode(&b);
            assert_eq!(view_decode(&b), want, "seed {seed}: {:?}", TaskView::parse(&b).err());
            if want.is_some() {
                accepted += 1
            } else {
                rejected += 1
            }
        }
    }
    assert!(accepted > 100 && rejected > 100, "both outcomes exercised: {accepted} {rejected}");
}

#[test]
fn varint_limits_are_postcard_s() {
    let mut t = minimal_task();
    t.version = 7;
    let p = postcard::to_allocvec(&t).unwrap();
    // The last two bytes: `version` (7) and `softmax` (0).
    let last = p.len() - 2;
    assert_eq!(&p[last..], &[7, 0]);
    // version as 5-byte varints: top nibble allowed, the bit above it not.
    for (tail, ok) in [
        (&[0x87, 0x80, 0x80, 0x80, 0x0f][..], true),
        (&[0x87, 0x80, 0x80, 0x80, 0x10][..], false),
        (&[0x87, 0x80, 0x80, 0x80, 0x80, 0x00][..], false),
    ] {
        let mut b = p[..last].to_vec();
        b.extend_from_slice(tail);
        b.push(0);
        assert_eq!(postcard_decode(&b).is_some(), ok, "{tail:x?}");
        assert_eq!(view_decode(&b), postcard_decode(&b), "{tail:x?}");
    }
    // Enum indices beyond the variants, and a variant index as a long varint.
    for (at, byte, field) in [(p.len() - 1, 2u8, "softmax"), (p.len() - 1, 0xff, "softmax"), (2, 5, "method")] {
        let mut b = p.clone();
        b[at] = byte;
        if byte == 0xff {
            b.extend_from_slice(&[0xff, 0xff, 0xff, 0x0f]);
        }
        assert!(postcard_decode(&b).is_none());
        let e = TaskView::parse(&b).unwrap_err();
        assert_eq!((e.kind, e.field, e.offset), (PayloadErrorKind::BadVariant, field, at), "{e}");
    }
    let mut b = p.clone();
    b[p.len() - 1] = 1;
    assert_eq!(TaskView::parse(&b).unwrap().softmax, Softmax::All);
    assert_eq!(view_decode(&b), postcard_decode(&b));
    // A label count near u64::MAX is refused before anything is sliced.
    let mut b = alloc::vec![0u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
    b.extend_from_slice(&p[2..]);
    assert!(postcard_decode(&b).is_none());
    assert_eq!(TaskView::parse(&b).unwrap_err().kind, PayloadErrorKind::Truncated);
}

#[test]
fn open_checks_the_header_and_both_digests() {
    let bytes = crate::format::task::encode(&full_task(1), &[9; 32]);
    let f = open(&bytes).unwrap();
    assert_eq!(f.backbone, [9; 32]);
    assert_eq!(f.digest, sha256(f.payload));
    assert_eq!(TaskView::parse(f.payload).unwrap().name, "tâche-1");
    for n in 0..bytes.len() {
        assert!(open(&bytes[..n]).is_err(), "truncated to {n}");
    }
    let mut r = SplitMix64::new(3);
    for _ in 0..500 {
        let mut b = bytes.clone();
        let i = r.below(b.len());
        b[i] ^= 1 << r.below(8);
        assert!(open(&b).is_err(), "a flipped bit at {i} went unnoticed");
    }
}
