//! Pools over a batch and their gradients. Max pooling routes the gradient to the first
//! maximum of each window (padding never wins); average pooling spreads it evenly over the
//! window's divisor; the global average over the plane.

use crate::kernels::reference::{self, PoolShape};

/// Visits the input range of every output position: `f(output index, rows, cols)` for one
/// channel, with rows and columns clipped to the image.
fn windows(s: &PoolShape, mut f: impl FnMut(usize, core::ops::Range<usize>, core::ops::Range<usize>)) {
    let (oh, ow) = s.out_hw().unwrap_or((0, 0));
    for oy in 0..oh {
        let y0 = (oy * s.sh) as isize - s.pad[0] as isize;
        let ys = y0.max(0) as usize..((y0 + s.kh as isize).min(s.h as isize)).max(0) as usize;
        for ox in 0..ow {
            let x0 = (ox * s.sw) as isize - s.pad[1] as isize;
            let xs = x0.max(0) as usize..((x0 + s.kw as isize).min(s.w as isize)).max(0) as usize;
            f(oy * ow + ox, ys.clone(), xs);
        }
    }
}

pub fn forward(s: &PoolShape, max: bool, x: &[f32], batch: usize, y: &mut [f32]) {
    let (oh, ow) = s.out_hw().unwrap_or((0, 0));
    let (xl, yl) = (s.c * s.h * s.w, s.c * oh * ow);
    for b in 0..batch {
        reference::pool(s, max, &x[b * xl..(b + 1) * xl], &mut y[b * yl..(b + 1) * yl]);
    }
}

/// Adds the gradient of [`forward`] into `dx`.
pub fn backward(s: &PoolShape, max: bool, x: &[f32], dy: &[f32], batch: usize, dx: &mut [f32]) {
    let (oh, ow) = s.out_hw().unwrap_or((0, 0));
    let (plane, op) = (s.h * s.w, oh * ow);
    for bc in 0..batch * s.c {
        let (xc, dyc) = (&x[bc * plane..(bc + 1) * plane], &dy[bc * op..(bc + 1) * op]);
        let dxc = &mut dx[bc * plane..(bc + 1) * plane];
        windows(s, |o, ys, xs| {
            if max {
                let mut best: Option<(usize, f32)> = None;
                for iy in ys {
                    for ix in xs.clone() {
                        let v = xc[iy * s.w + ix];
                        if best.is_none_or(|(_, m)| v > m) {
                            best = Some((iy * s.w + ix, v));
                        }
                    }
                }
                if let Some((i, _)) = best {
                    dxc[i] += dyc[o];
                }
            } else {
                let count = if s.count_include_pad { s.kh * s.kw } else { (ys.len() * xs.len()).max(1) };
                let g = dyc[o] / count as f32;
                for iy in ys {
                    for ix in xs.clone() {
                        dxc[iy * s.w + ix] += g;
                    }
                }
            }
        });
    }
}

/// `[batch][c][plane] -> [batch][c]`.
pub fn global_forward(c: usize, plane: usize, x: &[f32], batch: usize, y: &mut [f32]) {
    for b in 0..batch {
        reference::global_avg_pool(c, plane, &x[b * c * plane..(b + 1) * c * plane], &mut y[b * c..(b + 1) * c]);
    }
}

/// Adds the gradient of [`global_forward`]: every position gets `dy / plane`.
pub fn global_backward(c: usize, plane: usize, dy: &[f32], batch: usize, dx: &mut [f32]) {
    for bc in 0..batch * c {
        let g = dy[bc] / plane as f32;
        for d in &mut dx[bc * plane..(bc + 1) * plane] {
            *d += g;
        }
    }
}
