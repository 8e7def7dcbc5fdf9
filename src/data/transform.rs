//! Turning a decoded image (f32 pixels in [0, 1], its own channels × height × width) into a
//! backbone input of the transform's shape. The steps run in a fixed order:
//!
//! 1. channels: RGB → gray averages the three channels (gray → RGB replication happens at
//!    step 5, so the geometry steps work on one plane instead of three);
//! 2. geometry: an exact copy when the size already matches; with `pad` and a target at least
//!    as large in both dimensions, centred zero padding (28×28 → 32×32 for the GEMResNet
//!    inputs); otherwise a bilinear resize (a triangle filter widened by the scale factor when
//!    shrinking, so large photos are averaged rather than aliased);
//! 3. rotation about the centre by `rotate_deg` (counter-clockwise, bilinear, zero fill);
//! 4. augmentation, only when the caller passes a random stream: a random shift by up to
//!    `crop_pad` pixels each way with zero fill (the same as zero padding by `crop_pad` and
//!    cropping back at a random place), then a horizontal flip with probability ½;
//! 5. normalisation `(x - mean[c]) / std[c]` per output channel;
//! 6. the permutation, over the whole normalised sample: `out[i] = normalised[perm[i]]`.
//!
//! Zero fill happens in pixel space (black), before normalisation, as torchvision does it.
//! [`Scratch`] holds the intermediate planes so that a batch allocates once, not per sample.

use std::sync::Arc;

use super::DataError;
use crate::rng::SplitMix64;

/// Random training-time augmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Augment {
    /// Largest shift in pixels, each way, of the random crop (0 = no crop).
    pub crop_pad: usize,
    /// Random horizontal flip with probability ½.
    pub flip: bool,
}

/// What turns a decoded image into a backbone input of shape `c × h × w`; see the module
/// documentation for the order of the steps.
#[derive(Clone, Debug)]
pub struct Transform {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// Zero-pad centred instead of resizing when the target is at least as large as the image.
    pub pad: bool,
    /// Per output channel; only the first `c` entries are used.
    pub mean: [f32; 4],
    pub std: [f32; 4],
    /// Counter-clockwise rotation about the centre in degrees; 0 = none.
    pub rotate_deg: f32,
    /// Pixel permutation of the whole normalised sample (`c * h * w` entries, each below that).
    pub permutation: Option<Arc<Vec<u32>>>,
    pub augment: Option<Augment>,
}

/// A decoded image: `c × h × w` f32 in [0, 1], channel-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

/// Largest sample a transform may produce (64 Mi values); guards the scratch allocations.
const MAX_SAMPLE: usize = 1 << 26;

impl Transform {
    /// A plain transform: resize to `c × h × w` and normalise; no padding, rotation,
    /// permutation or augmentation.
    pub fn new(c: usize, h: usize, w: usize, mean: [f32; 4], std: [f32; 4]) -> Self {
        Transform { c, h, w, pad: false, mean, std, rotate_deg: 0.0, permutation: None, augment: None }
    }

    /// Values per sample, `c * h * w` (saturating; [`Transform::check`] rejects overflow).
    pub fn sample_len(&self) -> usize {
        self.c.saturating_mul(self.h).saturating_mul(self.w)
    }

    /// Checks that the transform can be applied: 1–4 channels, a non-empty shape of at most
    /// 64 Mi values, finite non-zero stds, finite means and angle, a permutation of the right
    /// length whose entries are in range.
    pub fn check(&self) -> Result<(), DataError> {
        let err = |m: String| Err(DataError(format!("invalid input transform: {m}")));
        if !(1..=4).contains(&self.c) {
            return err(format!("{} channels; 1 to 4 are supported", self.c));
        }
        let n = self.c.checked_mul(self.h).and_then(|n| n.checked_mul(self.w));
        if !matches!(n, Some(1..=MAX_SAMPLE)) {
            return err(format!("shape {}×{}×{} is empty or too large", self.c, self.h, self.w));
        }
        for ch in 0..self.c {
            let (m, s) = (self.mean[ch], self.std[ch]);
            if !m.is_finite() || !s.is_finite() || s == 0.0 {
                return err(format!("channel {ch} has mean {m} and std {s}; std must be finite and non-zero"));
            }
        }
        if !self.rotate_deg.is_finite() {
            return err(format!("rotation angle {}", self.rotate_deg));
        }
        if let Some(p) = &self.permutation {
            let n = self.sample_len();
            if p.len() != n || p.iter().any(|&i| i as usize >= n) {
                return err(format!("the pixel permutation has {} entries for samples of {n} values", p.len()));
            }
        }
        Ok(())
    }

    /// Applies the transform to one image, writing `sample_len()` values into `out`.
    /// `rng` drives augmentation only. Allocates its scratch; for many samples use
    /// [`Scratch::apply`].
    pub fn apply(&self, img: &Image, rng: Option<&mut SplitMix64>, out: &mut [f32]) -> Result<(), DataError> {
        Scratch::default().apply(self, img.c, img.h, img.w, &img.data, rng, out)
    }
}

/// Reusable intermediate planes for [`Transform`] application.
#[derive(Default)]
pub struct Scratch {
    gray: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    resizer: Resizer,
}

/// The resize's row pass output and its filter tables, cached for the last size pair.
#[derive(Default)]
struct Resizer {
    rows: Vec<f32>,
    filters: Option<Filters>,
}

/// Row and column filters for resizing `sh × sw` to `h × w`.
struct Filters {
    size: (usize, usize, usize, usize),
    y: Filter,
    x: Filter,
}

impl Scratch {
    /// Applies `t` to the `sc × sh × sw` image `src`, writing `t.sample_len()` values into
    /// `out`. `rng` drives augmentation only.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &mut self,
        t: &Transform,
        sc: usize,
        sh: usize,
        sw: usize,
        src: &[f32],
        rng: Option<&mut SplitMix64>,
        out: &mut [f32],
    ) -> Result<(), DataError> {
        t.check()?;
        self.run(t, sc, sh, sw, src, rng, out)
    }

    /// [`Scratch::apply`] for a transform that has passed [`Transform::check`] (a batch checks
    /// once, not per sample).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
        &mut self,
        t: &Transform,
        sc: usize,
        sh: usize,
        sw: usize,
        src: &[f32],
        rng: Option<&mut SplitMix64>,
        out: &mut [f32],
    ) -> Result<(), DataError> {
        let plane = sh.checked_mul(sw).filter(|&p| p > 0);
        if plane.and_then(|p| p.checked_mul(sc)) != Some(src.len()) {
            return Err(DataError(format!("an image of {sc}×{sh}×{sw} cannot hold {} values", src.len())));
        }
        if out.len() != t.sample_len() {
            return Err(DataError(format!(
                "output holds {} values, the transform makes {}",
                out.len(),
                t.sample_len()
            )));
        }
        // Step 1: the channels the geometry works on, `k` = 1 or t.c.
        let (k, src): (usize, &[f32]) = if sc == t.c {
            (sc, src)
        } else if sc == 1 {
            (1, src)
        } else if t.c == 1 {
            let p = sh * sw;
            self.gray.clear();
            self.gray.extend((0..p).map(|i| (0..sc).map(|ch| src[ch * p + i]).sum::<f32>() / sc as f32));
            (1, &self.gray)
        } else {
            return Err(DataError(format!("cannot turn {sc}-channel images into {}-channel inputs", t.c)));
        };
        let (h, w) = (t.h, t.w);
        // Step 2: geometry into `b`.
        let mut g = std::mem::take(&mut self.b);
        g.clear();
        g.resize(k * h * w, 0.0);
        if (sh, sw) == (h, w) {
            g.copy_from_slice(src);
        } else if t.pad && h >= sh && w >= sw {
            let (oy, ox) = ((h - sh) / 2, (w - sw) / 2);
            for ch in 0..k {
                for y in 0..sh {
                    let from = &src[(ch * sh + y) * sw..][..sw];
                    g[(ch * h + oy + y) * w + ox..][..sw].copy_from_slice(from);
                }
            }
        } else {
            self.resizer.run(k, sh, sw, src, h, w, &mut g);
        }
        // Steps 3 and 4 go back and forth between `g` and `a`.
        let mut other = std::mem::take(&mut self.a);
        if t.rotate_deg != 0.0 {
            rotate(k, h, w, &g, t.rotate_deg, &mut other);
            std::mem::swap(&mut g, &mut other);
        }
        if let (Some(aug), Some(rng)) = (t.augment, rng) {
            if shift_and_flip(k, h, w, &g, aug, rng, &mut other) {
                std::mem::swap(&mut g, &mut other);
            }
        }
        // Steps 5 and 6.
        let p = h * w;
        let normalise = |dst: &mut [f32]| {
            for (ch, dst) in dst.chunks_exact_mut(p).enumerate() {
                let from = if k == 1 { &g[..p] } else { &g[ch * p..][..p] };
                let (m, inv) = (t.mean[ch], 1.0 / t.std[ch]);
                for (d, &x) in dst.iter_mut().zip(from) {
                    *d = (x - m) * inv;
                }
            }
        };
        match &t.permutation {
            None => normalise(out),
            Some(perm) => {
                other.clear();
                other.resize(t.sample_len(), 0.0);
                normalise(&mut other);
                for (o, &i) in out.iter_mut().zip(perm.iter()) {
                    *o = other[i as usize];
                }
            }
        }
        self.a = other;
        self.b = g;
        Ok(())
    }
}

impl Resizer {
    /// Separable resize of `k` planes: rows first (`sh × w` into `self.rows`), then columns.
    #[allow(clippy::too_many_arguments)]
    fn run(&mut self, k: usize, sh: usize, sw: usize, src: &[f32], h: usize, w: usize, dst: &mut [f32]) {
        let key = (sh, sw, h, w);
        if self.filters.as_ref().map(|f| f.size) != Some(key) {
            self.filters = Some(Filters { size: key, y: Filter::new(sh, h), x: Filter::new(sw, w) });
        }
        let Some(Filters { y: fy, x: fx, .. }) = &self.filters else { return };
        self.rows.clear();
        self.rows.resize(k * sh * w, 0.0);
        for (from, to) in src.chunks_exact(sw).zip(self.rows.chunks_exact_mut(w)) {
            for (x, d) in to.iter_mut().enumerate() {
                *d = fx.taps(x).map(|(j, wt)| from[j] * wt).sum();
            }
        }
        for ch in 0..k {
            let from = &self.rows[ch * sh * w..][..sh * w];
            for y in 0..h {
                let to = &mut dst[(ch * h + y) * w..][..w];
                to.fill(0.0);
                for (j, wt) in fy.taps(y) {
                    for (d, &s) in to.iter_mut().zip(&from[j * w..][..w]) {
                        *d += s * wt;
                    }
                }
            }
        }
    }
}

/// Resampling weights along one axis: output `i` is `Σ weights[i][n] · input[start[i] + n]`.
/// The filter is a triangle (bilinear) over pixel centres, `(i + ½)·scale` in input
/// coordinates, widened by the scale factor when shrinking (the way Pillow resizes), and
/// renormalised at the borders (which equals clamping to the edge for enlargements).
struct Filter {
    start: Vec<usize>,
    taps: usize,
    weights: Vec<f32>,
}

impl Filter {
    fn new(src: usize, dst: usize) -> Filter {
        let scale = src as f64 / dst as f64;
        let support = scale.max(1.0);
        let taps = (2.0 * support).ceil() as usize + 1;
        let mut start = Vec::with_capacity(dst);
        let mut weights = vec![0.0f32; dst * taps];
        for i in 0..dst {
            let centre = (i as f64 + 0.5) * scale;
            let lo = (centre - support).floor().max(0.0) as usize;
            let hi = ((centre + support).ceil() as usize).min(src).min(lo + taps);
            let row = &mut weights[i * taps..][..taps];
            let mut sum = 0.0;
            for (n, j) in (lo..hi).enumerate() {
                let x = ((j as f64 + 0.5 - centre) / support).abs();
                let wt = (1.0 - x).max(0.0);
                row[n] = wt as f32;
                sum += wt;
            }
            if sum > 0.0 {
                row.iter_mut().for_each(|v| *v = (*v as f64 / sum) as f32);
            }
            start.push(lo);
        }
        Filter { start, taps, weights }
    }

    /// The (input index, weight) pairs of output `i`, zero weights skipped.
    fn taps(&self, i: usize) -> impl Iterator<Item = (usize, f32)> + '_ {
        let s = self.start[i];
        self.weights[i * self.taps..][..self.taps]
            .iter()
            .enumerate()
            .filter(|p| *p.1 != 0.0)
            .map(move |(n, &w)| (s + n, w))
    }
}

/// Rotates `k` planes of `h × w` counter-clockwise by `deg` about the centre; bilinear, zero
/// outside the source.
fn rotate(k: usize, h: usize, w: usize, src: &[f32], deg: f32, dst: &mut Vec<f32>) {
    dst.clear();
    dst.resize(k * h * w, 0.0);
    let (mut s, mut c) = (deg as f64).to_radians().sin_cos();
    // Exact quarter turns: sin/cos of 90° are 1 and 6e-17; snapping keeps them exact copies.
    for v in [&mut s, &mut c] {
        if v.abs() < 1e-9 {
            *v = 0.0;
        }
    }
    let (cy, cx) = ((h as f64 - 1.0) / 2.0, (w as f64 - 1.0) / 2.0);
    for y in 0..h {
        for x in 0..w {
            // Image coordinates have y pointing down, so a counter-clockwise turn on screen
            // takes the output offset (dx, dy) back to the source by the matrix below.
            let (dx, dy) = (x as f64 - cx, y as f64 - cy);
            let sx = cx + dx * c - dy * s;
            let sy = cy + dx * s + dy * c;
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = ((sx - x0) as f32, (sy - y0) as f32);
            let (x0, y0) = (x0 as i64, y0 as i64);
            for ch in 0..k {
                let plane = &src[ch * h * w..][..h * w];
                let at = |yy: i64, xx: i64| -> f32 {
                    if yy < 0 || xx < 0 || yy >= h as i64 || xx >= w as i64 {
                        0.0
                    } else {
                        plane[yy as usize * w + xx as usize]
                    }
                };
                let top = at(y0, x0) * (1.0 - fx) + at(y0, x0 + 1) * fx;
                let bottom = at(y0 + 1, x0) * (1.0 - fx) + at(y0 + 1, x0 + 1) * fx;
                dst[(ch * h + y) * w + x] = top * (1.0 - fy) + bottom * fy;
            }
        }
    }
}

/// Random shift (zero fill) and flip of `k` planes into `dst`. Draws the shift (two numbers)
/// and then the flip (one), always in that order, so a seed gives the same augmentation on
/// every target. Returns false (leaving `dst` alone) when it drew the identity.
fn shift_and_flip(
    k: usize,
    h: usize,
    w: usize,
    src: &[f32],
    aug: Augment,
    rng: &mut SplitMix64,
    dst: &mut Vec<f32>,
) -> bool {
    let p = aug.crop_pad;
    let (dy, dx) = if p > 0 {
        let span = 2 * p + 1;
        (rng.below(span) as i64 - p as i64, rng.below(span) as i64 - p as i64)
    } else {
        (0, 0)
    };
    let flip = aug.flip && rng.below(2) == 1;
    if (dy, dx, flip) == (0, 0, false) {
        return false;
    }
    dst.clear();
    dst.resize(k * h * w, 0.0);
    for ch in 0..k {
        for y in 0..h {
            let sy = y as i64 + dy;
            if sy < 0 || sy >= h as i64 {
                continue;
            }
            let from = &src[(ch * h + sy as usize) * w..][..w];
            let to = &mut dst[(ch * h + y) * w..][..w];
            for (x, d) in to.iter_mut().enumerate() {
                // Mirror the output column when flipping, then shift in source coordinates.
                let fx = if flip { (w - 1 - x) as i64 } else { x as i64 };
                let sx = fx + dx;
                if sx >= 0 && sx < w as i64 {
                    *d = from[sx as usize];
                }
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: ([f32; 4], [f32; 4]) = ([0.0; 4], [1.0; 4]);

    fn plain(c: usize, h: usize, w: usize) -> Transform {
        Transform::new(c, h, w, ID.0, ID.1)
    }

    fn ramp(c: usize, h: usize, w: usize) -> Image {
        Image { c, h, w, data: (0..c * h * w).map(|i| i as f32 / (c * h * w) as f32).collect() }
    }

    fn run(t: &Transform, img: &Image, rng: Option<&mut SplitMix64>) -> Vec<f32> {
        let mut out = vec![f32::NAN; t.sample_len()];
        t.apply(img, rng, &mut out).unwrap();
        out
    }

    #[test]
    fn same_size_is_an_exact_copy() {
        let img = ramp(3, 5, 7);
        assert_eq!(run(&plain(3, 5, 7), &img, None), img.data);
    }

    #[test]
    fn pad_centres_the_image_in_zeros() {
        let img = Image { c: 1, h: 28, w: 28, data: vec![1.0; 28 * 28] };
        let mut t = plain(1, 32, 32);
        t.pad = true;
        let out = run(&t, &img, None);
        for y in 0..32 {
            for x in 0..32 {
                let inside = (2..30).contains(&y) && (2..30).contains(&x);
                assert_eq!(out[y * 32 + x], if inside { 1.0 } else { 0.0 }, "({y}, {x})");
            }
        }
        // Without `pad` the same image is stretched: the border is image, not zero.
        t.pad = false;
        assert!(run(&t, &img, None).iter().all(|&v| (v - 1.0).abs() < 1e-6));
        // A smaller target is resized even with `pad`.
        t.pad = true;
        let t16 = Transform { h: 16, w: 16, ..t };
        assert!(run(&t16, &img, None).iter().all(|&v| (v - 1.0).abs() < 1e-6));
    }

    #[test]
    fn resize_averages_when_shrinking_and_interpolates_when_enlarging() {
        // 2×2 → 1×1 is the mean of the four pixels.
        let img = Image { c: 1, h: 2, w: 2, data: vec![0.0, 0.2, 0.4, 1.0] };
        assert!((run(&plain(1, 1, 1), &img, None)[0] - 0.4).abs() < 1e-6);
        // 1×2 → 1×4: half-pixel centres, edges clamped: [0, .25, .75, 1] of the step.
        let img = Image { c: 1, h: 1, w: 2, data: vec![0.0, 1.0] };
        let out = run(&plain(1, 1, 4), &img, None);
        for (o, e) in out.iter().zip([0.0, 0.25, 0.75, 1.0]) {
            assert!((o - e).abs() < 1e-6, "{out:?}");
        }
        // 8× shrink of every-4th-column lines: point-sampled bilinear would read 0.5 (pixels 3
        // and 4 around each centre); the widened filter gives about the true mean, 0.25.
        let img = Image { c: 1, h: 1, w: 32, data: (0..32).map(|i| (i % 4 == 0) as u8 as f32).collect() };
        let out = run(&plain(1, 1, 4), &img, None);
        assert!(out.iter().all(|&v| (v - 0.25).abs() < 0.03), "{out:?}");
    }

    #[test]
    fn gray_to_rgb_replicates_and_rgb_to_gray_averages() {
        let gray = ramp(1, 3, 3);
        let out = run(&plain(3, 3, 3), &gray, None);
        for ch in 0..3 {
            assert_eq!(&out[ch * 9..][..9], &gray.data[..]);
        }
        let rgb = Image { c: 3, h: 1, w: 2, data: vec![0.3, 0.0, 0.6, 1.0, 0.0, 0.5] };
        let out = run(&plain(1, 1, 2), &rgb, None);
        assert!((out[0] - 0.3).abs() < 1e-6 && (out[1] - 0.5).abs() < 1e-6, "{out:?}");
        assert!(plain(2, 1, 2).apply(&rgb, None, &mut [0.0; 4]).is_err());
    }

    #[test]
    fn normalisation_uses_each_channels_mean_and_std() {
        let img = Image { c: 1, h: 1, w: 1, data: vec![0.5] };
        let t = Transform::new(3, 1, 1, [0.5, 0.25, 1.0, 0.0], [0.5, 0.25, 2.0, 1.0]);
        assert_eq!(run(&t, &img, None), vec![0.0, 1.0, -0.25]);
        let zero_std = Transform::new(1, 1, 1, [0.0; 4], [0.0; 4]);
        assert!(zero_std.apply(&img, None, &mut [0.0]).is_err());
    }

    #[test]
    fn rotation_by_zero_is_identity_and_by_90_moves_pixels_counter_clockwise() {
        let img = ramp(1, 5, 5);
        assert_eq!(run(&plain(1, 5, 5), &img, None), img.data);
        let mut one = Image { c: 1, h: 5, w: 5, data: vec![0.0; 25] };
        one.data[2 * 5 + 4] = 1.0; // right of the centre (2, 2)
        let mut t = plain(1, 5, 5);
        t.rotate_deg = 90.0;
        let out = run(&t, &one, None);
        // Counter-clockwise on screen: right of centre goes to above the centre.
        assert!((out[2] - 1.0).abs() < 1e-6, "{out:?}");
        assert!((out.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        // Four quarter turns are the identity.
        let mut x = img.clone();
        for _ in 0..4 {
            x.data = run(&t, &x, None);
        }
        assert!(x.data.iter().zip(&img.data).all(|(a, b)| (a - b).abs() < 1e-6));
        // 45° keeps the centre and loses the corners to zero fill.
        t.rotate_deg = 45.0;
        let out = run(&t, &Image { c: 1, h: 5, w: 5, data: vec![1.0; 25] }, None);
        assert!((out[12] - 1.0).abs() < 1e-6 && out[0] < 0.5, "{out:?}");
    }

    #[test]
    fn permutation_reorders_the_normalised_sample() {
        let img = ramp(1, 2, 2);
        let mut t = Transform::new(1, 2, 2, [0.5; 4], [2.0; 4]);
        t.permutation = Some(Arc::new(vec![3, 0, 2, 1]));
        let n: Vec<f32> = img.data.iter().map(|v| (v - 0.5) / 2.0).collect();
        assert_eq!(run(&t, &img, None), vec![n[3], n[0], n[2], n[1]]);
        t.permutation = Some(Arc::new(vec![0, 1, 2]));
        assert!(t.apply(&img, None, &mut [0.0; 4]).is_err());
        t.permutation = Some(Arc::new(vec![0, 1, 2, 4]));
        assert!(t.apply(&img, None, &mut [0.0; 4]).is_err());
    }

    #[test]
    fn augmentation_is_deterministic_per_seed_and_only_with_a_stream() {
        let img = ramp(1, 8, 8);
        let mut t = plain(1, 8, 8);
        t.augment = Some(Augment { crop_pad: 2, flip: true });
        assert_eq!(run(&t, &img, None), img.data, "no stream, no augmentation");
        let draw = |seed| {
            let mut r = SplitMix64::new(seed);
            (0..6).flat_map(|_| run(&t, &img, Some(&mut r))).collect::<Vec<f32>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
        // Each output is a shifted (zero-filled), maybe flipped copy of the input.
        let mut r = SplitMix64::new(5);
        for _ in 0..20 {
            let out = run(&t, &img, Some(&mut r));
            let found = (-2i64..=2).any(|dy| {
                (-2i64..=2).any(|dx| {
                    [false, true].iter().any(|&flip| {
                        (0..8).all(|y| {
                            (0..8).all(|x| {
                                let fx = if flip { 7 - x } else { x };
                                let (sy, sx) = (y + dy, fx + dx);
                                let e = if (0..8).contains(&sy) && (0..8).contains(&sx) {
                                    img.data[(sy * 8 + sx) as usize]
                                } else {
                                    0.0
                                };
                                out[(y * 8 + x) as usize] == e
                            })
                        })
                    })
                })
            });
            assert!(found, "{out:?}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let img = ramp(1, 2, 2);
        assert!(plain(1, 2, 2).apply(&img, None, &mut [0.0; 3]).is_err());
        assert!(plain(0, 2, 2).apply(&img, None, &mut []).is_err());
        assert!(plain(5, 1, 1).apply(&img, None, &mut [0.0; 5]).is_err());
        assert!(plain(1, usize::MAX, 2).check().is_err());
        let short = Image { c: 1, h: 2, w: 2, data: vec![0.0; 3] };
        assert!(plain(1, 2, 2).apply(&short, None, &mut [0.0; 4]).is_err());
    }
}
