//! Random SupSup backbones (ALGORITHMS §1.1–1.2): every conv and linear weight is
//! `±sqrt(2 / fan_in)` (signed Kaiming constant), stored as int8 ±1 with that per-channel scale,
//! no biases; norms are non-affine with running statistics (0, 1). The signs come from a
//! SplitMix64 stream of the recorded seed, so the seed regenerates the file bit for bit.

use super::{Ir, IrOp, IrWeights};
use crate::adapter::{Base, Components, Head, Mask, Method, NormState, Quantized, Softmax, Task};
use crate::backbone::Backbone;
use crate::format::graph::{InputSpec, Op, Pool, ValueId};
use crate::format::task::{decode, encode, TaskFile};
pub use crate::rng::SplitMix64;

/// The architectures `edgecl init` builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// 784-300-100-N (LeNet 300-100), input 1×28×28.
    Lenet,
    /// 784-1024-1024-N, input 1×28×28.
    Fc1024,
    /// ResNet-18 with widths 20/40/80/160, 32×32×3 input, non-affine batch norm.
    GemResnet18,
}

impl Arch {
    pub const ALL: [Arch; 3] = [Arch::Lenet, Arch::Fc1024, Arch::GemResnet18];

    pub fn name(self) -> &'static str {
        match self {
            Arch::Lenet => "lenet",
            Arch::Fc1024 => "fc1024",
            Arch::GemResnet18 => "gemresnet18",
        }
    }

    pub fn from_name(s: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name() == s)
    }
}

struct Builder {
    ir: Ir,
    rng: SplitMix64,
}

impl Builder {
    /// `rows × fan_in` weights of ±1 with scale sqrt(2 / fan_in); 64 signs per RNG draw.
    fn signs(&mut self, rows: usize, fan_in: usize) -> IrWeights {
        let n = rows * fan_in;
        let mut q = Vec::with_capacity(n);
        while q.len() < n {
            let bits = self.rng.next_u64();
            q.extend((0..64.min(n - q.len())).map(|b| if bits >> b & 1 == 1 { 1i8 } else { -1 }));
        }
        let c = (2.0 / fan_in as f64).sqrt() as f32;
        IrWeights::I8 { q, scale: vec![c; rows] }
    }

    fn linear(&mut self, input: ValueId, i: usize, o: usize) -> ValueId {
        let weight = self.signs(o, i);
        self.ir.push(input, IrOp::Linear { in_features: i as u32, out_features: o as u32, weight, bias: None })
    }

    fn conv(&mut self, input: ValueId, cin: usize, cout: usize, k: u32, stride: u32) -> ValueId {
        let weight = self.signs(cout, cin * (k * k) as usize);
        self.ir.push(input, IrOp::square_conv(cin as u32, cout as u32, k, stride, weight, None))
    }

    fn norm(&mut self, input: ValueId, c: usize) -> ValueId {
        self.ir.push(input, IrOp::BatchNorm { eps: 1e-5, mean: vec![0.0; c], var: vec![1.0; c], affine: None })
    }

    fn plain(&mut self, input: ValueId, op: Op) -> ValueId {
        self.ir.push(input, IrOp::Plain(op))
    }

    fn mlp(&mut self, widths: &[usize], outputs: usize) {
        let mut v = self.plain(0, Op::Flatten);
        for w in widths.windows(2) {
            v = self.linear(v, w[0], w[1]);
            v = self.plain(v, Op::Relu);
        }
        self.linear(v, *widths.last().unwrap_or(&784), outputs);
    }

    /// GEMResNet18 (`gemresnet.py` in the SupSup reference): stem, four stages of two basic
    /// blocks, 4×4 average pool, then the head as a linear layer (a 1×1 conv on 1×1 is one).
    fn gemresnet18(&mut self, outputs: usize) {
        let nf = 20;
        let mut v = self.conv(0, 3, nf, 3, 1);
        v = self.norm(v, nf);
        v = self.plain(v, Op::Relu);
        let mut cin = nf;
        for (stage, width) in [nf, 2 * nf, 4 * nf, 8 * nf].into_iter().enumerate() {
            for block in 0..2 {
                let stride = if block == 0 && stage > 0 { 2 } else { 1 };
                let x = v;
                let mut y = self.conv(x, cin, width, 3, stride);
                y = self.norm(y, width);
                y = self.plain(y, Op::Relu);
                y = self.conv(y, width, width, 3, 1);
                y = self.norm(y, width);
                let shortcut = if stride != 1 || cin != width {
                    let s = self.conv(x, cin, width, 1, stride);
                    self.norm(s, width)
                } else {
                    x
                };
                v = self.plain(y, Op::Add { other: shortcut });
                v = self.plain(v, Op::Relu);
                cin = width;
            }
        }
        let pool = Pool { kernel: [4, 4], stride: [4, 4], pad: [0; 4], count_include_pad: false };
        v = self.plain(v, Op::AvgPool(pool));
        v = self.plain(v, Op::Flatten);
        self.linear(v, cin, outputs);
    }
}

/// Builds a random SupSup backbone with `outputs` output units.
pub fn random_backbone(arch: Arch, outputs: usize, seed: u64) -> Ir {
    let (input, norm) = match arch {
        // MNIST-style normalisation (0.1307, 0.3081), as the SupSup MNIST loaders use.
        Arch::Lenet | Arch::Fc1024 => (InputSpec::plain(1, 28, 28), ([0.1307, 0.0, 0.0, 0.0], [0.3081, 1.0, 1.0, 1.0])),
        // CIFAR-100 statistics of the SupSup SplitCIFAR100 loader.
        Arch::GemResnet18 => (InputSpec::plain(3, 32, 32), ([0.491, 0.482, 0.447, 0.0], [0.247, 0.243, 0.262, 1.0])),
    };
    let input = InputSpec { mean: norm.0, std: norm.1, ..input };
    let source = format!("edgecl init --arch {} --outputs {outputs} --seed {seed}", arch.name());
    let mut b = Builder { ir: Ir::new(arch.name(), &source, input), rng: SplitMix64::new(seed) };
    b.ir.seed = Some(seed);
    match arch {
        Arch::Lenet => b.mlp(&[784, 300, 100], outputs),
        Arch::Fc1024 => b.mlp(&[784, 1024, 1024], outputs),
        Arch::GemResnet18 => b.gemresnet18(outputs),
    }
    b.ir
}

fn randoms(r: &mut SplitMix64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.uniform(lo, hi)).collect()
}

fn random_mask(r: &mut SplitMix64, n: usize) -> Mask {
    let density = r.uniform(0.2, 0.8);
    let mut words = vec![0u32; n.div_ceil(32)];
    for i in 0..n {
        if r.next_f32() < density {
            words[i / 32] |= 1 << (i % 32);
        }
    }
    Mask { len: n as u64, words }
}

/// A random task of `method` for `bb` with three classes, for tests and benchmarks: masks of
/// density 0.2–0.8, ExSSNeT values for exactly the exclusive weights given `deps` (oldest
/// first), norms with random statistics, CLR kernels near identity, random heads.
pub fn random_task(bb: &Backbone, method: Method, name: &str, deps: &[&TaskFile], seed: u64) -> TaskFile {
    let mut r = SplitMix64::new(seed);
    let layers = bb.layers();
    let maskable: Vec<usize> = (0..layers.len()).filter(|&i| layers[i].op.is_matmul()).collect();
    let mut c = Components::default();
    let classes = 3;
    match method {
        Method::Supsup | Method::Exssnet => {
            for (l, &i) in maskable.iter().enumerate() {
                let n = bb.maskable(i);
                let m = random_mask(&mut r, n);
                if method == Method::Exssnet {
                    let bits = m.bits().unwrap();
                    let excl = bits
                        .iter_ones()
                        .filter(|&j| deps.iter().all(|d| !d.task.components.masks[l].bits().unwrap()[j]))
                        .count();
                    c.overlay.push(randoms(&mut r, excl, -0.3, 0.3));
                }
                c.masks.push(m);
            }
        }
        Method::Finetune => {
            for &i in &maskable {
                c.dense.push(randoms(&mut r, bb.maskable(i), -0.3, 0.3));
            }
        }
        Method::Clr => {
            for i in (0..layers.len()).filter(|&i| bb.is_reprogrammed(i)) {
                let ch = bb.output_channels(i);
                let mut k = randoms(&mut r, 9 * ch, -0.1, 0.1);
                for j in 0..ch {
                    k[9 * j + 4] += 1.0;
                }
                if !bb.norm_follows(i) {
                    // A per-channel scale folded into the kernel, as training stores it.
                    for (taps, g) in k.chunks_exact_mut(9).zip(randoms(&mut r, ch, 0.5, 1.5)) {
                        taps.iter_mut().for_each(|t| *t *= g);
                    }
                    c.shifts.push(Quantized::quantize(&randoms(&mut r, ch, -0.2, 0.2), Base::Zero));
                }
                c.reprogram.push(Quantized::quantize(&k, Base::Identity3x3));
            }
        }
        Method::Linear => {}
    }
    let clr = method == Method::Clr;
    for l in layers.iter().filter(|l| matches!(l.op, Op::BatchNorm(_))) {
        let ch = bb.shape(l.input).c;
        c.norms.push(NormState {
            mean: randoms(&mut r, ch, -0.2, 0.2),
            var: randoms(&mut r, ch, 0.5, 2.0),
            gamma: clr.then(|| randoms(&mut r, ch, 0.5, 1.5)),
            beta: clr.then(|| randoms(&mut r, ch, -0.2, 0.2)),
        });
    }
    if matches!(method, Method::Clr | Method::Linear) {
        let inputs = bb.head_inputs();
        c.head = Some(Head {
            inputs: inputs as u32,
            outputs: classes as u32,
            weight: randoms(&mut r, inputs * classes, -0.5, 0.5),
            bias: randoms(&mut r, classes, -0.1, 0.1),
        });
    }
    let task = Task {
        name: name.to_string(),
        labels: (0..classes).map(|i| format!("c{i}")).collect(),
        method,
        components: c,
        depends_on: deps.iter().map(|d| d.digest).collect(),
        config: String::new(),
        metrics: Vec::new(),
        created_at: 0,
        version: 1,
        softmax: Softmax::Classes,
    };
    decode(&encode(&task, &bb.digest())).expect("an encoded task decodes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_published_sequence() {
        // First outputs for seed 1234567 from the reference implementation's test vector.
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
    }

    #[test]
    fn signed_kaiming_constant() {
        let ir = random_backbone(Arch::Lenet, 10, 7);
        let IrOp::Linear { weight: IrWeights::I8 { q, scale }, .. } = &ir.layers[1].1 else {
            panic!("layer 1 is linear")
        };
        assert!(q.iter().all(|&v| v == 1 || v == -1));
        let pos = q.iter().filter(|&&v| v == 1).count() as f64 / q.len() as f64;
        assert!((pos - 0.5).abs() < 0.01, "signs are balanced: {pos}");
        assert!(scale.iter().all(|&s| (s - (2.0f32 / 784.0).sqrt()).abs() < 1e-7));
    }
}
