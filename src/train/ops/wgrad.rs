//! Dense weight gradients of one-group convs, read in place from the input's stride phases
//! ([`Phases`]) rather than from an im2col copy: [`weight_grad`] with output channels in the
//! micro-kernel's lanes, and, where the table has the kernel (AVX-512), [`weight_grad_rows`]
//! with output positions in the lanes, for few channels on wide rows. Every score of a mask
//! needs its weight's gradient, so these are dense even when the forward product is sparse.

use super::conv::{for_each_chunk, sum_chunks, with_partials};
use super::sparse_conv::Phases;
use crate::kernels::gemm::MAX_TILE;
use crate::kernels::{ConvShape, Kernels, MicroKernel, TileEpilogue, WgradRows};

std::thread_local! {
    /// [`weight_grad`]'s sample phases and packed output gradient, kept between calls.
    static BUFS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Output planes smaller than this keep im2col for the weight gradient: [`weight_grad`]'s
/// products reduce over one sample's positions, and on a 4 × 4 plane (22 of them, 6 unused)
/// the micro-kernel's tile stores and the unused columns cost more than the unfolding saves.
pub(super) const WEIGHT_GRAD_MIN_PLANE: usize = 64;

/// Whether [`weight_grad`] takes `s` with micro-kernel rows `mr`: one group, at least `mr`
/// input channels (its row panels are `mr` channels of one tap, so fewer would leave most
/// rows unused), output planes of at least [`WEIGHT_GRAD_MIN_PLANE`] positions, and a
/// product row (the output row width `wq` of the phases) no longer than a channel's plane.
pub(super) fn weight_grad_supported(s: &ConvShape, mr: usize) -> bool {
    let ph = Phases::of_input(s);
    let p = s.oh() * s.ow();
    s.groups == 1 && s.c_in >= mr && p >= WEIGHT_GRAD_MIN_PLANE && (s.oh() - 1) * ph.wq + s.ow() <= ph.hq * ph.wq
}

/// `dw += ∂L/∂W` (`c_out × c_in·kh·kw`) of a one-group conv, with no unfolded input: per
/// sample, tap `(ky, kx)` of input channel `ci` reads, for output `(oy, ox)`, element
/// `oy·wq + ox` of one run of the input's phases ([`Phases`]), and the runs of channels
/// `ci, ci + 1, …` of one tap lie a phase plane apart. So `mr` channels of a tap are one
/// micro-kernel row panel at a constant stride, read in place, against the sample's output
/// gradient packed with the same column numbering (zero in the `wq − ow` unused columns of
/// each row): `dWᵀ[(tap, ci)][co] = Σ_j A[(tap, ci)][j] · dY[co][j]`. Samples are summed in
/// order within chunks of `nb`, chunks in order afterwards, so the result does not depend
/// on the thread count.
pub(super) fn weight_grad(k: &Kernels, s: &ConvShape, x: &[f32], dy: &[f32], batch: usize, nb: usize, dw: &mut [f32]) {
    debug_assert!(weight_grad_supported(s, k.micro.mr));
    let (oh, ow) = (s.oh(), s.ow());
    let (xl, yl) = (s.c_in * s.h * s.w, s.c_out * oh * ow);
    let (cin, cout, taps) = (s.c_in, s.c_out, s.kh * s.kw);
    let (mr, nr) = (k.micro.mr, k.micro.nr);
    let ph = Phases::of_input(s);
    let plane = ph.hq * ph.wq;
    // The reduction per sample: output row `oy` is columns `oy·wq ..`, of which `ow` are used.
    let nq = (oh - 1) * ph.wq + ow;
    // Where tap `t` of channel 0 reads for output (0, 0); channel `ci` is `ci · plane` on.
    let off: Vec<usize> = (0..taps).map(|t| ph.at(0, (t / s.kw) * s.dh, (t % s.kw) * s.dw)).collect();
    // The last row panel of a tap reads up to `mr − 1` channels past the last one: zeros.
    let xq_len = ph.len() + (mr - 1) * plane;
    let part_len = taps * cin * cout;
    let chunks = batch.div_ceil(nb);
    with_partials(chunks * part_len, |partial| {
        let ep = TileEpilogue::IDENTITY;
        let panels = panels(k, cout);
        let b_len: usize = panels.iter().map(|p| nq * p.micro.nr).sum();
        let work = 2 * batch * s.macs();
        for_each_chunk(batch, nb, work, None, 0, Some(&mut *partial), part_len, |_, b0, nbs, _, part| {
            let part = part.expect("the chunk's partial");
            part.fill(0.0);
            BUFS.with_borrow_mut(|(xq, bp)| {
                let mut tile = [0.0f32; MAX_TILE];
                let tile = &mut tile[..mr * nr];
                for b in b0..b0 + nbs {
                    ph.fill(&x[b * xl..(b + 1) * xl], s.h, s.w, s.pad[0], s.pad[1], xq);
                    xq.resize(xq_len, 0.0);
                    bp.resize(b_len, 0.0);
                    pack_dy(&dy[b * yl..(b + 1) * yl], (oh, ow, ph.wq), nq, &panels, bp);
                    for (t, &o) in off.iter().enumerate() {
                        for ci0 in (0..cin).step_by(mr) {
                            let m_eff = mr.min(cin - ci0);
                            let mut bq = &bp[..];
                            for p in &panels {
                                let pnr = p.micro.nr;
                                // A last row panel that a short kernel holds runs on the
                                // smallest that does, in one call: each call streams all of the
                                // B panel, and two 2-row calls for a tail of four took longer than
                                // one full 6-row one (GEMResNet18's 40 channels, AVX2).
                                let (micro, rows) = match p.short.iter().find(|sk| m_eff <= sk.mr) {
                                    Some(&sk) => (sk, sk.mr),
                                    None => (p.micro, mr),
                                };
                                for i0 in (0..m_eff).step_by(rows) {
                                    (micro.run)(nq, &xq[o + (ci0 + i0) * plane..], plane, bq, &ep, tile, pnr);
                                    for i in 0..rows.min(m_eff - i0) {
                                        let d = &mut part[(t * cin + ci0 + i0 + i) * cout + p.c0..][..p.n];
                                        for (d, &v) in d.iter_mut().zip(&tile[i * pnr..][..p.n]) {
                                            *d += v;
                                        }
                                    }
                                }
                                bq = &bq[nq * pnr..];
                            }
                        }
                    }
                }
            })
        });
        for (r, row) in sum_chunks(partial, part_len).chunks_exact(cout).enumerate() {
            let (t, ci) = (r / cin, r % cin);
            for (co, &v) in row.iter().enumerate() {
                dw[(co * cin + ci) * taps + t] += v;
            }
        }
    })
}

/// Whether [`weight_grad_rows`] takes `s` on `k`: the table has the kernel, and `s` is a
/// one-group 3 × 3 stride-1 conv whose output rows are at least [`ROWS_MIN_WIDTH`] wide.
pub(super) fn weight_grad_rows_supported(k: &Kernels, s: &ConvShape) -> bool {
    k.wgrad_rows.is_some()
        && s.groups == 1
        && s.sh == 1
        && s.sw == 1
        && s.kh == 3
        && s.kw == 3
        && s.ow() >= ROWS_MIN_WIDTH
}

/// Output rows narrower than this keep [`weight_grad`]. Measured in GEMResNet18's training
/// step (AVX-512, batch 64): 32 × 32 with 20 channels 9.6 → 5.6 ms at one thread, its
/// 3-channel stem 4.0 → 1.2 ms; 8 × 8 with 80, 6.5 → 9.4 ms. 16 × 16 with 40 channels gained
/// in the node and not in the step while the gradient rows were padded to the input's 18
/// columns; read in place (whole rows of 16), its three stride-1 convs' backward went
/// 25.8–25.9 → 23.9–24.3 ms per pass at one thread, 13.4 → 12.6 ms at two.
pub(super) const ROWS_MIN_WIDTH: usize = 16;

/// Samples per chunk of [`weight_grad_rows`].
const ROWS_CHUNK: usize = 8;

/// Bytes of output gradient rows that [`weight_grad_rows`] keeps in L1 while it goes through
/// the input channels: the two channels' planes of as many samples as fit are one pass.
const ROWS_L1_BYTES: usize = 24 << 10;

/// [`weight_grad_rows`]'s buffers: a chunk's input phases, and the per-lane sums kept between
/// passes.
#[derive(Default)]
struct RowsBufs {
    xs: Vec<f32>,
    sums: Vec<[[f32; 16]; 18]>,
}

std::thread_local! {
    static ROWS_BUFS: std::cell::RefCell<RowsBufs> = std::cell::RefCell::new(RowsBufs::default());
}

/// `dw += ∂L/∂W` of a one-group 3 × 3 stride-1 conv with the output positions in the lanes
/// ([`crate::kernels::WgradRowsFn`]): `dW[co][ci][t] = Σ xq[ci][off_t + oy·wq + ox] ·
/// dy[co][oy·ow + ox]` over the output positions, with `xq` the sample's padded input
/// ([`Phases`], rows `wq` apart) and `dy` read in place. Per chunk of [`ROWS_CHUNK`] samples,
/// each (output channel pair, input channel) keeps 18 vectors of per-lane sums over the
/// chunk's samples in order, then sums their lanes in order; chunks are summed in order
/// afterwards, so the result does not depend on the thread count. The samples go in passes
/// whose output gradient planes stay in L1 while the input channels stream past them.
pub(super) fn weight_grad_rows(k: &Kernels, s: &ConvShape, x: &[f32], dy: &[f32], batch: usize, dw: &mut [f32]) {
    debug_assert!(weight_grad_rows_supported(k, s));
    let kern = k.wgrad_rows.expect("a table with the kernel");
    let (oh, ow) = (s.oh(), s.ow());
    let (cin, cout) = (s.c_in, s.c_out);
    let (xl, yl) = (cin * s.h * s.w, cout * oh * ow);
    let ph = Phases::of_input(s);
    let (wq, plane) = (ph.wq, ph.hq * ph.wq);
    let rows = WgradRows { rows: oh, width: ow, x_row: wq, d_row: ow };
    let off: [usize; 9] = core::array::from_fn(|t| ph.at(0, (t / 3) * s.dh, (t % 3) * s.dw));
    // The last channel's taps read up to `(kw − 1)·dw + 15` floats past its plane: zeros.
    let xs_len = cin * plane + 2 * s.dw + 16;
    let per_pass = (ROWS_L1_BYTES / (2 * 4 * oh * ow)).max(1);
    let part_len = cout * cin * 9;
    let nb = ROWS_CHUNK;
    let chunks = batch.div_ceil(nb);
    with_partials(chunks * part_len, |partial| {
        let work = 2 * batch * s.macs();
        for_each_chunk(batch, nb, work, None, 0, Some(&mut *partial), part_len, |_, b0, nbs, _, part| {
            let part = part.expect("the chunk's partial");
            ROWS_BUFS.with_borrow_mut(|RowsBufs { xs, sums }| {
                xs.resize(nbs * xs_len, 0.0);
                for b in 0..nbs {
                    let xb = &mut xs[b * xs_len..(b + 1) * xs_len];
                    ph.fill_slice(&x[(b0 + b) * xl..][..xl], s.h, s.w, s.pad[0], s.pad[1], xb);
                    xb[ph.len()..].fill(0.0);
                }
                let pairs = cout.div_ceil(2);
                sums.clear();
                sums.resize(pairs * cin, [[0.0; 16]; 18]);
                for p0 in (0..nbs).step_by(per_pass) {
                    let last = p0 + per_pass >= nbs;
                    for pair in 0..pairs {
                        // An odd last channel is paired with itself; the second half is dropped.
                        let (co0, co1) = (2 * pair, (2 * pair + 1).min(cout - 1));
                        for ci in 0..cin {
                            let acc = &mut sums[pair * cin + ci];
                            let n = (p0 + per_pass).min(nbs) - p0;
                            let xb = &xs[p0 * xs_len + ci * plane..];
                            let d = |co: usize| &dy[(b0 + p0) * yl + co * oh * ow..];
                            kern(rows, n, xb, xs_len, &off, [d(co0), d(co1)], yl, acc);
                            if last {
                                for (h, co) in [co0, co1].into_iter().enumerate().take(1 + (co1 > co0) as usize) {
                                    let row = &mut part[(co * cin + ci) * 9..][..9];
                                    for (d, lanes) in row.iter_mut().zip(&acc[9 * h..9 * h + 9]) {
                                        *d = lanes.iter().fold(0.0, |a, &v| a + v);
                                    }
                                }
                            }
                        }
                    }
                }
            })
        });
        for (d, &v) in dw.iter_mut().zip(sum_chunks(partial, part_len)) {
            *d += v;
        }
    })
}

/// One B panel of [`weight_grad`]: output channels `c0 .. c0 + n`, in `micro.nr` lanes; and
/// the table's short kernels of the same width, fewest rows first.
struct Panel {
    micro: MicroKernel,
    short: Vec<MicroKernel>,
    c0: usize,
    n: usize,
}

/// `c` output channels as B panels: full panels of the table's micro-kernel, and a last
/// partial one of its narrow twin where that holds it.
fn panels(k: &Kernels, c: usize) -> Vec<Panel> {
    let nr = k.micro.nr;
    (0..c)
        .step_by(nr)
        .map(|c0| {
            let n = nr.min(c - c0);
            let micro = match k.micro_narrow {
                Some(m) if n <= m.nr && m.mr == k.micro.mr => m,
                _ => k.micro,
            };
            let short = k.micro_short.iter().filter(|s| s.nr == micro.nr).copied().collect();
            Panel { micro, short, c0, n }
        })
        .collect()
}

/// Packs one sample's output gradient (`c × oh × ow`) as [`weight_grad`]'s B operand: row
/// `oy·wq + ox` of `nq`, column `co`, panel after panel (`[nq][lanes]` each); the rows of
/// unused columns (`ox ≥ ow`) and the lanes past a panel's channels are zero.
fn pack_dy(dy: &[f32], (oh, ow, wq): (usize, usize, usize), nq: usize, panels: &[Panel], bp: &mut [f32]) {
    let mut rest = bp;
    for p in panels {
        let (nr, c0, w) = (p.micro.nr, p.c0, p.n);
        let (panel, tail) = rest.split_at_mut(nq * nr);
        rest = tail;
        if w < nr {
            panel.fill(0.0);
        } else {
            for oy in 0..oh - 1 {
                panel[(oy * wq + ow) * nr..(oy + 1) * wq * nr].fill(0.0);
            }
        }
        for lane in 0..w {
            let src = &dy[(c0 + lane) * oh * ow..][..oh * ow];
            for (oy, row) in src.chunks_exact(ow).enumerate() {
                let dst = &mut panel[oy * wq * nr + lane..];
                for (ox, &v) in row.iter().enumerate() {
                    dst[ox * nr] = v;
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use crate::train::ops::tests::rand;

    /// `dW[co][ci][ky][kx] = Σ_b,oy,ox dy[b][co][oy][ox] · x[b][ci][oy·sh + ky·dh − pad][…]`,
    /// in f64.
    pub(in crate::train::ops) fn naive_dw(s: &ConvShape, x: &[f32], dy: &[f32], batch: usize) -> Vec<f64> {
        let (oh, ow) = (s.oh(), s.ow());
        let mut dw = vec![0.0f64; s.c_out * s.c_in * s.kh * s.kw];
        for b in 0..batch {
            for co in 0..s.c_out {
                for ci in 0..s.c_in {
                    for ky in 0..s.kh {
                        for kx in 0..s.kw {
                            let mut acc = 0.0f64;
                            for oy in 0..oh {
                                for ox in 0..ow {
                                    let iy = (oy * s.sh + ky * s.dh) as isize - s.pad[0] as isize;
                                    let ix = (ox * s.sw + kx * s.dw) as isize - s.pad[1] as isize;
                                    if iy < 0 || ix < 0 || iy as usize >= s.h || ix as usize >= s.w {
                                        continue;
                                    }
                                    let xv = x[((b * s.c_in + ci) * s.h + iy as usize) * s.w + ix as usize];
                                    acc += xv as f64 * dy[((b * s.c_out + co) * oh + oy) * ow + ox] as f64;
                                }
                            }
                            dw[((co * s.c_in + ci) * s.kh + ky) * s.kw + kx] += acc;
                        }
                    }
                }
            }
        }
        dw
    }

    #[test]
    fn the_direct_weight_gradient_matches_the_definition_on_every_table_and_thread_count() {
        let shape = |c_in, side, c_out, k, stride, pad| ConvShape::square(c_in, side, side, c_out, k, stride, pad);
        let shapes = [
            // Channels not a multiple of the row panel, outputs not a multiple of the lanes.
            shape(7, 9, 17, 3, 1, 1),
            shape(8, 17, 20, 3, 2, 1),
            shape(13, 10, 5, 5, 1, 2),
            shape(20, 12, 20, 3, 1, 1),
            // Phases no tap reads: one of four for a 1 × 1 stride-2 conv, and for a dilation
            // equal to the stride.
            shape(8, 17, 12, 1, 2, 1),
            ConvShape { dh: 2, dw: 2, sh: 2, sw: 2, pad: [2; 4], ..shape(6, 20, 7, 3, 1, 0) },
            shape(6, 25, 9, 3, 3, 0),
            shape(9, 8, 33, 1, 1, 0),
            ConvShape { dh: 2, dw: 2, pad: [2; 4], ..shape(6, 10, 7, 3, 1, 0) },
            ConvShape { pad: [0, 1, 2, 0], h: 11, ..shape(8, 9, 6, 3, 1, 0) },
            ConvShape { pad: [3, 1, 2, 2], sh: 2, h: 19, ..shape(6, 16, 4, 3, 1, 0) },
        ];
        let mut r = SplitMix64::new(21);
        let mut runs = 0;
        let mut tables = vec![Kernels::generic(true)];
        tables.extend(Kernels::available());
        for s in shapes {
            let batch = 5;
            let x = rand(&mut r, batch * s.c_in * s.h * s.w);
            let dy = rand(&mut r, batch * s.c_out * s.oh() * s.ow());
            let want = naive_dw(&s, &x, &dy, batch);
            for k in &tables {
                if !weight_grad_supported(&s, k.micro.mr) {
                    // Row panels taller than the channels (NEON's 8, AVX-512's 12 rows).
                    assert!(s.c_in < k.micro.mr, "{s:?} on {}", k.micro.name);
                    continue;
                }
                runs += 1;
                if s.c_out == 17 {
                    // 16 + 1 (or 8 + 8 + 1) channels: the last panel is the narrow kernel's.
                    let last = &panels(k, 17)[17 / k.micro.nr];
                    assert_eq!((last.c0, last.n), (17 / k.micro.nr * k.micro.nr, 1));
                    assert_eq!(last.micro.nr, k.micro_narrow.map_or(k.micro.nr, |m| m.nr));
                }
                let mut bits: Option<Vec<f32>> = None;
                for (threads, nb) in [(1, 2), (2, 2), (2, 1)] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    // Added onto what the buffer holds.
                    let mut dw = vec![1.0f32; want.len()];
                    pool.broadcast(|_| {
                        BUFS.with_borrow_mut(|(a, b)| {
                            for v in [a, b] {
                                v.clear();
                                v.resize(1 << 20, f32::NAN);
                            }
                        })
                    });
                    pool.install(|| weight_grad(k, &s, &x, &dy, batch, nb, &mut dw));
                    for (i, (&g, &w)) in dw.iter().zip(&want).enumerate() {
                        let w = w + 1.0;
                        assert!(
                            (g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{s:?} {} [{i}]: {g} vs {w}",
                            k.micro.name
                        );
                    }
                    if nb == 2 {
                        match &bits {
                            None => bits = Some(dw),
                            Some(b) => assert_eq!(b, &dw, "{s:?}: the thread count changes no bit"),
                        }
                    }
                }
            }
        }
        assert!(runs >= shapes.len(), "every shape ran on the generic table at least");
        // Too few channels or positions: im2col's path.
        let k = Kernels::generic(true);
        assert!(!weight_grad_supported(&shape(3, 16, 8, 3, 1, 1), k.micro.mr));
        assert!(!weight_grad_supported(&shape(8, 6, 8, 3, 1, 1), k.micro.mr));
    }

    #[test]
    fn the_weight_gradient_with_positions_in_lanes_matches_the_definition() {
        let shape = |c_in, side, c_out, pad| ConvShape::square(c_in, side, side, c_out, 3, 1, pad);
        let shapes = [
            // An odd output channel count (the last pair is one channel), few input channels.
            ConvShape { h: 5, ..shape(3, 32, 7, 1) },
            shape(4, 33, 2, 1),
            // Dilation, uneven padding, no padding.
            ConvShape { dh: 2, dw: 2, h: 9, ..shape(5, 34, 4, 2) },
            ConvShape { pad: [0, 1, 2, 0], h: 7, ..shape(3, 33, 5, 0) },
            ConvShape { h: 6, ..shape(2, 36, 3, 0) },
            // The narrowest rows it takes.
            ConvShape { h: 5, ..shape(4, ROWS_MIN_WIDTH, 6, 1) },
        ];
        let mut r = SplitMix64::new(23);
        let mut runs = 0;
        for k in Kernels::available() {
            for s in shapes {
                assert!(s.ow() >= ROWS_MIN_WIDTH, "{s:?}");
                if !weight_grad_rows_supported(&k, &s) {
                    continue;
                }
                runs += 1;
                // Chunks of 8 samples and a short last one.
                let batch = 11;
                let x = rand(&mut r, batch * s.c_in * s.h * s.w);
                let dy = rand(&mut r, batch * s.c_out * s.oh() * s.ow());
                let want = naive_dw(&s, &x, &dy, batch);
                let mut bits: Option<Vec<f32>> = None;
                for threads in [1, 2] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    pool.broadcast(|_| {
                        ROWS_BUFS.with_borrow_mut(|RowsBufs { xs, .. }| {
                            xs.clear();
                            xs.resize(1 << 16, f32::NAN);
                        })
                    });
                    // Added onto what the buffer holds.
                    let mut dw = vec![1.0f32; want.len()];
                    pool.install(|| weight_grad_rows(&k, &s, &x, &dy, batch, &mut dw));
                    for (i, (&g, &w)) in dw.iter().zip(&want).enumerate() {
                        let w = w + 1.0;
                        assert!((g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "{s:?} [{i}]: {g} vs {w}");
                    }
                    match &bits {
                        None => bits = Some(dw),
                        Some(b) => assert_eq!(b, &dw, "{s:?}: the thread count changes no bit"),
                    }
                }
            }
        }
        // Every table with the kernel took every shape.
        let with = Kernels::available().iter().filter(|k| k.wgrad_rows.is_some()).count();
        assert_eq!(runs, with * shapes.len());
    }
}
