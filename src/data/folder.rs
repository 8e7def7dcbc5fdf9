//! Image-folder datasets: `DIR/<class>/*` or `DIR/{train,test}/<class>/*`.
//!
//! The layout is scanned once; images are decoded only when a batch asks for them. Class
//! folders are sorted by name (byte order) and their position is the class id; files are
//! sorted by name and only `png`, `jpg` and `jpeg` (any case) count, other files and hidden
//! entries (names starting with `.`) are ignored.
//!
//! - With both `DIR/train` and `DIR/test` the classes are the folders of `train/`; `test/` may
//!   lack a class but may not have a class that `train/` does not. Other entries of `DIR` are
//!   ignored.
//! - Without them every class folder is split deterministically: of each class's images in
//!   sorted order, the 5th, 10th, 15th, … go to test and the rest to train.
//!
//! Errors: no class folders, a single class, a class folder without images, and (at decode
//! time) an image that does not decode, each naming the folder or file and what to do.

use std::path::{Path, PathBuf};

use super::transform::Image;
use super::DataError;

/// Image file extensions counted as samples (compared case-insensitively).
pub const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Largest image side decoded, and the decoder's allocation budget (44 Mpx of 8-bit RGB),
/// so that a hostile header cannot make the decoder allocate gigabytes. The f32 planes made
/// from the decoded image take four times the budget at most.
const MAX_SIDE: u32 = 16_384;
const MAX_DECODE_BYTES: u64 = 128 << 20;

/// Image files with their class ids, in sorted order.
pub type Files = Vec<(PathBuf, u32)>;

/// A scanned folder dataset: class names and, per split, (file, class id) in sorted order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub class_names: Vec<String>,
    pub train: Files,
    pub test: Files,
}

/// Scans `dir` (see the module documentation for the layouts it accepts).
pub fn scan(dir: &Path) -> Result<Layout, DataError> {
    let (train_dir, test_dir) = (dir.join("train"), dir.join("test"));
    match (train_dir.is_dir(), test_dir.is_dir()) {
        (true, true) => {
            let (class_names, train) = scan_classes(&train_dir, None)?;
            let (_, test) = scan_classes(&test_dir, Some(&class_names))?;
            Ok(Layout { class_names, train, test })
        }
        (false, false) => {
            let (class_names, all) = scan_classes(dir, None)?;
            let (mut train, mut test) = (Vec::new(), Vec::new());
            let (mut prev, mut nth) = (None, 0usize);
            for (path, class) in all {
                // `all` is grouped by class: count afresh at each class's first image.
                if prev != Some(class) {
                    (prev, nth) = (Some(class), 0);
                }
                nth += 1;
                if nth % 5 == 0 { &mut test } else { &mut train }.push((path, class));
            }
            Ok(Layout { class_names, train, test })
        }
        (has_train, _) => {
            let (there, missing) = if has_train { ("train", "test") } else { ("test", "train") };
            Err(DataError(format!(
                "{}: has a {there}/ folder but no {missing}/ folder; give both {{train,test}}/<class>/ or only \
                 <class>/ folders (then every 5th image of each class is held out for testing)",
                dir.display()
            )))
        }
    }
}

/// Lists the class folders of `dir` and their images. With `known` (the train classes), the
/// folders must be among them and ids come from that list.
fn scan_classes(dir: &Path, known: Option<&[String]>) -> Result<(Vec<String>, Files), DataError> {
    let mut classes: Vec<(String, PathBuf)> = entries(dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .map(|p| (p.file_name().unwrap_or_default().to_string_lossy().into_owned(), p))
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(DataError(format!(
            "{}: holds no class folders; expected {0}/<class>/*.png (or .jpg) or {0}/{{train,test}}/<class>/*",
            dir.display()
        )));
    }
    let names: Vec<String> = match known {
        Some(k) => k.to_vec(),
        None if classes.len() == 1 => {
            return Err(DataError(format!(
                "{}: has only one class folder ({}); a classifier needs at least two",
                dir.display(),
                classes[0].0
            )))
        }
        None => classes.iter().map(|c| c.0.clone()).collect(),
    };
    let mut samples = Vec::new();
    for (name, path) in &classes {
        let id = names.iter().position(|n| n == name).ok_or_else(|| {
            DataError(format!(
                "{}: class folder {name} has no counterpart in the train folder; add it there or remove it",
                path.display()
            ))
        })?;
        let mut files: Vec<PathBuf> = entries(path)?.into_iter().filter(|p| is_image(p) && p.is_file()).collect();
        files.sort();
        if files.is_empty() {
            return Err(DataError(format!(
                "{}: class folder holds no {} images; add some or remove the folder",
                path.display(),
                EXTENSIONS.join("/")
            )));
        }
        samples.extend(files.into_iter().map(|f| (f, id as u32)));
    }
    Ok((names, samples))
}

/// The non-hidden entries of `dir`.
fn entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let err = |e: std::io::Error| DataError(format!("{}: cannot list folder: {e}", dir.display()));
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            out.push(entry.path());
        }
    }
    Ok(out)
}

fn is_image(path: &Path) -> bool {
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
    ext.is_some_and(|e| EXTENSIONS.contains(&e.as_str()))
}

/// Decodes an image file into f32 in [0, 1]: one channel for gray images (with or without
/// alpha), three for colour ones (alpha dropped). The format is guessed from the content.
pub fn decode(path: &Path) -> Result<Image, DataError> {
    let err =
        |what: String| DataError(format!("{}: cannot decode image: {what}; fix or remove the file", path.display()));
    let mut reader = image::ImageReader::open(path)
        .map_err(|e| err(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| err(e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| err(e.to_string()))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(err("it has no pixels".into()));
    }
    // Straight from the decoded integers to channel-major f32 planes, without an interleaved
    // f32 copy in between: 8-bit images stay 8-bit, deeper ones go through 16 bits.
    let color = img.color();
    let eight_bit = color.bytes_per_pixel() == color.channel_count();
    let (c, data) = match (color.has_color(), eight_bit) {
        (true, true) => (3, planes(img.into_rgb8().as_raw(), 3, 255.0)),
        (true, false) => (3, planes(img.into_rgb16().as_raw(), 3, 65535.0)),
        (false, true) => (1, planes(img.into_luma8().as_raw(), 1, 255.0)),
        (false, false) => (1, planes(img.into_luma16().as_raw(), 1, 65535.0)),
    };
    Ok(Image { c, h, w, data })
}

/// Interleaved samples with `c` channels to channel-major f32 planes divided by `max`.
fn planes<T: Copy + Into<f32>>(raw: &[T], c: usize, max: f32) -> Vec<f32> {
    let p = raw.len() / c;
    let mut out = vec![0.0; raw.len()];
    for (i, px) in raw.chunks_exact(c).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            out[ch * p + i] = v.into() / max;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tests::temp_dir;

    /// Writes a `side × side` gray PNG whose pixels are all `v`.
    fn png(path: &Path, v: u8, side: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::GrayImage::from_pixel(side, side, image::Luma([v])).save(path).unwrap();
    }

    #[test]
    fn flat_layout_sorts_and_holds_out_every_fifth_image() {
        let dir = temp_dir("folder-flat");
        for i in 0..7 {
            png(&dir.join(format!("b/{i}.png")), 10 * i, 2);
        }
        for i in 0..5 {
            png(&dir.join(format!("a/x{i}.PNG")), 0, 2);
        }
        std::fs::write(dir.join("a/notes.txt"), "not an image").unwrap();
        std::fs::write(dir.join("a/.hidden.png"), "hidden").unwrap();
        std::fs::create_dir_all(dir.join(".cache")).unwrap();
        let l = scan(&dir).unwrap();
        assert_eq!(l.class_names, ["a", "b"]);
        let names = |v: &[(PathBuf, u32)]| -> Vec<String> {
            v.iter().map(|(p, c)| format!("{c}:{}", p.strip_prefix(&dir).unwrap().display())).collect()
        };
        assert_eq!(names(&l.test), ["0:a/x4.PNG", "1:b/4.png"]);
        assert_eq!(
            names(&l.train),
            [
                "0:a/x0.PNG",
                "0:a/x1.PNG",
                "0:a/x2.PNG",
                "0:a/x3.PNG",
                "1:b/0.png",
                "1:b/1.png",
                "1:b/2.png",
                "1:b/3.png",
                "1:b/5.png",
                "1:b/6.png"
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn split_layout_takes_classes_from_train() {
        let dir = temp_dir("folder-split");
        for c in ["cat", "dog", "eel"] {
            png(&dir.join(format!("train/{c}/1.png")), 1, 2);
        }
        png(&dir.join("test/eel/z.png"), 1, 2);
        png(&dir.join("test/cat/z.png"), 1, 2);
        let l = scan(&dir).unwrap();
        assert_eq!(l.class_names, ["cat", "dog", "eel"]);
        assert_eq!(l.train.iter().map(|s| s.1).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(l.test.iter().map(|s| s.1).collect::<Vec<_>>(), [0, 2]);
        png(&dir.join("test/fox/z.png"), 1, 2);
        let e = scan(&dir).unwrap_err().0;
        assert!(e.contains("fox") && e.contains("train"), "{e}");
        std::fs::remove_dir_all(dir.join("test")).unwrap();
        let e = scan(&dir).unwrap_err().0;
        assert!(e.contains("no test/"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn layout_errors_name_the_folder() {
        let dir = temp_dir("folder-errors");
        let e = scan(&dir).unwrap_err().0;
        assert!(e.contains(&dir.display().to_string()) && e.contains("no class folders"), "{e}");
        png(&dir.join("only/1.png"), 1, 2);
        let e = scan(&dir).unwrap_err().0;
        assert!(e.contains("only one class") && e.contains("only"), "{e}");
        std::fs::create_dir_all(dir.join("second")).unwrap();
        std::fs::write(dir.join("second/readme.txt"), "x").unwrap();
        let e = scan(&dir).unwrap_err().0;
        assert!(e.contains(&dir.join("second").display().to_string()) && e.contains("no png"), "{e}");
        assert!(scan(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn decode_gives_gray_or_rgb_planes_and_names_corrupt_files() {
        let dir = temp_dir("folder-decode");
        png(&dir.join("g.png"), 51, 3);
        let g = decode(&dir.join("g.png")).unwrap();
        assert_eq!((g.c, g.h, g.w), (1, 3, 3));
        assert!(g.data.iter().all(|&v| (v - 0.2).abs() < 1e-6));
        let mut rgb = image::RgbImage::new(2, 1);
        rgb.put_pixel(0, 0, image::Rgb([255, 0, 0]));
        rgb.put_pixel(1, 0, image::Rgb([0, 0, 255]));
        rgb.save(dir.join("c.png")).unwrap();
        let c = decode(&dir.join("c.png")).unwrap();
        assert_eq!((c.c, c.h, c.w), (3, 1, 2));
        assert_eq!(c.data, [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
        // 16-bit gray and RGBA (alpha dropped).
        image::ImageBuffer::from_pixel(2, 2, image::Luma([32768u16])).save(dir.join("g16.png")).unwrap();
        let g16 = decode(&dir.join("g16.png")).unwrap();
        assert_eq!((g16.c, g16.data.len()), (1, 4));
        assert!(g16.data.iter().all(|&v| (v - 32768.0 / 65535.0).abs() < 1e-6));
        image::RgbaImage::from_pixel(1, 1, image::Rgba([0, 255, 0, 7])).save(dir.join("a.png")).unwrap();
        assert_eq!(decode(&dir.join("a.png")).unwrap().data, [0.0, 1.0, 0.0]);
        let bytes = std::fs::read(dir.join("g.png")).unwrap();
        std::fs::write(dir.join("bad.png"), &bytes[..bytes.len() / 2]).unwrap();
        std::fs::write(dir.join("text.jpg"), "hello").unwrap();
        for f in ["bad.png", "text.jpg"] {
            let e = decode(&dir.join(f)).unwrap_err().0;
            assert!(e.contains(f) && e.contains("cannot decode"), "{e}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
