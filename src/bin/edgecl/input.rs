//! Turning files into network inputs: images (resized and normalised as the backbone says)
//! and `.npy` tensors (already preprocessed).

use anyhow::{bail, Context, Result};
use edgecl::backbone::Backbone;
use std::path::Path;

/// Reads `path` as a batch of inputs for `bb`; returns the data (NCHW) and the batch size.
pub fn load(path: &Path, bb: &Backbone) -> Result<(Vec<f32>, usize)> {
    let shape = bb.input_shape();
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    if ext == "npy" {
        let bytes = std::fs::read(path)?;
        let (dims, data) = edgecl::data::npy::parse(&bytes)?;
        let per = shape.len();
        let want = [shape.c, shape.h, shape.w];
        let batch = match dims.as_slice() {
            d if d == want => 1,
            [n, rest @ ..] if rest == want => *n,
            [n, f] if shape.h == 1 && shape.w == 1 && *f == shape.c => *n,
            [f] if shape.h == 1 && shape.w == 1 && *f == shape.c => 1,
            _ => bail!(
                "tensor shape {dims:?} does not match the backbone input {}x{}x{} (batch optional)",
                shape.c,
                shape.h,
                shape.w
            ),
        };
        if batch == 0 || data.len() != batch * per {
            bail!("empty tensor");
        }
        return Ok((data, batch));
    }
    let img = image::open(path).context("not a readable PNG or JPEG image")?;
    let img = img.resize_exact(shape.w as u32, shape.h as u32, image::imageops::FilterType::Triangle);
    let spec = bb.input();
    let plane = shape.h * shape.w;
    let mut x = vec![0.0f32; shape.len()];
    match shape.c {
        1 => {
            for (i, p) in img.to_luma32f().pixels().enumerate() {
                x[i] = (p.0[0] - spec.mean[0]) / spec.std[0];
            }
        }
        3 => {
            for (i, p) in img.to_rgb32f().pixels().enumerate() {
                for c in 0..3 {
                    x[c * plane + i] = (p.0[c] - spec.mean[c]) / spec.std[c];
                }
            }
        }
        c => bail!("images can feed 1- or 3-channel inputs; this backbone takes {c} channels (use .npy)"),
    }
    Ok((x, 1))
}
