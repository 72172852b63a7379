//! Training: Adam, length-grouped micro-batches with gradient accumulation,
//! and checkpoints that resume exactly.
//!
//! One optimiser step consumes a logical batch (e.g. the paper's 1024
//! examples). It is sorted by length and cut into micro-batches of at most
//! `max_tokens_per_micro_batch` padded tokens, so it fits any device and
//! wastes little padding; each micro-batch's summed loss is divided by the
//! whole batch's target-token count, so the accumulated gradient is the
//! gradient of the batch's mean token loss whatever the split. With
//! `micro_batches = k` the sorted rows are first dealt out in turn to k parts
//! of alike lengths, so that k data-parallel ranks each get one part.

use crate::error::{Error, Result};
use crate::files::Manifest;
use crate::model::{Dropout, Seq2SeqBatch};
use crate::parallel::{is_mine, Collective, SingleRank};
use crate::weights::{Model, WEIGHTS_FILE};
use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_FILE: &str = "trainer.json";

/// An (input ids, target ids) pair, each ending in eos.
pub type Example = (Vec<u32>, Vec<u32>);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Adam's constant learning rate (PROTOCOL.md section 5: 1e-4).
    pub lr: f64,
    /// Examples per optimiser step (paper: 1024 for 582M, 2048 for 300M).
    pub batch_size: usize,
    /// Padded tokens (input + target) per forward/backward pass; bounds memory.
    pub max_tokens_per_micro_batch: usize,
    /// The least number of micro-batches a batch is cut into (1: as few as
    /// the token budget allows). k ranks take one rank's steps bit for bit
    /// when every batch is exactly k micro-batches: both add the k gradients
    /// in order. (A part the budget cuts again is summed in another order.)
    #[serde(default = "single", skip_serializing_if = "is_single")]
    pub micro_batches: usize,
    /// Train with the model config's dropout rate (off: deterministic forward).
    pub dropout: bool,
    /// Seeds the data order and the dropout masks.
    pub seed: u64,
    /// Optimiser steps over which the learning rate rises linearly from
    /// lr / warmup_steps to lr (0: constant from the start, the paper's).
    #[serde(default)]
    pub warmup_steps: u64,
    /// What the learning rate does after the warm-up.
    #[serde(default, skip_serializing_if = "LrSchedule::is_constant")]
    pub lr_schedule: LrSchedule,
    /// Random offsets of the digit places (a model with digit positions).
    #[serde(default, skip_serializing_if = "DigitOffset::is_none")]
    pub digit_offset: DigitOffset,
}

/// The default of a count that is 1 unless set (micro-batches, ranks).
pub(crate) fn single() -> usize {
    1
}

/// Whether a count is 1 (a field left out of a saved config when it is).
pub(crate) fn is_single(count: &usize) -> bool {
    *count == 1
}

/// The random offset added in training to every digit's place (model.rs,
/// `DigitPositions`), so that the table rows beyond the taught lengths are
/// trained too; never in evaluation or generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigitOffset {
    /// Offsets are uniform over 0..=max (0: none).
    pub max: u32,
    /// One offset per example, or one per optimiser step for all its
    /// examples (McLeish et al.'s choice).
    #[serde(default)]
    pub per: OffsetDraw,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OffsetDraw {
    #[default]
    Example,
    Batch,
}

impl DigitOffset {
    pub fn is_none(&self) -> bool {
        self.max == 0
    }

    /// Offsets for the `count` examples of one batch (empty when off), from
    /// the trainer's noise stream.
    fn draw(&self, rng: &mut Pcg64, count: usize) -> Vec<u32> {
        match self.per {
            _ if self.is_none() => Vec::new(),
            OffsetDraw::Example => (0..count).map(|_| rng.random_range(0..=self.max)).collect(),
            OffsetDraw::Batch => vec![rng.random_range(0..=self.max); count],
        }
    }
}

/// The learning rate after the warm-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    /// lr from then on (the paper's).
    #[default]
    Constant,
    /// lr * sqrt(warmup_steps / step), T5's own pre-training schedule: large
    /// steps while a model from scratch finds the task, small ones later so
    /// that it settles instead of swinging from epoch to epoch.
    InverseSqrt,
}

impl LrSchedule {
    pub fn is_constant(&self) -> bool {
        *self == LrSchedule::Constant
    }

    /// The learning rate of optimiser step `step` (counted from 1).
    pub fn rate(self, lr: f64, warmup_steps: u64, step: u64) -> f64 {
        let warmup = warmup_steps.max(1) as f64;
        let step = step as f64;
        match self {
            _ if step < warmup => lr * step / warmup,
            LrSchedule::Constant => lr,
            LrSchedule::InverseSqrt => lr * (warmup / step).sqrt(),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 1e-4,
            batch_size: 1024,
            max_tokens_per_micro_batch: 65536,
            micro_batches: 1,
            dropout: false,
            seed: 0,
            warmup_steps: 0,
            lr_schedule: LrSchedule::Constant,
            digit_offset: DigitOffset::default(),
        }
    }
}

/// Adam (Kingma & Ba) as torch.optim.Adam computes it, with a learning rate
/// that follows `schedule` after an optional linear warm-up. Moments, and
/// for bf16 weights a master copy, are kept in f32.
pub struct Adam {
    pub lr: f64,
    pub warmup_steps: u64,
    pub schedule: LrSchedule,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub steps: u64,
    /// Per parameter: first moment, second moment, and the f32 master
    /// weights when the parameter itself is not f32.
    state: BTreeMap<String, (Tensor, Tensor, Option<Tensor>)>,
}

impl Adam {
    pub fn new(vars: &BTreeMap<String, Var>, lr: f64, warmup_steps: u64, schedule: LrSchedule) -> Result<Self> {
        let state = vars
            .iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?.to_dtype(DType::F32)?;
                let master = match var.dtype() {
                    DType::F32 => None,
                    _ => Some(var.as_tensor().to_dtype(DType::F32)?),
                };
                Ok((name.clone(), (zeros.clone(), zeros, master)))
            })
            .collect::<Result<_>>()?;
        Ok(Adam { lr, warmup_steps, schedule, beta1: 0.9, beta2: 0.999, eps: 1e-8, steps: 0, state })
    }

    /// One update of every parameter that has a gradient.
    pub fn step(&mut self, vars: &BTreeMap<String, Var>, grads: &BTreeMap<String, Tensor>) -> Result<()> {
        self.steps += 1;
        let bias1 = 1.0 - self.beta1.powi(self.steps as i32);
        let bias2 = 1.0 - self.beta2.powi(self.steps as i32);
        let lr = self.schedule.rate(self.lr, self.warmup_steps, self.steps);
        for (name, var) in vars {
            let (Some(grad), Some((m, v, master))) = (grads.get(name), self.state.get_mut(name)) else {
                continue;
            };
            let grad = grad.to_dtype(DType::F32)?;
            *m = ((&*m * self.beta1)? + (&grad * (1.0 - self.beta1))?)?;
            *v = ((&*v * self.beta2)? + (grad.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((&*v / bias2)?.sqrt()? + self.eps)?;
            let update = ((&*m * (lr / bias1))? / denom)?;
            match master {
                Some(master) => {
                    *master = (&*master - update)?;
                    var.set(&master.to_dtype(var.dtype())?)?;
                }
                None => var.set(&(var.as_tensor() - update)?)?,
            }
        }
        Ok(())
    }
}

/// Splits a logical batch into micro-batches of similar lengths: indices
/// sorted by length and dealt out in turn to `parts` parts (alike in
/// lengths, so ranks that take one each finish together), each cut so that
/// rows x longest row <= `max_tokens`.
pub fn micro_batches(examples: &[&Example], max_tokens: usize, parts: usize) -> Vec<Vec<usize>> {
    let len = |i: usize| examples[i].0.len() + examples[i].1.len();
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| (len(i), i));
    let parts = parts.max(1);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for part in 0..parts {
        let mut current: Vec<usize> = Vec::new();
        for &i in order.iter().skip(part).step_by(parts) {
            // Sorted ascending, so the newest row is the longest.
            if !current.is_empty() && (current.len() + 1) * len(i) > max_tokens {
                batches.push(std::mem::take(&mut current));
            }
            current.push(i);
        }
        if !current.is_empty() {
            batches.push(current);
        }
    }
    batches
}

/// What a trainer saves besides weights and moments.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainerState {
    config: TrainConfig,
    adam_steps: u64,
    epochs: u64,
    data_rng: Pcg64,
    dropout_rng: Pcg64,
    /// The decay of the running average of the weights, when one is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weight_average: Option<f64>,
}

/// A running average of the weights (Polyak averaging with an exponential
/// window): after every optimiser step, `decay * average + (1 - decay) *
/// weights`. It is a model of its own, so that it can be asked and saved
/// while training goes on from the weights themselves.
pub struct WeightAverage {
    pub decay: f64,
    pub model: Model,
}

impl WeightAverage {
    /// Starts at the model's current weights.
    pub fn new(decay: f64, model: &Model) -> Result<Self> {
        let tensors = model
            .vars
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(WeightAverage { decay, model: copy_of(model, tensors)? })
    }

    /// Moves the average toward the model's weights by one step.
    pub fn update(&self, model: &Model) -> Result<()> {
        for (name, average) in &self.model.vars {
            let weights = model.vars[name].as_tensor();
            average.set(&((average.as_tensor() * self.decay)? + (weights * (1.0 - self.decay))?)?)?;
        }
        Ok(())
    }
}

/// A model with `model`'s config, device and dtype and the given weights.
fn copy_of(model: &Model, tensors: HashMap<String, Tensor>) -> Result<Model> {
    let file = Path::new("(a copy of the trained weights)");
    Model::from_tensors(model.config(), tensors, file, model.t5.device(), model.t5.dtype())
}

pub struct Trainer {
    pub model: Model,
    pub config: TrainConfig,
    pub adam: Adam,
    /// Completed epochs.
    pub epochs: u64,
    data_rng: Pcg64,
    dropout_rng: Pcg64,
    /// The ranks that share each batch (one rank unless data-parallel).
    pub collective: Arc<dyn Collective>,
    /// Kept once `start_average` is called (self_training.weight_average).
    pub average: Option<WeightAverage>,
}

impl Trainer {
    pub fn new(model: Model, config: TrainConfig) -> Result<Self> {
        let adam = Adam::new(&model.vars, config.lr, config.warmup_steps, config.lr_schedule)?;
        // Two streams from one seed: data order, and training noise (dropout
        // masks, digit-place offsets; the name is older than the offsets).
        let data_rng = Pcg64::new(config.seed as u128, 0xda7a);
        let dropout_rng = Pcg64::new(config.seed as u128, 0xd209);
        Ok(Trainer {
            model,
            config,
            adam,
            epochs: 0,
            data_rng,
            dropout_rng,
            collective: Arc::new(SingleRank),
            average: None,
        })
    }

    /// Keeps a running average of the weights from now on (once started, it
    /// goes on, and a resumed trainer has it back from its checkpoint).
    pub fn start_average(&mut self, decay: f64) -> Result<()> {
        if self.average.is_none() {
            self.average = Some(WeightAverage::new(decay, &self.model)?);
        }
        Ok(())
    }

    /// The model to ask and to save: the running average when one is kept,
    /// else the weights being trained.
    pub fn published(&self) -> &Model {
        self.average.as_ref().map_or(&self.model, |average| &average.model)
    }

    /// One optimiser step on `batch`; returns its mean token loss.
    pub fn step(&mut self, batch: &[&Example]) -> Result<f32> {
        let (loss, grads) = self.gradients(batch)?;
        self.adam.step(&self.model.vars, &grads)?;
        if let Some(average) = &self.average {
            average.update(&self.model)?;
        }
        Ok(loss)
    }

    /// The mean token loss of `batch` and its gradient by parameter name,
    /// accumulated over length-grouped micro-batches. With several ranks each
    /// computes its share of the micro-batches and the shares are summed.
    pub fn gradients(&mut self, batch: &[&Example]) -> Result<(f32, BTreeMap<String, Tensor>)> {
        let total_tokens: usize = batch.iter().map(|(_, target)| target.len()).sum();
        let device = self.model.t5.device().clone();
        let rate = if self.config.dropout { self.model.config().dropout_rate } else { 0.0 };
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss = 0f32;
        let collective = self.collective.clone();
        let micros = micro_batches(batch, self.config.max_tokens_per_micro_batch, self.config.micro_batches);
        // Drawn before the micro-batches, so they do not depend on the split.
        let digit_offsets = self.config.digit_offset.draw(&mut self.dropout_rng, batch.len());
        for (i, micro) in micros.iter().enumerate() {
            // One draw per micro-batch on every rank, so the dropout masks do
            // not depend on how many ranks share the batch.
            let dropout_seed: u64 = self.dropout_rng.random();
            if !is_mine(collective.as_ref(), i) {
                continue;
            }
            let inputs: Vec<Vec<u32>> = micro.iter().map(|&i| batch[i].0.clone()).collect();
            let targets: Vec<Vec<u32>> = micro.iter().map(|&i| batch[i].1.clone()).collect();
            let mut micro_batch = Seq2SeqBatch::new(&inputs, &targets, &device)?;
            if !digit_offsets.is_empty() {
                micro_batch.digit_offsets = micro.iter().map(|&i| digit_offsets[i]).collect();
            }
            let mut dropout = Dropout::new(rate, Pcg64::new(dropout_seed as u128, 0xd209));
            let micro_loss = (self.model.t5.loss_sum(&micro_batch, &mut dropout)? / total_tokens as f64)?;
            loss += micro_loss.to_scalar::<f32>()?;
            let store = micro_loss.backward()?;
            for (name, var) in &self.model.vars {
                if let Some(grad) = store.get(var.as_tensor()) {
                    let sum = match grads.remove(name) {
                        Some(acc) => (acc + grad)?,
                        None => grad.clone(),
                    };
                    grads.insert(name.clone(), sum);
                }
            }
        }
        if collective.world_size() == 1 {
            return Ok((loss, grads));
        }
        // Every rank sums every parameter, in the same order, even one its
        // share of the batch left without a gradient.
        let mut summed = BTreeMap::new();
        for (name, var) in &self.model.vars {
            let grad = match grads.remove(name) {
                Some(grad) => grad,
                None => var.as_tensor().zeros_like()?,
            };
            summed.insert(name.clone(), collective.sum(&grad)?);
        }
        let loss = collective.sum(&Tensor::new(&[loss], &Device::Cpu)?)?.to_vec1::<f32>()?[0];
        Ok((loss, summed))
    }

    /// One pass over `data` in a fresh random order, in batches of
    /// `batch_size` (the last one may be smaller). Returns the mean of the
    /// step losses.
    pub fn epoch(&mut self, data: &[Example]) -> Result<f32> {
        self.epoch_with_progress(data, |_, _| {})
    }

    /// `epoch`, calling `on_step(examples, loss)` after each optimiser step.
    pub fn epoch_with_progress(&mut self, data: &[Example], mut on_step: impl FnMut(usize, f32)) -> Result<f32> {
        let mut order: Vec<usize> = (0..data.len()).collect();
        order.shuffle(&mut self.data_rng);
        let mut loss_sum = 0.0;
        let chunks: Vec<&[usize]> = order.chunks(self.config.batch_size.max(1)).collect();
        for chunk in &chunks {
            let batch: Vec<&Example> = chunk.iter().map(|&i| &data[i]).collect();
            let loss = self.step(&batch)?;
            on_step(batch.len(), loss);
            loss_sum += loss;
        }
        self.epochs += 1;
        Ok(loss_sum / chunks.len().max(1) as f32)
    }

    /// Writes a checkpoint directory: config.json and model.safetensors (a
    /// Hugging Face checkpoint of the published model), optimizer.safetensors
    /// (with the trained weights too when they are not the published ones),
    /// trainer.json and manifest.sha256. It is built in `DIR.partial` and renamed into place,
    /// so `dir` is always either absent or complete.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let partial = PathBuf::from(format!("{}.partial", dir.display()));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
        let mut manifest = Manifest::default();
        self.published().save(&partial, &mut manifest)?;

        let mut moments: Vec<(String, Tensor)> = Vec::new();
        for (name, (m, v, master)) in &self.adam.state {
            moments.push((format!("m.{name}"), m.clone()));
            moments.push((format!("v.{name}"), v.clone()));
            if let Some(master) = master {
                moments.push((format!("master.{name}"), master.clone()));
            }
            if self.average.is_some() {
                moments.push((format!("trained.{name}"), self.model.vars[name].as_tensor().clone()));
            }
        }
        crate::weights::write_tensors(moments.iter().map(|(n, t)| (n, t)), &partial, OPTIMIZER_FILE, &mut manifest)?;

        let state = TrainerState {
            config: self.config.clone(),
            adam_steps: self.adam.steps,
            epochs: self.epochs,
            data_rng: self.data_rng.clone(),
            dropout_rng: self.dropout_rng.clone(),
            weight_average: self.average.as_ref().map(|average| average.decay),
        };
        manifest.write_file(&partial, TRAINER_FILE, &serde_json::to_vec_pretty(&state).expect("serialises"))?;
        manifest.save(&partial)?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::rename(&partial, dir).map_err(|e| Error::io(dir, e))
    }

    /// Loads a checkpoint written by `save`, checking every file against the
    /// manifest first.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        let read_checked = |name: &str| -> Result<Vec<u8>> {
            let bytes = crate::files::read(&dir.join(name))?;
            manifest.verify_bytes(dir, name, &bytes)?;
            Ok(bytes)
        };
        // The tensor files are hashed in pieces, then mapped, not read whole.
        let tensors_checked = |name: &str, device: &Device| -> Result<HashMap<String, Tensor>> {
            manifest.verify_file(dir, name)?;
            let path = dir.join(name);
            candle_core::safetensors::load(&path, device)
                .map_err(|e| Error::format(&path, format!("cannot read tensors: {e}")))
        };
        let config_path = dir.join(crate::weights::CONFIG_FILE);
        read_checked(crate::weights::CONFIG_FILE)?;
        let model_cfg = crate::weights::read_config(&config_path)?;
        let weights = tensors_checked(WEIGHTS_FILE, &Device::Cpu)?;
        let dtype = crate::model::compute_dtype(device);
        let model = Model::from_tensors(&model_cfg, weights, &dir.join(WEIGHTS_FILE), device, dtype)?;

        let trainer_path = dir.join(TRAINER_FILE);
        let state: TrainerState = serde_json::from_slice(&read_checked(TRAINER_FILE)?)
            .map_err(|e| Error::format(&trainer_path, format!("is not a trainer state: {e}")))?;
        let optimizer_path = dir.join(OPTIMIZER_FILE);
        let mut tensors = tensors_checked(OPTIMIZER_FILE, device)?;
        let mut take = |prefix: &str, name: &str| {
            tensors
                .remove(&format!("{prefix}.{name}"))
                .ok_or_else(|| Error::format(&optimizer_path, format!("has no tensor {prefix}.{name}")))
        };
        // With a running average, model.safetensors holds the average and
        // the optimizer file the weights training goes on from.
        let (trained, average) = match state.weight_average {
            None => (model, None),
            Some(decay) => {
                let weights =
                    model.vars.keys().map(|name| Ok((name.clone(), take("trained", name)?))).collect::<Result<_>>()?;
                (copy_of(&model, weights)?, Some(WeightAverage { decay, model }))
            }
        };
        let mut trainer = Trainer::new(trained, state.config)?;
        trainer.average = average;
        trainer.adam.steps = state.adam_steps;
        trainer.epochs = state.epochs;
        trainer.data_rng = state.data_rng;
        trainer.dropout_rng = state.dropout_rng;
        for (name, (m, v, master)) in trainer.adam.state.iter_mut() {
            *m = take("m", name)?;
            *v = take("v", name)?;
            if master.is_some() {
                *master = Some(take("master", name)?);
            }
        }
        Ok(trainer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_group_by_length_within_budget() {
        let ex = |n: usize| (vec![5; n], vec![6; 2]);
        let examples: Vec<Example> = [10, 3, 8, 3, 9, 2].iter().map(|&n| ex(n)).collect();
        let refs: Vec<&Example> = examples.iter().collect();
        let batches = micro_batches(&refs, 24, 1);
        // Lengths (input + target): 12, 5, 10, 5, 11, 4.
        assert_eq!(batches, vec![vec![5, 1, 3], vec![2, 4], vec![0]]);
        let all: usize = batches.iter().map(Vec::len).sum();
        assert_eq!(all, examples.len());
    }

    #[test]
    fn a_weight_average_moves_a_quarter_of_the_way_at_decay_three_quarters() -> Result<()> {
        let cfg = crate::model::T5Config::preset("cpu-tiny").expect("a preset");
        let model = Model::random(&cfg, 0, &Device::Cpu, DType::F32)?;
        let average = WeightAverage::new(0.75, &model)?;
        let (name, var) = model.vars.iter().next().expect("weights");
        let start = var.as_tensor().copy()?;
        var.set(&(&start + 4.0)?)?;
        average.update(&model)?;
        // 0.75 * start + 0.25 * (start + 4) = start + 1, and the model's own
        // weights are left as they were.
        let moved = (average.model.vars[name].as_tensor() - &start)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(moved.iter().all(|d| (d - 1.0).abs() < 1e-5), "{:?}", &moved[..4]);
        let kept = (var.as_tensor() - &start)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(kept.iter().all(|d| (d - 4.0).abs() < 1e-5));
        Ok(())
    }

    #[test]
    fn adam_accumulates_small_bf16_updates_in_f32_master_weights() -> Result<()> {
        // Near 1.0, bf16 steps by 2^-7 or 2^-8: an update of 1e-3 applied to
        // the bf16 value itself would round back to 1.0 every time.
        let var = Var::from_tensor(&Tensor::new(&[1f32], &Device::Cpu)?.to_dtype(DType::BF16)?)?;
        let vars = BTreeMap::from([("w".to_string(), var.clone())]);
        let grads = BTreeMap::from([("w".to_string(), Tensor::new(&[1f32], &Device::Cpu)?.to_dtype(DType::BF16)?)]);
        let mut adam = Adam::new(&vars, 1e-3, 0, LrSchedule::Constant)?;
        for _ in 0..10 {
            adam.step(&vars, &grads)?;
        }
        // A constant gradient makes every Adam update lr (to within eps).
        let master = adam.state["w"].2.as_ref().expect("bf16 has a master copy").to_vec1::<f32>()?[0];
        assert!((master - 0.99).abs() < 1e-5, "master {master}");
        let value = var.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?[0];
        assert!(value < 1.0 && (value - 0.99).abs() < 4e-3, "bf16 value {value}");
        Ok(())
    }

    #[test]
    fn bf16_training_keeps_f32_moments_and_master_weights_and_does_not_scale_the_loss() -> Result<()> {
        // What CUDA trains with (REPRODUCE.md, "Adam" and "Paper scale on
        // GPUs"): bf16 weights; f32 moments and master weights; no loss
        // scaling, since bf16 has f32's exponent range: the gradient is that
        // of the mean loss itself, as an f32 model's is.
        let cfg = crate::model::T5Config::preset("cpu-tiny").expect("a preset");
        let f32_model = Model::random(&cfg, 3, &Device::Cpu, DType::F32)?;
        let tensors = f32_model.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let bf16_model = Model::from_tensors(&cfg, tensors, Path::new("memory"), &Device::Cpu, DType::BF16)?;
        let batch: Vec<Example> = (0..4).map(|i| (vec![10 + i, 20, 1], vec![30 + i, 40, 1])).collect();
        let batch: Vec<&Example> = batch.iter().collect();
        let mut norms = Vec::new();
        for model in [f32_model, bf16_model] {
            let dtype = model.t5.dtype();
            let mut trainer = Trainer::new(model, TrainConfig::default())?;
            for (name, (m, v, master)) in &trainer.adam.state {
                assert_eq!((m.dtype(), v.dtype()), (DType::F32, DType::F32), "{name}: moments are f32");
                let want = (dtype == DType::BF16).then_some(DType::F32);
                assert_eq!(master.as_ref().map(Tensor::dtype), want, "{name}: an f32 master copy only for bf16");
            }
            let (_, grads) = trainer.gradients(&batch)?;
            let squares: f32 = grads
                .values()
                .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>())
                .sum::<candle_core::Result<f32>>()?;
            norms.push(squares.sqrt());
        }
        let ratio = norms[1] / norms[0];
        assert!((0.95..1.05).contains(&ratio), "bf16 / f32 gradient norm {ratio}: a scaled loss would be far off");
        Ok(())
    }

    #[test]
    fn micro_batches_deal_sorted_rows_to_parts_of_alike_lengths() {
        let ex = |n: usize| (vec![5; n], vec![6; 2]);
        let examples: Vec<Example> = [10, 3, 8, 3, 9, 2].iter().map(|&n| ex(n)).collect();
        let refs: Vec<&Example> = examples.iter().collect();
        // Sorted by length: 5, 1, 3, 2, 4, 0; dealt in turn to two parts.
        assert_eq!(micro_batches(&refs, 1000, 2), vec![vec![5, 3, 4], vec![1, 2, 0]]);
        // Each part is then cut by the token budget, as one part is.
        assert_eq!(micro_batches(&refs, 24, 2), vec![vec![5, 3], vec![4], vec![1, 2], vec![0]]);
        // More parts than rows: every row alone, no empty part.
        assert_eq!(micro_batches(&refs[..2], 1000, 3), vec![vec![1], vec![0]]);
    }

    #[test]
    fn a_row_longer_than_the_budget_still_gets_a_batch() {
        let examples = [(vec![5; 50], vec![6; 50])];
        let refs: Vec<&Example> = examples.iter().collect();
        assert_eq!(micro_batches(&refs, 10, 1), vec![vec![0]]);
    }

    #[test]
    fn warm_up_scales_the_first_updates_linearly() -> Result<()> {
        // Adam's first updates have size lr whatever the gradient's size, so
        // with warm-up over 4 steps a constant gradient moves the weight by
        // lr/4, 2lr/4, 3lr/4, lr, lr.
        let var = Var::new(&[0f32], &Device::Cpu)?;
        let vars = BTreeMap::from([("w".to_string(), var.clone())]);
        let grads = BTreeMap::from([("w".to_string(), Tensor::new(&[0.5f32], &Device::Cpu)?)]);
        let mut adam = Adam::new(&vars, 1e-2, 4, LrSchedule::Constant)?;
        let mut before = 0f32;
        for expected in [0.25, 0.5, 0.75, 1.0, 1.0] {
            adam.step(&vars, &grads)?;
            let now = var.as_tensor().to_vec1::<f32>()?[0];
            assert!(((before - now) / 1e-2 - expected).abs() < 1e-4, "moved {} not {expected} lr", before - now);
            before = now;
        }
        Ok(())
    }

    #[test]
    fn inverse_sqrt_halves_the_rate_at_four_times_the_warm_up() {
        let rate = |step| LrSchedule::InverseSqrt.rate(1e-3, 100, step);
        assert_eq!(rate(50), 5e-4);
        assert_eq!(rate(100), 1e-3);
        assert!((rate(400) - 5e-4).abs() < 1e-12);
        assert_eq!(LrSchedule::Constant.rate(1e-3, 100, 400), 1e-3);
    }
}
