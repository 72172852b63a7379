//! A CPU-scale stand-in for ByT5's pretraining (a declared deviation).
//!
//! The paper starts from pretrained ByT5, which can already copy, cut and
//! read byte strings; a small model from random weights cannot, and that,
//! not addition, is what stops it (../shared/spec/CPU-SCALE-NOTES.md). So at
//! CPU scale a model first learns string skills on pairs of random numbers:
//! copy them, give their last digits, drop their last digits. No example
//! holds a sum, so no ground truth of the task leaks in. A SECToR run whose
//! config says `model.pretrain = "experiments/cpu/pretrain.toml"` starts
//! from RUNS_DIR/<name>/checkpoint (made first if it is missing) as the
//! paper starts from ByT5's weights, with a fresh optimiser.
//!
//! Every epoch draws fresh examples from a stream seeded by the epoch, and
//! ends with a checkpoint, so a killed run resumes at its last epoch.

use crate::config::ModelSettings;
use crate::error::{Error, Result};
use crate::files::{csv_bytes, read_csv};
use crate::generate::{greedy_text, GreedyOptions};
use crate::model::select_device;
use crate::provenance::Provenance;
use crate::task::random_operand;
use crate::tokenizer::encode;
use crate::train::{Example, LrSchedule, TrainConfig, Trainer};
use crate::weights::Model;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const PRETRAIN_CSV: &str = "pretrain.csv";
pub const CHECKPOINT_DIR: &str = "checkpoint";

/// A pretraining config (experiments/cpu/pretrain*.toml).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    pub name: String,
    pub scale: String,
    #[serde(default)]
    pub seed: u64,
    pub model: ModelSettings,
    pub train: PretrainTraining,
    pub strings: StringSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainTraining {
    /// Adam's constant learning rate, after a linear warm-up.
    pub lr: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default, skip_serializing_if = "LrSchedule::is_constant")]
    pub lr_schedule: LrSchedule,
    pub batch_size: usize,
    pub max_tokens_per_micro_batch: usize,
    pub epochs: usize,
}

/// The string-skill data: numbers of min_digits up to a maximum length that
/// starts at `start_max_digits` and grows by `grow_digits` after each epoch
/// whose held-out exact match reaches `grow_threshold` on every skill, up
/// to `max_digits` (short strings teach a model from scratch to copy at
/// all; longer ones then teach it to copy as long as the run will need).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringSettings {
    pub examples_per_epoch: usize,
    pub min_digits: usize,
    pub start_max_digits: usize,
    pub max_digits: usize,
    pub grow_digits: usize,
    pub grow_threshold: f64,
    /// Held-out examples of each skill, for the exact match measured per epoch.
    pub held_out: usize,
    pub decode_batch: usize,
}

/// The three skills; each is a prefix line, then `{u} + {v}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skill {
    /// Target: `{u} + {v}`.
    Copy,
    /// Target: the last digit of each, `{x} + {y}`.
    LastDigits,
    /// Target: each without its last digit, `{u'} + {v'}` (0 for a one-digit number).
    DropLastDigits,
}

pub const SKILLS: [Skill; 3] = [Skill::Copy, Skill::LastDigits, Skill::DropLastDigits];

impl Skill {
    fn prefix(self) -> &'static str {
        match self {
            Skill::Copy => "Copy.",
            Skill::LastDigits => "Last digits.",
            Skill::DropLastDigits => "Drop last digits.",
        }
    }

    /// The (input, target) strings of this skill on the numbers `u` and `v`.
    pub fn example(self, u: &str, v: &str) -> (String, String) {
        let last = |s: &str| s[s.len() - 1..].to_string();
        let drop = |s: &str| if s.len() == 1 { "0".to_string() } else { s[..s.len() - 1].to_string() };
        let (x, y) = match self {
            Skill::Copy => (u.to_string(), v.to_string()),
            Skill::LastDigits => (last(u), last(v)),
            Skill::DropLastDigits => (drop(u), drop(v)),
        };
        (format!("{}\n{u} + {v}", self.prefix()), format!("{x} + {y}"))
    }
}

/// One row of pretrain.csv: an epoch and the held-out exact match per skill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainRecord {
    pub epoch: usize,
    /// The longest numbers of this epoch's data and held-out examples.
    pub max_digits: usize,
    pub examples: usize,
    pub loss: f64,
    pub copy: f64,
    pub last_digits: f64,
    pub drop_last_digits: f64,
    /// The maximum length of the next epoch; `finished` once the held-out
    /// exact match reached the threshold at `strings.max_digits`.
    pub next_max_digits: usize,
    pub finished: bool,
    pub seconds: f64,
}

impl PretrainConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = String::from_utf8(crate::files::read(path)?).map_err(|_| Error::format(path, "is not UTF-8"))?;
        let config: PretrainConfig = toml::from_str(&text)
            .map_err(|e| Error::format(path, format!("is not a valid pretraining config: {e}")))?;
        config.model.check(path)?;
        let bad = |field: &str, problem: &str| {
            Err(Error::Config { path: path.to_path_buf(), field: field.into(), problem: problem.into() })
        };
        if config.model.preset.is_none() {
            return bad("model.preset", "is missing: pretraining starts from random weights of a preset");
        }
        let s = &config.strings;
        if s.min_digits == 0 || s.min_digits > s.start_max_digits || s.start_max_digits > s.max_digits {
            return bad("strings", "needs 1 <= min_digits <= start_max_digits <= max_digits");
        }
        if s.grow_digits == 0 || !(0.0..=1.0).contains(&s.grow_threshold) {
            return bad("strings", "needs grow_digits >= 1 and grow_threshold between 0 and 1");
        }
        if config.train.batch_size == 0 || config.train.epochs == 0 || s.examples_per_epoch == 0 {
            return bad("train", "needs batch_size, epochs and strings.examples_per_epoch above 0");
        }
        Ok(config)
    }

    /// `count` examples of every skill over the whole length range, for
    /// rehearsal while the task is learned (`task.rehearsal`).
    pub fn rehearsal_examples(&self, rng: &mut Pcg64, count: usize) -> Vec<Example> {
        let examples = self.examples(rng, count, self.strings.max_digits, &HashSet::new());
        examples.iter().map(|(_, input, target)| (encode(input), encode(target))).collect()
    }

    /// `count` examples, skills in turn, numbers of lengths uniform in
    /// min_digits..=max_digits.
    fn examples(
        &self,
        rng: &mut Pcg64,
        count: usize,
        max_digits: usize,
        exclude: &HashSet<String>,
    ) -> Vec<(Skill, String, String)> {
        let lengths = self.strings.min_digits..=max_digits;
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let skill = SKILLS[out.len() % SKILLS.len()];
            let (u_digits, v_digits) = (rng.random_range(lengths.clone()), rng.random_range(lengths.clone()));
            let (u, v) = (random_operand(rng, u_digits), random_operand(rng, v_digits));
            let (input, target) = skill.example(&u, &v);
            if !exclude.contains(&input) {
                out.push((skill, input, target));
            }
        }
        out
    }
}

/// Pretrains to the configured epochs in RUNS_ROOT/<name>/, resuming after
/// the last finished epoch; returns the run directory.
pub fn run_into(config: &PretrainConfig, runs_root: &Path) -> Result<PathBuf> {
    let dir = runs_root.join(&config.name);
    let canonical = toml::to_string(config).expect("a pretraining config serialises");
    let (mut manifest, _lock) = crate::files::open_run_dir(&dir, &config.name, &canonical)?;
    let checkpoint = dir.join(CHECKPOINT_DIR);
    let device = select_device(&config.model.device)?;
    let mut records: Vec<PretrainRecord> = read_csv(&dir.join(PRETRAIN_CSV))?;
    let mut trainer = if checkpoint.exists() && !records.is_empty() {
        Trainer::load(&checkpoint, &device)?
    } else {
        records.clear();
        let cfg = config.model.preset_config().expect("checked when loaded");
        let model = Model::from_preset_or_weights(Some(&cfg), None, config.seed, &device)?;
        let t = &config.train;
        let train_config = TrainConfig {
            lr: t.lr,
            batch_size: t.batch_size,
            max_tokens_per_micro_batch: t.max_tokens_per_micro_batch,
            micro_batches: 1,
            dropout: false,
            seed: config.seed,
            warmup_steps: t.warmup_steps,
            lr_schedule: t.lr_schedule,
            // The string skills draw no digit-place offsets.
            digit_offset: crate::train::DigitOffset::default(),
        };
        Trainer::new(model, train_config)?
    };
    // Epoch e's data comes from stream e; the held-out examples of a maximum
    // length m from stream HELD_OUT + m.
    const HELD_OUT: usize = 1 << 20;
    let stream = |n: usize| Pcg64::new(config.seed as u128, 0x5721_0000 + n as u128);
    let log = |line: &str| crate::files::append_log(&dir, &config.name, line);
    if !records.is_empty() {
        log(&format!("resuming after epoch {}", records.len()));
    }
    let s = &config.strings;
    let mut max_digits = records.last().map_or(s.start_max_digits, |r| r.next_max_digits);
    let mut finished = records.last().is_some_and(|r| r.finished);
    if !finished && records.len() < config.train.epochs {
        let machine = Provenance::record_session(&dir, &mut manifest, records.len() + 1, &config.model.device, 1)?;
        log(&format!("machine: {}", machine.describe()));
    }
    for epoch in records.len() + 1..=config.train.epochs {
        if finished {
            break;
        }
        let started = Instant::now();
        let held_out =
            config.examples(&mut stream(HELD_OUT + max_digits), s.held_out * SKILLS.len(), max_digits, &HashSet::new());
        let held_out_inputs: HashSet<String> = held_out.iter().map(|(_, input, _)| input.clone()).collect();
        let data: Vec<Example> = config
            .examples(&mut stream(epoch), s.examples_per_epoch, max_digits, &held_out_inputs)
            .iter()
            .map(|(_, input, target)| (encode(input), encode(target)))
            .collect();
        let bar = ProgressBar::new(data.len() as u64).with_style(
            ProgressStyle::with_template(
                "pretraining epoch {msg} [{bar:30}] {pos}/{len} examples, {per_sec}, ETA {eta}",
            )
            .expect("valid template"),
        );
        bar.set_message(format!("{epoch}/{}", config.train.epochs));
        let loss = trainer.epoch_with_progress(&data, |examples, _| bar.inc(examples as u64))?;
        bar.finish_and_clear();
        let exact = held_out_exact_match(&trainer, &held_out, config, max_digits)?;
        let passed = exact.iter().all(|&e| e >= s.grow_threshold);
        finished = passed && max_digits == s.max_digits;
        let next_max_digits = if passed { (max_digits + s.grow_digits).min(s.max_digits) } else { max_digits };
        let record = PretrainRecord {
            epoch,
            max_digits,
            examples: data.len(),
            loss: loss as f64,
            copy: exact[0],
            last_digits: exact[1],
            drop_last_digits: exact[2],
            next_max_digits,
            finished,
            seconds: started.elapsed().as_secs_f64(),
        };
        log(&format!(
            "epoch {epoch} (numbers of {}..{max_digits} digits): loss {:.4}, held-out exact copy {:.3} last digits {:.3} \
             drop last digits {:.3}, {:.1} s{}",
            s.min_digits,
            record.loss,
            record.copy,
            record.last_digits,
            record.drop_last_digits,
            record.seconds,
            if finished { "; finished" } else if passed { "; longer numbers next" } else { "" }
        ));
        records.push(record);
        max_digits = next_max_digits;
        // The checkpoint first: a row in pretrain.csv promises it is on disk.
        trainer.save(&checkpoint)?;
        manifest.add_checkpoint(&dir, CHECKPOINT_DIR)?;
        manifest.write_file(&dir, PRETRAIN_CSV, &csv_bytes(&records, &dir.join(PRETRAIN_CSV))?)?;
        manifest.save(&dir)?;
    }
    Ok(dir)
}

/// Held-out exact match per skill, in the order of `SKILLS`.
fn held_out_exact_match(
    trainer: &Trainer,
    held_out: &[(Skill, String, String)],
    config: &PretrainConfig,
    max_digits: usize,
) -> Result<[f64; 3]> {
    let mut hits = [0usize; 3];
    let mut totals = [0usize; 3];
    let max_new_tokens = 2 * max_digits + 8;
    for chunk in held_out.chunks(config.strings.decode_batch.max(1)) {
        let prompts: Vec<String> = chunk.iter().map(|(_, input, _)| input.clone()).collect();
        let outputs = greedy_text(&trainer.model.t5, &prompts, GreedyOptions::new(max_new_tokens))?;
        for ((skill, _, target), output) in chunk.iter().zip(&outputs) {
            let slot = SKILLS.iter().position(|s| s == skill).expect("a known skill");
            totals[slot] += 1;
            hits[slot] += usize::from(output == target);
        }
    }
    Ok([0, 1, 2].map(|i| if totals[i] == 0 { 0.0 } else { hits[i] as f64 / totals[i] as f64 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skills_copy_cut_and_read_without_sums() {
        assert_eq!(Skill::Copy.example("95", "8"), ("Copy.\n95 + 8".into(), "95 + 8".into()));
        assert_eq!(Skill::LastDigits.example("95", "87"), ("Last digits.\n95 + 87".into(), "5 + 7".into()));
        assert_eq!(Skill::DropLastDigits.example("95", "8"), ("Drop last digits.\n95 + 8".into(), "9 + 0".into()));
    }
}
