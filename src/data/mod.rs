//! (std) Reading inputs and datasets from files. Every reader treats its file as hostile:
//! lengths are checked before anything is allocated from them, errors name the file's fault.
//!
//! - [`npy`]: `.npy` tensors, for comparing against PyTorch and onnxruntime;
//! - [`idx`]: IDX image and label files (MNIST, Fashion-MNIST), plain or gzipped;
//! - [`folder`]: `DIR/<class>/*` image folders, decoded on demand;
//! - [`Transform`]: decoded image → backbone input (resize or pad, rotation, augmentation,
//!   normalisation, pixel permutation);
//! - [`scenario`]: continual-learning task sequences (split, permuted, rotated) over a dataset.
//!
//! A [`Source`] names where samples come from (the CLI's `--data`); [`Dataset::open`] reads one
//! split of it. A dataset holds labels and either all pixels (IDX; Fashion-MNIST's training
//! split is 47 MB) or only file paths (folders), and [`Dataset::load`] writes transformed
//! samples into a caller-owned batch buffer.

pub mod folder;
pub mod idx;
pub mod npy;
pub mod scenario;
mod transform;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::rng::SplitMix64;
pub use transform::{Augment, Image, Scratch, Transform};

/// Why a source or sample could not be read; the message names the file or folder, what is
/// wrong with it and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataError(pub String);

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DataError {}

/// Where samples come from, as written on the command line (`--data`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `fashion-mnist`: the IDX files of Debian's `dataset-fashion-mnist` package.
    FashionMnist,
    /// `idx:DIR`: `DIR/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.
    Idx(PathBuf),
    /// `folder:DIR`: `DIR/<class>/*` or `DIR/{train,test}/<class>/*` (see [`folder`]).
    Folder(PathBuf),
    /// `embedded`: the Fashion-MNIST subset compiled into edgecl (`src/data/embedded/`).
    Embedded,
}

/// Folders searched for Fashion-MNIST, in order (Debian installs into the first).
pub const FASHION_MNIST_DIRS: [&str; 2] =
    ["/usr/share/datasets/fashion-mnist", "/usr/local/share/datasets/fashion-mnist"];

/// Fashion-MNIST's class names, in label order (Xiao, Rasul, Vollgraf 2017, table 1).
pub const FASHION_MNIST_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

const SOURCE_FORMS: &str = "fashion-mnist, embedded, idx:DIR or folder:DIR";

impl Source {
    /// Parses a `--data` value: `fashion-mnist`, `embedded`, `idx:DIR` or `folder:DIR`.
    pub fn parse(spec: &str) -> Result<Source, DataError> {
        let dir = |d: &str, kind: &str| {
            if d.is_empty() {
                Err(DataError(format!("--data {spec}: give a folder after `{kind}:`, e.g. {kind}:./data")))
            } else {
                Ok(PathBuf::from(d))
            }
        };
        match spec {
            "fashion-mnist" => Ok(Source::FashionMnist),
            "embedded" => Ok(Source::Embedded),
            _ => match spec.split_once(':') {
                Some(("idx", d)) => Ok(Source::Idx(dir(d, "idx")?)),
                Some(("folder", d)) => Ok(Source::Folder(dir(d, "folder")?)),
                _ => Err(DataError(format!("--data {spec}: unknown data source; use one of {SOURCE_FORMS}"))),
            },
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::FashionMnist => f.write_str("fashion-mnist"),
            Source::Embedded => f.write_str("embedded"),
            Source::Idx(d) => write!(f, "idx:{}", d.display()),
            Source::Folder(d) => write!(f, "folder:{}", d.display()),
        }
    }
}

/// Which half of a source.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Split {
    Train,
    Test,
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
        })
    }
}

/// One split of a source: a label per sample and the samples' pixels or files.
#[derive(Debug)]
pub struct Dataset {
    name: String,
    labels: Vec<u32>,
    class_names: Vec<String>,
    samples: Samples,
}

#[derive(Debug)]
enum Samples {
    /// Gray images of `rows × cols` bytes, one after another.
    Pixels { rows: usize, cols: usize, data: Vec<u8> },
    /// One image file per sample, decoded on demand.
    Files(Vec<PathBuf>),
}

/// The embedded subset (see `src/data/embedded/README.md`).
#[cfg(feature = "embedded-data")]
const EMBEDDED: [(&str, &[u8]); 4] = [
    ("embedded train-images-idx3-ubyte.gz", include_bytes!("embedded/train-images-idx3-ubyte.gz")),
    ("embedded train-labels-idx1-ubyte.gz", include_bytes!("embedded/train-labels-idx1-ubyte.gz")),
    ("embedded t10k-images-idx3-ubyte.gz", include_bytes!("embedded/t10k-images-idx3-ubyte.gz")),
    ("embedded t10k-labels-idx1-ubyte.gz", include_bytes!("embedded/t10k-labels-idx1-ubyte.gz")),
];

impl Dataset {
    /// Reads one split of `src`: for IDX sources all labels and pixels, for folders the file
    /// list (images are decoded in [`Dataset::load`]).
    pub fn open(src: &Source, split: Split) -> Result<Dataset, DataError> {
        let name = format!("{src} ({split})");
        match src {
            #[cfg(feature = "embedded-data")]
            Source::Embedded => {
                let pick = if split == Split::Train { 0 } else { 2 };
                let images = idx::parse_images(EMBEDDED[pick].1, EMBEDDED[pick].0)?;
                let labels = idx::parse_labels(EMBEDDED[pick + 1].1, EMBEDDED[pick + 1].0)?;
                Dataset::from_idx(name, images, labels, EMBEDDED[pick].0, EMBEDDED[pick + 1].0, fashion_names())
            }
            #[cfg(not(feature = "embedded-data"))]
            Source::Embedded => Err(DataError(format!(
                "{name}: this edgecl was built without the embedded Fashion-MNIST subset (cargo feature \
                 `embedded-data`); use --data fashion-mnist, idx:DIR or folder:DIR"
            ))),
            Source::FashionMnist => {
                let dir = FASHION_MNIST_DIRS.iter().map(Path::new).find(|d| d.is_dir()).ok_or_else(|| {
                    DataError(format!(
                        "Fashion-MNIST is not installed (looked in {}); install it with \
                         `apt-get install dataset-fashion-mnist`, or download its four IDX files and use \
                         --data idx:DIR, or use --data embedded for the built-in subset",
                        FASHION_MNIST_DIRS.join(", ")
                    ))
                })?;
                Dataset::open_idx(name, dir, split, Some(fashion_names()))
            }
            Source::Idx(dir) => Dataset::open_idx(name, dir, split, None),
            Source::Folder(dir) => {
                let layout = folder::scan(dir)?;
                let files = if split == Split::Train { layout.train } else { layout.test };
                if files.is_empty() {
                    return Err(DataError(format!(
                        "{}: no {split} images; without train/ and test/ folders every 5th image of a class \
                         is a test image, so give some class at least 5 images",
                        dir.display()
                    )));
                }
                let (paths, labels) = files.into_iter().unzip();
                Ok(Dataset { name, labels, class_names: layout.class_names, samples: Samples::Files(paths) })
            }
        }
    }

    fn open_idx(name: String, dir: &Path, split: Split, names: Option<Vec<String>>) -> Result<Dataset, DataError> {
        let prefix = if split == Split::Train { "train" } else { "t10k" };
        let images_path = idx_file(dir, &format!("{prefix}-images-idx3-ubyte"))?;
        let labels_path = idx_file(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
        let images = idx::read_images(&images_path)?;
        let labels = idx::read_labels(&labels_path)?;
        let names = match names {
            Some(n) => n,
            None => {
                // Both splits' labels decide the class count, so train and test agree on it
                // even when one split lacks the highest class. Label files are small.
                let other = if split == Split::Train { "t10k" } else { "train" };
                let other = idx::read_labels(&idx_file(dir, &format!("{other}-labels-idx1-ubyte"))?)?;
                let classes = labels.iter().chain(&other).max().map_or(0, |&m| m as usize + 1);
                (0..classes).map(|c| c.to_string()).collect()
            }
        };
        let (images_name, labels_name) = (images_path.display().to_string(), labels_path.display().to_string());
        Dataset::from_idx(name, images, labels, &images_name, &labels_name, names)
    }

    fn from_idx(
        name: String,
        images: idx::Images,
        labels: Vec<u8>,
        images_name: &str,
        labels_name: &str,
        class_names: Vec<String>,
    ) -> Result<Dataset, DataError> {
        if labels.len() != images.count {
            return Err(DataError(format!(
                "{labels_name} holds {} labels but {images_name} holds {} images; they must come in pairs",
                labels.len(),
                images.count
            )));
        }
        if let Some(i) = labels.iter().position(|&l| l as usize >= class_names.len()) {
            return Err(DataError(format!(
                "{labels_name}: label {} of sample {i} is not one of the {} classes of this dataset",
                labels[i],
                class_names.len()
            )));
        }
        if class_names.len() < 2 {
            return Err(DataError(format!("{labels_name}: all labels are 0; a classifier needs at least two classes")));
        }
        let samples = Samples::Pixels { rows: images.rows, cols: images.cols, data: images.pixels };
        Ok(Dataset { name, labels: labels.into_iter().map(u32::from).collect(), class_names, samples })
    }

    /// The source and split, e.g. `embedded (train)`, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The class id of sample `i` (panics past the end, like slice indexing).
    pub fn label(&self, i: usize) -> u32 {
        self.labels[i]
    }

    /// All labels, in sample order.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Class names in class-id order: Fashion-MNIST's names, `"0"`, `"1"`, … for other IDX
    /// sources, the sorted class folder names for folders.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// Transforms samples `idx` into `out` (`idx.len() * t.sample_len()` values, NCHW).
    /// `rng` drives augmentation only: `None` means none even if `t.augment` is set. Fails on
    /// an index past the end, a wrongly sized `out`, an invalid transform, or (folders) an
    /// image that does not decode.
    pub fn load(
        &self,
        idx: &[usize],
        t: &Transform,
        mut rng: Option<&mut SplitMix64>,
        out: &mut [f32],
    ) -> Result<(), DataError> {
        t.check()?;
        let n = t.sample_len();
        if Some(out.len()) != idx.len().checked_mul(n) {
            return Err(DataError(format!(
                "a batch of {} samples of {n} values needs {} values, the buffer holds {}",
                idx.len(),
                idx.len().saturating_mul(n),
                out.len()
            )));
        }
        if let Some(&bad) = idx.iter().find(|&&i| i >= self.len()) {
            return Err(DataError(format!("{}: sample {bad} asked for, it has {}", self.name, self.len())));
        }
        let mut scratch = Scratch::default();
        match &self.samples {
            Samples::Pixels { rows, cols, data } => {
                let size = rows * cols;
                let mut px = vec![0.0f32; size];
                for (&i, out) in idx.iter().zip(out.chunks_exact_mut(n)) {
                    for (p, &b) in px.iter_mut().zip(&data[i * size..][..size]) {
                        *p = b as f32 * (1.0 / 255.0);
                    }
                    scratch.run(t, 1, *rows, *cols, &px, rng.as_deref_mut(), out)?;
                }
            }
            Samples::Files(paths) => {
                for (&i, out) in idx.iter().zip(out.chunks_exact_mut(n)) {
                    let img = folder::decode(&paths[i])?;
                    scratch
                        .run(t, img.c, img.h, img.w, &img.data, rng.as_deref_mut(), out)
                        .map_err(|e| DataError(format!("{}: {e}", paths[i].display())))?;
                }
            }
        }
        Ok(())
    }
}

fn fashion_names() -> Vec<String> {
    FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect()
}

/// `DIR/NAME` or `DIR/NAME.gz`, whichever exists (plain first).
fn idx_file(dir: &Path, name: &str) -> Result<PathBuf, DataError> {
    let found = [dir.join(name), dir.join(format!("{name}.gz"))].into_iter().find(|p| p.is_file());
    found.ok_or_else(|| {
        DataError(format!(
            "{}: has neither {name} nor {name}.gz; an IDX folder holds train-images-idx3-ubyte, \
             train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each may be gzipped)",
            dir.display()
        ))
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh, empty folder under the system temp folder, unique per test and process.
    pub(crate) fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("edgecl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn sources_parse_and_print_back() {
        for spec in ["fashion-mnist", "embedded", "idx:/data/mnist", "folder:photos", "folder:C:/x"] {
            assert_eq!(Source::parse(spec).unwrap().to_string(), spec);
        }
        assert_eq!(Source::parse("idx:d").unwrap(), Source::Idx("d".into()));
        for bad in ["", "mnist", "idx:", "folder:", "IDX:d", "embedded:x"] {
            let e = Source::parse(bad).unwrap_err().0;
            assert!(e.contains("--data"), "{e}");
        }
    }

    #[test]
    fn embedded_subset_is_balanced_fashion_mnist() {
        let train = Dataset::open(&Source::Embedded, Split::Train).unwrap();
        let test = Dataset::open(&Source::Embedded, Split::Test).unwrap();
        assert_eq!((train.len(), test.len()), (5000, 1000));
        for (ds, per) in [(&train, 500), (&test, 100)] {
            assert_eq!(ds.num_classes(), 10);
            assert_eq!(ds.class_names()[0], "T-shirt/top");
            assert_eq!(ds.class_names()[9], "Ankle boot");
            let mut counts = [0; 10];
            ds.labels().iter().for_each(|&l| counts[l as usize] += 1);
            assert_eq!(counts, [per; 10]);
        }
    }

    #[test]
    fn embedded_subset_is_the_first_images_of_each_class() {
        let full = Source::FashionMnist;
        let Ok(full) = Dataset::open(&full, Split::Test) else {
            println!("note: dataset-fashion-mnist is not installed; skipping the comparison with it");
            return;
        };
        assert_eq!(full.len(), 10_000);
        let sub = Dataset::open(&Source::Embedded, Split::Test).unwrap();
        let t = Transform::new(1, 28, 28, [0.0; 4], [1.0; 4]);
        let mut seen = [0; 10];
        let picked: Vec<usize> = (0..full.len())
            .filter(|&i| {
                let c = full.label(i) as usize;
                seen[c] += 1;
                seen[c] <= 100
            })
            .collect();
        assert_eq!(picked.len(), 1000);
        let (mut a, mut b) = (vec![0.0; 1000 * 784], vec![0.0; 1000 * 784]);
        full.load(&picked, &t, None, &mut a).unwrap();
        sub.load(&(0..1000).collect::<Vec<_>>(), &t, None, &mut b).unwrap();
        assert_eq!(a, b);
        assert!(picked.iter().enumerate().all(|(j, &i)| full.label(i) == sub.label(j)));
    }

    fn write_idx(dir: &Path, prefix: &str, count: usize, labels: &[u8], gz: bool) {
        let images =
            idx::Images { count, rows: 2, cols: 3, pixels: (0..count * 6).map(|i| (i * 7 % 256) as u8).collect() };
        let (mut i, mut l) = (idx::write_images(&images).unwrap(), idx::write_labels(labels).unwrap());
        let ext = if gz { ".gz" } else { "" };
        if gz {
            (i, l) = (idx::gzip(&i), idx::gzip(&l));
        }
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte{ext}")), i).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte{ext}")), l).unwrap();
    }

    #[test]
    fn idx_folder_opens_loads_and_checks_pairs() {
        let dir = temp_dir("idx-folder");
        write_idx(&dir, "train", 4, &[0, 1, 2, 1], true);
        write_idx(&dir, "t10k", 2, &[3, 0], false);
        let src = Source::Idx(dir.clone());
        let train = Dataset::open(&src, Split::Train).unwrap();
        // Class count from both splits: test has label 3.
        assert_eq!(train.class_names(), ["0", "1", "2", "3"]);
        assert_eq!(train.labels(), [0, 1, 2, 1]);
        let t = Transform::new(1, 2, 3, [0.0; 4], [1.0; 4]);
        let mut out = vec![0.0; 12];
        train.load(&[3, 0], &t, None, &mut out).unwrap();
        let px = |i: usize| (i * 7 % 256) as f32 / 255.0;
        let want: Vec<f32> = (18..24).chain(0..6).map(px).collect();
        assert!(out.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-7), "{out:?}");
        assert!(train.load(&[4], &t, None, &mut out[..6]).unwrap_err().0.contains("sample 4"));
        assert!(train.load(&[0], &t, None, &mut out).is_err(), "wrong buffer size");
        assert_eq!(Dataset::open(&src, Split::Test).unwrap().len(), 2);
        // Three labels for four images.
        write_idx(&dir, "train", 4, &[0, 1, 2], true);
        let e = Dataset::open(&src, Split::Train).unwrap_err().0;
        assert!(e.contains("3 labels") && e.contains("4 images") && e.contains("train-labels"), "{e}");
        std::fs::remove_file(dir.join("t10k-images-idx3-ubyte")).unwrap();
        let e = Dataset::open(&src, Split::Test).unwrap_err().0;
        assert!(e.contains("t10k-images-idx3-ubyte.gz"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn folder_dataset_decodes_on_load_and_names_corrupt_files() {
        let dir = temp_dir("folder-dataset");
        for (class, v) in [("dark", 0u8), ("light", 255)] {
            std::fs::create_dir_all(dir.join(class)).unwrap();
            for i in 0..5 {
                image::GrayImage::from_pixel(4, 4, image::Luma([v]))
                    .save(dir.join(format!("{class}/{i}.png")))
                    .unwrap();
            }
        }
        let src = Source::Folder(dir.clone());
        let (train, test) = (Dataset::open(&src, Split::Train).unwrap(), Dataset::open(&src, Split::Test).unwrap());
        assert_eq!((train.len(), test.len()), (8, 2));
        assert_eq!(test.labels(), [0, 1]);
        let t = Transform::new(3, 2, 2, [0.5; 4], [0.5; 4]);
        let mut out = vec![0.0; 2 * 12];
        test.load(&[0, 1], &t, None, &mut out).unwrap();
        assert!(out[..12].iter().all(|&v| (v + 1.0).abs() < 1e-5), "{out:?}");
        assert!(out[12..].iter().all(|&v| (v - 1.0).abs() < 1e-5), "{out:?}");
        std::fs::write(dir.join("light/2.png"), b"\x89PNG broken").unwrap();
        let train = Dataset::open(&src, Split::Train).unwrap();
        train.load(&[0, 1, 2, 3], &t, None, &mut [0.0; 48]).unwrap();
        let e = train.load(&[6], &t, None, &mut out[..12]).unwrap_err().0;
        assert!(e.contains("2.png"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_sources_say_what_to_do() {
        let e = Dataset::open(&Source::Idx("/nonexistent/edgecl".into()), Split::Train).unwrap_err().0;
        assert!(e.contains("/nonexistent/edgecl") && e.contains("train-images-idx3-ubyte"), "{e}");
        let e = Dataset::open(&Source::Folder("/nonexistent/edgecl".into()), Split::Train).unwrap_err().0;
        assert!(e.contains("/nonexistent/edgecl"), "{e}");
    }
}
