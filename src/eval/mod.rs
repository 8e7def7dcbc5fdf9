//! (std) Evaluation: a task's accuracy from its components, the continual-learning accuracy
//! matrix and its summaries (ALGORITHMS §4), and reports (JSON, Markdown, SVG heatmap).

use crate::adapter::Task;
use crate::backbone::Backbone;
use crate::kernels::Kernels;
use crate::train::method::Samples;
use crate::train::model::{self, ComponentError};
use crate::train::ops::loss::argmax;

/// Accuracy and every prediction of `task` (with its dependencies `deps`, oldest first) on
/// `samples`, batch by batch in sample order.
pub fn evaluate(
    k: &Kernels,
    bb: &Backbone,
    deps: &[&Task],
    task: &Task,
    samples: &dyn Samples,
    batch: usize,
) -> Result<(f64, Vec<u32>), EvalError> {
    let mut net = model::build(bb, deps, task).map_err(EvalError::Components)?;
    net.train_mode = false;
    let classes = task.classes();
    let width = net.out_shape().len();
    let in_len = net.in_shape.len();
    let batch = batch.max(1);
    let mut x = vec![0.0f32; batch * in_len];
    let mut preds = Vec::with_capacity(samples.len());
    let idx: Vec<usize> = (0..samples.len()).collect();
    let mut correct = 0usize;
    for chunk in idx.chunks(batch) {
        let xs = &mut x[..chunk.len() * in_len];
        samples.load(chunk, None, xs).map_err(EvalError::Data)?;
        let out = net.forward(k, xs, chunk.len());
        for (b, &i) in chunk.iter().enumerate() {
            let p = argmax(&out[b * width..(b + 1) * width], classes) as u32;
            correct += usize::from(p == samples.label(i));
            preds.push(p);
        }
    }
    Ok((correct as f64 / samples.len().max(1) as f64, preds))
}

#[derive(Debug)]
pub enum EvalError {
    Components(ComponentError),
    Data(String),
}

impl std::fmt::Display for EvalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EvalError::Components(e) => e.fmt(f),
            EvalError::Data(m) => write!(f, "reading evaluation data: {m}"),
        }
    }
}

impl std::error::Error for EvalError {}

/// `a[i][j]`: accuracy on task `j` after learning tasks `0..=i` (`None` above the diagonal).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Matrix(pub Vec<Vec<Option<f64>>>);

impl Matrix {
    pub fn new(tasks: usize) -> Self {
        Matrix(vec![vec![None; tasks]; tasks])
    }
    fn last(&self) -> &[Option<f64>] {
        self.0.last().map_or(&[], |r| r)
    }
    /// Mean accuracy over all tasks after the last one.
    pub fn acc(&self) -> f64 {
        let r = self.last();
        r.iter().flatten().sum::<f64>() / r.len().max(1) as f64
    }
    /// Backward transfer: mean of `a[T−1][j] − a[j][j]` over `j < T−1` (0 for one task).
    pub fn bwt(&self) -> f64 {
        let t = self.0.len();
        if t < 2 {
            return 0.0;
        }
        (0..t - 1).map(|j| self.0[t - 1][j].unwrap_or(0.0) - self.0[j][j].unwrap_or(0.0)).sum::<f64>() / (t - 1) as f64
    }
    /// Forgetting: mean of `max_{i<T−1} a[i][j] − a[T−1][j]` over `j < T−1`.
    pub fn forgetting(&self) -> f64 {
        let t = self.0.len();
        if t < 2 {
            return 0.0;
        }
        (0..t - 1)
            .map(|j| {
                let best = (j..t - 1).filter_map(|i| self.0[i][j]).fold(f64::NEG_INFINITY, f64::max);
                best - self.0[t - 1][j].unwrap_or(0.0)
            })
            .sum::<f64>()
            / (t - 1) as f64
    }

    /// The matrix as Markdown (rows: after learning task i; columns: task j).
    pub fn markdown(&self, names: &[String]) -> String {
        let mut s = String::from("| after \\ on |");
        for n in names {
            s += &format!(" {n} |");
        }
        s += "\n|---|";
        s += &"---|".repeat(names.len());
        s += "\n";
        for (i, row) in self.0.iter().enumerate() {
            s += &format!("| {} |", names.get(i).map_or("?", |n| n.as_str()));
            for v in row {
                s += &match v {
                    Some(a) => format!(" {:.4} |", a),
                    None => " |".into(),
                };
            }
            s += "\n";
        }
        s
    }

    /// A heatmap of the matrix as a standalone SVG: darker = more accurate.
    pub fn svg(&self, names: &[String], title: &str) -> String {
        let n = self.0.len();
        let (cell, left, top) = (56, 110, 60);
        let (w, h) = (left + cell * n + 20, top + cell * n + 20);
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"10\" y=\"20\" font-size=\"14\">{}</text>\n",
            escape(title)
        );
        for (j, name) in names.iter().enumerate().take(n) {
            s += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                left + j * cell + cell / 2,
                top - 8,
                escape(name)
            );
            s += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">after {}</text>\n",
                left - 6,
                top + j * cell + cell / 2 + 4,
                escape(name)
            );
        }
        for (i, row) in self.0.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                let (x, y) = (left + j * cell, top + i * cell);
                match v {
                    Some(a) => {
                        let shade = (255.0 - 200.0 * a.clamp(0.0, 1.0)) as u8;
                        let text = if *a > 0.6 { "white" } else { "black" };
                        s += &format!(
                            "<rect x=\"{x}\" y=\"{y}\" width=\"{cell}\" height=\"{cell}\" fill=\"rgb({shade},{shade},255)\" stroke=\"white\"/>\n<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"{text}\">{:.3}</text>\n",
                            x + cell / 2,
                            y + cell / 2 + 4,
                            a
                        );
                    }
                    None => s += &format!("<rect x=\"{x}\" y=\"{y}\" width=\"{cell}\" height=\"{cell}\" fill=\"#eee\" stroke=\"white\"/>\n"),
                }
            }
        }
        s += "</svg>\n";
        s
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acc_bwt_forgetting_by_hand() {
        let m = Matrix(vec![
            vec![Some(0.9), None, None],
            vec![Some(0.8), Some(0.7), None],
            vec![Some(0.6), Some(0.7), Some(1.0)],
        ]);
        assert!((m.acc() - 2.3 / 3.0).abs() < 1e-12);
        // ((0.6 - 0.9) + (0.7 - 0.7)) / 2
        assert!((m.bwt() + 0.15).abs() < 1e-12);
        // ((0.9 - 0.6) + (0.7 - 0.7)) / 2
        assert!((m.forgetting() - 0.15).abs() < 1e-12);
        let names = vec!["a".to_string(), "b".into(), "c".into()];
        assert!(m.markdown(&names).contains("| c | 0.6000 | 0.7000 | 1.0000 |"));
        let svg = m.svg(&names, "t<1>");
        assert_eq!(svg.matches("<rect").count(), 9);
        assert!(svg.contains("t&lt;1&gt;"));
    }
}
