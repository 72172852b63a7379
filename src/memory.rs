//! The per-GPU memory plan: what training one micro-batch needs, printed
//! before a run trains and checked against the device.
//!
//! The estimate counts the weights, the accumulated gradients, Adam's
//! moments and f32 master weights, and the activations autograd keeps for
//! the largest micro-batch (`max_tokens_per_micro_batch` padded tokens). It
//! leaves out the allocator's slack and the kernels' workspaces, so a plan
//! is refused when it needs more than 90 % of the device.

use crate::config::Experiment;
use crate::model::T5Config;
use crate::task::{Kind, Problem};
use std::fmt;

/// Fraction of the device a plan may use.
pub const USABLE: f64 = 0.9;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryPlan {
    pub params: usize,
    /// Weights, gradients, Adam's moments and master weights.
    pub state_bytes: u64,
    /// Activations kept for the backward pass of one micro-batch.
    pub activation_bytes: u64,
    pub micro_batch_tokens: usize,
}

impl MemoryPlan {
    /// `dtype_bytes`: 2 for bf16 (paper scale), 4 for f32. `longest` is the
    /// longest input or target sequence the run trains on, in tokens.
    pub fn new(cfg: &T5Config, dtype_bytes: u64, micro_batch_tokens: usize, longest: usize) -> Self {
        let params = cfg.num_params();
        // Weights and their accumulated gradients in the compute dtype; Adam's
        // two moments in f32; an f32 master copy when the weights are not f32.
        let master = if dtype_bytes == 4 { 0 } else { 4 };
        let state_bytes = params as u64 * (2 * dtype_bytes + 8 + master);
        let activation_bytes = micro_batch_tokens as u64 * Self::bytes_per_token(cfg, dtype_bytes, longest);
        MemoryPlan { params, state_bytes, activation_bytes, micro_batch_tokens }
    }

    /// Activations kept per token of a micro-batch, counting every token as
    /// passing the deeper of the two stacks (the budget mixes input and
    /// target tokens), plus the output logits.
    fn bytes_per_token(cfg: &T5Config, dtype_bytes: u64, longest: usize) -> u64 {
        let (d, ff, inner) = (cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.d_kv);
        // Per attention block: its norm input and output, q, k, v and the
        // attention output, and the scores and probabilities over `longest` keys.
        let attention = 2 * d + 4 * inner + 2 * cfg.num_heads * longest;
        // Gated-GELU feed-forward: norm, two input projections, GELU, product, output.
        let feed_forward = 2 * d + 4 * ff + d;
        let encoder = cfg.num_layers * (attention + feed_forward);
        let decoder = cfg.decoder_layers() * (2 * attention + feed_forward);
        let per_layer_stack = encoder.max(decoder) as u64 * dtype_bytes;
        // Logits in the compute dtype, then f32 log-probabilities and their gradient.
        let logits = cfg.vocab_size as u64 * (dtype_bytes + 8);
        per_layer_stack + logits
    }

    /// The plan of an experiment's training: its micro-batch budget at its
    /// longest sequence (a slow step on its longest problems).
    pub fn for_experiment(e: &Experiment, cfg: &T5Config, dtype_bytes: u64) -> Self {
        let n = e.self_training.last_digits.max(e.supervised.max_digits);
        let worst = Problem::new("9".repeat(n), "9".repeat(n), true);
        let longest = [worst.prompt(Kind::Slow), worst.prompt(Kind::Fast), worst.slow_target(e.task.slow_format)]
            .iter()
            .map(|text| text.len() + 1)
            .max()
            .expect("three texts");
        Self::new(cfg, dtype_bytes, e.train.max_tokens_per_micro_batch, longest)
    }

    pub fn total_bytes(&self) -> u64 {
        self.state_bytes + self.activation_bytes
    }

    /// The largest micro-batch budget (tokens) that fits in `capacity` bytes,
    /// or None when the model's state alone does not fit.
    pub fn largest_micro_batch(&self, capacity: u64) -> Option<usize> {
        let usable = (capacity as f64 * USABLE) as u64;
        let per_token = self.activation_bytes / self.micro_batch_tokens.max(1) as u64;
        usable.checked_sub(self.state_bytes).map(|left| (left / per_token.max(1)) as usize).filter(|&t| t > 0)
    }

    /// Ok when the plan fits in `capacity` bytes; otherwise what to change.
    pub fn check(&self, capacity: u64) -> Result<(), String> {
        if self.total_bytes() as f64 <= capacity as f64 * USABLE {
            return Ok(());
        }
        let fix = match self.largest_micro_batch(capacity) {
            Some(tokens) => format!("set train.max_tokens_per_micro_batch to at most {tokens}"),
            None => "the weights and Adam's state alone do not fit: use a smaller model or a larger GPU".into(),
        };
        Err(format!(
            "training needs about {} per GPU but the device has {} ({}% usable): {fix}",
            gib(self.total_bytes()),
            gib(capacity),
            (USABLE * 100.0) as u32
        ))
    }
}

pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let millions = self.params as f64 / 1e6;
        write!(
            f,
            "memory per device: about {} ({millions:.*}M parameters: {} for weights, gradients and Adam; {} for \
             the activations of a micro-batch of {} tokens)",
            gib(self.total_bytes()),
            if millions < 10.0 { 1 } else { 0 },
            gib(self.state_bytes),
            gib(self.activation_bytes),
            self.micro_batch_tokens
        )
    }
}

/// The device's memory in bytes (None on the CPU, where the plan is only printed).
pub fn device_capacity(device: &candle_core::Device) -> candle_core::Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(cuda) = device {
        let total = cuda.cuda_stream().context().total_mem().map_err(candle_core::Error::wrap)?;
        return Ok(Some(total as u64));
    }
    let _ = device;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byt5_base_state_is_sixteen_bytes_a_parameter_in_bf16() {
        let cfg = T5Config::preset("byt5-base").unwrap();
        let plan = MemoryPlan::new(&cfg, 2, 4096, 300);
        // bf16 weights and gradients (2 + 2), f32 moments (8), f32 master (4).
        assert_eq!(plan.state_bytes, 581_653_248 * 16);
        assert!(plan.activation_bytes > 0);
    }

    #[test]
    fn a_plan_too_big_for_the_device_is_refused_with_a_budget_that_fits() {
        let cfg = T5Config::preset("byt5-base").unwrap();
        let v100 = 32u64 << 30;
        let plan = MemoryPlan::new(&cfg, 2, 1 << 20, 300);
        let message = plan.check(v100).unwrap_err();
        let tokens = plan.largest_micro_batch(v100).unwrap();
        assert!(message.contains(&format!("max_tokens_per_micro_batch to at most {tokens}")), "{message}");
        // The suggested budget fits; twice it does not.
        assert!(MemoryPlan::new(&cfg, 2, tokens, 300).check(v100).is_ok());
        assert!(MemoryPlan::new(&cfg, 2, tokens * 2, 300).check(v100).is_err());
        // The state of byt5-base (9.3 GB) cannot fit in 8 GiB at all.
        assert!(plan.check(8 << 30).unwrap_err().contains("alone do not fit"));
    }
}
