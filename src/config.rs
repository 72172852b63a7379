//! Experiment configs: one TOML file per experiment under experiments/.
//!
//! Every field has the paper's value as its default (byt5-base on CUDA,
//! PROTOCOL.md sections 5 and 6), so a config holds only what differs.
//! Unknown fields are rejected, naming the file and the field.

use crate::error::{Error, Result};
use crate::model::{DigitPositions, T5Config};
use crate::task::SlowFormat;
use crate::train::{DigitOffset, LrSchedule};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Names the run directory (runs/<name>) and labels its artifacts.
    pub name: String,
    /// "micro" (machinery checks), "cpu" or "paper"; labels every artifact.
    #[serde(default = "defaults::scale")]
    pub scale: String,
    /// Seeds every random draw of the run (data, weights, order, dropout).
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub model: ModelSettings,
    #[serde(default)]
    pub train: TrainSettings,
    #[serde(default)]
    pub task: TaskSettings,
    #[serde(default)]
    pub supervised: SupervisedSettings,
    #[serde(default)]
    pub self_training: SelfTrainingSettings,
    #[serde(default)]
    pub eval: EvalSettings,
    /// The length-generalisation probe (`sector probe`; src/probe.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<crate::probe::ProbeSettings>,
}

/// Which model, on which device: exactly one of `preset` (a randomly
/// initialised model; shape fields override the preset), `weights`
/// (pretrained ones: a directory or a hub id such as google/byt5-base) and
/// `pretrain` (a pretraining config such as experiments/cpu/pretrain.toml,
/// whose checkpoint the run makes first if it is missing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    pub preset: Option<String>,
    pub weights: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrain: Option<String>,
    /// cpu, cuda or cuda:N.
    pub device: String,
    /// "f32" or "bf16": a statement of what the run computes in, checked
    /// against the device (f32 on the CPU, bf16 on CUDA; `model::compute_dtype`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    pub d_model: Option<usize>,
    pub d_ff: Option<usize>,
    pub num_heads: Option<usize>,
    pub d_kv: Option<usize>,
    pub num_layers: Option<usize>,
    pub num_decoder_layers: Option<usize>,
    pub relative_attention_num_buckets: Option<usize>,
    pub relative_attention_max_distance: Option<usize>,
    /// Clipped relative positions (T5Config::relative_attention_clip), a
    /// CPU-scale deviation: every distance of K or more shares one bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relative_attention_clip: Option<usize>,
    pub dropout_rate: Option<f64>,
    pub initializer_factor: Option<f64>,
    /// The output layer's initial std (T5Config::lm_head_init_std).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lm_head_init_std: Option<f64>,
    /// Digit-position embeddings (T5Config::digit_positions), a CPU-scale
    /// deviation: `{ max_index = 160, from_right = false, number_index = false }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digit_positions: Option<DigitPositions>,
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            preset: None,
            weights: Some("google/byt5-base".into()),
            pretrain: None,
            device: "cuda".into(),
            dtype: None,
            d_model: None,
            d_ff: None,
            num_heads: None,
            d_kv: None,
            num_layers: None,
            num_decoder_layers: None,
            relative_attention_num_buckets: None,
            relative_attention_max_distance: None,
            relative_attention_clip: None,
            dropout_rate: None,
            initializer_factor: None,
            lm_head_init_std: None,
            digit_positions: None,
        }
    }
}

impl ModelSettings {
    /// Checks that exactly one of preset, weights and pretrain is given,
    /// that the preset exists, and that shape fields come only with a preset.
    pub fn check(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, problem: String| {
            Err(Error::Config { path: path.to_path_buf(), field: field.into(), problem })
        };
        let given = [self.preset.is_some(), self.weights.is_some(), self.pretrain.is_some()];
        if given.iter().filter(|&&g| g).count() != 1 {
            return bad(
                "model.preset",
                "model.weights and model.pretrain: give exactly one (a preset for random weights, pretrained \
                 weights, or a pretraining config)"
                    .into(),
            );
        }
        if let Some(dtype) = &self.dtype {
            let on_cuda = self.device.starts_with("cuda");
            match (dtype.as_str(), on_cuda) {
                ("f32", false) | ("bf16", true) => {}
                ("bf16", false) => {
                    return bad(
                        "model.dtype",
                        "is bf16, but on the CPU sector computes in f32: its portable kernels, which give the same \
                         bits on every x86-64 CPU with AVX2 and FMA, are f32 only (candle's CPU bf16 is used only \
                         by tests). Remove the field to train in f32, or set model.device = \"cuda\" to train in \
                         bf16 as the paper did"
                            .into(),
                    )
                }
                ("f32", true) => {
                    return bad(
                        "model.dtype",
                        "is f32, but on CUDA sector computes in bf16 (the paper's choice, with f32 Adam moments and \
                         master weights): remove the field, or set model.device = \"cpu\" to train in f32"
                            .into(),
                    )
                }
                (other, _) => return bad("model.dtype", format!("is {other:?}: use \"f32\" or \"bf16\"")),
            }
        }
        match &self.preset {
            Some(preset) if T5Config::preset(preset).is_none() => bad(
                "model.preset",
                format!(
                    "is {preset:?}; use byt5-small, byt5-base, byt5-large, byt5-xl, cpu-tiny, cpu-small or cpu-medium"
                ),
            ),
            None if self.shape_overrides() => {
                bad("model", "shape fields only apply to a preset, not to pretrained weights".into())
            }
            _ => match self.preset_config().and_then(|cfg| cfg.unsupported()) {
                Some((field, problem)) => bad(&format!("model.{field}"), problem),
                None => Ok(()),
            },
        }
    }

    fn shape_overrides(&self) -> bool {
        [self.d_model, self.d_ff, self.num_heads, self.d_kv, self.num_layers, self.num_decoder_layers]
            .iter()
            .chain([
                &self.relative_attention_num_buckets,
                &self.relative_attention_max_distance,
                &self.relative_attention_clip,
            ])
            .any(Option::is_some)
            || self.dropout_rate.is_some()
            || self.initializer_factor.is_some()
            || self.lm_head_init_std.is_some()
            || self.digit_positions.is_some()
    }

    /// The preset's model config with the shape overrides (None for pretrained weights).
    pub fn preset_config(&self) -> Option<T5Config> {
        let mut cfg = T5Config::preset(self.preset.as_deref()?)?;
        let set = |field: &mut usize, value: Option<usize>| *field = value.unwrap_or(*field);
        set(&mut cfg.d_model, self.d_model);
        set(&mut cfg.d_ff, self.d_ff);
        set(&mut cfg.num_heads, self.num_heads);
        set(&mut cfg.d_kv, self.d_kv);
        set(&mut cfg.num_layers, self.num_layers);
        set(&mut cfg.relative_attention_num_buckets, self.relative_attention_num_buckets);
        set(&mut cfg.relative_attention_max_distance, self.relative_attention_max_distance);
        cfg.relative_attention_clip = self.relative_attention_clip.or(cfg.relative_attention_clip);
        cfg.num_decoder_layers = self.num_decoder_layers.or(cfg.num_decoder_layers);
        cfg.dropout_rate = self.dropout_rate.unwrap_or(cfg.dropout_rate);
        cfg.initializer_factor = self.initializer_factor.unwrap_or(cfg.initializer_factor);
        cfg.lm_head_init_std = self.lm_head_init_std.or(cfg.lm_head_init_std);
        cfg.digit_positions = self.digit_positions.or(cfg.digit_positions);
        Some(cfg)
    }
}

/// Optimisation (PROTOCOL.md section 5; the paper's appendix C).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSettings {
    /// Adam's constant learning rate.
    pub lr: f64,
    /// Steps of linear warm-up to `lr` at the start of a run (0: none, the paper's).
    pub warmup_steps: u64,
    /// After the warm-up: "constant" (the paper's) or "inverse-sqrt" (T5's
    /// pre-training schedule, lr * sqrt(warmup_steps / step)).
    #[serde(skip_serializing_if = "LrSchedule::is_constant")]
    pub lr_schedule: LrSchedule,
    /// Examples per optimiser step (paper: 1024 for 582M, 2048 for 300M).
    pub batch_size: usize,
    /// Padded tokens per forward/backward pass (gradient accumulation).
    pub max_tokens_per_micro_batch: usize,
    /// The least number of micro-batches a batch is cut into, its rows
    /// dealt out in turn by length: 2 lets `sector run --cpu-ranks 2` give
    /// each core one, with the weights of one rank bit for bit as long as
    /// the token budget cuts neither part further.
    #[serde(skip_serializing_if = "crate::train::is_single")]
    pub micro_batches: usize,
    /// Train with the model's dropout rate.
    pub dropout: bool,
    /// Epochs per stage before the gate is first checked.
    pub min_epochs: usize,
    /// Epochs per stage after which a stage that has not passed its gate
    /// ends the run.
    pub max_epochs: usize,
    /// The random offset of digit places in training (a model with
    /// `model.digit_positions`): `{ max = 30, per = "example" }` or `per = "batch"`.
    #[serde(skip_serializing_if = "DigitOffset::is_none")]
    pub digit_offset: DigitOffset,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            lr: 1e-4,
            warmup_steps: 0,
            lr_schedule: LrSchedule::Constant,
            batch_size: 1024,
            max_tokens_per_micro_batch: 65536,
            micro_batches: 1,
            dropout: false,
            min_epochs: 1,
            max_epochs: 20,
            digit_offset: DigitOffset::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskSettings {
    /// english (the paper's) or compact (a declared CPU-scale deviation).
    pub slow_format: SlowFormat,
    /// Multiplies every data size of sections 5 and 6 (1 = the paper's).
    pub data_scale: f64,
    /// String-skill examples of the pretraining (`model.pretrain`) added to
    /// every stage's training, as a fraction of the stage's examples (0:
    /// none). A CPU-scale deviation: pretrained ByT5 keeps what it knew while
    /// it is fine-tuned; a small model forgets its stand-in pretraining.
    #[serde(skip_serializing_if = "is_zero")]
    pub rehearsal: f64,
}

fn is_zero(value: &f64) -> bool {
    *value == 0.0
}

impl Default for TaskSettings {
    fn default() -> Self {
        TaskSettings { slow_format: SlowFormat::English, data_scale: 1.0, rehearsal: 0.0 }
    }
}

/// When the supervised phase hands over to self-training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StartSelfTraining {
    /// After the supervised stage on 1..N digits (582M: 6, 300M: 8).
    AfterDigits(usize),
    /// "when-slow-generalises": once one-step slow exact match on N+1
    /// digits reaches `generalise_threshold`.
    When(StartWhen),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartWhen {
    WhenSlowGeneralises,
}

/// The supervised curriculum (PROTOCOL.md section 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisedSettings {
    /// Digits of the first stage (it trains on 1..first_digits).
    pub first_digits: usize,
    /// Held-out problems of each kind for the gate.
    pub gate_size: usize,
    /// Fast exact match needed to move on.
    pub fast_gate: f64,
    /// One-step slow exact match needed to move on.
    pub slow_gate: f64,
    pub start_self_training: StartSelfTraining,
    /// Slow exact match on N+1 digits that counts as generalising.
    pub generalise_threshold: f64,
    /// The last supervised stage when waiting for generalisation; self-training
    /// starts after it even if slow has not generalised (PROTOCOL.md section 5).
    pub max_digits: usize,
    /// Another experiment's config (e.g. "experiments/cpu/main.toml") whose
    /// supervised phase this run takes over instead of training it again:
    /// its stages, datasets and last supervised checkpoint are copied from
    /// RUNS_DIR/<its name>. For ablations of self-training; everything that
    /// phase depends on (seed, model, train, task, supervised) must match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

impl Default for SupervisedSettings {
    fn default() -> Self {
        SupervisedSettings {
            first_digits: 3,
            gate_size: 128,
            fast_gate: 0.75,
            slow_gate: 1.0,
            start_self_training: StartSelfTraining::AfterDigits(6),
            generalise_threshold: 0.99,
            max_digits: 12,
            from: None,
        }
    }
}

/// How self-training labels its fast examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LabelMethod {
    Fast,
    SimplifyOnly,
    SimplifyThenGuess,
}

/// Self-training (PROTOCOL.md section 6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SelfTrainingSettings {
    /// The longest addition the run attempts.
    pub last_digits: usize,
    /// Simplifications before the last guess of simplify-then-guess.
    pub k: usize,
    pub fast_labels: LabelMethod,
    /// Keep only labels on which a problem and its twin agree.
    pub commutativity_check: bool,
    /// Held-out self-generated examples of each kind for the gate.
    pub gate_size: usize,
    /// End the run when fewer generated fast pairs than this fraction pass
    /// the checks (needs no ground truth; 0 = never).
    pub stop_below_acceptance: f64,
    /// End the run when the audited accuracy of accepted fast data falls
    /// below this (the paper's 0.9; it reads the ground truth, so it is off
    /// unless set).
    pub stop_below_audited_accuracy: Option<f64>,
    /// Multiplies the problems each stage generates (section 6's 1,000 slow
    /// and 3,000 fast, times task.data_scale). A CPU-scale deviation: while
    /// slow on M digits is well below 1, the paper's volume leaves too few
    /// labels after the checks (Lee et al. 2025 label 50,000 a round).
    #[serde(skip_serializing_if = "is_one")]
    pub generated_scale: f64,
    /// A constant learning rate for every self-training stage, in place of
    /// the supervised schedule's continuation (None: the schedule goes on,
    /// the paper's). A CPU-scale deviation: a small model's warm-up and
    /// inverse-sqrt decay leave a rate at which self-training unsettles it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// The stronger consistency check the paper names (section 5): besides
    /// its commutative twin, this many variants of each problem, each with
    /// the digits of one column exchanged between the two numbers (the same
    /// sum and carries), must give the label's answer too (0: the paper's
    /// check alone). A CPU-scale deviation.
    #[serde(skip_serializing_if = "is_none")]
    pub column_swaps: usize,
    /// A stronger check of slow labels: the twin's step must be the label's
    /// with the two numbers exchanged (`A: y + x = s. ... Next B + A.`), not
    /// only reach the same sum by simplify-only (false: the paper's check
    /// alone). A CPU-scale deviation.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub mirrored_steps: bool,
    /// A stronger check of slow labels: the problem with its last column
    /// made another way, two last digits and a carry in with the same sum
    /// (3 + 3 as 4 + 2 or 2 + 3 + 1), must take the label's step but for
    /// the numbers it reads (`Problem::last_column_variant`). The twin
    /// cannot see a one-column sum both get wrong (`A: 3 + 3 = 5.`); false:
    /// the paper's check alone. A CPU-scale deviation.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub last_column_variants: bool,
    /// The same check of the first step behind each fast label: the step
    /// simplify-only and simplify-then-guess take first on the problem must
    /// be the one the model takes on its last-column variant, with the
    /// variant's numbers read. Every candidate of simplify-then-guess keeps
    /// that step's digit, so a last-column sum wrong in both twins (`A: 7 +
    /// 2 + 1 = 9.`) is otherwise the label's last digit (false: the paper's
    /// check alone). A CPU-scale deviation.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fast_last_column_variants: bool,
    /// Labelling asks every question at digit offsets 0..offset_vote and
    /// takes the majority output (0: at offset 0 alone, the places
    /// themselves). Training draws an offset per example; at a length it was
    /// not taught, a model's step is right at some offsets and wrong at
    /// others (sweep rows m01-m03). Needs model.digit_positions and at most
    /// train.digit_offset.max + 1 offsets. Gates and evaluations ask at
    /// offset 0. A CPU-scale deviation.
    #[serde(skip_serializing_if = "is_none")]
    pub offset_vote: usize,
    /// Misses the slow gate of a self-training stage allows among its
    /// held-out examples (0: every one right, the paper's gate). Those
    /// examples are the model's own accepted labels, so one wrong label
    /// held out blocks the paper's gate however well the model has learnt
    /// (sweep rows b02, b04 and cpu-main's last stage). A CPU-scale deviation.
    #[serde(skip_serializing_if = "is_none")]
    pub slow_gate_misses: usize,
    /// The fast exact match a self-training gate needs, in place of
    /// supervised.fast_gate (None: the supervised gate's, the paper's 0.75).
    /// A small model leaves a stage soon after its slow gate passes, with
    /// fast on the new length at 0.9 or below, and later stages' replay does
    /// not mend all of it (sweep rows m05, s46). A CPU-scale deviation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fast_gate: Option<f64>,
    /// The fast gate of the stage that teaches `last_digits`, in place of
    /// fast_gate: that length is the final checkpoint's newest, and no later
    /// stage's replay mends it (s50 passed its 30-digit stage at gate fast
    /// 0.88 and answered 30 digits at 0.84). None: the same gate as every
    /// stage's. A CPU-scale deviation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_fast_gate: Option<f64>,
    /// From the first self-training stage on, the model that is gated,
    /// labels, is evaluated and is saved is a running average of the
    /// weights, `decay * average + (1 - decay) * weights` after every
    /// optimiser step (a window of about 1 / (1 - decay) steps); training
    /// goes on from the weights themselves. A small model's answers on the
    /// lengths it knows swing from one stage's checkpoint to the next (203
    /// to 42 wrong of 4,800), and the mean of neighbouring checkpoints
    /// halves them (row m10). None: the weights themselves, the paper's. A
    /// CPU-scale deviation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_average: Option<f64>,
}

fn is_none(count: &usize) -> bool {
    *count == 0
}

fn is_one(value: &f64) -> bool {
    *value == 1.0
}

impl Default for SelfTrainingSettings {
    fn default() -> Self {
        SelfTrainingSettings {
            last_digits: 30,
            k: 5,
            fast_labels: LabelMethod::SimplifyThenGuess,
            commutativity_check: true,
            gate_size: 128,
            stop_below_acceptance: 0.0,
            stop_below_audited_accuracy: None,
            generated_scale: 1.0,
            lr: None,
            column_swaps: 0,
            mirrored_steps: false,
            last_column_variants: false,
            fast_last_column_variants: false,
            offset_vote: 0,
            slow_gate_misses: 0,
            fast_gate: None,
            last_fast_gate: None,
            weight_average: None,
        }
    }
}

/// Accuracy by length after each stage (figures 6 to 8, tables 1 and 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSettings {
    /// Evaluate lengths 1..N + lengths_beyond after stage N (figures 6-8).
    pub lengths_beyond: usize,
    pub problems_per_length: usize,
    /// Tables 1 and 3: the final checkpoint's fast accuracy on lengths
    /// 1..final digits + lengths_beyond, this many problems each.
    pub final_problems_per_length: usize,
    /// Rows per greedy decoding call (generation and evaluation).
    pub decode_batch: usize,
    /// Figure 9: problems of (final digits + carry_digits_beyond) digits put
    /// to the final checkpoint (the paper: 30 digits after learning 28).
    pub carry_problems: usize,
    pub carry_digits_beyond: usize,
    /// Figure 4: problems of final digits + 1 traced through simplify-then-guess.
    pub vote_examples: usize,
}

impl Default for EvalSettings {
    fn default() -> Self {
        EvalSettings {
            lengths_beyond: 8,
            problems_per_length: 100,
            final_problems_per_length: 100,
            decode_batch: 256,
            carry_problems: 1000,
            carry_digits_beyond: 2,
            vote_examples: 3,
        }
    }
}

mod defaults {
    pub fn scale() -> String {
        "paper".into()
    }
}

impl Experiment {
    pub fn load(path: &Path) -> Result<Self> {
        let text = String::from_utf8(crate::files::read(path)?).map_err(|_| Error::format(path, "is not UTF-8"))?;
        Self::parse(&text, path)
    }

    /// Parses and checks a config; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let experiment: Experiment =
            toml::from_str(text).map_err(|e| Error::format(path, format!("is not a valid experiment config: {e}")))?;
        experiment.check(path)?;
        Ok(experiment)
    }

    /// The canonical text of this config, stored in its run directory.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("an experiment serialises")
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, problem: String| {
            Err(Error::Config { path: path.to_path_buf(), field: field.into(), problem })
        };
        if self.name.is_empty() || !self.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return bad(
                "name",
                format!("is {:?}; use letters, digits, - and _ (it names the run directory)", self.name),
            );
        }
        if !["micro", "cpu", "paper"].contains(&self.scale.as_str()) {
            return bad("scale", format!("is {:?}; use \"micro\", \"cpu\" or \"paper\"", self.scale));
        }
        self.model.check(path)?;
        if self.train.batch_size == 0 || self.train.max_epochs == 0 || self.train.min_epochs > self.train.max_epochs {
            return bad("train", "needs batch_size > 0 and 1 <= min_epochs <= max_epochs".into());
        }
        if self.train.micro_batches == 0 {
            return bad(
                "train.micro_batches",
                "is 0; use 1 (as few as the token budget allows) or the number of --cpu-ranks".into(),
            );
        }
        if self.task.data_scale.is_nan() || self.task.data_scale <= 0.0 {
            return bad("task.data_scale", format!("is {}; it must be positive", self.task.data_scale));
        }
        let rehearsal = self.task.rehearsal;
        if rehearsal.is_nan() || rehearsal < 0.0 || (rehearsal > 0.0 && self.model.pretrain.is_none()) {
            return bad("task.rehearsal", format!("is {rehearsal}; it must be 0, or positive with model.pretrain set"));
        }
        if self.scale == "paper" {
            if let Some((field, _)) = self.cpu_scale_deviations().first() {
                return bad(
                    field,
                    "is a CPU-scale deviation: paper-scale runs are the paper's method on ByT5 as published, \
                     remove it"
                        .into(),
                );
            }
        }
        let generated = self.self_training.generated_scale;
        if generated.is_nan() || generated <= 0.0 {
            return bad("self_training.generated_scale", format!("is {generated}; it must be positive"));
        }
        if let Some(lr) = self.self_training.lr.filter(|lr| lr.is_nan() || *lr <= 0.0) {
            return bad("self_training.lr", format!("is {lr}; it must be positive"));
        }
        if self.supervised.first_digits < 2 {
            return bad("supervised.first_digits", "must be at least 2 (slow steps need two digits)".into());
        }
        if let StartSelfTraining::AfterDigits(n) = self.supervised.start_self_training {
            if n < self.supervised.first_digits {
                return bad("supervised.start_self_training", format!("is {n}, below first_digits"));
            }
        }
        self.check_digit_places(path)?;
        if self.self_training.k == 0 {
            return bad("self_training.k", "must be at least 1".into());
        }
        for (field, value) in [
            ("supervised.fast_gate", self.supervised.fast_gate),
            ("supervised.slow_gate", self.supervised.slow_gate),
            ("supervised.generalise_threshold", self.supervised.generalise_threshold),
            ("self_training.stop_below_acceptance", self.self_training.stop_below_acceptance),
            ("self_training.fast_gate", self.self_training.fast_gate.unwrap_or(0.0)),
            ("self_training.last_fast_gate", self.self_training.last_fast_gate.unwrap_or(0.0)),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return bad(field, format!("is {value}; it is a fraction between 0 and 1"));
            }
        }
        if let Some(decay) = self.self_training.weight_average {
            if !(decay > 0.0 && decay < 1.0) {
                return bad(
                    "self_training.weight_average",
                    format!("is {decay}; a decay is above 0 and below 1 (0.995 averages about 200 steps)"),
                );
            }
        }
        Ok(())
    }

    /// The longest number (in digits) the run meets: the longest problem it
    /// trains or evaluates on, plus one for the carry of its sum.
    pub fn longest_number(&self) -> usize {
        let beyond = self.eval.lengths_beyond.max(self.eval.carry_digits_beyond);
        let run = self.self_training.last_digits.max(self.supervised.max_digits) + beyond;
        let probe = self.probe.as_ref().map_or(0, |p| p.max_digits + p.lengths_beyond);
        run.max(probe) + 1
    }

    /// The CPU-scale deviations this experiment turns on: each field with
    /// what it does, as tables and figures state it. Each gives a small model
    /// from random weights what pretrained ByT5 brings (REPRODUCE.md), and
    /// none may run at paper scale.
    pub fn cpu_scale_deviations(&self) -> Vec<(&'static str, String)> {
        let (model, task, st) = (&self.model, &self.task, &self.self_training);
        [
            ("model.digit_positions", model.digit_positions.map(|_| "digit places".to_string())),
            (
                "model.relative_attention_clip",
                model.relative_attention_clip.map(|k| format!("positions clipped at {k}")),
            ),
            ("model.pretrain", model.pretrain.as_ref().map(|_| "string-skill pretraining".to_string())),
            ("task.slow_format", (task.slow_format == SlowFormat::Compact).then(|| "compact slow format".to_string())),
            ("task.data_scale", (task.data_scale != 1.0).then(|| format!("data sizes x{}", task.data_scale))),
            ("task.rehearsal", (task.rehearsal > 0.0).then(|| format!("rehearsal {}", task.rehearsal))),
            (
                "self_training.generated_scale",
                (st.generated_scale != 1.0).then(|| format!("generated x{}", st.generated_scale)),
            ),
            ("self_training.lr", st.lr.map(|lr| format!("self-training lr {lr}"))),
            ("self_training.column_swaps", (st.column_swaps > 0).then(|| format!("{} column swaps", st.column_swaps))),
            ("self_training.mirrored_steps", st.mirrored_steps.then(|| "mirrored steps".to_string())),
            ("self_training.last_column_variants", st.last_column_variants.then(|| "last-column variants".to_string())),
            (
                "self_training.fast_last_column_variants",
                st.fast_last_column_variants.then(|| "last-column variants of fast labels".to_string()),
            ),
            ("self_training.offset_vote", (st.offset_vote > 0).then(|| format!("offset vote over {}", st.offset_vote))),
            (
                "self_training.slow_gate_misses",
                (st.slow_gate_misses > 0).then(|| {
                    let n = st.slow_gate_misses;
                    format!("slow gate allows {n} {}", if n == 1 { "miss" } else { "misses" })
                }),
            ),
            ("self_training.fast_gate", st.fast_gate.map(|gate| format!("self-training fast gate {gate}"))),
            ("self_training.last_fast_gate", st.last_fast_gate.map(|gate| format!("last stage's fast gate {gate}"))),
            (
                "self_training.weight_average",
                st.weight_average.map(|decay| format!("weights averaged at decay {decay}")),
            ),
        ]
        .into_iter()
        .filter_map(|(field, what)| Some((field, what?)))
        .collect()
    }

    /// Digit places: offsets need the tables, and the tables must hold the
    /// longest number plus the largest offset.
    fn check_digit_places(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, problem: String| {
            Err(Error::Config { path: path.to_path_buf(), field: field.into(), problem })
        };
        let offset = self.train.digit_offset.max as usize;
        // Pretrained weights in a directory (e.g. another run's checkpoint)
        // bring their own tables in config.json; hub ids (ByT5) have none.
        let digit_positions = match &self.model.weights {
            Some(dir) if Path::new(dir).is_dir() => {
                crate::weights::read_config(&crate::weights::resolve(dir)?.config)?.digit_positions
            }
            _ => self.model.digit_positions,
        };
        // Labelling asks at offsets 0..offset_vote: each must be one training draws.
        let vote = self.self_training.offset_vote;
        if vote == 1 || (vote > 0 && (digit_positions.is_none() || vote > offset + 1)) {
            return bad(
                "self_training.offset_vote",
                format!(
                    "is {vote}; it must be 0 (off), or 2 to train.digit_offset.max + 1 = {} with \
                     model.digit_positions set",
                    offset + 1
                ),
            );
        }
        match digit_positions {
            None if offset > 0 => bad(
                "train.digit_offset",
                format!("is {offset}, but the model has no digit positions: set model.digit_positions or remove it"),
            ),
            Some(p) if p.max_index < self.longest_number() + offset => bad(
                "model.digit_positions.max_index",
                format!(
                    "is {}; this run meets numbers of up to {} digits (the longest problem it trains, evaluates \
                     or probes, plus a carry) and offsets of up to {offset}: set it to at least {}",
                    p.max_index,
                    self.longest_number(),
                    self.longest_number() + offset
                ),
            ),
            _ => Ok(()),
        }
    }

    /// The trainer's settings: `train`, seeded by the experiment's seed.
    pub fn train_config(&self) -> crate::train::TrainConfig {
        let t = &self.train;
        crate::train::TrainConfig {
            lr: t.lr,
            batch_size: t.batch_size,
            max_tokens_per_micro_batch: t.max_tokens_per_micro_batch,
            micro_batches: t.micro_batches,
            dropout: t.dropout,
            seed: self.seed,
            warmup_steps: t.warmup_steps,
            lr_schedule: t.lr_schedule,
            digit_offset: t.digit_offset,
        }
    }

    /// The model config of a preset run, with this experiment's overrides.
    pub fn model_config(&self) -> Option<T5Config> {
        self.model.preset_config()
    }

    /// The model's shape without loading it, and its name: the preset's, or
    /// for hub weights named after a preset (google/byt5-base) that preset's,
    /// whose parameter count matches the published checkpoint's.
    pub fn model_config_for_cost(&self, path: &Path) -> Result<(T5Config, String)> {
        if let (Some(cfg), Some(name)) = (self.model_config(), &self.model.preset) {
            return Ok((cfg, name.clone()));
        }
        let weights = self.model.weights.as_deref().unwrap_or_default();
        let name = weights.rsplit('/').next().unwrap_or_default();
        match T5Config::preset(name) {
            Some(cfg) if name.starts_with("byt5-") => Ok((cfg, name.to_string())),
            _ => Err(Error::Config {
                path: path.to_path_buf(),
                field: "model.weights".into(),
                problem: format!(
                    "is {weights:?}: costs are known for presets and hub ids named after one (google/byt5-base)"
                ),
            }),
        }
    }

    /// Problems a self-training stage generates where the paper generates
    /// `count`: scaled by the data size and the generated volume, at least 1.
    pub fn generated(&self, count: usize) -> usize {
        ((count as f64 * self.task.data_scale * self.self_training.generated_scale).round() as usize).max(1)
    }

    /// `count` scaled by the data-size factor, at least 1.
    pub fn scaled(&self, count: usize) -> usize {
        ((count as f64 * self.task.data_scale).round() as usize).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Experiment> {
        Experiment::parse(text, Path::new("experiments/x.toml"))
    }

    #[test]
    fn defaults_are_the_papers() {
        let e = parse("name = \"paper\"").unwrap();
        assert_eq!(e.model.weights.as_deref(), Some("google/byt5-base"));
        assert_eq!((e.train.lr, e.train.batch_size), (1e-4, 1024));
        assert_eq!(e.supervised.start_self_training, StartSelfTraining::AfterDigits(6));
        assert_eq!((e.supervised.fast_gate, e.supervised.slow_gate, e.supervised.gate_size), (0.75, 1.0, 128));
        assert_eq!((e.self_training.k, e.self_training.fast_labels), (5, LabelMethod::SimplifyThenGuess));
        assert_eq!(parse(&e.to_toml()).unwrap(), e, "canonical form round-trips");
    }

    #[test]
    fn a_dtype_is_checked_against_the_device_never_run_as_another() {
        let with = |device: &str, dtype: &str| {
            parse(&format!(
                "name = \"x\"\n[model]\nweights = \"google/byt5-base\"\ndevice = \"{device}\"\ndtype = \"{dtype}\""
            ))
        };
        assert_eq!(with("cpu", "f32").unwrap().model.dtype.as_deref(), Some("f32"));
        assert!(with("cuda:1", "bf16").is_ok());
        for (device, dtype, says) in [
            ("cpu", "bf16", "on the CPU sector computes in f32"),
            ("cuda", "f32", "on CUDA sector computes in bf16"),
            ("cpu", "fp16", "use \"f32\" or \"bf16\""),
        ] {
            let error = with(device, dtype).unwrap_err().to_string();
            assert!(error.contains("field `model.dtype`") && error.contains(says), "{device} {dtype}: {error}");
            assert!(error.contains("experiments/x.toml"), "{error}");
        }
    }

    #[test]
    fn overrides_and_start_rule() {
        let e = parse(
            "name = \"cpu\"\nscale = \"cpu\"\n[model]\npreset = \"cpu-small\"\ndevice = \"cpu\"\nd_model = 384\n\
             [supervised]\nstart_self_training = \"when-slow-generalises\"\n[task]\nslow_format = \"compact\"",
        )
        .unwrap();
        assert_eq!(e.model_config().unwrap().d_model, 384);
        assert_eq!(e.supervised.start_self_training, StartSelfTraining::When(StartWhen::WhenSlowGeneralises));
        assert_eq!(e.task.slow_format, SlowFormat::Compact);
    }

    #[test]
    fn a_checkpoint_directory_brings_its_own_digit_places() {
        use crate::model::{DigitPositions, T5Config};
        let save = |digit_positions: Option<DigitPositions>| {
            let mut cfg = T5Config::preset("cpu-tiny").unwrap();
            cfg.digit_positions = digit_positions;
            let dir = tempfile::tempdir().unwrap();
            let model = crate::weights::Model::random(&cfg, 1, &candle_core::Device::Cpu, candle_core::DType::F32);
            model.unwrap().save(dir.path(), &mut crate::files::Manifest::default()).unwrap();
            dir
        };
        let config = |dir: &tempfile::TempDir| {
            format!(
                "name = \"x\"\nscale = \"cpu\"\n[model]\nweights = \"{}\"\ndevice = \"cpu\"\n\
                 [train]\ndigit_offset = {{ max = 10 }}",
                dir.path().display()
            )
        };
        let with_places = save(Some(DigitPositions { max_index: 100, from_right: false, number_index: false }));
        assert!(parse(&config(&with_places)).is_ok());
        let without = save(None);
        let message = parse(&config(&without)).unwrap_err().to_string();
        assert!(message.contains("train.digit_offset") && message.contains("no digit positions"), "{message}");
    }

    #[test]
    fn bad_configs_name_the_file_and_field() {
        for (text, field) in [
            ("name = \"x\"\n[train]\nlearning_rate = 1.0", "learning_rate"),
            ("name = \"x\"\n[model]\npreset = \"huge\"\ndevice = \"cpu\"", "model.preset"),
            (
                "name = \"x\"\n[model]\npreset = \"cpu-tiny\"\nweights = \"google/byt5-base\"\ndevice = \"cpu\"",
                "model.preset",
            ),
            ("name = \"x\"\n[supervised]\nfast_gate = 75", "supervised.fast_gate"),
            ("name = \"x\"\n[task]\nrehearsal = 0.1", "task.rehearsal"),
            ("name = \"a b\"", "name"),
            ("name = \"x\"\n[train]\ndigit_offset = { max = 30 }", "train.digit_offset"),
            ("name = \"x\"\n[train]\nmicro_batches = 0", "train.micro_batches"),
            (
                "name = \"x\"\nscale = \"cpu\"\n[model]\npreset = \"cpu-tiny\"\ndevice = \"cpu\"\n\
                 digit_positions = { max_index = 40 }\n[train]\ndigit_offset = { max = 30 }",
                "model.digit_positions.max_index",
            ),
            (
                "name = \"x\"\n[model]\npreset = \"byt5-base\"\ndevice = \"cuda\"\n\
                 digit_positions = { max_index = 200 }",
                "model.digit_positions",
            ),
            ("name = \"x\"\n[self_training]\nlr = 1e-4", "self_training.lr"),
            ("name = \"x\"\n[task]\nslow_format = \"compact\"", "task.slow_format"),
            ("name = \"x\"\n[task]\ndata_scale = 0.5", "task.data_scale"),
            ("name = \"x\"\n[self_training]\ncolumn_swaps = 2", "self_training.column_swaps"),
            ("name = \"x\"\n[self_training]\ngenerated_scale = 2.0", "self_training.generated_scale"),
            ("name = \"x\"\n[self_training]\nmirrored_steps = true", "self_training.mirrored_steps"),
            ("name = \"x\"\n[self_training]\nlast_column_variants = true", "self_training.last_column_variants"),
            (
                "name = \"x\"\n[self_training]\nfast_last_column_variants = true",
                "self_training.fast_last_column_variants",
            ),
            ("name = \"x\"\n[self_training]\noffset_vote = 5", "self_training.offset_vote"),
            ("name = \"x\"\n[self_training]\nslow_gate_misses = 1", "self_training.slow_gate_misses"),
            ("name = \"x\"\n[self_training]\nfast_gate = 0.95", "self_training.fast_gate"),
            ("name = \"x\"\nscale = \"cpu\"\n[self_training]\nfast_gate = 95", "self_training.fast_gate"),
            ("name = \"x\"\n[self_training]\nlast_fast_gate = 0.97", "self_training.last_fast_gate"),
            ("name = \"x\"\nscale = \"cpu\"\n[self_training]\nlast_fast_gate = 97", "self_training.last_fast_gate"),
            ("name = \"x\"\n[self_training]\nweight_average = 0.995", "self_training.weight_average"),
            ("name = \"x\"\nscale = \"cpu\"\n[self_training]\nweight_average = 1.0", "self_training.weight_average"),
            (
                "name = \"x\"\nscale = \"cpu\"\n[model]\npreset = \"cpu-tiny\"\ndevice = \"cpu\"\n\
                 digit_positions = { max_index = 60 }\n[train]\ndigit_offset = { max = 3 }\n\
                 [self_training]\noffset_vote = 5",
                "self_training.offset_vote",
            ),
            (
                "name = \"x\"\nscale = \"cpu\"\n[model]\npreset = \"cpu-tiny\"\ndevice = \"cpu\"\n\
                 [self_training]\noffset_vote = 1",
                "self_training.offset_vote",
            ),
            (
                "name = \"x\"\n[model]\npreset = \"byt5-base\"\ndevice = \"cuda\"\nrelative_attention_clip = 4",
                "model.relative_attention_clip",
            ),
            (
                "name = \"x\"\nscale = \"cpu\"\n[model]\npreset = \"cpu-tiny\"\ndevice = \"cpu\"\n\
                 relative_attention_clip = 0",
                "model.relative_attention_clip",
            ),
            ("name = \"x\"\nscale = \"cpu\"\n[self_training]\nlr = 0.0", "self_training.lr"),
        ] {
            let message = parse(text).unwrap_err().to_string();
            assert!(message.contains("experiments/x.toml") && message.contains(field), "{field}: {message}");
        }
    }
}
