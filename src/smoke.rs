//! `sector smoke`: the paper-scale models (byt5-small, byt5-base) through the
//! whole path on the CPU, from seeded random weights, since the hub cannot be
//! reached here: build the model, take a few optimiser steps of the paper's
//! first supervised stage (its data, Adam, learning rate; only the batch is
//! small), greedy-decode, save a checkpoint, reload it and compare logits.
//! Each model's seconds a step, training rate and peak resident memory are
//! reported beside the memory plan's prediction for the same micro-batch.
//! The device and learning rate are the experiment's (the CLI may override
//! them); on CUDA the model trains in bf16 (`scripts/gpu-check.sh`).

use crate::config::Experiment;
use crate::error::{Error, Result};
use crate::generate::{greedy_text, GreedyOptions};
use crate::memory::{gib, MemoryPlan};
use crate::model::{compute_dtype, select_device, Dropout, Seq2SeqBatch, T5Config};
use crate::task::TrueOracle;
use crate::train::{Example, TrainConfig, Trainer};
use crate::weights::Model;
use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_pcg::Pcg64;
use std::path::Path;
use std::time::Instant;

/// Tokens greedy decoding may add to each prompt.
const NEW_TOKENS: usize = 24;
/// Prompts decoded, and rows of the padded batch whose logits are compared.
const PROMPTS: usize = 4;

/// What one model did.
#[derive(Debug)]
pub struct SmokeReport {
    pub preset: String,
    pub params: usize,
    pub steps: usize,
    /// Mean token loss of the first batch before the first step and after the last.
    pub first_batch_loss: (f32, f32),
    /// Median seconds of an optimiser step.
    pub seconds_per_step: f64,
    /// Tokens (input and target) of the median step, and their training
    /// matmul FLOPs (`cost`'s count: 6 per weight a token meets).
    pub tokens_per_step: usize,
    pub flops_per_step: f64,
    /// Peak resident memory of the process while the model was built and
    /// trained (None where /proc cannot say).
    pub peak_training_bytes: Option<u64>,
    /// The memory plan for the same micro-batch.
    pub plan: MemoryPlan,
    pub prompts: Vec<String>,
    pub outputs: Vec<String>,
    /// Bytes of the checkpoint directory (model, optimiser state, trainer).
    pub checkpoint_bytes: u64,
    pub save_reload_seconds: f64,
    /// Peak resident memory while the checkpoint was saved and reloaded.
    pub peak_save_reload_bytes: Option<u64>,
    /// Largest absolute difference between the logits before saving and
    /// after reloading (0 when the checkpoint round-trips exactly).
    pub logits_max_diff: f32,
}

/// Runs the smoke test of `preset` with `experiment`'s first supervised
/// stage: `steps` optimiser steps of `batch` examples. The checkpoint goes to
/// `dir` and is removed after the comparison (it is several GB).
pub fn smoke(experiment: &Experiment, preset: &str, steps: usize, batch: usize, dir: &Path) -> Result<SmokeReport> {
    let unknown = || candle_core::Error::Msg(format!("unknown preset {preset:?}: use byt5-small or byt5-base"));
    let cfg = T5Config::preset(preset).ok_or_else(unknown)?;
    let device = select_device(&experiment.model.device)?;
    reset_peak_memory();
    let model = Model::random(&cfg, experiment.seed, &device, compute_dtype(&device))?;
    let params: usize = model.vars.values().map(|v| v.as_tensor().elem_count()).sum();
    if params != cfg.num_params() {
        let counted = cfg.num_params();
        return Err(candle_core::Error::Msg(format!(
            "{preset}: built {params} parameters, its config counts {counted}"
        ))
        .into());
    }

    // The paper's first supervised stage, in a seeded order.
    let first = experiment.supervised.first_digits;
    let (gate, rows) = crate::sector::supervised_data(experiment, &TrueOracle, 1, first);
    let mut examples: Vec<Example> = rows.iter().map(|row| row.example()).collect();
    examples.shuffle(&mut Pcg64::seed_from_u64(experiment.seed));
    let batches: Vec<&[Example]> = examples.chunks(batch.max(1)).take(steps.max(1)).collect();
    let config = TrainConfig { batch_size: batch, ..experiment.train_config() };
    let mut trainer = Trainer::new(model, config)?;
    let first_batch: Vec<&Example> = batches[0].iter().collect();
    let loss_before = mean_loss(&trainer, &first_batch)?;
    // (seconds, tokens, FLOPs) of each step.
    let mut timed = Vec::new();
    let (input_weights, target_weights) = crate::cost::weights_per_token(&cfg);
    for (step, examples) in batches.iter().enumerate() {
        let start = Instant::now();
        let loss = trainer.step(&examples.iter().collect::<Vec<_>>())?;
        let seconds = start.elapsed().as_secs_f64();
        let (inputs, targets) =
            examples.iter().fold((0, 0), |(i, t), (input, target)| (i + input.len(), t + target.len()));
        let flops = 6.0 * (input_weights * inputs as f64 + target_weights * targets as f64);
        timed.push((seconds, inputs + targets, flops));
        eprintln!("  {preset} step {}/{}: loss {loss:.3}, {seconds:.1} s", step + 1, batches.len());
    }
    let first_batch_loss = (loss_before, mean_loss(&trainer, &first_batch)?);
    let peak_training_bytes = peak_memory();
    timed.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (seconds_per_step, tokens_per_step, flops_per_step) = timed[timed.len() / 2];
    let dtype_bytes = trainer.model.t5.dtype().size_in_bytes() as u64;
    let plan = plan_of(&cfg, dtype_bytes, batches[0], experiment.train.max_tokens_per_micro_batch);

    let prompts: Vec<String> =
        gate.iter().step_by(gate.len().div_ceil(PROMPTS).max(1)).map(|g| g.problem.prompt(g.kind)).collect();
    let outputs = greedy_text(&trainer.model.t5, &prompts, GreedyOptions::new(NEW_TOKENS))?;

    // Logits of a padded batch (rows of different lengths) before and after.
    let probe: Vec<&Example> = examples.iter().step_by(examples.len().div_ceil(PROMPTS).max(1)).collect();
    let before = logits(&trainer, &probe)?;
    reset_peak_memory();
    let start = Instant::now();
    let checkpoint = dir.join(preset);
    trainer.save(&checkpoint)?;
    let checkpoint_bytes = dir_bytes(&checkpoint)?;
    drop(trainer);
    let reloaded = Trainer::load(&checkpoint, &device)?;
    let after = logits(&reloaded, &probe)?;
    let save_reload_seconds = start.elapsed().as_secs_f64();
    let peak_save_reload_bytes = peak_memory();
    let logits_max_diff =
        (before.to_dtype(DType::F32)? - after.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
    drop(reloaded);
    std::fs::remove_dir_all(&checkpoint).map_err(|e| Error::io(&checkpoint, e))?;

    Ok(SmokeReport {
        preset: preset.into(),
        params,
        steps: batches.len(),
        first_batch_loss,
        seconds_per_step,
        tokens_per_step,
        flops_per_step,
        peak_training_bytes,
        plan,
        prompts,
        outputs,
        checkpoint_bytes,
        save_reload_seconds,
        peak_save_reload_bytes,
        logits_max_diff,
    })
}

/// The memory plan for `batch` as the trainer cuts it: its padded tokens
/// (up to the micro-batch budget) at its longest sequence.
fn plan_of(cfg: &T5Config, dtype_bytes: u64, batch: &[Example], budget: usize) -> MemoryPlan {
    let longest = batch.iter().map(|(input, target)| input.len().max(target.len())).max().unwrap_or(1);
    let padded: usize = batch.len() * batch.iter().map(|(i, t)| i.len() + t.len()).max().unwrap_or(0);
    MemoryPlan::new(cfg, dtype_bytes, padded.min(budget), longest)
}

/// Mean token loss of `examples` without dropout.
fn mean_loss(trainer: &Trainer, examples: &[&Example]) -> Result<f32> {
    let batch = padded_batch(trainer, examples)?;
    let sum = trainer.model.t5.loss_sum(&batch, &mut Dropout::off())?.to_scalar::<f32>()?;
    Ok(sum / batch.num_target_tokens as f32)
}

fn padded_batch(trainer: &Trainer, examples: &[&Example]) -> Result<Seq2SeqBatch> {
    let inputs: Vec<Vec<u32>> = examples.iter().map(|(input, _)| input.clone()).collect();
    let targets: Vec<Vec<u32>> = examples.iter().map(|(_, target)| target.clone()).collect();
    Ok(Seq2SeqBatch::new(&inputs, &targets, trainer.model.t5.device())?)
}

/// Teacher-forced logits of `examples`, padded into one batch: (b, tgt_len, vocab).
fn logits(trainer: &Trainer, examples: &[&Example]) -> Result<Tensor> {
    Ok(trainer.model.t5.forward(&padded_batch(trainer, examples)?, &mut Dropout::off())?)
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let io = |e| Error::io(dir, e);
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(io)? {
        total += entry.map_err(io)?.metadata().map_err(io)?.len();
    }
    Ok(total)
}

/// Resets the kernel's peak resident size of this process (VmHWM), so that
/// each model's peak is its own; where it cannot, the peak is the process's.
fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory of this process since the last reset, from /proc.
fn peak_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The reports as a Markdown table, then each model's decoded prompts.
pub fn table(reports: &[SmokeReport]) -> String {
    let mut out = String::from(
        "| model | parameters | steps | loss of the first batch, before -> after | seconds a step | tokens a second | \
         training TFLOP/s | peak resident, build + training | \
         memory plan, same micro-batch | checkpoint | save + reload s | peak resident, save + reload | \
         logits after reload, max abs diff |\n\
         |---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in reports {
        let peak = r.peak_training_bytes.map_or("-".into(), gib);
        let peak_save = r.peak_save_reload_bytes.map_or("-".into(), gib);
        out += &format!(
            "| {} | {} | {} | {:.3} -> {:.3} | {:.1} | {:.0} | {:.3} | {peak} | {} ({} tokens) | {} | {:.1} | {peak_save} | {:e} |\n",
            r.preset,
            thousands(r.params),
            r.steps,
            r.first_batch_loss.0,
            r.first_batch_loss.1,
            r.seconds_per_step,
            r.tokens_per_step as f64 / r.seconds_per_step,
            r.flops_per_step / r.seconds_per_step / 1e12,
            gib(r.plan.total_bytes()),
            r.plan.micro_batch_tokens,
            gib(r.checkpoint_bytes),
            r.save_reload_seconds,
            r.logits_max_diff,
        );
    }
    for r in reports {
        out += &format!("\n{}: greedy outputs of random weights ({} new tokens at most)\n", r.preset, NEW_TOKENS);
        for (prompt, output) in r.prompts.iter().zip(&r.outputs) {
            out += &format!("  {:?} -> {:?}\n", prompt, output);
        }
    }
    out
}

/// 299637760 -> "299,637,760".
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits_by_three() {
        assert_eq!(thousands(299_637_760), "299,637,760");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
    }
}
