//! The dense weight gradient of a 3 × 3, stride-1, padding-1 conv by Winograd's minimal
//! filtering F(2 × 2, 3 × 3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural
//! Networks", 2016), taken through its transpose: the forward tile `y = Aᵀ[(G w Gᵀ) ⊙ (Bᵀ d B)]A`
//! gives `∂L/∂w = Gᵀ [Σ (A dy Aᵀ) ⊙ (Bᵀ d B)] G`, the sum over every 2 × 2 output tile `dy` and
//! its 4 × 4 input tile `d` of every sample. The sum is 16 products, one per element `ξ` of the
//! 4 × 4 transformed tile: `M_ξ[ci][co] = Σ_tiles V_ξ[ci][tile] · P_ξ[co][tile]`, each a GEMM
//! through the kernel table. They take 16 multiply-adds per tile and channel pair where the
//! direct gradient takes 36 (4 outputs × 9 taps): 2.25 times fewer, for the transforms' adds.
//!
//! The transformed values are sums and differences of inputs (and `G` halves them), so the
//! result rounds differently from the direct sum; the tests hold it to the definition with the
//! tolerance they give the direct paths.
//!
//! The work is split by what it writes, never by samples: the input transform by input
//! channel, the gradient transform by panel of output channels, the products by `ξ`, the
//! output transform by 16 output channels. Every sum over tiles is one micro-kernel sum over a
//! group's tiles, and groups (fixed by the shape and the batch) add in order, so any thread
//! count gives the same bits, with no per-thread partials to add. Splitting the batch instead
//! left two chunks for two threads on GEMResNet18's last stages: in its training step, one
//! thread often ran both, or waited for the other (at two threads, 2.6 ms for 80 channels and
//! 3.0 ms for 160, against 2.1–2.3 and 2.0 ms timed alone).

use super::conv::for_each_job;
use crate::kernels::for_each_chunk;
use crate::kernels::matmul::{gemm_cols, pack_bt_cols, Cols};
use crate::kernels::{ConvShape, Kernels};

/// Whether [`weight_grad`] can take `s`: one group, 3 × 3, stride 1, no dilation, padding 1
/// on every side (so the output is the input's size), and an even output.
pub(super) fn supported(s: &ConvShape) -> bool {
    s.groups == 1
        && (s.kh, s.kw, s.sh, s.sw, s.dh, s.dw) == (3, 3, 1, 1, 1, 1)
        && s.pad == [1; 4]
        && s.h.is_multiple_of(2)
        && s.w.is_multiple_of(2)
        && s.h >= 2
        && s.w >= 2
}

/// Whether [`weight_grad`] is the faster path for `s` ([`supported`]): small planes of many
/// channels. Its transforms write four floats per input and gradient value, and its products
/// are `c_in × c_out`; on wide planes of few channels the direct paths win. Measured on
/// GEMResNet18's convs (AVX-512, one thread, batch 64; direct against transforms + products):
/// 160 channels on 4 × 4, 5.5 against 2.8 ms; 80 on 8 × 8, 6.1 against 3.9 ms; 40 on 16 ×
/// 16, 5.8 against 7.6 ms (6.3 against 6.6 ms with the work split as it is now); 20 on 32 ×
/// 32, 5.6 against 23 ms.
pub(super) fn preferred(s: &ConvShape) -> bool {
    supported(s) && s.h * s.w <= 64 && s.c_in >= 32 && s.c_out >= 32
}

/// Tiles per group of samples, at most: a group's transformed input and gradient are `16 ·
/// (c_in + c_out)` floats per tile, 5 MB for GEMResNet18's 80 channels on 8 × 8, whose batch of
/// 64 makes two groups. Measured in its training step (80 channels, batch 64, AVX-512): one
/// group of 1024 tiles took 4.2 ms at one thread against 3.6–3.8 ms for 512 or 256; at two
/// threads 512 was best (2.3–2.5 ms), and 128 slower at both (4.2 and 3.0 ms).
const GROUP_TILES: usize = 512;

/// Samples per group: at most [`GROUP_TILES`] tiles' worth, at least one. A function of the
/// shape and batch only, never of the threads.
fn group_samples(tiles: usize, batch: usize) -> usize {
    (GROUP_TILES / tiles).clamp(1, batch.max(1))
}

/// [`weight_grad`]'s buffers, kept between calls on the calling thread.
#[derive(Default)]
struct Bufs {
    /// `V`: `[ci][ξ][tile · nb + b]`, so that `V_ξ` is `c_in` rows at stride `16 · kc`.
    v: Vec<f32>,
    /// `P`, packed as the products' B operands: `[ξ][panel][tile · nb + b][lane]`.
    p: Vec<f32>,
    /// `M`: `[ξ][ci][co]`, the sums over every group.
    m: Vec<f32>,
}

std::thread_local! {
    static BUFS: std::cell::RefCell<Bufs> = std::cell::RefCell::new(Bufs::default());
    /// A worker's regrouping buffer: a channel with samples in lanes, or a sample's panel of
    /// gradient channels with channels in lanes.
    static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One job of the transforms: an input channel's, or a panel of output channels'.
enum Transform<'a> {
    Input(usize, &'a mut [f32]),
    Gradient(usize, Vec<&'a mut [f32]>),
}

/// `dw += ∂L/∂W` (`c_out × c_in × 3 × 3`) of the conv `s` ([`supported`]) over `batch` samples
/// of its input `x` and output gradient `dy`.
pub(super) fn weight_grad(k: &Kernels, s: &ConvShape, x: &[f32], dy: &[f32], batch: usize, dw: &mut [f32]) {
    debug_assert!(supported(s));
    let (h, w, cin, cout) = (s.h, s.w, s.c_in, s.c_out);
    let tiles = (h / 2) * (w / 2);
    let nb = group_samples(tiles, batch);
    let nr = k.micro.nr;
    let panels = cout.div_ceil(nr);
    let (xl, yl) = (cin * h * w, cout * h * w);
    // Multiply-adds of the products per sample: what decides whether threads are worth it.
    let work = 16 * tiles * cin * cout;
    // Taken out for the call rather than borrowed: the products wait on the pool, and a pool
    // thread that waits may run another task that calls this (with a fresh set of its own).
    let mut bufs = BUFS.take();
    {
        let Bufs { v, p, m } = &mut bufs;
        m.resize(16 * cin * cout, 0.0);
        for (g, b0) in (0..batch).step_by(nb).enumerate() {
            let nbs = nb.min(batch - b0);
            let kc = nbs * tiles;
            v.resize(cin * 16 * kc, 0.0);
            let p_len = panels * kc * nr;
            p.resize(16 * p_len, 0.0);
            let (xg, dyg) = (&x[b0 * xl..][..nbs * xl], &dy[b0 * yl..][..nbs * yl]);
            // A panel's gradient job writes its piece of each of the 16 products' operands.
            let mut by_panel: Vec<Vec<&mut [f32]>> = (0..panels).map(|_| Vec::with_capacity(16)).collect();
            for pxi in p.chunks_exact_mut(p_len) {
                for (q, piece) in pxi.chunks_exact_mut(kc * nr).enumerate() {
                    by_panel[q].push(piece);
                }
            }
            let mut jobs: Vec<Transform> =
                by_panel.into_iter().enumerate().map(|(q, p)| Transform::Gradient(q, p)).collect();
            jobs.extend(v.chunks_exact_mut(16 * kc).enumerate().map(|(ci, v)| Transform::Input(ci, v)));
            for_each_job(jobs, nbs * work, |job| {
                ROW.with_borrow_mut(|row| match job {
                    Transform::Input(ci, v) => input_tiles(xg, (ci, cin), (h, w), nbs, v, row),
                    Transform::Gradient(q, mut p) => {
                        let c0 = q * nr;
                        gradient_tiles(dyg, (c0, nr.min(cout - c0), cout), (h, w), nbs, nr, &mut p, row)
                    }
                })
            });
            // M_ξ (+)= V_ξ · P_ξ (c_in × c_out) over the group.
            let (v, p) = (&v[..], &p[..]);
            for_each_chunk(m, cin * cout, nbs * work, |xi, out| {
                let bp = &p[xi * p_len..][..p_len];
                gemm_cols(k, cin, cout, kc, &v[xi * kc..], 16 * kc, bp, out, Cols::plain(cout, cout), None, g > 0);
            });
        }
        // dW = Gᵀ M G per channel pair, for 16 output channels at once (consecutive rows of
        // dW), one in each lane; on the threads when the products were.
        let m = &m[..];
        for_each_chunk(&mut dw[..cout * cin * 9], 16 * cin * 9, batch * work, |q, rows| {
            let (c0, n) = (q * 16, rows.len() / (cin * 9));
            for ci in 0..cin {
                let mut mx = [[0.0f32; 16]; 16];
                for (xi, lanes) in mx.iter_mut().enumerate() {
                    lanes[..n].copy_from_slice(&m[(xi * cin + ci) * cout + c0..][..n]);
                }
                let g = output_transform(&mx);
                for (lane, d) in rows.chunks_exact_mut(cin * 9).enumerate() {
                    for (t, d) in d[ci * 9..][..9].iter_mut().enumerate() {
                        *d += g[t][lane];
                    }
                }
            }
        });
    }
    BUFS.set(bufs);
}

/// `Bᵀ d B` of every 4 × 4 tile of input channel `ci` of `c` in a group of `nb` samples
/// (`[b][c][h][w]`, padded by 1) into `v` (`[ξ][kc]`, column `tile · nb + b`): input tile `(ty,
/// tx)` is rows `2ty − 1 ..= 2ty + 2`, columns `2tx − 1 ..= 2tx + 2`. The channel is first
/// regrouped with its samples in lanes (`[padded position][nb]`, zeros around), so that each
/// tile is a few vector operations whatever the plane's size: with `B`'s rows `(1, 0, −1, 0),
/// (0, 1, 1, 0), (0, −1, 1, 0), (0, 1, 0, −1)`, a row `(d₀, d₁, d₂, d₃)` becomes `(d₀ − d₂, d₁ +
/// d₂, d₂ − d₁, d₁ − d₃)`, and the four transformed rows of a tile likewise down its columns.
fn input_tiles(
    x: &[f32],
    (ci, c): (usize, usize),
    (h, w): (usize, usize),
    nb: usize,
    v: &mut [f32],
    buf: &mut Vec<f32>,
) {
    let (th, tw) = (h / 2, w / 2);
    let (hp, wp) = (h + 2, w + 2);
    let kc = th * tw * nb;
    buf.resize(hp * wp * nb + 16 * nb, 0.0);
    let (xc, t) = buf.split_at_mut(hp * wp * nb);
    xc[..wp * nb].fill(0.0);
    xc[(hp - 1) * wp * nb..].fill(0.0);
    for iy in 0..h {
        let r = &mut xc[(iy + 1) * wp * nb..][..wp * nb];
        r[..nb].fill(0.0);
        r[(wp - 1) * nb..].fill(0.0);
        for b in 0..nb {
            let src = &x[((b * c + ci) * h + iy) * w..][..w];
            for (d, &u) in r[nb + b..].iter_mut().step_by(nb).zip(src) {
                *d = u;
            }
        }
    }
    for ty in 0..th {
        for tx in 0..tw {
            // t[r][v]: row r of the tile through B.
            for r in 0..4 {
                let d = |cc: usize| &xc[((2 * ty + r) * wp + 2 * tx + cc) * nb..][..nb];
                let (d0, d1, d2, d3) = (d(0), d(1), d(2), d(3));
                let tr = &mut t[r * 4 * nb..][..4 * nb];
                let (t0, rest) = tr.split_at_mut(nb);
                let (t1, rest) = rest.split_at_mut(nb);
                let (t2, t3) = rest.split_at_mut(nb);
                for l in 0..nb {
                    t0[l] = d0[l] - d2[l];
                    t1[l] = d1[l] + d2[l];
                    t2[l] = d2[l] - d1[l];
                    t3[l] = d1[l] - d3[l];
                }
            }
            let at = (ty * tw + tx) * nb;
            for vv in 0..4 {
                let r = |i: usize| &t[(i * 4 + vv) * nb..][..nb];
                let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
                let o = |u: usize| (u * 4 + vv) * kc + at;
                for ((d, &a), &c) in v[o(0)..][..nb].iter_mut().zip(r0).zip(r2) {
                    *d = a - c;
                }
                for ((d, &b), &c) in v[o(1)..][..nb].iter_mut().zip(r1).zip(r2) {
                    *d = b + c;
                }
                for ((d, &b), &c) in v[o(2)..][..nb].iter_mut().zip(r1).zip(r2) {
                    *d = c - b;
                }
                for ((d, &b), &e) in v[o(3)..][..nb].iter_mut().zip(r1).zip(r3) {
                    *d = b - e;
                }
            }
        }
    }
}

/// `A dy Aᵀ` of every 2 × 2 output-gradient tile of output channels `c0 .. c0 + n` (of `c`)
/// over a group of `nb` samples (`[b][c][h][w]`) into `p`, the panel's piece of each of the 16
/// products' packed B operands (`p[ξ]`: `[kc][nr]`, column `tile · nb + b`, lanes past `n`
/// zero). With `A`'s rows `(1, 0), (1, 1), (1, −1), (0, −1)`, a tile `[[a, b], [c, d]]` has
/// rows `q_i = (a, a + b, a − b, −b)` (and of `c, d`), and `P = (q₀, q₀ + q₁, q₀ − q₁, −q₁)`.
/// Each sample's panel is first regrouped with its channels in lanes (`[h·w][nr]`), so that
/// each tile is a few vector operations.
fn gradient_tiles(
    dy: &[f32],
    (c0, n, c): (usize, usize, usize),
    (h, w): (usize, usize),
    nb: usize,
    nr: usize,
    p: &mut [&mut [f32]],
    buf: &mut Vec<f32>,
) {
    let (th, tw) = (h / 2, w / 2);
    let hw = h * w;
    buf.resize(hw * nr, 0.0);
    for b in 0..nb {
        // The GEMM's own packing of a transposed operand, spare lanes zero.
        let src = &dy[(b * c + c0) * hw..][..n * hw];
        pack_bt_cols(src, n, hw, Cols::plain(hw, hw), nr, buf);
        match nr {
            16 => panel_tiles::<16>(buf, (th, tw, w), (b, nb), p),
            8 => panel_tiles::<8>(buf, (th, tw, w), (b, nb), p),
            4 => panel_tiles::<4>(buf, (th, tw, w), (b, nb), p),
            _ => unreachable!("micro-kernels are 4, 8 or 16 lanes wide"),
        }
    }
}

/// [`gradient_tiles`] of sample `b` for one panel of `N` channels (`dq`: `[h·w][N]`), into `p`
/// (`p[ξ]`: `[kc][N]`).
#[inline(always)]
fn panel_tiles<const N: usize>(
    dq: &[f32],
    (th, tw, w): (usize, usize, usize),
    (b, nb): (usize, usize),
    p: &mut [&mut [f32]],
) {
    let (dc, _) = dq.as_chunks::<N>();
    for ty in 0..th {
        let (r0, r1) = (&dc[2 * ty * w..][..w], &dc[(2 * ty + 1) * w..][..w]);
        for tx in 0..tw {
            let (a, bb, cc, d) = (&r0[2 * tx], &r0[2 * tx + 1], &r1[2 * tx], &r1[2 * tx + 1]);
            let base = ((ty * tw + tx) * nb + b) * N;
            for v in 0..4 {
                let mut u0 = [0.0f32; N];
                let mut u1 = [0.0f32; N];
                for l in 0..N {
                    (u0[l], u1[l]) = match v {
                        0 => (a[l], cc[l]),
                        1 => (a[l] + bb[l], cc[l] + d[l]),
                        2 => (a[l] - bb[l], cc[l] - d[l]),
                        _ => (-bb[l], -d[l]),
                    };
                }
                let mut put = |u: usize, f: [f32; N]| {
                    let o: &mut [f32; N] = (&mut p[u * 4 + v][base..][..N]).try_into().expect("N lanes");
                    *o = f;
                };
                put(0, u0);
                put(1, core::array::from_fn(|l| u0[l] + u1[l]));
                put(2, core::array::from_fn(|l| u0[l] - u1[l]));
                put(3, core::array::from_fn(|l| -u1[l]));
            }
        }
    }
}

/// `Gᵀ M G` (3 × 3) of a 4 × 4 `M` in each of 16 lanes (`m[ξ][lane]`, `ξ = 4u + v`; the
/// result `[3i + j][lane]`), with `G`'s rows `(1, 0, 0), (½, ½, ½), (½, −½, ½), (0, 0, 1)`.
#[inline(always)]
fn output_transform(m: &[[f32; 16]; 16]) -> [[f32; 16]; 9] {
    // Rows of Gᵀ M: r[i][v].
    let mut r = [[[0.0f32; 16]; 4]; 3];
    for v in 0..4 {
        let (a, b, c, d) = (&m[v], &m[4 + v], &m[8 + v], &m[12 + v]);
        for l in 0..16 {
            r[0][v][l] = a[l] + 0.5 * (b[l] + c[l]);
            r[1][v][l] = 0.5 * (b[l] - c[l]);
            r[2][v][l] = 0.5 * (b[l] + c[l]) + d[l];
        }
    }
    let mut g = [[0.0f32; 16]; 9];
    for i in 0..3 {
        let [a, b, c, d] = &r[i];
        for l in 0..16 {
            g[i * 3][l] = a[l] + 0.5 * (b[l] + c[l]);
            g[i * 3 + 1][l] = 0.5 * (b[l] - c[l]);
            g[i * 3 + 2][l] = 0.5 * (b[l] + c[l]) + d[l];
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn the_winograd_weight_gradient_matches_the_definition_on_every_table_and_thread_count() {
        let shape = |c_in, h, w, c_out| ConvShape { h, w, ..ConvShape::square(c_in, h, h, c_out, 3, 1, 1) };
        // Channels not a multiple of the lanes or row panels, a 2 × 2 plane, oblong planes;
        // enough work to go to the threads, and on a plane of more than a group's tiles (each
        // sample a group of its own).
        let shapes = [
            shape(5, 4, 6, 7),
            shape(16, 8, 8, 17),
            shape(3, 2, 2, 33),
            shape(9, 10, 4, 5),
            shape(32, 8, 8, 40),
            shape(16, 48, 48, 9),
        ];
        // A sample's products' multiply-adds: from the threshold, even one sample is threaded.
        let threaded = |s: &ConvShape| 16 * (s.h * s.w / 4) * s.c_in * s.c_out >= crate::kernels::PAR_MIN_WORK;
        assert_eq!(shapes.iter().filter(|s| threaded(s)).count(), 2, "the last two, even at batch 1");
        let mut r = SplitMix64::new(31);
        let mut tables = vec![Kernels::generic(true)];
        tables.extend(Kernels::available());
        for s in shapes {
            assert!(supported(&s));
            let tiles = s.h * s.w / 4;
            assert_eq!(group_samples(tiles, 5) == 1, s.h == 48, "{s:?}: one sample a group");
            for batch in [1, 5] {
                let x: Vec<f32> = (0..batch * s.c_in * s.h * s.w).map(|_| r.uniform(-1.0, 1.0)).collect();
                let dy: Vec<f32> = (0..batch * s.c_out * s.h * s.w).map(|_| r.uniform(-1.0, 1.0)).collect();
                let want = super::super::wgrad::tests::naive_dw(&s, &x, &dy, batch);
                for k in &tables {
                    let mut bits: Option<Vec<f32>> = None;
                    for threads in [1, 2] {
                        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                        pool.broadcast(|_| {
                            BUFS.with_borrow_mut(|b| {
                                for v in [&mut b.v, &mut b.p, &mut b.m] {
                                    v.clear();
                                    v.resize(1 << 16, f32::NAN);
                                }
                            });
                            ROW.with_borrow_mut(|v| {
                                v.clear();
                                v.resize(1 << 16, f32::NAN);
                            });
                        });
                        // Added onto what the buffer holds.
                        let mut dw = vec![1.0f32; want.len()];
                        pool.install(|| weight_grad(k, &s, &x, &dy, batch, &mut dw));
                        for (i, (&g, &w)) in dw.iter().zip(&want).enumerate() {
                            let w = w + 1.0;
                            assert!(
                                (g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                                "{s:?} batch {batch} {} [{i}]: {g} vs {w}",
                                k.micro.name
                            );
                        }
                        match &bits {
                            None => bits = Some(dw),
                            Some(b) => assert_eq!(b, &dw, "{s:?}: the thread count changes no bit"),
                        }
                    }
                }
            }
        }
        // Not taken: stride 2, odd planes, padding 0, 5 × 5.
        assert!(!supported(&ConvShape::square(8, 8, 8, 8, 3, 2, 1)));
        assert!(!supported(&ConvShape::square(8, 7, 7, 8, 3, 1, 1)));
        assert!(!supported(&ConvShape::square(8, 8, 8, 8, 3, 1, 0)));
        assert!(!supported(&ConvShape::square(8, 8, 8, 8, 5, 1, 2)));
    }

    #[test]
    fn the_conv_backward_takes_it_for_many_channels_on_small_planes() {
        let s = ConvShape::square(32, 4, 4, 33, 3, 1, 1);
        assert!(preferred(&s));
        // Wide planes and few channels keep the direct paths.
        assert!(!preferred(&ConvShape::square(40, 16, 16, 40, 3, 1, 1)));
        assert!(!preferred(&ConvShape::square(16, 8, 8, 16, 3, 1, 1)));
        let mut r = SplitMix64::new(33);
        let batch = 3;
        let x: Vec<f32> = (0..batch * s.c_in * 16).map(|_| r.uniform(-1.0, 1.0)).collect();
        let dy: Vec<f32> = (0..batch * s.c_out * 16).map(|_| r.uniform(-1.0, 1.0)).collect();
        let w: Vec<f32> = (0..s.c_out * s.c_in * 9).map(|_| r.uniform(-1.0, 1.0)).collect();
        let want = super::super::wgrad::tests::naive_dw(&s, &x, &dy, batch);
        let k = Kernels::detect();
        let mut dw = vec![0.0f32; want.len()];
        let weights = crate::kernels::Weights::F32(&w);
        super::super::conv::backward(&k, &s, weights, &x, &dy, batch, None, Some(&mut dw), None, None, None);
        for (i, (&g, &w)) in dw.iter().zip(&want).enumerate() {
            assert!((g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "[{i}]: {g} vs {w}");
        }
        // The same bits as the path itself gives.
        let mut own = vec![0.0f32; want.len()];
        weight_grad(&k, &s, &x, &dy, batch, &mut own);
        assert_eq!(dw, own);
    }
}
