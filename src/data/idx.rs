//! IDX files (LeCun's MNIST format, also used by Fashion-MNIST), plain or gzipped: unsigned-byte
//! images (magic `00 00 08 03`, dims count × rows × cols) and unsigned-byte labels (magic
//! `00 00 08 01`, dim count). All numbers are big-endian.
//!
//! Files are hostile. The header is checked before the body is read; the body length implied
//! by the dims is computed with checked arithmetic and capped at [`MAX_BODY`]; a gzipped body
//! is decompressed through a reader limited to one byte more than that length, so a
//! decompression bomb costs at most the size its header claims. Every error names the file.
//!
//! This module only parses and writes; pairing images with labels is [`super::Dataset`]'s job.

use std::io::{Read, Write};
use std::path::Path;

use super::DataError;

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Largest body (pixels or labels) accepted: 2 GiB, forty times full MNIST's training images.
pub const MAX_BODY: usize = 1 << 31;

/// An IDX image file: `count` images of `rows × cols` unsigned bytes, row-major, one after
/// another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Images {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

impl Images {
    /// The pixels of image `i` (`rows * cols` bytes); `None` past the end.
    pub fn image(&self, i: usize) -> Option<&[u8]> {
        let size = self.rows.checked_mul(self.cols)?;
        self.pixels.get(i.checked_mul(size)?..i.checked_add(1)?.checked_mul(size)?)
    }
}

/// Reads an IDX image file, gzipped or not (told apart by the gzip magic, not the name).
pub fn read_images(path: &Path) -> Result<Images, DataError> {
    parse_images(&read_file(path)?, &path.display().to_string())
}

/// Reads an IDX label file, gzipped or not.
pub fn read_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    parse_labels(&read_file(path)?, &path.display().to_string())
}

/// Parses the bytes of an IDX image file (gzipped or not); `name` goes into error messages.
pub fn parse_images(bytes: &[u8], name: &str) -> Result<Images, DataError> {
    let (dims, pixels) = parse(bytes, name, IMAGES_MAGIC, 3)?;
    let [count, rows, cols] = [dims[0], dims[1], dims[2]];
    if rows == 0 || cols == 0 {
        return Err(bad(name, &format!("images of {rows}×{cols} pixels have no pixels")));
    }
    Ok(Images { count, rows, cols, pixels })
}

/// Parses the bytes of an IDX label file (gzipped or not); `name` goes into error messages.
/// Labels are single bytes, so every label is below 256 by construction.
pub fn parse_labels(bytes: &[u8], name: &str) -> Result<Vec<u8>, DataError> {
    Ok(parse(bytes, name, LABELS_MAGIC, 1)?.1)
}

/// Serialises images as an (uncompressed) IDX file. `pixels.len()` must be
/// `count * rows * cols`; dims above `u32::MAX` cannot be written.
pub fn write_images(images: &Images) -> Result<Vec<u8>, DataError> {
    let dims = [images.count, images.rows, images.cols];
    write(IMAGES_MAGIC, &dims, &images.pixels)
}

/// Serialises labels as an (uncompressed) IDX file.
pub fn write_labels(labels: &[u8]) -> Result<Vec<u8>, DataError> {
    write(LABELS_MAGIC, &[labels.len()], labels)
}

/// Gzips bytes (for writing `.gz` IDX files).
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(bytes);
    enc.finish().unwrap_or_default()
}

fn bad(name: &str, what: &str) -> DataError {
    DataError(format!("{name}: not a usable IDX file: {what}"))
}

fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| DataError(format!("{}: cannot read: {e}", path.display())))
}

fn write(magic: u32, dims: &[usize], body: &[u8]) -> Result<Vec<u8>, DataError> {
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n != Some(body.len()) {
        return Err(DataError(format!("IDX dims {dims:?} do not match {} body bytes", body.len())));
    }
    let mut out = magic.to_be_bytes().to_vec();
    for &d in dims {
        let d = u32::try_from(d).map_err(|_| DataError(format!("IDX dim {d} does not fit in 32 bits")))?;
        out.extend(d.to_be_bytes());
    }
    out.extend(body);
    Ok(out)
}

/// Checks magic and dims, then reads exactly the body the dims imply.
fn parse(bytes: &[u8], name: &str, magic: u32, ndims: usize) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    if bytes.starts_with(&GZIP_MAGIC) {
        let mut gz = flate2::read::MultiGzDecoder::new(bytes);
        let (dims, body_len) = header(&mut gz, name, magic, ndims, " after decompression")?;
        // Grows with the data that actually arrives, never past what the header claims + 1.
        let mut body = Vec::new();
        gz.take(body_len as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|e| bad(name, &format!("gzip stream is corrupt: {e}")))?;
        check_body_len(name, body.len(), body_len, &dims)?;
        Ok((dims, body))
    } else {
        let mut rest = bytes;
        let (dims, body_len) = header(&mut rest, name, magic, ndims, "")?;
        check_body_len(name, rest.len(), body_len, &dims)?;
        Ok((dims, rest.to_vec()))
    }
}

fn header(
    r: &mut impl Read,
    name: &str,
    magic: u32,
    ndims: usize,
    note: &str,
) -> Result<(Vec<usize>, usize), DataError> {
    let short = |e: std::io::Error| bad(name, &format!("file ends inside the header{note} ({e})"));
    let mut word = [0u8; 4];
    r.read_exact(&mut word).map_err(short)?;
    let got = u32::from_be_bytes(word);
    if got != magic {
        let kind = if magic == IMAGES_MAGIC { "an image file (idx3, unsigned bytes)" } else { "a label file (idx1)" };
        return Err(bad(
            name,
            &format!(
                "magic number is {got:#010x}, expected {magic:#010x} for {kind}; \
                 check that the images and labels files are not swapped"
            ),
        ));
    }
    let mut dims = Vec::with_capacity(ndims);
    for _ in 0..ndims {
        r.read_exact(&mut word).map_err(short)?;
        dims.push(u32::from_be_bytes(word) as usize);
    }
    if dims[0] == 0 {
        return Err(bad(name, "it holds no samples (count is 0)"));
    }
    let body_len = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&n| n <= MAX_BODY);
    let body_len = body_len.ok_or_else(|| {
        bad(name, &format!("dims {dims:?} imply more than the {} GiB edgecl reads from one file", MAX_BODY >> 30))
    })?;
    Ok((dims, body_len))
}

fn check_body_len(name: &str, got: usize, want: usize, dims: &[usize]) -> Result<(), DataError> {
    if got < want {
        Err(bad(name, &format!("dims {dims:?} need {want} data bytes but the file ends after {got}; it is truncated")))
    } else if got > want {
        Err(bad(
            name,
            &format!("dims {dims:?} need {want} data bytes but the file holds more; it is not one IDX array"),
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tests::temp_dir;

    fn sample() -> Images {
        Images { count: 3, rows: 2, cols: 4, pixels: (0..24).map(|i| (i * 10) as u8).collect() }
    }

    #[test]
    fn round_trip_plain_and_gzipped_files() {
        let dir = temp_dir("idx-round-trip");
        let images = sample();
        let labels = vec![7u8, 0, 255];
        std::fs::write(dir.join("i"), write_images(&images).unwrap()).unwrap();
        std::fs::write(dir.join("i.gz"), gzip(&write_images(&images).unwrap())).unwrap();
        std::fs::write(dir.join("l"), write_labels(&labels).unwrap()).unwrap();
        std::fs::write(dir.join("l.gz"), gzip(&write_labels(&labels).unwrap())).unwrap();
        for f in ["i", "i.gz"] {
            assert_eq!(read_images(&dir.join(f)).unwrap(), images, "{f}");
        }
        for f in ["l", "l.gz"] {
            assert_eq!(read_labels(&dir.join(f)).unwrap(), labels, "{f}");
        }
        assert_eq!(images.image(1).unwrap(), &images.pixels[8..16]);
        assert_eq!(images.image(3), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn every_truncation_is_an_error() {
        let plain = write_images(&sample()).unwrap();
        let gz = gzip(&plain);
        for cut in 0..plain.len() {
            assert!(parse_images(&plain[..cut], "x").is_err(), "plain cut at {cut}");
        }
        for cut in 0..gz.len() {
            assert!(parse_images(&gz[..cut], "x").is_err(), "gz cut at {cut}");
        }
        let labels = write_labels(&[1, 2, 3]).unwrap();
        for cut in 0..labels.len() {
            assert!(parse_labels(&labels[..cut], "x").is_err(), "labels cut at {cut}");
        }
    }

    #[test]
    fn mutated_headers_are_errors_that_name_the_file() {
        let good = write_images(&sample()).unwrap();
        // Swapped kind: an image file read as labels and the reverse.
        let e = parse_labels(&good, "train-images").unwrap_err().0;
        assert!(e.contains("train-images") && e.contains("magic"), "{e}");
        assert!(parse_images(&write_labels(&[1]).unwrap(), "l").is_err());
        // Wrong data type byte (0x0d = f32).
        let mut m = good.clone();
        m[2] = 0x0d;
        assert!(parse_images(&m, "x").is_err());
        // A count that claims more images than the file holds.
        let mut m = good.clone();
        m[7] = 4;
        let e = parse_images(&m, "x").unwrap_err().0;
        assert!(e.contains("truncated"), "{e}");
        // Fewer than the file holds.
        let mut m = good.clone();
        m[7] = 2;
        assert!(parse_images(&m, "x").is_err());
        // Zero count, zero rows.
        let mut m = good.clone();
        m[7] = 0;
        assert!(parse_images(&m, "x").is_err());
        let mut m = good.clone();
        m[11] = 0;
        assert!(parse_images(&m, "x").is_err());
        // Trailing bytes after a gzipped body.
        let mut long = good.clone();
        long.push(0);
        assert!(parse_images(&gzip(&long), "x").is_err());
    }

    #[test]
    fn huge_claimed_dims_are_rejected_before_allocating() {
        // 0xffffffff images of 0xffff × 0xffff pixels: overflows or exceeds the cap.
        let mut h = IMAGES_MAGIC.to_be_bytes().to_vec();
        for d in [u32::MAX, 0xffff, 0xffff] {
            h.extend(d.to_be_bytes());
        }
        let e = parse_images(&h, "bomb").unwrap_err().0;
        assert!(e.contains("GiB"), "{e}");
        // A gzipped file that claims 1 GiB but holds 16 bytes fails as truncated, having
        // allocated only what arrived.
        let mut h = IMAGES_MAGIC.to_be_bytes().to_vec();
        for d in [1u32 << 20, 32, 32] {
            h.extend(d.to_be_bytes());
        }
        h.extend([0u8; 16]);
        let e = parse_images(&gzip(&h), "bomb.gz").unwrap_err().0;
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn corrupt_gzip_is_an_error() {
        let mut gz = gzip(&write_images(&sample()).unwrap());
        let mid = gz.len() / 2;
        gz[mid] ^= 0xff;
        gz[mid + 1] ^= 0x55;
        assert!(parse_images(&gz, "x").is_err());
    }
}
