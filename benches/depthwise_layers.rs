//! Lite0's depthwise layers at 96×96, one at a time: the per-layer view of the CLR training
//! step's depthwise work (`train_step clr-lite0-96` gives the whole step).
//!
//! `cargo bench --bench depthwise_layers` times the backward of each of the 25 shapes one step
//! runs (the backbone's 16 depthwise convs and the stem need the input gradient only; each of
//! the 17 CLR kernels needs it and its kernel gradient), batch 16 (one call per sample, as
//! training makes them), one thread, best of `REPS` batches. It prints one line per shape (time
//! and multiply-adds per second) and the total weighted by how often Lite0 has each shape.
//! `-- --forward` times the forward kernel instead; `-- --shape I [--reps N]` one shape (e.g.
//! under `perf record`).

use edgecl::kernels::{depthwise, ConvShape, Kernels, PostOp, Store, Weights};
use std::time::Instant;

const BATCH: usize = 16;
const REPS: usize = 15;

/// Channels, input side, kernel, stride, whether the kernel gradient is needed (a CLR
/// kernel), and how many of the layer Lite0 has.
struct Layer {
    c: usize,
    side: usize,
    k: usize,
    stride: usize,
    clr: bool,
    count: usize,
}

const fn l(c: usize, side: usize, k: usize, stride: usize, clr: bool, count: usize) -> Layer {
    Layer { c, side, k, stride, clr, count }
}

/// In network order: the stem's CLR, then per MBConv block its depthwise conv and the CLR at
/// the depthwise conv's output size.
const LAYERS: [Layer; 25] = [
    l(32, 48, 3, 1, true, 1),
    l(32, 48, 3, 1, false, 1),
    l(32, 48, 3, 1, true, 1),
    l(96, 48, 3, 2, false, 1),
    l(96, 24, 3, 1, true, 1),
    l(144, 24, 3, 1, false, 1),
    l(144, 24, 3, 1, true, 1),
    l(144, 24, 5, 2, false, 1),
    l(144, 12, 3, 1, true, 1),
    l(240, 12, 5, 1, false, 1),
    l(240, 12, 3, 1, true, 1),
    l(240, 12, 3, 2, false, 1),
    l(240, 6, 3, 1, true, 1),
    l(480, 6, 3, 1, false, 2),
    l(480, 6, 3, 1, true, 2),
    l(480, 6, 5, 1, false, 1),
    l(480, 6, 3, 1, true, 1),
    l(672, 6, 5, 1, false, 2),
    l(672, 6, 3, 1, true, 2),
    l(672, 6, 5, 2, false, 1),
    l(672, 3, 3, 1, true, 1),
    l(1152, 3, 5, 1, false, 3),
    l(1152, 3, 3, 1, true, 3),
    l(1152, 3, 3, 1, false, 1),
    l(1152, 3, 3, 1, true, 1),
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1));
    let forward = args.iter().any(|a| a == "--forward");
    let only: Option<usize> = value("--shape").map(|v| v.parse().expect("--shape takes a layer index"));
    let reps: usize = value("--reps").map_or(REPS, |v| v.parse().expect("--reps takes a count"));
    let k = Kernels::detect();
    println!("{} kernels, {}, batch {BATCH}, best of {reps}", k.isa, if forward { "forward" } else { "backward" });
    let mut total = 0.0;
    for (i, layer) in LAYERS.iter().enumerate().filter(|(i, _)| only.is_none_or(|o| o == *i)) {
        let Layer { c, side, k: kk, stride, clr, count } = *layer;
        let p = (kk - 1) / 2;
        let s = ConvShape {
            c_in: c,
            h: side,
            w: side,
            c_out: c,
            kh: kk,
            kw: kk,
            sh: stride,
            sw: stride,
            pad: [p; 4],
            dh: 1,
            dw: 1,
            groups: c,
        };
        let (oh, ow) = s.out_hw().expect("the window fits");
        let x: Vec<f32> = (0..c * side * side).map(|i| (i % 7) as f32 * 0.1).collect();
        let dy: Vec<f32> = (0..c * oh * ow).map(|i| (i % 5) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..c * kk * kk).map(|i| (i % 3) as f32 * 0.1).collect();
        let (mut dx, mut dw, mut y) = (vec![0.0f32; x.len()], vec![0.0f32; w.len()], vec![0.0f32; dy.len()]);
        let mut scratch = vec![0.0f32; depthwise::backward_scratch_len(&s)];
        let (ones, zeros) = (vec![1.0f32; c], vec![0.0f32; c]);
        let post = PostOp { mul: &ones, add: &zeros, lo: f32::NEG_INFINITY, hi: f32::INFINITY };
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            for _ in 0..BATCH {
                if forward {
                    (k.depthwise)(&s, Weights::F32(&w), 0, &x, &mut y, &post);
                } else {
                    let dwk = clr.then_some(&mut dw[..]);
                    (k.depthwise_backward)(&s, &w, &x, &dy, Some((&mut dx, Store::Set)), dwk, &mut scratch);
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let passes = if clr && !forward { 2 } else { 1 };
        let macs = (c * oh * ow * kk * kk * BATCH * passes) as f64;
        total += best * count as f64;
        let what = if forward {
            ""
        } else if clr {
            " dx+dw"
        } else {
            " dx"
        };
        println!(
            "{i:2}: {c:4} ch {side:2}×{side:<2} {kk}×{kk} s{stride}{what:6} ×{count}  {:7.3} ms  {:5.1} G multiply-adds/s",
            best * 1e3,
            macs / best / 1e9
        );
    }
    println!("total (weighted by count): {:.2} ms", total * 1e3);
}
