//! Optimisers (SGD with momentum, Adam, RMSprop; weight decay as an L2 term added to the
//! gradient, as PyTorch's) and learning-rate schedules, stepped per epoch.

/// Which update rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Sgd { momentum: f32 },
    Adam { beta1: f32, beta2: f32, eps: f32 },
    RmsProp { alpha: f32, eps: f32 },
}

impl Kind {
    pub fn from_name(s: &str) -> Option<Kind> {
        match s {
            "sgd" => Some(Kind::Sgd { momentum: 0.9 }),
            "adam" => Some(Kind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }),
            "rmsprop" => Some(Kind::RmsProp { alpha: 0.99, eps: 1e-8 }),
            _ => None,
        }
    }
}

/// Learning rate over epochs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    /// `lr · ½(1 + cos(π·epoch/epochs))`.
    Cosine,
    /// `lr · gamma^(epoch / every)`.
    Step {
        every: usize,
        gamma: f32,
    },
}

impl Schedule {
    pub fn lr(self, base: f32, epoch: usize, epochs: usize) -> f32 {
        match self {
            Schedule::Constant => base,
            Schedule::Cosine => {
                (base as f64 * 0.5 * (1.0 + (core::f64::consts::PI * epoch as f64 / epochs.max(1) as f64).cos())) as f32
            }
            Schedule::Step { every, gamma } => base * gamma.powi((epoch / every.max(1)) as i32),
        }
    }
}

/// Per-slot optimiser state; a slot is one parameter tensor.
pub struct Optimizer {
    pub kind: Kind,
    pub weight_decay: f32,
    state: Vec<(Vec<f32>, Vec<f32>)>,
    t: i32,
}

impl Optimizer {
    pub fn new(kind: Kind, weight_decay: f32) -> Self {
        Optimizer { kind, weight_decay, state: Vec::new(), t: 0 }
    }

    /// Starts a step (Adam's bias correction counts steps).
    pub fn begin(&mut self) {
        self.t += 1;
    }

    /// Updates `value` from `grad` for parameter slot `slot`.
    pub fn update(&mut self, slot: usize, value: &mut [f32], grad: &[f32], lr: f32) {
        let (kind, wd, t) = (self.kind, self.weight_decay, self.t);
        self.each_chunk(slot, value, |at, p, m, v| step(kind, wd, t, lr, p, &grad[at..at + p.len()], m, v));
    }

    /// [`Optimizer::update`] with the gradient made a few hundred entries at a time, just
    /// before their step, by `grad(at, values, g)`: `g` ← the gradient of `value[at ..]`,
    /// given those values as they are before the step. The whole gradient is never stored,
    /// which saves writing and reading back a buffer as large as the param (SupSup's
    /// straight-through score gradient is made this way). The same bits as `update`.
    pub fn update_with(
        &mut self,
        slot: usize,
        value: &mut [f32],
        lr: f32,
        grad: impl Fn(usize, &[f32], &mut [f32]) + Sync,
    ) {
        const RUN: usize = 512;
        let (kind, wd, t) = (self.kind, self.weight_decay, self.t);
        self.each_chunk(slot, value, |at, p, m, v| {
            let mut g = [0.0f32; RUN];
            let runs = p.chunks_mut(RUN).zip(m.chunks_mut(RUN)).zip(v.chunks_mut(RUN));
            for (i, ((p, m), v)) in runs.enumerate() {
                let g = &mut g[..p.len()];
                grad(at + i * RUN, p, g);
                step(kind, wd, t, lr, p, g, m, v);
            }
        });
    }

    /// `f(at, value[at ..], m[at ..], v[at ..])` over chunks of the slot's param and state, in
    /// parallel for a large param (the steps are element-wise: any split gives the same bits).
    fn each_chunk(
        &mut self,
        slot: usize,
        value: &mut [f32],
        f: impl Fn(usize, &mut [f32], &mut [f32], &mut [f32]) + Sync,
    ) {
        if self.state.len() <= slot {
            self.state.resize_with(slot + 1, Default::default);
        }
        let (m, v) = &mut self.state[slot];
        if m.len() != value.len() {
            *m = vec![0.0; value.len()];
            *v = vec![0.0; value.len()];
        }
        const CHUNK: usize = 1 << 14;
        if value.len() >= 4 * CHUNK && crate::kernels::threads() > 1 {
            use rayon::prelude::*;
            value
                .par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .enumerate()
                .for_each(|(i, ((p, m), v))| f(i * CHUNK, p, m, v));
        } else {
            f(0, value, m, v);
        }
    }
}

/// One update of `value` from `grad` with the slot's state `m` (momentum or first moment,
/// or RMSprop's mean square) and `v` (Adam's second moment), at step `t`.
#[allow(clippy::too_many_arguments)]
fn step(kind: Kind, wd: f32, t: i32, lr: f32, value: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
    match kind {
        Kind::Sgd { momentum } => {
            for ((p, &g), b) in value.iter_mut().zip(grad).zip(m.iter_mut()) {
                let g = g + wd * *p;
                *b = momentum * *b + g;
                *p -= lr * *b;
            }
        }
        Kind::Adam { beta1, beta2, eps } => {
            let c1 = 1.0 - beta1.powi(t);
            let c2 = 1.0 - beta2.powi(t);
            for (((p, &g), a), b) in value.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()) {
                let g = g + wd * *p;
                *a = beta1 * *a + (1.0 - beta1) * g;
                *b = beta2 * *b + (1.0 - beta2) * g * g;
                *p -= lr * (*a / c1) / ((*b / c2).sqrt() + eps);
            }
        }
        Kind::RmsProp { alpha, eps } => {
            for ((p, &g), b) in value.iter_mut().zip(grad).zip(m.iter_mut()) {
                let g = g + wd * *p;
                *b = alpha * *b + (1.0 - alpha) * g * g;
                *p -= lr * g / (b.sqrt() + eps);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_first_step_moves_by_lr_against_the_gradient_sign() {
        let mut o = Optimizer::new(Kind::from_name("adam").unwrap(), 0.0);
        let mut p = [1.0f32, -1.0];
        o.begin();
        o.update(0, &mut p, &[0.3, -2.0], 0.01);
        assert!((p[0] - 0.99).abs() < 1e-6 && (p[1] + 0.99).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn sgd_momentum_and_rmsprop_match_hand_computation() {
        let mut o = Optimizer::new(Kind::Sgd { momentum: 0.5 }, 0.0);
        let mut p = [0.0f32];
        for _ in 0..2 {
            o.begin();
            o.update(0, &mut p, &[1.0], 0.1);
        }
        // buf 1 then 1.5: p = -0.1 - 0.15
        assert!((p[0] + 0.25).abs() < 1e-6);
        let mut o = Optimizer::new(Kind::RmsProp { alpha: 0.99, eps: 0.0 }, 0.0);
        let mut p = [0.0f32];
        o.begin();
        o.update(0, &mut p, &[2.0], 0.1);
        // sq = 0.01·4 = 0.04, step = 0.1·2/0.2 = 1
        assert!((p[0] + 1.0).abs() < 1e-5, "{p:?}");
    }

    /// Large tensors are split over threads: every rule gives the same bits as on one thread.
    #[test]
    fn split_updates_equal_one_thread() {
        let mut r = crate::rng::SplitMix64::new(8);
        let n = 200_000;
        let grads: Vec<Vec<f32>> = (0..3).map(|_| (0..n).map(|_| r.uniform(-1.0, 1.0)).collect()).collect();
        for name in ["sgd", "adam", "rmsprop"] {
            // A gradient that depends on the values, made whole (`update`) or as the steps
            // go (`update_with`).
            let grad_of = |g: &[f32], p: &[f32], out: &mut [f32]| {
                for ((o, &g), &p) in out.iter_mut().zip(g).zip(p) {
                    *o = g + 0.1 * p;
                }
            };
            let run = |threads, fused: bool| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut o = Optimizer::new(Kind::from_name(name).unwrap(), 1e-4);
                let mut p = vec![0.5f32; n];
                pool.install(|| {
                    for g in &grads {
                        o.begin();
                        if fused {
                            o.update_with(0, &mut p, 0.01, |at, p, out| grad_of(&g[at..], p, out));
                        } else {
                            let mut whole = vec![0.0; n];
                            grad_of(g, &p, &mut whole);
                            o.update(0, &mut p, &whole, 0.01);
                        }
                    }
                });
                p.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            };
            let one = run(1, false);
            assert_ne!(one, vec![0.5f32.to_bits(); n]);
            for (threads, fused) in [(2, false), (1, true), (2, true)] {
                assert_eq!(one, run(threads, fused), "{name} on {threads} threads, fused {fused}");
            }
        }
    }

    #[test]
    fn schedules() {
        assert_eq!(Schedule::Cosine.lr(1.0, 0, 10), 1.0);
        assert!((Schedule::Cosine.lr(1.0, 5, 10) - 0.5).abs() < 1e-6);
        assert!((Schedule::Step { every: 2, gamma: 0.1 }.lr(1.0, 5, 10) - 0.01).abs() < 1e-7);
    }
}
