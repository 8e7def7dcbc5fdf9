//! Softmax cross-entropy, mean over the batch, on the first `classes` logits of each row
//! (a task may use fewer outputs than the backbone's output layer has).

/// Returns the mean loss and writes `∂loss/∂logits` into `dlogits` (zero for unused logits).
pub fn cross_entropy(logits: &[f32], width: usize, classes: usize, labels: &[u32], dlogits: &mut [f32]) -> f32 {
    let batch = labels.len();
    let mut total = 0.0f64;
    dlogits[..batch * width].fill(0.0);
    for (b, &label) in labels.iter().enumerate() {
        let row = &logits[b * width..b * width + classes];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let log_z = max as f64 + sum.ln();
        total += log_z - row[label as usize] as f64;
        let d = &mut dlogits[b * width..b * width + classes];
        for (j, (g, &v)) in d.iter_mut().zip(row).enumerate() {
            let p = ((v as f64 - log_z).exp()) as f32;
            *g = (p - if j == label as usize { 1.0 } else { 0.0 }) / batch as f32;
        }
    }
    (total / batch.max(1) as f64) as f32
}

/// Index of the largest of the first `classes` logits (the first one on ties).
pub fn argmax(row: &[f32], classes: usize) -> usize {
    let mut best = 0;
    for (j, &v) in row[..classes].iter().enumerate() {
        if v > row[best] {
            best = j;
        }
    }
    best
}

/// `log Σ exp(row)`, computed in f64 around the row's maximum.
pub(crate) fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
    max as f64 + sum.ln()
}

/// Entropy `−Σ p log p` (natural log) of the softmax of `row`.
pub fn softmax_entropy(row: &[f32]) -> f32 {
    let log_z = log_sum_exp(row);
    -row.iter().map(|&v| v as f64 - log_z).map(|lp| lp.exp() * lp).sum::<f64>() as f32
}

/// Mean over `batch` rows of the softmax entropy of the first `classes` logits of each row
/// (task inference, ALGORITHMS §1.4). Writes `∂H/∂logits` into `dlogits` (zero for the unused
/// logits): with `H_b` the row's entropy, `∂H/∂z_bc = −p_bc (log p_bc + H_b) / batch`.
pub fn entropy(logits: &[f32], width: usize, classes: usize, batch: usize, dlogits: &mut [f32]) -> f32 {
    let mut total = 0.0f64;
    dlogits[..batch * width].fill(0.0);
    for b in 0..batch {
        let row = &logits[b * width..b * width + classes];
        let log_z = log_sum_exp(row);
        let h = softmax_entropy(row) as f64;
        total += h;
        for (g, &v) in dlogits[b * width..b * width + classes].iter_mut().zip(row) {
            let lp = v as f64 - log_z;
            *g = (-lp.exp() * (lp + h) / batch as f64) as f32;
        }
    }
    (total / batch.max(1) as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn entropy_value_and_gradient_match_finite_differences() {
        let mut r = SplitMix64::new(11);
        let (width, classes, batch) = (6, 4, 3);
        let mut logits: Vec<f32> = (0..batch * width).map(|_| r.uniform(-2.0, 2.0)).collect();
        let mut d = vec![f32::NAN; batch * width];
        let h = entropy(&logits, width, classes, batch, &mut d);
        // By hand: the mean of the rows' entropies over their first four logits.
        let by_hand: f64 = (0..batch)
            .map(|b| {
                let row = &logits[b * width..b * width + classes];
                let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
                -row.iter().map(|&v| (v as f64).exp() / z).map(|p| p * p.ln()).sum::<f64>()
            })
            .sum::<f64>()
            / batch as f64;
        assert!((h as f64 - by_hand).abs() < 1e-6, "{h} vs {by_hand}");
        for b in 0..batch {
            assert!(d[b * width + classes..(b + 1) * width].iter().all(|&g| g == 0.0), "unused logits");
        }
        let mut scratch = vec![0.0; batch * width];
        let step = 1e-3f32;
        for i in 0..logits.len() {
            let keep = logits[i];
            logits[i] = keep + step;
            let up = entropy(&logits, width, classes, batch, &mut scratch) as f64;
            logits[i] = keep - step;
            let down = entropy(&logits, width, classes, batch, &mut scratch) as f64;
            logits[i] = keep;
            let fd = ((up - down) / (2.0 * step as f64)) as f32;
            assert!((fd - d[i]).abs() <= 1e-4 + 1e-3 * d[i].abs(), "logit {i}: fd {fd} vs analytic {}", d[i]);
        }
        // Uniform logits: the entropy is log(classes) and every gradient vanishes.
        let flat = vec![0.5f32; width];
        let mut g = vec![1.0; width];
        let h = entropy(&flat, width, classes, 1, &mut g);
        assert!((h - (classes as f32).ln()).abs() < 1e-6);
        assert!(g.iter().all(|v| v.abs() < 1e-7));
    }
}
