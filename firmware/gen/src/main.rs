//! `edgecl-firmware-gen BACKBONE.ecb COUNT OUT.npy`: the first test image of each of the
//! classes `0..COUNT` of the embedded Fashion-MNIST subset, transformed into the backbone's
//! input exactly as `edgecl learn` and `eval` load samples (`Dataset::load`), written as one
//! f32 `.npy` of shape `[COUNT, C, H, W]`. `edgecl predict` reads a `.npy` as already
//! normalised, and the firmware reads the same bytes, so both run the same inputs bit for bit.
//! Prints one line per image: its index in the test split and its true class.

use edgecl::backbone::Backbone;
use edgecl::data::{Dataset, Source, Split, Transform};
use std::process::ExitCode;

fn run(args: &[String]) -> Result<(), String> {
    let [backbone, count, out] = args else {
        return Err("usage: edgecl-firmware-gen BACKBONE.ecb COUNT OUT.npy".into());
    };
    let count: usize = count.parse().map_err(|_| format!("COUNT must be a whole number, got {count}"))?;
    let bytes = std::fs::read(backbone).map_err(|e| format!("{backbone}: {e}"))?;
    // Backbones are read in place as f32: copy into 8-byte-aligned storage.
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    let aligned = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()];
    aligned.copy_from_slice(&bytes);
    let bb = Backbone::open(aligned).map_err(|e| format!("{backbone}: {e}"))?;
    let ds = Dataset::open(&Source::Embedded, Split::Test).map_err(|e| e.to_string())?;
    if count == 0 || count > ds.num_classes() {
        return Err(format!("COUNT must be 1..={}", ds.num_classes()));
    }
    let idx: Vec<usize> = (0..count as u32)
        .map(|c| ds.labels().iter().position(|&l| l == c).ok_or(format!("no test image of class {c}")))
        .collect::<Result<_, _>>()?;
    let i = bb.input();
    let (c, h, w) = (i.channels as usize, i.height as usize, i.width as usize);
    // As `edgecl`'s base transform: 28×28 images into a larger input are padded, not resized.
    let mut t = Transform::new(c, h, w, i.mean, i.std);
    t.pad = true;
    let mut x = vec![0f32; count * t.sample_len()];
    ds.load(&idx, &t, None, &mut x).map_err(|e| e.to_string())?;
    std::fs::write(out, edgecl::data::npy::write(&[count, c, h, w], &x)).map_err(|e| format!("{out}: {e}"))?;
    for (n, &j) in idx.iter().enumerate() {
        println!("image {n}: test sample {j}, class {} ({})", ds.label(j), ds.class_names()[ds.label(j) as usize]);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgecl-firmware-gen: {e}");
            ExitCode::FAILURE
        }
    }
}
