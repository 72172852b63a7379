//! What a paper-scale experiment costs: FLOPs from its data schedule and
//! model size, and hours on GPUs of stated peak rates at stated
//! utilisations (`sector cost`, the cost table of REPRODUCE.md).
//!
//! Matmul FLOPs only: 2 per weight per token forward, 6 training
//! (forward and backward). Attention scores add about 2 % at these lengths
//! and are left out. A token of the input passes the encoder and the
//! decoder's cross-attention keys and values; a token of the target passes
//! the rest of the decoder and the output layer. Sequence lengths are the
//! mean byte lengths of random problems in the experiment's formats.

use crate::config::{Experiment, StartSelfTraining};
use crate::memory::{gib, MemoryPlan};
use crate::model::T5Config;
use crate::sector::{FAST_NEW, FAST_OLD, SELF_TRAINING_FRACTION, SLOW_NEW, SLOW_OLD};
use crate::task::{random_problem, Kind, Problem, SlowFormat};
use rand_pcg::Pcg64;

/// Peak rates of the GPUs in the table for bf16 training, FLOP/s: A100 and
/// H100 dense bf16 tensor cores; the V100 has no bf16 tensor cores, so the
/// paper's bf16 ran at best at its fp32 rate.
pub const GPUS: [(&str, f64); 3] = [("V100", 15.7e12), ("A100", 312e12), ("H100", 989e12)];
/// Assumed fractions of peak: training at these batch sizes, and greedy
/// decoding, which waits on memory more than on arithmetic.
pub const TRAIN_UTILISATION: f64 = 0.3;
pub const DECODE_UTILISATION: f64 = 0.1;

/// The FLOPs of one experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct Cost {
    pub name: String,
    pub model: String,
    pub supervised: (usize, usize),
    pub self_taught: (usize, usize),
    /// One epoch over every stage's training data.
    pub train_flops_per_epoch: f64,
    /// Labelling new problems and evaluating every stage.
    pub decode_flops: f64,
    /// Per-GPU memory in bf16 at the configured micro-batch budget.
    pub memory: MemoryPlan,
}

impl Cost {
    /// Hours on `gpus` GPUs of `peak` FLOP/s with `epochs` epochs per stage.
    pub fn hours(&self, epochs: f64, gpus: f64, peak: f64) -> f64 {
        let seconds = epochs * self.train_flops_per_epoch / (TRAIN_UTILISATION * peak * gpus)
            + self.decode_flops / (DECODE_UTILISATION * peak * gpus);
        seconds / 3600.0
    }

    /// Epochs per stage that fit in `hours` on `gpus` GPUs of `peak` FLOP/s.
    pub fn epochs_in(&self, hours: f64, gpus: f64, peak: f64) -> f64 {
        let decode = self.hours(0.0, gpus, peak);
        (hours - decode) / (self.hours(1.0, gpus, peak) - decode)
    }
}

/// Weights met per token: (input side, target side).
pub fn weights_per_token(cfg: &T5Config) -> (f64, f64) {
    let (d, ff, inner) = (cfg.d_model as f64, cfg.d_ff as f64, (cfg.num_heads * cfg.d_kv) as f64);
    let (enc, dec) = (cfg.num_layers as f64, cfg.decoder_layers() as f64);
    // Encoder layer: q, k, v, o and the gated feed-forward; each decoder
    // layer projects every input token to cross-attention keys and values.
    let input = enc * (4.0 * d * inner + 3.0 * d * ff) + dec * 2.0 * d * inner;
    // Decoder layer: self-attention q, k, v, o, cross-attention q and o, feed-forward; then the output layer.
    let target = dec * (6.0 * d * inner + 3.0 * d * ff) + d * cfg.vocab_size as f64;
    (input, target)
}

struct Lengths {
    format: SlowFormat,
    rng: Pcg64,
}

impl Lengths {
    /// Mean (input, target) tokens of `kind` queries on n-digit problems, eos included.
    fn mean(&mut self, kind: Kind, n: usize) -> (f64, f64) {
        const SAMPLE: usize = 64;
        let mut sum = (0.0, 0.0);
        for _ in 0..SAMPLE {
            let p: Problem = random_problem(&mut self.rng, n);
            let target = match kind {
                Kind::Slow if n > 1 => p.slow_target(self.format),
                _ => p.fast_target(),
            };
            sum.0 += (p.prompt(kind).len() + 1) as f64;
            sum.1 += (target.len() + 1) as f64;
        }
        (sum.0 / SAMPLE as f64, sum.1 / SAMPLE as f64)
    }
}

/// The cost of `e`, with `cfg` its model.
pub fn cost(e: &Experiment, cfg: &T5Config, model: &str) -> Cost {
    let (w_in, w_out) = weights_per_token(cfg);
    let mut lengths = Lengths { format: e.task.slow_format, rng: Pcg64::new(0, 0xc057) };
    let mut query = |kind: Kind, n: usize, flops_per_weight: f64| {
        let (input, target) = lengths.mean(kind, n.max(1));
        flops_per_weight * (w_in * input + w_out * target)
    };
    let train = |q: &mut dyn FnMut(Kind, usize, f64) -> f64, kind: Kind, n: usize, count: usize| {
        e.scaled(count) as f64 * q(kind, n, 6.0)
    };
    // Decoding: a chain of slow steps from n digits down to `last`, then a fast guess.
    let steps_then_guess = |q: &mut dyn FnMut(Kind, usize, f64) -> f64, n: usize, last: usize| -> f64 {
        (last + 1..=n).map(|k| q(Kind::Slow, k, 2.0)).sum::<f64>() + q(Kind::Fast, last, 2.0)
    };

    let first = e.supervised.first_digits;
    let cap = match e.supervised.start_self_training {
        StartSelfTraining::AfterDigits(n) => n,
        StartSelfTraining::When(_) => e.supervised.max_digits,
    };
    let last = e.self_training.last_digits;
    let (mut train_flops, mut decode_flops) = (0.0, 0.0);
    let evaluate = |q: &mut dyn FnMut(Kind, usize, f64) -> f64, n: usize| -> f64 {
        let per_length = e.eval.problems_per_length as f64;
        (1..=n + e.eval.lengths_beyond).map(|l| per_length * (q(Kind::Fast, l, 2.0) + steps_then_guess(q, l, 1))).sum()
    };
    for n in first..=cap {
        // PROTOCOL.md section 5: the new length in full, the shorter ones at a tenth.
        train_flops += train(&mut query, Kind::Slow, n, SLOW_NEW) + train(&mut query, Kind::Fast, n, FAST_NEW);
        for k in 1..n {
            train_flops += train(&mut query, Kind::Fast, k, FAST_OLD);
            if k >= 2 {
                train_flops += train(&mut query, Kind::Slow, k, SLOW_OLD);
            }
        }
        decode_flops += evaluate(&mut query, n);
    }
    for m in cap + 1..=last {
        // Section 6: label slow problems by simplify-only and fast ones by
        // simplify-then-guess (K slow steps, a fast guess after each), train
        // on all of them (an upper bound: rejected labels are not trained
        // on) and on replay at a tenth of section 5's sizes for every
        // shorter length.
        let k = e.self_training.k.min(m - 1);
        let slow_labels = steps_then_guess(&mut query, m, m - 1);
        let fast_labels =
            steps_then_guess(&mut query, m, m - k) + (1..k).map(|j| query(Kind::Fast, m - j, 2.0)).sum::<f64>();
        decode_flops += e.generated(SLOW_NEW / SELF_TRAINING_FRACTION) as f64 * slow_labels
            + e.generated(FAST_NEW / SELF_TRAINING_FRACTION) as f64 * fast_labels
            + evaluate(&mut query, m);
        train_flops += train(&mut query, Kind::Slow, m, SLOW_NEW / SELF_TRAINING_FRACTION)
            + train(&mut query, Kind::Fast, m, FAST_NEW / SELF_TRAINING_FRACTION);
        for k in 1..m {
            train_flops += train(&mut query, Kind::Fast, k, FAST_OLD / SELF_TRAINING_FRACTION);
            if k >= 2 {
                train_flops += train(&mut query, Kind::Slow, k, SLOW_OLD / SELF_TRAINING_FRACTION);
            }
        }
    }
    Cost {
        name: e.name.clone(),
        model: model.to_string(),
        supervised: (first, cap),
        self_taught: (cap + 1, last),
        train_flops_per_epoch: train_flops,
        decode_flops,
        memory: MemoryPlan::for_experiment(e, cfg, 2),
    }
}

/// The Markdown cost table, with the paper's 24 h on 8 V100s set against it.
pub fn table(costs: &[Cost]) -> String {
    let mut out = String::from(
        "| experiment | model | supervised | self-taught | training PFLOP per epoch of every stage | \
         labelling + evaluation PFLOP |",
    );
    for (gpu, _) in GPUS {
        out += &format!(" hours, 1 epoch/stage, 1 / 8 {gpu} |");
    }
    out += " epochs/stage in 24 h on 8 V100 | memory per GPU (micro-batch tokens) |\n|---|---|---|---|---:|---:|";
    out += &"---:|".repeat(GPUS.len() + 2);
    out += "\n";
    for c in costs {
        let self_taught = match c.self_taught {
            (first, last) if first <= last => format!("{first}..{last}"),
            _ => "-".into(),
        };
        out += &format!(
            "| {} | {} | {}..{} | {self_taught} | {:.0} | {:.0} |",
            c.name,
            c.model,
            c.supervised.0,
            c.supervised.1,
            c.train_flops_per_epoch / 1e15,
            c.decode_flops / 1e15
        );
        for (_, peak) in GPUS {
            out += &format!(" {:.1} / {:.1} |", c.hours(1.0, 1.0, peak), c.hours(1.0, 8.0, peak));
        }
        out += &format!(
            " {:.1} | {} ({}) |\n",
            c.epochs_in(24.0, 8.0, GPUS[0].1),
            gib(c.memory.total_bytes()),
            c.memory.micro_batch_tokens
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn every_weight_but_the_input_embedding_is_met_once_per_token() {
        let cfg = T5Config::preset("byt5-base").unwrap();
        let (input, target) = weights_per_token(&cfg);
        let embedding = (cfg.vocab_size * cfg.d_model) as f64;
        let missing = cfg.num_params() as f64 - embedding - (input + target);
        // Only the norms' scales and the relative-position biases remain.
        assert!(missing > 0.0 && missing < 1e-3 * cfg.num_params() as f64, "{missing}");
    }

    #[test]
    fn training_flops_follow_the_data_scale_and_hours_the_epochs() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/paper/main.toml");
        let mut e = Experiment::load(&path).unwrap();
        let (cfg, name) = e.model_config_for_cost(&path).unwrap();
        let full = cost(&e, &cfg, &name);
        e.task.data_scale = 0.5;
        let half = cost(&e, &cfg, &name);
        assert!((half.train_flops_per_epoch / full.train_flops_per_epoch - 0.5).abs() < 1e-9);
        let (a100, epochs) = (GPUS[1].1, 3.0);
        let eight = full.hours(epochs, 8.0, a100);
        assert!((full.hours(epochs, 1.0, a100) / eight - 8.0).abs() < 1e-9);
        assert!((full.epochs_in(eight, 8.0, a100) - epochs).abs() < 1e-9);
    }
}
