//! The length-generalisation probe: does one slow step carry to numbers
//! longer than the model was taught? It answers in about an hour at one
//! thread what a curriculum run answers in several.
//!
//! The model of an experiment config trains for a bounded number of steps on
//! fresh script problems of up to `probe.max_digits` digits (every batch new,
//! so it cannot memorise; or, with `pool_size`, a fixed pool drawn once, as
//! a curriculum stage's dataset is), and every `eval_every` steps it is asked problems
//! of max_digits..=max_digits + lengths_beyond digits: one-step slow, fast,
//! simplify-only and simplify-then-guess, each by exact match. Ground truth
//! above max_digits only measures; it never trains.

use crate::answer::{majority_vote, Solver};
use crate::config::Experiment;
use crate::error::Result;
use crate::files::{csv_bytes, write_atomic};
use crate::model::select_device;
use crate::parallel::SingleRank;
use crate::task::{random_problem, sample_unique, Kind, Oracle, Problem, TrueOracle};
use crate::train::{Example, Trainer};
use crate::weights::Model;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

pub const RESULTS_FILE: &str = "probe.csv";
pub const CHECKPOINT_DIR: &str = "checkpoint";

/// The `[probe]` table of an experiment config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeSettings {
    /// Training lengths: slow 2..=max_digits, fast 1..=max_digits.
    pub max_digits: usize,
    /// Optimiser steps of `train.batch_size` fresh examples.
    pub steps: usize,
    /// Evaluate after every this many steps (and after the last).
    pub eval_every: usize,
    /// Share of fast examples (PROTOCOL.md section 5's curriculum: 3/4).
    pub fast_share: f64,
    /// Share of examples of exactly max_digits digits; the others are
    /// uniform over the lengths.
    pub top_share: f64,
    /// Evaluate lengths max_digits..=max_digits + lengths_beyond.
    pub lengths_beyond: usize,
    /// Problems per evaluated length.
    pub problems_per_length: usize,
    /// 0: fresh examples every batch. Otherwise train on this many examples
    /// drawn once and visited in a new shuffled order every pass, like the
    /// fixed dataset of a curriculum stage (unlike it, not deduplicated: short
    /// lengths repeat, as the curriculum's capped ones are duplicated).
    #[serde(skip_serializing_if = "is_zero")]
    pub pool_size: usize,
    /// Every problem drawn with its commutative twin (b + a), as PROTOCOL
    /// section 2 draws a curriculum's problems.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub twins: bool,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Default for ProbeSettings {
    fn default() -> Self {
        ProbeSettings {
            max_digits: 8,
            steps: 3000,
            eval_every: 500,
            fast_share: 0.0,
            top_share: 0.0,
            lengths_beyond: 8,
            problems_per_length: 50,
            pool_size: 0,
            twins: false,
        }
    }
}

/// One evaluated length at one step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeRecord {
    pub step: usize,
    /// Mean training loss over the steps since the last evaluation.
    pub loss: f64,
    pub digits: usize,
    pub problems: usize,
    pub slow: f64,
    pub fast: f64,
    pub simplify_only: f64,
    pub simplify_then_guess: f64,
    /// Wall time of training so far (evaluation excluded).
    pub train_seconds: f64,
}

/// One fresh training problem and its kind, followed by its commutative twin
/// when `probe.twins` is set (as in a curriculum stage's dataset).
fn examples(experiment: &Experiment, probe: &ProbeSettings, rng: &mut Pcg64) -> Vec<Example> {
    let kind = if rng.random_bool(probe.fast_share) { Kind::Fast } else { Kind::Slow };
    let shortest = if kind == Kind::Slow { 2 } else { 1 };
    let digits =
        if rng.random_bool(probe.top_share) { probe.max_digits } else { rng.random_range(shortest..=probe.max_digits) };
    let problem = random_problem(rng, digits);
    let twin = probe.twins.then(|| problem.twin());
    let format = experiment.task.slow_format;
    std::iter::once(problem)
        .chain(twin)
        .map(|p| {
            (crate::tokenizer::encode(&p.prompt(kind)), crate::tokenizer::encode(&TrueOracle.target(&p, kind, format)))
        })
        .collect()
}

/// Where the probe's batches come from: fresh examples, or a fixed pool.
struct Examples {
    pool: Vec<Example>,
    /// Indices into `pool` of the current pass, consumed from the back.
    order: Vec<usize>,
    /// Fresh examples drawn but not yet batched (a twin waits here).
    fresh: Vec<Example>,
}

impl Examples {
    fn new(experiment: &Experiment, probe: &ProbeSettings, rng: &mut Pcg64) -> Self {
        let mut pool = Vec::with_capacity(probe.pool_size + 1);
        while pool.len() < probe.pool_size {
            pool.extend(examples(experiment, probe, rng));
        }
        pool.truncate(probe.pool_size);
        Examples { pool, order: Vec::new(), fresh: Vec::new() }
    }

    fn batch(&mut self, experiment: &Experiment, probe: &ProbeSettings, rng: &mut Pcg64) -> Vec<Example> {
        (0..experiment.train.batch_size)
            .map(|_| {
                if self.pool.is_empty() {
                    if self.fresh.is_empty() {
                        self.fresh = examples(experiment, probe, rng);
                        self.fresh.reverse();
                    }
                    return self.fresh.pop().expect("refilled above");
                }
                if self.order.is_empty() {
                    self.order = (0..self.pool.len()).collect();
                    rand::seq::SliceRandom::shuffle(self.order.as_mut_slice(), rng);
                }
                self.pool[self.order.pop().expect("refilled above")].clone()
            })
            .collect()
    }
}

/// Exact-match rates of one length's problems.
fn evaluate(solver: &Solver, problems: &[Problem], k: usize) -> Result<(f64, f64, f64, f64)> {
    let rate = |hits: usize| hits as f64 / problems.len().max(1) as f64;
    let traces = solver.simplify_then_guess(problems, k)?;
    let fast = solver.fast(problems)?;
    let (mut slow, mut fast_hits, mut only, mut vote) = (0, 0, 0, 0);
    for ((p, trace), fast) in problems.iter().zip(&traces).zip(&fast) {
        let sum = Some(p.sum());
        slow += usize::from(trace.slow_outputs[0] == p.slow_target(solver.format));
        fast_hits += usize::from(*fast == sum);
        only += usize::from(trace.candidates[0] == sum);
        vote += usize::from(majority_vote(&trace.candidates) == sum);
    }
    Ok((rate(slow), rate(fast_hits), rate(only), rate(vote)))
}

/// Runs `probe` on the model and training settings of `experiment` into
/// RUNS_DIR/<name> (probe.csv, run.log, the final checkpoint) and returns
/// its records. It starts afresh every time (probe.csv is rewritten after
/// each evaluation, so an interrupted probe keeps what it measured).
pub fn run_into(experiment: &Experiment, probe: &ProbeSettings, runs_root: &Path) -> Result<Vec<ProbeRecord>> {
    let dir = runs_root.join(&experiment.name);
    std::fs::create_dir_all(&dir).map_err(|e| crate::Error::io(&dir, e))?;
    let device = select_device(&experiment.model.device)?;
    let model = Model::from_preset_or_weights(
        experiment.model_config().as_ref(),
        experiment.model.weights.as_deref(),
        experiment.seed,
        &device,
    )?;
    let config = experiment.train_config();
    let mut trainer = Trainer::new(model, config)?;
    let mut data_rng = Pcg64::new(experiment.seed as u128, 0x9a0be);
    let mut examples = Examples::new(experiment, probe, &mut data_rng);
    // The same problems at every evaluation.
    let mut eval_rng = Pcg64::new(experiment.seed as u128, 0xe7a1);
    let lengths = probe.max_digits..=probe.max_digits + probe.lengths_beyond;
    let eval_sets: Vec<Vec<Problem>> =
        lengths.map(|n| sample_unique(&mut eval_rng, n, probe.problems_per_length, &HashSet::new())).collect();

    let bar = ProgressBar::new(probe.steps as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps, {per_sec}, ETA {eta}").expect("valid"),
    );
    bar.set_message(experiment.name.clone());
    let (mut records, mut losses, mut train_seconds) = (Vec::new(), Vec::new(), 0.0);
    for step in 1..=probe.steps {
        let batch = examples.batch(experiment, probe, &mut data_rng);
        let started = Instant::now();
        losses.push(trainer.step(&batch.iter().collect::<Vec<_>>())? as f64);
        train_seconds += started.elapsed().as_secs_f64();
        bar.inc(1);
        if step % probe.eval_every.max(1) != 0 && step != probe.steps {
            continue;
        }
        let loss = losses.iter().sum::<f64>() / losses.len() as f64;
        losses.clear();
        let solver = Solver {
            model: &trainer.model.t5,
            format: experiment.task.slow_format,
            decode_batch: experiment.eval.decode_batch,
            progress: ProgressBar::hidden(),
            collective: &SingleRank,
            digit_offsets: Vec::new(),
        };
        let mut line = format!("step {step} loss {loss:.4} | slow / fast / simplify-only / stg by length:");
        for problems in &eval_sets {
            let (slow, fast, simplify_only, simplify_then_guess) =
                evaluate(&solver, problems, experiment.self_training.k)?;
            let digits = problems[0].digits();
            line += &format!(" {digits}: {slow:.2}/{fast:.2}/{simplify_only:.2}/{simplify_then_guess:.2}");
            records.push(ProbeRecord {
                step,
                loss,
                digits,
                problems: problems.len(),
                slow,
                fast,
                simplify_only,
                simplify_then_guess,
                train_seconds,
            });
        }
        bar.suspend(|| crate::files::append_log(&dir, &experiment.name, &line));
        let results = dir.join(RESULTS_FILE);
        write_atomic(&results, &csv_bytes(&records, &results)?)?;
    }
    bar.finish();
    trainer.save(&dir.join(CHECKPOINT_DIR))?;
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::decode;

    fn experiment(probe: &str) -> Experiment {
        let text = format!(
            "name = \"probe-test\"\nscale = \"micro\"\n[model]\npreset = \"cpu-tiny\"\ndevice = \"cpu\"\n\
             digit_positions = {{ max_index = 50 }}\n[train]\nbatch_size = 200\ndigit_offset = {{ max = 5 }}\n\
             [task]\nslow_format = \"compact\"\n[probe]\n{probe}"
        );
        Experiment::parse(&text, Path::new("probe.toml")).unwrap()
    }

    /// The prompts of one batch of 200.
    fn drawn_prompts(e: &Experiment) -> Vec<String> {
        let (mut rng, probe) = (Pcg64::new(1, 2), e.probe.as_ref().unwrap());
        Examples::new(e, probe, &mut rng).batch(e, probe, &mut rng).iter().map(|(input, _)| decode(input)).collect()
    }

    /// (kind, digits) of each example of one batch, read back from its prompt.
    fn drawn(e: &Experiment) -> Vec<(Kind, usize)> {
        drawn_prompts(e)
            .iter()
            .map(|prompt| {
                let kind = if prompt.starts_with("Add fast.") { Kind::Fast } else { Kind::Slow };
                let a = prompt.split("Q: ").nth(1).unwrap().split(' ').next().unwrap().len();
                (kind, a)
            })
            .collect()
    }

    #[test]
    fn batches_stay_within_the_taught_lengths() {
        let examples = drawn(&experiment("max_digits = 5\nfast_share = 0.5"));
        assert!(examples.iter().all(|&(kind, n)| n <= 5 && (kind == Kind::Fast || n >= 2)));
        let fast = examples.iter().filter(|(kind, _)| *kind == Kind::Fast).count();
        assert!((60..140).contains(&fast), "{fast} of 200 fast at a share of 0.5");
        assert!(examples.iter().any(|&(_, n)| n == 1) && examples.iter().any(|&(_, n)| n == 5));
        let top = drawn(&experiment("max_digits = 5\ntop_share = 1.0"));
        assert!(top.iter().all(|&(kind, n)| kind == Kind::Slow && n == 5));
    }

    #[test]
    fn a_pool_is_drawn_once_and_visited_whole_before_repeating() {
        let e = experiment("max_digits = 5\nfast_share = 0.5\npool_size = 300");
        let (mut rng, probe) = (Pcg64::new(1, 2), e.probe.as_ref().unwrap());
        let mut examples = Examples::new(&e, probe, &mut rng);
        let pool: HashSet<Example> = examples.pool.iter().cloned().collect();
        // Batches of 200: the first pass ends inside the second batch.
        let (first, second) = (examples.batch(&e, probe, &mut rng), examples.batch(&e, probe, &mut rng));
        let first_pass: HashSet<&Example> = first.iter().chain(&second[..100]).collect();
        assert_eq!(first_pass.len(), pool.len(), "every pooled example once in a pass");
        assert!(first.iter().chain(&second).all(|x| pool.contains(x)), "nothing from outside the pool");
    }

    #[test]
    fn twins_follow_their_problems() {
        let e = experiment("max_digits = 5\nfast_share = 0.5\ntwins = true");
        let batch = drawn_prompts(&e);
        for pair in batch.chunks(2) {
            let numbers = |prompt: &str| -> Vec<String> {
                prompt.split("Q: ").nth(1).unwrap().split(' ').step_by(2).take(2).map(String::from).collect()
            };
            let (first, second) = (numbers(&pair[0]), numbers(&pair[1]));
            assert_eq!((first[0].clone(), first[1].clone()), (second[1].clone(), second[0].clone()), "{pair:?}");
            assert_eq!(pair[0].split('\n').next(), pair[1].split('\n').next(), "one kind per pair");
        }
    }

    #[test]
    fn a_probe_reports_every_length_at_every_evaluation() {
        let mut e =
            experiment("max_digits = 3\nsteps = 2\neval_every = 1\nlengths_beyond = 2\nproblems_per_length = 3");
        e.train.batch_size = 4;
        let dir = tempfile::tempdir().unwrap();
        let records = run_into(&e, e.probe.as_ref().unwrap(), dir.path()).unwrap();
        let seen: Vec<(usize, usize)> = records.iter().map(|r| (r.step, r.digits)).collect();
        assert_eq!(seen, [(1, 3), (1, 4), (1, 5), (2, 3), (2, 4), (2, 5)]);
        let written: Vec<ProbeRecord> =
            crate::files::read_csv(&dir.path().join("probe-test").join(RESULTS_FILE)).unwrap();
        assert_eq!(written.len(), 6);
        assert!(dir.path().join("probe-test").join(CHECKPOINT_DIR).join("config.json").exists());
    }
}
