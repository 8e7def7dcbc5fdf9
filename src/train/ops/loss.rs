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
