//! Batch normalisation over `[batch][c][plane]` and the per-channel affine that CLR adds after
//! a conv whose norm was folded into it.
//!
//! Training mode normalises with the batch's statistics (biased variance, as PyTorch) and
//! updates the running statistics with momentum (unbiased variance); evaluation mode uses the
//! running statistics. Sums are f32 over blocks of values and f64 over blocks: they run over up to
//! millions of values.

/// Batch statistics kept from a training-mode forward for its backward.
#[derive(Clone, Debug, Default)]
pub struct Saved {
    pub mean: Vec<f32>,
    pub inv_std: Vec<f32>,
    /// No γ, no β and no residual: the output, where a fused clamp passes it, is `x̂ = (x −
    /// μ)·s` itself, to the bit (`x̂·1 + 0`).
    pub identity: bool,
}

use super::act::through_clamp;
use super::Store;

/// Independent partial sums per channel reduction: one running f64 sum per element did not
/// vectorise (batch norm was 8 % of a GEMResNet step); the lanes are added in a fixed order.
/// Each lane sums [`BLOCK`] values in f32 and adds that into its f64 total: converting every
/// value to f64 held the sums to two values per instruction on baseline x86-64 (batch norm
/// was still a tenth of a GEMResNet step), and a block's f32 sum of 32 values loses about as
/// little as the f32 products that feed it.
const LANES: usize = 8;

/// Chunks of [`LANES`] values per f32 block.
const BLOCK: usize = 32;

/// Two running sums of pairs per channel, as above: `f(u[8i + l], v[8i + l])` adds into lane
/// `l` (a plane's tail into the first lanes). The f32 block carries over from one plane to
/// the next of the same channel: GEMResNet18's 16-value planes filled an eighth of a block
/// each, and each added its own block into the f64 lanes, 16 conversions and adds for 16
/// values (carried over: its 160-channel norm 0.29 → 0.27 ms forward, 0.37 → 0.33 ms
/// backward, one thread, batch 64).
#[derive(Clone, Copy, Default)]
struct Sums2 {
    total: [[f64; LANES]; 2],
    block: [[f32; LANES]; 2],
    /// Chunks of [`LANES`] values in `block`.
    filled: usize,
}

impl Sums2 {
    #[inline(always)]
    fn flush(&mut self) {
        for (t, b) in self.total.iter_mut().zip(&mut self.block) {
            for (t, b) in t.iter_mut().zip(b.iter_mut()) {
                *t += *b as f64;
                *b = 0.0;
            }
        }
        self.filled = 0;
    }

    #[inline(always)]
    fn add(&mut self, u: &[f32], v: &[f32], f: impl Fn(f32, f32) -> (f32, f32)) {
        let (mut uc, ut) = u.as_chunks::<LANES>();
        let (mut vc, vt) = v[..u.len()].as_chunks::<LANES>();
        while !uc.is_empty() {
            let take = (BLOCK - self.filled).min(uc.len());
            // Local copies, so that the sums stay in registers through the loops; one loop per
            // sum over the block's chunks (in L1): one loop for both was vectorised across the
            // two sums of a lane, not across the lanes of one sum (scalar arithmetic and
            // shuffles; the shifted sums of 64 × 20 × 1024 values in L2, 0.52 → 0.29 ms).
            let [mut a0, mut a1] = self.block;
            for (cu, cv) in uc[..take].iter().zip(&vc[..take]) {
                for l in 0..LANES {
                    a0[l] += f(cu[l], cv[l]).0;
                }
            }
            for (cu, cv) in uc[..take].iter().zip(&vc[..take]) {
                for l in 0..LANES {
                    a1[l] += f(cu[l], cv[l]).1;
                }
            }
            self.block = [a0, a1];
            (uc, vc) = (&uc[take..], &vc[take..]);
            self.filled += take;
            if self.filled == BLOCK {
                self.flush();
            }
        }
        for (l, (&x, &y)) in ut.iter().zip(vt).enumerate() {
            let (p, q) = f(x, y);
            self.total[0][l] += p as f64;
            self.total[1][l] += q as f64;
        }
    }
}

fn channel(v: &[f32], b: usize, c: usize, ch: usize, plane: usize) -> &[f32] {
    &v[(b * ch + c) * plane..][..plane]
}

/// Training-mode forward. `gamma`/`beta` absent = non-affine. Updates `running_mean`/`running_var`.
/// `residual` fuses a residual sum that alone reads this op's output (`y = norm(x) + r`, with
/// the bits of the norm then `act::add_forward`), and `clamp` a ReLU or ReLU6 that reads only
/// the result, as in [`affine_forward`].
#[allow(clippy::too_many_arguments)]
pub fn train_forward(
    ch: usize,
    plane: usize,
    batch: usize,
    x: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
    momentum: f32,
    running_mean: &mut [f32],
    running_var: &mut [f32],
    residual: Option<&[f32]>,
    clamp: Option<(f32, f32)>,
    y: &mut [f32],
) -> Saved {
    let n = (batch * plane) as f64;
    // Per channel, in one pass: the sums of `v − k` and `(v − k)²`, with `k` the mean of the
    // first sample's plane. Shifted so, the variance `Σ(v − k)²/n − (mean − k)²` loses little
    // to cancellation (unshifted, it loses everything when |mean| ≫ std); a second pass for
    // the squared deviations from the mean read the whole tensor once more (without it,
    // GEMResNet18's step went 0.226–0.232 → 0.221–0.227 s).
    let shift: Vec<f32> = (0..ch)
        .map(|c| (channel(x, 0, c, ch, plane).iter().map(|&v| v as f64).sum::<f64>() / plane as f64) as f32)
        .collect();
    let sums = channel_sums(ch, plane, batch, |b, acc| {
        for (c, a) in acc.iter_mut().enumerate() {
            let (k, v) = (shift[c], channel(x, b, c, ch, plane));
            a.add(v, v, |u, _| (u - k, (u - k) * (u - k)));
        }
    });
    let stats = sums.iter().zip(&shift).map(|(&[s1, s2], &k)| (k as f64 + s1 / n, (s2 - s1 * (s1 / n)).max(0.0)));
    let identity = gamma.is_none() && beta.is_none() && residual.is_none();
    let mut saved = Saved { mean: vec![0.0; ch], inv_std: vec![0.0; ch], identity };
    let mut coef = vec![(0.0f32, 0.0f32, 0.0f32, 0.0f32); ch];
    for (c, (mean, sq)) in stats.enumerate() {
        let var = sq / n;
        let inv_std = 1.0 / (var + eps as f64).sqrt();
        saved.mean[c] = mean as f32;
        saved.inv_std[c] = inv_std as f32;
        let unbiased = if n > 1.0 { sq / (n - 1.0) } else { var };
        running_mean[c] = ((1.0 - momentum as f64) * running_mean[c] as f64 + momentum as f64 * mean) as f32;
        running_var[c] = ((1.0 - momentum as f64) * running_var[c] as f64 + momentum as f64 * unbiased) as f32;
        let (g, bt) = (gamma.map_or(1.0, |g| g[c]), beta.map_or(0.0, |b| b[c]));
        coef[c] = (saved.mean[c], saved.inv_std[c], g, bt);
    }
    let (lo, hi) = clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    per_sample(&mut y[..batch * ch * plane], ch * plane, batch * ch * plane, |b, ys| {
        for (c, (yc, &(m, s, g, bt))) in ys.chunks_exact_mut(plane).zip(&coef).enumerate() {
            let xc = channel(x, b, c, ch, plane);
            match residual {
                Some(r) => {
                    for ((o, &v), &r) in yc.iter_mut().zip(xc).zip(channel(r, b, c, ch, plane)) {
                        *o = crate::kernels::clamp(((v - m) * s * g + bt) + r, lo, hi);
                    }
                }
                None => {
                    for (o, &v) in yc.iter_mut().zip(xc) {
                        *o = crate::kernels::clamp((v - m) * s * g + bt, lo, hi);
                    }
                }
            }
        }
    });
    saved
}

/// Samples whose sums [`channel_sums`] keeps together: a partial per sample was 128 bytes per
/// channel and sample, twice the size of the tensor itself for 16-value planes (GEMResNet18's
/// 160-channel norm: 0.315 → 0.29 ms forward with chunks, one thread, batch 64).
const SUM_CHUNK: usize = 8;

/// Two sums per channel over the batch: `f(b, acc)` adds sample `b`'s values into `acc[c]`
/// for each channel `c`, onto the sums of the earlier samples of its chunk of
/// [`SUM_CHUNK`]; the chunks' lanes are then added in order, so any thread count gives the
/// same bits. Walking sample by sample reads one run of memory per sample; walking a channel
/// across the batch read runs of one plane (16 to 4096 bytes) a sample apart, and took twice
/// as long as a pass over a whole tensor.
fn channel_sums(ch: usize, plane: usize, batch: usize, f: impl Fn(usize, &mut [Sums2]) + Sync + Send) -> Vec<[f64; 2]> {
    let mut part = vec![Sums2::default(); batch.div_ceil(SUM_CHUNK) * ch];
    per_sample(&mut part, ch, batch * ch * plane, |chunk, acc| {
        for b in chunk * SUM_CHUNK..batch.min((chunk + 1) * SUM_CHUNK) {
            f(b, acc);
        }
        acc.iter_mut().for_each(Sums2::flush);
    });
    (0..ch)
        .map(|c| {
            let mut acc = [[0.0f64; LANES]; 2];
            for p in part[c..].iter().step_by(ch.max(1)) {
                for (a, q) in acc.iter_mut().zip(&p.total) {
                    for (u, v) in a.iter_mut().zip(q) {
                        *u += v;
                    }
                }
            }
            acc.map(|a| a.iter().sum())
        })
        .collect()
}

/// Values a norm's pass touches from which it goes to the threads. A value costs a norm a few
/// times what a multiply-add costs a product (the kernels' `PAR_MIN_WORK`, 256 k, under which
/// GEMResNet18's 160-channel norms, 164 k values at batch 64, stayed on one thread). At two
/// threads, its five 160-channel norms went 3.45 → 2.79 ms (forward and backward, the sum of
/// per-node minima over three profiled steps).
const PAR_MIN_VALUES: usize = 1 << 15;

/// Values per job of [`per_sample`], at least (whole samples): one sample of those norms is
/// 2560 values, a job of a few microseconds, about what handing it to a thread costs (with
/// jobs of 16 k values, 2.79 → 2.70 ms).
const JOB_VALUES: usize = 1 << 14;

/// `f(b, sample b's part of v)` for every sample (`len` items each), in parallel when `work`
/// (values touched) is worth it.
fn per_sample<T: Send>(v: &mut [T], len: usize, work: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    per_sample_with(v, None, len, work, |b, s, _| f(b, s))
}

/// [`per_sample`] with sample `b`'s part of a second buffer `w` too, when there is one.
fn per_sample_with<T: Send>(
    v: &mut [T],
    w: Option<&mut [f32]>,
    len: usize,
    work: usize,
    f: impl Fn(usize, &mut [T], Option<&mut [f32]>) + Sync + Send,
) {
    use rayon::prelude::*;
    if len == 0 {
        return;
    }
    let samples = v.len() / len;
    let mut parts: Vec<Option<&mut [f32]>> = match w {
        Some(w) => w[..v.len()].chunks_exact_mut(len).map(Some).collect(),
        None => (0..samples).map(|_| None).collect(),
    };
    if work >= PAR_MIN_VALUES && samples > 1 && crate::kernels::threads() > 1 {
        // Jobs of whole samples, at least `JOB_VALUES` values each.
        let per = (JOB_VALUES * samples / work.max(1)).clamp(1, samples.div_ceil(2));
        v.par_chunks_mut(per * len).zip(parts.par_chunks_mut(per)).enumerate().for_each(|(j, (s, w))| {
            for (i, (s, w)) in s.chunks_exact_mut(len).zip(w).enumerate() {
                f(j * per + i, s, w.take())
            }
        });
    } else {
        v.chunks_exact_mut(len).zip(parts.iter_mut()).enumerate().for_each(|(b, (s, w))| f(b, s, w.take()));
    }
}

/// Evaluation-mode forward with running statistics (and a fused residual and clamp, as
/// [`train_forward`]).
#[allow(clippy::too_many_arguments)]
pub fn eval_forward(
    ch: usize,
    plane: usize,
    batch: usize,
    x: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
    mean: &[f32],
    var: &[f32],
    residual: Option<&[f32]>,
    clamp: Option<(f32, f32)>,
    y: &mut [f32],
) {
    let (lo, hi) = clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    for c in 0..ch {
        let s = 1.0 / libm::sqrtf(var[c] + eps);
        let (g, bt) = (gamma.map_or(1.0, |g| g[c]), beta.map_or(0.0, |b| b[c]));
        let (mul, add) = (s * g, bt - mean[c] * s * g);
        for b in 0..batch {
            let at = (b * ch + c) * plane;
            let (yc, xc) = (&mut y[at..at + plane], &x[at..at + plane]);
            match residual {
                Some(r) => {
                    for ((o, &v), &r) in yc.iter_mut().zip(xc).zip(&r[at..at + plane]) {
                        *o = crate::kernels::clamp((v * mul + add) + r, lo, hi);
                    }
                }
                None => {
                    for (o, &v) in yc.iter_mut().zip(xc) {
                        *o = crate::kernels::clamp(v * mul + add, lo, hi);
                    }
                }
            }
        }
    }
}

/// Gradients of [`train_forward`] (added into `dgamma`, `dbeta`; stored into `dx`):
/// with `x̂ = (x − μ)·s`, `dβ = Σ dy`, `dγ = Σ dy·x̂`, and
/// `dx = γ·s/N · (N·dy − Σdy − x̂·Σ(dy·x̂))` (the batch statistics depend on every sample).
/// With a fused clamp, `dy` is the clamped output's gradient, passed as [`Clamped`] says; the
/// gradient that reaches the norm is also the fused residual's, stored into `dres` with the
/// bits `act::accumulate_both` gives.
#[allow(clippy::too_many_arguments)]
pub fn train_backward(
    ch: usize,
    plane: usize,
    batch: usize,
    x: &[f32],
    saved: &Saved,
    gamma: Option<&[f32]>,
    dy: &[f32],
    clamped: Option<Clamped>,
    dx: Option<(&mut [f32], Store)>,
    dres: Option<(&mut [f32], Store)>,
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
) {
    let n = (batch * plane) as f64;
    let buf = || vec![0.0f32; if clamped.is_some() { plane } else { 0 }];
    // The sums read `x̂` from the clamped output where that is `x̂` itself: one stream fewer
    // of the three. Where the clamp stops the gradient, `g` is 0 and `0·y` adds what `0·x̂`
    // did; where it passes, `y = x̂` to the bit; so the sums keep their bits.
    let xhat_is_y = clamped.filter(|_| saved.identity);
    let sums = channel_sums(ch, plane, batch, |b, acc| {
        let mut passed = buf();
        for (c, a) in acc.iter_mut().enumerate() {
            let (m, is) = (saved.mean[c], saved.inv_std[c]);
            let at = (b * ch + c) * plane;
            let g = pass(clamped, dy, at, plane, &mut passed);
            match xhat_is_y {
                Some(Clamped { y, .. }) => a.add(g, &y[at..at + plane], |g, v| (g, g * v)),
                None => a.add(g, &x[at..at + plane], |g, v| (g, g * ((v - m) * is))),
            }
        }
    });
    if let Some(db) = dbeta {
        for (d, s) in db.iter_mut().zip(&sums) {
            *d += s[0] as f32;
        }
    }
    if let Some(dg) = dgamma {
        for (d, s) in dg.iter_mut().zip(&sums) {
            *d += s[1] as f32;
        }
    }
    let len = batch * ch * plane;
    let (rstore, dres) = match dres {
        Some((d, st)) => (st, Some(&mut d[..len])),
        None => (Store::Add, None),
    };
    let Some((dx, store)) = dx else {
        if let Some(dres) = dres {
            let mut passed = buf();
            let plane = plane.max(1);
            for (at, d) in (0..len).step_by(plane).zip(dres.chunks_exact_mut(plane)) {
                for (d, &g) in d.iter_mut().zip(pass(clamped, dy, at, plane, &mut passed)) {
                    rstore.put(d, g);
                }
            }
        }
        return;
    };
    let coef: Vec<(f32, f32, f32, f32, f32)> = sums
        .iter()
        .enumerate()
        .map(|(c, &[sdy, sdyx])| {
            let g = gamma.map_or(1.0, |g| g[c]);
            (saved.mean[c], saved.inv_std[c], g * saved.inv_std[c], (sdy / n) as f32, (sdyx / n) as f32)
        })
        .collect();
    per_sample_with(&mut dx[..len], dres, ch * plane, len, |b, dxs, mut dres| {
        let mut passed = buf();
        for (c, (dxc, &(m, is, gs, a, bq))) in dxs.chunks_exact_mut(plane).zip(&coef).enumerate() {
            let at = (b * ch + c) * plane;
            let g = pass(clamped, dy, at, plane, &mut passed);
            for ((d, &gy), &v) in dxc.iter_mut().zip(g).zip(&x[at..at + plane]) {
                let xh = (v - m) * is;
                store.put(d, gs * (gy - a - xh * bq));
            }
            if let Some(r) = dres.as_deref_mut() {
                for (d, &gy) in r[c * plane..][..plane].iter_mut().zip(g) {
                    rstore.put(d, gy);
                }
            }
        }
    });
}

/// Gradient of [`eval_forward`] with respect to its input: `dx += dy · γ / sqrt(var + eps)`,
/// and of `γ`, `β` and the fused residual when asked for (`clamped` and `dres` as in
/// [`train_backward`]).
#[allow(clippy::too_many_arguments)]
pub fn eval_backward(
    ch: usize,
    plane: usize,
    batch: usize,
    x: &[f32],
    gamma: Option<&[f32]>,
    eps: f32,
    mean: &[f32],
    var: &[f32],
    dy: &[f32],
    clamped: Option<Clamped>,
    mut dx: Option<&mut [f32]>,
    mut dres: Option<(&mut [f32], Store)>,
    mut dgamma: Option<&mut [f32]>,
    mut dbeta: Option<&mut [f32]>,
) {
    let mut passed = vec![0.0f32; if clamped.is_some() { plane } else { 0 }];
    for c in 0..ch {
        let s = 1.0 / libm::sqrtf(var[c] + eps);
        let g = gamma.map_or(1.0, |g| g[c]);
        for b in 0..batch {
            let at = (b * ch + c) * plane;
            let (dyc, xc) = (pass(clamped, dy, at, plane, &mut passed), &x[at..at + plane]);
            if let Some((dr, st)) = dres.as_mut() {
                for (d, &gy) in dr[at..at + plane].iter_mut().zip(dyc) {
                    st.put(d, gy);
                }
            }
            if let Some(dx) = dx.as_deref_mut() {
                for (d, &gy) in dx[at..at + plane].iter_mut().zip(dyc) {
                    *d += gy * s * g;
                }
            }
            if let Some(dg) = dgamma.as_deref_mut() {
                dg[c] += dyc.iter().zip(xc).map(|(&gy, &v)| gy * (v - mean[c]) * s).sum::<f32>();
            }
            if let Some(db) = dbeta.as_deref_mut() {
                db[c] += dyc.iter().sum::<f32>();
            }
        }
    }
}

/// `y = x · γ[c] + β[c]`, clamped to `[lo, hi]` when `clamp` is `Some((lo, hi))` (a ReLU or
/// ReLU6 that reads only this op's output, fused into it: one pass over the activations
/// instead of two, and one tensor fewer kept).
#[allow(clippy::too_many_arguments)]
pub fn affine_forward(
    ch: usize,
    plane: usize,
    batch: usize,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    clamp: Option<(f32, f32)>,
    y: &mut [f32],
) {
    let (lo, hi) = clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    per_sample(&mut y[..batch * ch * plane], ch * plane, batch * ch * plane, |b, ys| {
        for (c, yc) in ys.chunks_exact_mut(plane).enumerate() {
            for (o, &v) in yc.iter_mut().zip(channel(x, b, c, ch, plane)) {
                // Clamping to ±∞ leaves every value as it is, NaN included.
                *o = crate::kernels::clamp(v * gamma[c] + beta[c], lo, hi);
            }
        }
    });
}

/// The clamp fused into a batch norm: its bounds and the norm's output `y`. The
/// gradient passes where `lo < y < hi` (where the clamp's input was inside the bounds), with
/// the bits of `act::clamp_backward` storing into a fresh buffer (a −0 becomes +0).
#[derive(Clone, Copy)]
pub struct Clamped<'a> {
    pub y: &'a [f32],
    pub lo: f32,
    pub hi: f32,
}

/// The `len` gradients at `dy[at..]` that reach the op under a fused clamp, written into
/// `buf` (`len` long, kept in L1 for the passes over one channel's plane); without a clamp,
/// `dy`'s own.
fn pass<'s>(clamped: Option<Clamped>, dy: &'s [f32], at: usize, len: usize, buf: &'s mut [f32]) -> &'s [f32] {
    let dy = &dy[at..at + len];
    match clamped {
        Some(Clamped { y, lo, hi }) => {
            let buf = &mut buf[..len];
            for ((p, &d), &v) in buf.iter_mut().zip(dy).zip(&y[at..at + len]) {
                *p = 0.0 + through_clamp(v, lo, hi, d);
            }
            buf
        }
        None => dy,
    }
}

/// One channel of [`affine_backward`]: its gradient `g` (`dy` where the clamp, when `CLAMP`,
/// passes it at `x·γ + β`), stored (added when `ADD`) into `dx` times `γ` when given, and
/// `(Σ g·x, Σ g)` in eight partial sums each, lane `l` taking elements `8i + l` and the tail
/// the first lanes, as [`super::dot8`] (a single running sum is a chain of dependent adds that
/// does not vectorise).
#[inline(always)]
fn affine_channel<const CLAMP: bool, const ADD: bool>(
    x: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    gc: f32,
    bc: f32,
    lo: f32,
    hi: f32,
) -> (f32, f32) {
    let grad = |d: f32, v: f32| if CLAMP { 0.0 + through_clamp(v * gc + bc, lo, hi, d) } else { d };
    let put = |o: &mut f32, g: f32| if ADD { *o += g * gc } else { *o = 0.0 + g * gc };
    let (mut sg, mut sb) = ([0.0f32; 8], [0.0f32; 8]);
    let (xs, xt) = x.as_chunks::<8>();
    let (ds, dt) = dy[..x.len()].as_chunks::<8>();
    match dx {
        Some(dx) => {
            let (os, ot) = dx[..x.len()].as_chunks_mut::<8>();
            for ((xv, dv), o) in xs.iter().zip(ds).zip(os) {
                for l in 0..8 {
                    let g = grad(dv[l], xv[l]);
                    sg[l] += g * xv[l];
                    sb[l] += g;
                    put(&mut o[l], g);
                }
            }
            for (l, ((&v, &d), o)) in xt.iter().zip(dt).zip(ot).enumerate() {
                let g = grad(d, v);
                sg[l] += g * v;
                sb[l] += g;
                put(o, g);
            }
        }
        None => {
            for (xv, dv) in xs.iter().zip(ds) {
                for l in 0..8 {
                    let g = grad(dv[l], xv[l]);
                    sg[l] += g * xv[l];
                    sb[l] += g;
                }
            }
            for (l, (&v, &d)) in xt.iter().zip(dt).enumerate() {
                let g = grad(d, v);
                sg[l] += g * v;
                sb[l] += g;
            }
        }
    }
    (sg.iter().sum(), sb.iter().sum())
}

/// Gradients of [`affine_forward`]: added into `dgamma`, `dbeta`; stored into `dx`. With a
/// fused clamp (`clamp`, as in the forward), `dy` is the clamped output's gradient: it passes
/// where `lo < x·γ + β < hi`, that sum recomputed from `x` as the forward made it (so the
/// output need not be read: one stream fewer of the four), with the bits of
/// `act::clamp_backward` storing into a fresh buffer (a −0 becomes +0).
#[allow(clippy::too_many_arguments)]
pub fn affine_backward(
    ch: usize,
    plane: usize,
    batch: usize,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    dy: &[f32],
    clamp: Option<(f32, f32)>,
    dx: Option<(&mut [f32], Store)>,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    if ch * plane == 0 {
        return;
    }
    // Per sample (in parallel when large): its sums per channel, and its input gradient.
    // The sums are then added in sample order, as one thread would.
    let mut sums = vec![(0.0f32, 0.0f32); batch * ch];
    let store = dx.as_ref().map_or(Store::Add, |d| d.1);
    let (lo, hi) = clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    // One pass per channel, chosen outside the loop: a loop per use of the clamp's gradient
    // (a buffer of it, the sums, the input gradient) took three times the forward's time.
    let channel_grad = match (clamp.is_some(), store) {
        (false, Store::Set) => affine_channel::<false, false>,
        (false, Store::Add) => affine_channel::<false, true>,
        (true, Store::Set) => affine_channel::<true, false>,
        (true, Store::Add) => affine_channel::<true, true>,
    };
    let one = |b: usize, sums: &mut [(f32, f32)], mut dxs: Option<&mut [f32]>| {
        for (c, s) in sums.iter_mut().enumerate() {
            let at = (b * ch + c) * plane;
            let (xc, dyc) = (channel(x, b, c, ch, plane), &dy[at..at + plane]);
            let dxc = dxs.as_deref_mut().map(|d| &mut d[c * plane..(c + 1) * plane]);
            *s = channel_grad(xc, dyc, dxc, gamma[c], beta[c], lo, hi);
        }
    };
    let len = ch * plane;
    let mut dxv = dx.map(|(d, _)| &mut d[..batch * len]);
    if batch > 1 && batch * len >= crate::kernels::PAR_MIN_WORK && crate::kernels::threads() > 1 {
        use rayon::prelude::*;
        match dxv.take() {
            Some(d) => {
                d.par_chunks_exact_mut(len).zip(sums.par_chunks_exact_mut(ch)).enumerate().for_each(|(b, (dxs, s))| {
                    one(b, s, Some(dxs));
                })
            }
            None => sums.par_chunks_exact_mut(ch).enumerate().for_each(|(b, s)| one(b, s, None)),
        }
    } else {
        for (b, s) in sums.chunks_exact_mut(ch).enumerate() {
            one(b, s, dxv.as_deref_mut().map(|d| &mut d[b * len..(b + 1) * len]));
        }
    }
    for s in sums.chunks_exact(ch) {
        for (c, &(g, bt)) in s.iter().enumerate() {
            dgamma[c] += g;
            dbeta[c] += bt;
        }
    }
}
