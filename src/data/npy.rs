//! NumPy `.npy` files of little-endian f32 in C order: the interchange format for tensors that
//! users compare against PyTorch or onnxruntime. Only what edgecl needs: `<f4`, C order,
//! format versions 1–3.

use std::fmt;

/// Why an `.npy` file was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyError(pub String);

impl fmt::Display for NpyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a usable .npy file: {}", self.0)
    }
}

impl std::error::Error for NpyError {}

/// Largest header edgecl accepts (numpy writes 64–128 bytes).
const MAX_HEADER: usize = 64 * 1024;

/// Parses an `.npy` file: returns its shape and its f32 data.
pub fn parse(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>), NpyError> {
    let e = |m: &str| NpyError(m.to_string());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(e("missing the \\x93NUMPY magic"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(NpyError(format!("unsupported format version {v}"))),
    };
    if hlen > MAX_HEADER || start + hlen > bytes.len() {
        return Err(e("header length runs past the end of the file"));
    }
    let header = std::str::from_utf8(&bytes[start..start + hlen]).map_err(|_| e("header is not text"))?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr").ok_or_else(|| e("no 'descr' in header"))?;
    if !(descr.starts_with("'<f4'") || descr.starts_with("'float32'")) {
        return Err(NpyError(format!(
            "dtype must be little-endian float32 ('<f4'), found {}",
            descr.split(',').next().unwrap_or("")
        )));
    }
    let fortran = field("fortran_order").ok_or_else(|| e("no 'fortran_order' in header"))?;
    if !fortran.starts_with("False") {
        return Err(e("Fortran-order arrays are not supported; save with np.ascontiguousarray"));
    }
    let shape_txt = field("shape").ok_or_else(|| e("no 'shape' in header"))?;
    let inner = shape_txt.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or_else(|| e("malformed shape"))?;
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| e("malformed shape")))
        .collect::<Result<_, _>>()?;
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| e("shape too large"))?;
    let data = &bytes[start + hlen..];
    if Some(data.len()) != n.checked_mul(4) {
        return Err(NpyError(format!(
            "shape {shape:?} needs {} data bytes, the file has {}",
            n.saturating_mul(4),
            data.len()
        )));
    }
    Ok((shape, data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()))
}

/// Serialises f32 data of `shape` as an `.npy` (version 1) file.
pub fn write(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    // Pad so that the data starts on a 64-byte boundary, ending the header with a newline.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let x: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
        let b = write(&[2, 3, 4], &x);
        assert_eq!(parse(&b).unwrap(), (vec![2, 3, 4], x));
    }

    #[test]
    fn hostile_inputs_are_errors() {
        let b = write(&[2, 3], &[1.0; 6]);
        for cut in 0..b.len() {
            assert!(parse(&b[..cut]).is_err(), "truncated to {cut}");
        }
        let mut big = b.clone();
        let at = big.windows(6).position(|w| w == b"(2, 3)").unwrap();
        big[at + 1] = b'9';
        assert!(parse(&big).is_err());
    }
}
