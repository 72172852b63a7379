//! The SECToR loop (PROTOCOL.md sections 5 and 6): a supervised curriculum
//! on 1..N digits, then self-training on N+1, N+2, ... with labels the model
//! makes itself, one stage per length.
//!
//! A run lives in `runs/<name>/`: the config it was made by, a checkpoint
//! and a dataset CSV per stage, the results CSVs (stages, accuracy,
//! generation) and a manifest of every file's sha256. Each stage depends
//! only on the previous stage's checkpoint and on seeds derived from the
//! experiment seed and the stage number, so a killed run that is started
//! again redoes its unfinished stage and ends exactly as an uninterrupted
//! run would.
//!
//! Ground truth enters only through an `Oracle`: for script data on lengths
//! inside the supervised range, and for audits and evaluation, which are
//! recorded but never feed training or a gate of self-training.

use crate::analysis::{self, CARRIES_CSV, FINAL_CSV, VOTES_CSV};
use crate::answer::{majority_vote, Solver, Trace};
use crate::config::{Experiment, LabelMethod, SelfTrainingSettings, StartSelfTraining, SupervisedSettings};
use crate::error::{Error, Result};
use crate::eval::{evaluate, summarize};
use crate::files::{csv_bytes, read_csv, Manifest, RunLock, CONFIG_FILE};
use crate::memory::{device_capacity, MemoryPlan};
use crate::model::select_device;
use crate::parallel::{self, Collective};
use crate::provenance::Provenance;
use crate::task::{mirrored_slow, restated_last_column, sample_unique, Kind, Oracle, Problem};
use crate::tokenizer::encode;
use crate::train::{Example, LrSchedule, Trainer};
use crate::weights::Model;
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub const STAGES_CSV: &str = "stages.csv";
pub const ACCURACY_CSV: &str = "accuracy.csv";
pub const GENERATION_CSV: &str = "generation.csv";

/// Data sizes of PROTOCOL.md section 5, per stage, before `data_scale`.
pub const SLOW_NEW: usize = 10_000;
pub const SLOW_OLD: usize = 1_000;
pub const FAST_NEW: usize = 30_000;
pub const FAST_OLD: usize = 3_000;
/// Self-training (section 6) uses a tenth of them.
pub const SELF_TRAINING_FRACTION: usize = 10;

/// Independent random streams of a stage.
mod streams {
    pub const GATE: u128 = 1;
    pub const DATA: u128 = 2;
    pub const NEXT_LENGTH: u128 = 3;
    pub const REPLAY: u128 = 4;
    pub const EVAL: u128 = 5;
    pub const CARRIES: u128 = 6;
    pub const VOTES: u128 = 7;
    pub const FINAL: u128 = 8;
    pub const REHEARSAL: u128 = 9;
    pub const COLUMN_SWAPS: u128 = 10;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Supervised,
    #[serde(rename = "self")]
    SelfTraining,
    /// Only as `next_phase`: the run has ended.
    Stop,
}

/// One row of stages.csv: what a stage did and what comes next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub stage: usize,
    pub phase: Phase,
    pub digits: usize,
    pub epochs: usize,
    pub passed: bool,
    /// Gate exact match, fast and one-step slow (self-training: against its own labels).
    pub gate_fast: f64,
    pub gate_slow: f64,
    /// Supervised stages: exact match on digits + 1 against the ground truth (figure 3).
    pub next_fast: Option<f64>,
    pub next_slow: Option<f64>,
    /// Self-training: problems the model labelled, and how many labels it kept.
    pub generated: usize,
    pub accepted: usize,
    pub rejected: usize,
    /// Training examples of the stage (new, replay and script), and those seen over its epochs.
    pub train_examples: usize,
    pub script_examples: usize,
    pub consumed: usize,
    /// Audited error rate of the accepted self-generated data (analysis only).
    pub accepted_fast_error: Option<f64>,
    pub accepted_slow_error: Option<f64>,
    pub seconds: f64,
    pub next_phase: Phase,
    pub next_digits: usize,
    pub stop_reason: String,
}

/// One row of accuracy.csv: a length evaluated after a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccuracyRecord {
    pub stage: usize,
    pub phase: Phase,
    pub stage_digits: usize,
    pub length: usize,
    pub problems: usize,
    pub fast: f64,
    pub chain: f64,
    pub slow: Option<f64>,
}

/// One row of generation.csv: a labelling method's audited quality (figure 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRecord {
    pub stage: usize,
    pub digits: usize,
    pub kind: Kind,
    pub method: String,
    /// "none", "commutativity", or the twin and the stronger checks that
    /// are on, e.g. "commutativity+columns+mirror+last-column"
    /// (`self_training.column_swaps`, `mirrored_steps`, `last_column_variants`,
    /// `fast_last_column_variants`).
    pub check: String,
    pub generated: usize,
    pub kept: usize,
    pub audited_errors: usize,
    pub error_rate: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Script,
    Model,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Gate,
    Unused,
}

/// One example of a stage's dataset CSV.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataRow {
    pub input: String,
    pub target: String,
    pub digits: usize,
    pub kind: Kind,
    pub origin: Origin,
    /// script, slow-greedy, fast, simplify-only, simplify-then-guess; "replay:" marks reused rows.
    pub method: String,
    pub accepted: bool,
    pub audited_correct: bool,
    pub split: Split,
}

impl DataRow {
    pub(crate) fn example(&self) -> Example {
        (encode(&self.input), encode(&self.target))
    }
}

/// Everything a stage produced.
struct StageOutput {
    record: StageRecord,
    data: Vec<DataRow>,
    accuracy: Vec<AccuracyRecord>,
    generation: Vec<GenerationRecord>,
}

/// New problems labelled by the model during self-training.
struct Labels {
    /// One row per problem: the slow problems, then the fast ones.
    rows: Vec<DataRow>,
    /// The problem of each row.
    problems: Vec<Problem>,
    fast_problems: Vec<Problem>,
    /// Simplify-only answers that check the slow labels.
    slow_answers: Vec<Option<String>>,
    /// Per slow problem: whether the stronger checks that are on (its
    /// column-swap variants, its twin's mirrored step, its last-column
    /// variant's step) agree with it.
    slow_checks_agree: Vec<bool>,
    /// Fast answers by every labelling method, and per problem whether its
    /// column-swap variants agree with it under that method.
    fast_methods: Vec<(LabelMethod, Vec<Option<String>>, Vec<bool>)>,
}

/// The column-swap variants of a set of problems (`self_training.
/// column_swaps`), flattened: `problems[j]` is a variant of problem `owners[j]`.
struct ColumnSwaps {
    problems: Vec<Problem>,
    owners: Vec<usize>,
}

impl ColumnSwaps {
    fn draw(of: &[Problem], per_problem: usize, rng: &mut Pcg64) -> Self {
        let (mut problems, mut owners) = (Vec::new(), Vec::new());
        for (owner, p) in of.iter().enumerate() {
            for variant in p.column_swaps(per_problem, rng) {
                problems.push(variant);
                owners.push(owner);
            }
        }
        ColumnSwaps { problems, owners }
    }

    /// For each problem: whether every one of its variants got its answer
    /// (true for a problem without variants).
    fn agree(&self, answers: &[Option<String>], variant_answers: &[Option<String>]) -> Vec<bool> {
        let mut agree = vec![true; answers.len()];
        for (&owner, answer) in self.owners.iter().zip(variant_answers) {
            agree[owner] &= *answer == answers[owner];
        }
        agree
    }
}

/// For each problem: whether the model's slow step on its last-column
/// variant (`Problem::last_column_variant`) is `steps[i]`, the step taken on
/// the problem, with the variant's numbers read (true when the column has no
/// other way). Both steps have the same sum, digit, carry and subproblem, so
/// a one-column sum the model gets wrong in both twins shows here.
fn last_columns_restated(solver: &Solver, problems: &[Problem], steps: &[&str], rng: &mut Pcg64) -> Result<Vec<bool>> {
    let variants: Vec<Option<Problem>> = problems.iter().map(|p| p.last_column_variant(rng)).collect();
    let asked: Vec<Problem> = variants.iter().flatten().cloned().collect();
    let mut outputs = solver.ask(&asked, Kind::Slow)?.into_iter();
    let restated = variants.iter().zip(steps).map(|(variant, step)| match variant {
        None => true,
        Some(v) => {
            let output = outputs.next().expect("one output per variant");
            restated_last_column(step, solver.format, v) == Some(output)
        }
    });
    Ok(restated.collect())
}

/// The answer of each trace's first candidate (simplify-only's).
fn first_candidates(traces: &[Trace]) -> Vec<Option<String>> {
    traces.iter().map(|t| t.candidates[0].clone()).collect()
}

/// Each trace's majority vote (simplify-then-guess's answer).
fn votes(traces: &[Trace]) -> Vec<Option<String>> {
    traces.iter().map(|t| majority_vote(&t.candidates)).collect()
}

fn method_name(method: LabelMethod) -> &'static str {
    match method {
        LabelMethod::Fast => "fast",
        LabelMethod::SimplifyOnly => "simplify-only",
        LabelMethod::SimplifyThenGuess => "simplify-then-guess",
    }
}

/// A gate example: the problem, how it is asked, and the answer expected.
pub(crate) struct GateExample {
    pub problem: Problem,
    pub kind: Kind,
    pub target: String,
}

/// Script (ground-truth) rows for `count` problems of `length` digits,
/// duplicated up to a third of `count` when fewer unique problems exist.
fn script_rows(
    e: &Experiment,
    oracle: &dyn Oracle,
    rng: &mut Pcg64,
    (length, kind, count): (usize, Kind, usize),
    exclude: &HashSet<Problem>,
) -> Vec<DataRow> {
    let problems = sample_unique(rng, length, count, exclude);
    let minimum = count.div_ceil(3);
    let copies = if problems.is_empty() { 0 } else { minimum.div_ceil(problems.len()).max(1) };
    let rows: Vec<DataRow> = problems
        .iter()
        .map(|p| DataRow {
            input: p.prompt(kind),
            target: oracle.target(p, kind, e.task.slow_format),
            digits: length,
            kind,
            origin: Origin::Script,
            method: "script".into(),
            accepted: true,
            audited_correct: true,
            split: Split::Train,
        })
        .collect();
    let mut all = Vec::with_capacity(rows.len() * copies);
    for _ in 0..copies {
        all.extend(rows.iter().cloned());
    }
    all
}

/// One of a stage's independent random streams, by the experiment's seed.
fn stage_rng(seed: u64, slot: usize, stream: u128) -> Pcg64 {
    Pcg64::new(((seed as u128) << 64) | slot as u128, stream)
}

/// The data of supervised stage `stage` on 1..=n (PROTOCOL.md section 5):
/// its gate (held-out fast and slow problems of n digits) and its training
/// rows (fast for every length, slow from 2 digits, more of the newest
/// length), which avoid the gate's problems. `sector smoke` trains on them too.
pub(crate) fn supervised_data(
    e: &Experiment,
    oracle: &dyn Oracle,
    stage: usize,
    n: usize,
) -> (Vec<GateExample>, Vec<DataRow>) {
    let format = e.task.slow_format;
    let gate_size = e.supervised.gate_size;
    // Held-out problems first, so that the training data avoids them.
    let mut rng = stage_rng(e.seed, stage, streams::GATE);
    let gate_fast = sample_unique(&mut rng, n, gate_size, &HashSet::new());
    let gate_slow = sample_unique(&mut rng, n, gate_size, &gate_fast.iter().cloned().collect());
    let held_out: HashSet<Problem> = gate_fast.iter().chain(&gate_slow).cloned().collect();
    let gate: Vec<GateExample> = [(Kind::Fast, &gate_fast), (Kind::Slow, &gate_slow)]
        .into_iter()
        .flat_map(|(kind, problems)| {
            problems.iter().map(move |p| GateExample {
                problem: p.clone(),
                kind,
                target: oracle.target(p, kind, format),
            })
        })
        .collect();

    let mut rng = stage_rng(e.seed, stage, streams::DATA);
    let mut data = Vec::new();
    for length in 1..=n {
        let fast = e.scaled(if length == n { FAST_NEW } else { FAST_OLD });
        data.extend(script_rows(e, oracle, &mut rng, (length, Kind::Fast, fast), &held_out));
        if length >= 2 {
            let slow = e.scaled(if length == n { SLOW_NEW } else { SLOW_OLD });
            data.extend(script_rows(e, oracle, &mut rng, (length, Kind::Slow, slow), &held_out));
        }
    }
    (gate, data)
}

pub struct Run<'a> {
    pub experiment: Experiment,
    pub dir: PathBuf,
    runs_root: PathBuf,
    oracle: &'a dyn Oracle,
    device: Device,
    records: Vec<StageRecord>,
    accuracy: Vec<AccuracyRecord>,
    generation: Vec<GenerationRecord>,
    manifest: Manifest,
    /// The ranks of a data-parallel run; rank 0 alone writes to `dir`.
    collective: Arc<dyn Collective>,
    /// Rank 0's hold on `dir` while the run lives.
    _lock: Option<RunLock>,
}

/// Runs an experiment to its end, resuming from its run directory under
/// `runs_root` if there is one. Returns every stage's record. Every rank of
/// `collective` calls this with the same arguments (`SingleRank` for one
/// process).
pub fn run(
    experiment: Experiment,
    runs_root: &Path,
    oracle: &dyn Oracle,
    collective: Arc<dyn Collective>,
) -> Result<Vec<StageRecord>> {
    let mut run = Run::open(experiment, runs_root, oracle, collective)?;
    let mut trainer = run.trainer()?;
    loop {
        let (phase, digits) = match run.records.last() {
            None => (Phase::Supervised, run.experiment.supervised.first_digits),
            Some(last) if last.next_phase == Phase::Stop => break,
            Some(last) => (last.next_phase, last.next_digits),
        };
        let stage = run.records.len() + 1;
        let started = Instant::now();
        let mut output = match phase {
            Phase::Supervised => run.supervised_stage(&mut trainer, stage, digits)?,
            _ => run.self_training_stage(&mut trainer, stage, digits)?,
        };
        output.record.seconds = started.elapsed().as_secs_f64();
        run.finish_stage(&trainer, output)?;
    }
    run.analyse_final_checkpoint()?;
    Ok(run.records)
}

/// The (fast, slow) thresholds of the gate of the self-training stage that
/// teaches `digits`, holding out `held` slow labels. Fast:
/// `self_training.last_fast_gate` at `last_digits`, else
/// `self_training.fast_gate`, else the supervised one. Slow: allowing
/// `slow_gate_misses` of them, (held - misses) / held, computed as the
/// gate's rate is, so equal counts compare equal, and never above the
/// supervised threshold.
fn self_training_gate(sup: &SupervisedSettings, st: &SelfTrainingSettings, digits: usize, held: usize) -> (f64, f64) {
    let slow = sup.slow_gate.min(rate(held.saturating_sub(st.slow_gate_misses), held));
    let every_stage = st.fast_gate.unwrap_or(sup.fast_gate);
    let fast = if digits >= st.last_digits { st.last_fast_gate.unwrap_or(every_stage) } else { every_stage };
    (fast, slow)
}

/// Exact-match rate of `hits` (0 for an empty set).
fn rate(hits: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        hits as f64 / total as f64
    }
}

/// For each problem: whether it and its commutative twin got the same,
/// parsable answer. A problem whose twin is not in the set does not agree.
fn twins_agree(problems: &[Problem], answers: &[Option<String>]) -> Vec<bool> {
    twins_pass(problems, |i, j| answers[i].is_some() && answers[j] == answers[i])
}

/// `agree[i] &= check[i]`: a label passes every check that is on.
fn both(agree: &mut [bool], check: &[bool]) {
    agree.iter_mut().zip(check).for_each(|(a, c)| *a &= *c);
}

/// For each problem i whose commutative twin j is in the set: pass(i, j);
/// false without a twin.
fn twins_pass(problems: &[Problem], pass: impl Fn(usize, usize) -> bool) -> Vec<bool> {
    let index: HashMap<&Problem, usize> = problems.iter().enumerate().map(|(i, p)| (p, i)).collect();
    problems.iter().enumerate().map(|(i, p)| index.get(&p.twin()).is_some_and(|&j| pass(i, j))).collect()
}

/// Writes the results CSVs (accuracy, generation, stages; stages last, since
/// its rows say which stages are finished) and saves the manifest.
fn write_results(
    manifest: &mut Manifest,
    dir: &Path,
    accuracy: &[AccuracyRecord],
    generation: &[GenerationRecord],
    records: &[StageRecord],
) -> Result<()> {
    for (name, bytes) in [
        (ACCURACY_CSV, csv_bytes(accuracy, &dir.join(ACCURACY_CSV))?),
        (GENERATION_CSV, csv_bytes(generation, &dir.join(GENERATION_CSV))?),
        (STAGES_CSV, csv_bytes(records, &dir.join(STAGES_CSV))?),
    ] {
        manifest.write_file(dir, name, &bytes)?;
    }
    manifest.save(dir)
}

/// Copies the supervised phase of the run of `parent_config` into the new
/// run directory `dir` (config field `supervised.from`): its stage and
/// accuracy rows, its datasets and its last supervised checkpoint, each file
/// checked against the parent's manifest. stages.csv is written last, so a
/// copy cut short is made again.
fn take_supervised_phase(
    experiment: &Experiment,
    parent_config: &Path,
    runs_root: &Path,
    dir: &Path,
    manifest: &mut Manifest,
) -> Result<()> {
    let refuse =
        |problem: String| Err(Error::Config { path: dir.join(CONFIG_FILE), field: "supervised.from".into(), problem });
    let parent = Experiment::load(parent_config)?;
    let supervised = |e: &Experiment| SupervisedSettings { from: None, ..e.supervised.clone() };
    for (section, same) in [
        ("seed", parent.seed == experiment.seed),
        ("model", parent.model == experiment.model),
        ("train", parent.train == experiment.train),
        ("task", parent.task == experiment.task),
        ("supervised", supervised(&parent) == supervised(experiment)),
    ] {
        if !same {
            return refuse(format!(
                "names {}, whose {section} differs from this config's; only a supervised phase made the way this \
                 run would make it can be taken over. Fix: make the two agree, or drop supervised.from",
                parent_config.display()
            ));
        }
    }
    let parent_dir = runs_root.join(&parent.name);
    let records: Vec<StageRecord> = read_csv(&parent_dir.join(STAGES_CSV))?;
    let records: Vec<StageRecord> = records.into_iter().take_while(|r| r.phase == Phase::Supervised).collect();
    let Some(last) = records.last().filter(|r| r.next_phase == Phase::SelfTraining).map(|r| r.stage) else {
        return refuse(format!(
            "names {}, but {} has not finished its supervised phase with a passed gate. Fix: run `sector run {}` \
             first (with the same --runs-dir)",
            parent_config.display(),
            parent_dir.display(),
            parent_config.display()
        ));
    };
    let parent_manifest = Manifest::load(&parent_dir)?;
    let checkpoint = format!("{}/", Run::checkpoint_name(last));
    let mut files: Vec<String> = (1..=last).map(Run::data_file).collect();
    files.extend(parent_manifest.entries.keys().filter(|name| name.starts_with(&checkpoint)).cloned());
    std::fs::create_dir_all(dir.join(&checkpoint)).map_err(|e| Error::io(dir, e))?;
    for name in files {
        let bytes = crate::files::read(&parent_dir.join(&name))?;
        parent_manifest.verify_bytes(&parent_dir, &name, &bytes)?;
        manifest.write_file(dir, &name, &bytes)?;
    }
    let mut accuracy: Vec<AccuracyRecord> = read_csv(&parent_dir.join(ACCURACY_CSV))?;
    accuracy.retain(|r| r.stage <= last);
    write_results(manifest, dir, &accuracy, &[], &records)?;
    crate::files::append_log(
        dir,
        &experiment.name,
        &format!("took over stages 1..{last} (the supervised phase) from {}", parent_dir.display()),
    );
    Ok(())
}

impl<'a> Run<'a> {
    /// Opens (or creates) the run directory, refusing one made by another
    /// config; other ranks wait for rank 0 to do so, then read it.
    pub fn open(
        experiment: Experiment,
        runs_root: &Path,
        oracle: &'a dyn Oracle,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        let dir = runs_root.join(&experiment.name);
        let writer = collective.rank() == 0;
        let opened = if writer {
            let (mut manifest, lock) = crate::files::open_run_dir(&dir, &experiment.name, &experiment.to_toml())?;
            std::fs::create_dir_all(dir.join("data")).map_err(|e| Error::io(&dir, e))?;
            if let Some(parent) = &experiment.supervised.from {
                if read_csv::<StageRecord>(&dir.join(STAGES_CSV))?.is_empty() {
                    take_supervised_phase(&experiment, Path::new(parent), runs_root, &dir, &mut manifest)?;
                }
            }
            Some((manifest, lock))
        } else {
            None
        };
        parallel::barrier(collective.as_ref())?;
        let (manifest, lock) = match opened {
            Some((manifest, lock)) => (manifest, Some(lock)),
            None => (Manifest::load_or_default(&dir)?, None),
        };
        let records: Vec<StageRecord> = read_csv(&dir.join(STAGES_CSV))?;
        let finished = records.len();
        // Rows of a stage that was cut short are dropped; the stage runs again.
        let mut accuracy: Vec<AccuracyRecord> = read_csv(&dir.join(ACCURACY_CSV))?;
        accuracy.retain(|r| r.stage <= finished);
        let mut generation: Vec<GenerationRecord> = read_csv(&dir.join(GENERATION_CSV))?;
        generation.retain(|r| r.stage <= finished);
        let device = select_device(&experiment.model.device)?;
        let runs_root = runs_root.to_path_buf();
        let mut run = Run {
            experiment,
            dir,
            runs_root,
            oracle,
            device,
            records,
            accuracy,
            generation,
            manifest,
            collective,
            _lock: lock,
        };
        if finished > 0 {
            run.log(&format!("resuming after stage {finished}"));
        }
        let done = run.records.last().is_some_and(|r| r.next_phase == Phase::Stop);
        if writer && !done {
            let device = run.experiment.model.device.clone();
            let ranks = run.collective.world_size();
            let machine = Provenance::record_session(&run.dir, &mut run.manifest, finished + 1, &device, ranks)?;
            run.log(&format!("machine: {}", machine.describe()));
            if ranks > 1 {
                run.log(&format!("data-parallel: {ranks} ranks"));
            }
        }
        Ok(run)
    }

    fn checkpoint_dir(&self, stage: usize) -> PathBuf {
        self.dir.join(Self::checkpoint_name(stage))
    }

    fn checkpoint_name(stage: usize) -> String {
        format!("checkpoints/stage-{stage:02}")
    }

    fn data_file(stage: usize) -> String {
        format!("data/stage-{stage:02}.csv")
    }

    /// The trainer at the end of the last finished stage, or a fresh one.
    fn trainer(&self) -> Result<Trainer> {
        let mut trainer = self.restore_or_start()?;
        self.check_memory(&trainer)?;
        trainer.collective = self.collective.clone();
        Ok(trainer)
    }

    /// Logs the per-GPU memory plan and refuses one the device cannot hold.
    fn check_memory(&self, trainer: &Trainer) -> Result<()> {
        let dtype_bytes = trainer.model.t5.dtype().size_in_bytes() as u64;
        let plan = MemoryPlan::for_experiment(&self.experiment, trainer.model.config(), dtype_bytes);
        self.log(&plan.to_string());
        match device_capacity(&self.device)? {
            Some(capacity) => plan.check(capacity).map_err(|problem| Error::Config {
                path: self.dir.join(CONFIG_FILE),
                field: "train.max_tokens_per_micro_batch".into(),
                problem,
            }),
            None => Ok(()),
        }
    }

    fn restore_or_start(&self) -> Result<Trainer> {
        if !self.records.is_empty() {
            return Trainer::load(&self.checkpoint_dir(self.records.len()), &self.device);
        }
        let e = &self.experiment;
        let model = match &e.model.pretrain {
            Some(config) => {
                let mut config = crate::pretrain::PretrainConfig::load(Path::new(config))?;
                config.model.device = e.model.device.clone();
                // Rank 0 pretrains (or finds the pretraining done); the others wait for it.
                if self.writes() {
                    crate::pretrain::run_into(&config, &self.runs_root)?;
                }
                parallel::barrier(self.collective.as_ref())?;
                let checkpoint = self.runs_root.join(&config.name).join(crate::pretrain::CHECKPOINT_DIR);
                self.log(&format!("starting from the pretrained checkpoint {}", checkpoint.display()));
                Model::load(&checkpoint.display().to_string(), &self.device)?
            }
            None => Model::from_preset_or_weights(
                e.model_config().as_ref(),
                e.model.weights.as_deref(),
                e.seed,
                &self.device,
            )?,
        };
        let config = e.train_config();
        Trainer::new(model, config)
    }

    fn rng(&self, slot: usize, stream: u128) -> Pcg64 {
        stage_rng(self.experiment.seed, slot, stream)
    }

    /// Asks the trainer's published model (the running average of its
    /// weights, when one is kept); a spinner labelled `task` counts decoded rows.
    fn solver<'m>(&self, trainer: &'m Trainer, task: &str) -> Solver<'m> {
        let progress = self
            .on_rank_zero(ProgressBar::new_spinner())
            .with_style(ProgressStyle::with_template("{msg}: {pos} rows decoded, {per_sec}, {elapsed}").expect("valid"))
            .with_message(task.to_string());
        Solver {
            model: &trainer.published().t5,
            format: self.experiment.task.slow_format,
            decode_batch: self.experiment.eval.decode_batch,
            progress,
            collective: trainer.collective.as_ref(),
            digit_offsets: Vec::new(),
        }
    }

    /// Whether this process writes the run directory (rank 0).
    fn writes(&self) -> bool {
        self.collective.rank() == 0
    }

    /// `bar`, drawn only by rank 0 (the other ranks' progress is the same).
    fn on_rank_zero(&self, bar: ProgressBar) -> ProgressBar {
        if !self.writes() {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        bar
    }

    fn log(&self, line: &str) {
        if self.writes() {
            crate::files::append_log(&self.dir, &self.experiment.name, line);
        }
    }

    /// The digits of the last supervised stage: ground truth is used up to here.
    fn supervised_cap(&self) -> usize {
        self.records.iter().filter(|r| r.phase == Phase::Supervised).map(|r| r.digits).max().unwrap_or(0)
    }

    /// Trains epoch by epoch until the gate passes or `max_epochs` is
    /// reached, on `train` and the stage's rehearsal examples (`task.rehearsal`:
    /// drawn from the stage's own stream, the same every epoch, and not in
    /// the stage's dataset file, which holds the task's examples).
    /// Returns (epochs, gate fast, gate slow, passed).
    fn train_until_gate(
        &self,
        trainer: &mut Trainer,
        stage: usize,
        train: &[Example],
        gate: &[GateExample],
        thresholds: (f64, f64),
        label: &str,
    ) -> Result<(usize, f64, f64, bool)> {
        let t = &self.experiment.train;
        let rehearsed: Vec<Example>;
        let train = match self.experiment.model.pretrain.as_ref().filter(|_| self.experiment.task.rehearsal > 0.0) {
            None => train,
            Some(pretrain) => {
                let count = (self.experiment.task.rehearsal * train.len() as f64).round() as usize;
                let config = crate::pretrain::PretrainConfig::load(Path::new(pretrain))?;
                let extra = config.rehearsal_examples(&mut self.rng(stage, streams::REHEARSAL), count);
                self.log(&format!("{label}: {count} rehearsal examples of {pretrain}'s string skills"));
                rehearsed = [train, extra.as_slice()].concat();
                &rehearsed
            }
        };
        let bar = self.on_rank_zero(ProgressBar::new((train.len() * t.max_epochs) as u64)).with_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} examples, {per_sec}, ETA {eta}")
                .expect("valid template"),
        );
        let mut result = (0, 0.0, 0.0, false);
        for epoch in 1..=t.max_epochs {
            bar.set_message(format!("{label} epoch {epoch}/{}", t.max_epochs));
            let started = Instant::now();
            let loss = trainer.epoch_with_progress(train, |examples, _| bar.inc(examples as u64))?;
            // The gate is checked from min_epochs on.
            let gate_rates = if epoch < t.min_epochs { None } else { Some(self.gate_accuracy(trainer, gate)?) };
            let gate_text =
                gate_rates.map_or(String::new(), |(fast, slow)| format!(", gate fast {fast:.3} slow {slow:.3}"));
            self.log(&format!(
                "{label} epoch {epoch}: loss {loss:.4}{gate_text}, {:.1} s",
                started.elapsed().as_secs_f64()
            ));
            let Some((fast, slow)) = gate_rates else { continue };
            result = (epoch, fast, slow, fast >= thresholds.0 && slow >= thresholds.1);
            if result.3 {
                break;
            }
        }
        bar.finish_and_clear();
        Ok(result)
    }

    /// Exact match of the model's greedy outputs with the gate targets, fast and slow.
    fn gate_accuracy(&self, trainer: &Trainer, gate: &[GateExample]) -> Result<(f64, f64)> {
        let solver = self.solver(trainer, "gate");
        let mut rates = [0.0; 2];
        for (slot, kind) in [Kind::Fast, Kind::Slow].into_iter().enumerate() {
            let examples: Vec<&GateExample> = gate.iter().filter(|g| g.kind == kind).collect();
            let problems: Vec<Problem> = examples.iter().map(|g| g.problem.clone()).collect();
            let outputs = solver.ask(&problems, kind)?;
            let hits = outputs.iter().zip(&examples).filter(|(out, g)| **out == g.target).count();
            rates[slot] = rate(hits, examples.len());
        }
        Ok((rates[0], rates[1]))
    }

    /// Accuracy on lengths 1..=digits + lengths_beyond, fast, by chain and
    /// one-step slow, on the same problems after every stage.
    fn evaluate_lengths(
        &self,
        trainer: &Trainer,
        stage: usize,
        phase: Phase,
        digits: usize,
    ) -> Result<Vec<AccuracyRecord>> {
        let e = &self.experiment.eval;
        let mut problems = Vec::new();
        for length in 1..=digits + e.lengths_beyond {
            let mut rng = self.rng(length, streams::EVAL);
            problems.extend(sample_unique(&mut rng, length, e.problems_per_length, &HashSet::new()));
        }
        let results = evaluate(
            &self.solver(trainer, &format!("evaluating lengths 1..{}", digits + e.lengths_beyond)),
            &problems,
            self.oracle,
        )?;
        Ok(summarize(&results)
            .into_iter()
            .map(|s| AccuracyRecord {
                stage,
                phase,
                stage_digits: digits,
                length: s.digits,
                problems: s.problems,
                fast: s.fast_accuracy,
                chain: s.chain_accuracy,
                slow: s.slow_accuracy,
            })
            .collect())
    }

    /// Stage N of the curriculum: script data on 1..N digits, trained until
    /// the gate on held-out N-digit problems passes.
    fn supervised_stage(&self, trainer: &mut Trainer, stage: usize, n: usize) -> Result<StageOutput> {
        let e = &self.experiment;
        let format = e.task.slow_format;
        let gate_size = e.supervised.gate_size;
        let (gate, mut data) = supervised_data(e, self.oracle, stage, n);
        let train: Vec<Example> = data.iter().map(DataRow::example).collect();
        data.extend(gate.iter().map(|g| DataRow {
            input: g.problem.prompt(g.kind),
            target: g.target.clone(),
            digits: n,
            kind: g.kind,
            origin: Origin::Script,
            method: "script".into(),
            accepted: true,
            audited_correct: true,
            split: Split::Gate,
        }));

        let label = format!("stage {stage} supervised 1..{n}");
        let thresholds = (e.supervised.fast_gate, e.supervised.slow_gate);
        let (epochs, fast, slow, passed) = self.train_until_gate(trainer, stage, &train, &gate, thresholds, &label)?;

        // Figure 3: how the model does one length beyond, fast and slow.
        let mut rng = self.rng(stage, streams::NEXT_LENGTH);
        let next: Vec<GateExample> = sample_unique(&mut rng, n + 1, gate_size, &HashSet::new())
            .into_iter()
            .flat_map(|p| {
                [Kind::Fast, Kind::Slow].map(|kind| GateExample {
                    target: self.oracle.target(&p, kind, format),
                    problem: p.clone(),
                    kind,
                })
            })
            .collect();
        let (next_fast, next_slow) = self.gate_accuracy(trainer, &next)?;

        let (next_phase, next_digits, stop_reason) = match e.supervised.start_self_training {
            _ if !passed => (Phase::Stop, 0, format!("supervised stage {n} did not pass its gate in {epochs} epochs")),
            StartSelfTraining::AfterDigits(last) if n >= last => (Phase::SelfTraining, n + 1, String::new()),
            // PROTOCOL.md section 5: the phase ends when slow generalises or
            // at the configured digit; self-training then finds out for itself
            // whether its labels pass the checks.
            StartSelfTraining::When(_)
                if next_slow >= e.supervised.generalise_threshold || n >= e.supervised.max_digits =>
            {
                (Phase::SelfTraining, n + 1, String::new())
            }
            _ => (Phase::Supervised, n + 1, String::new()),
        };
        let (next_phase, next_digits, stop_reason) =
            if next_phase == Phase::SelfTraining && n >= e.self_training.last_digits {
                (Phase::Stop, 0, format!("reached self_training.last_digits ({})", e.self_training.last_digits))
            } else {
                (next_phase, next_digits, stop_reason)
            };
        let record = StageRecord {
            stage,
            phase: Phase::Supervised,
            digits: n,
            epochs,
            passed,
            gate_fast: fast,
            gate_slow: slow,
            next_fast: Some(next_fast),
            next_slow: Some(next_slow),
            generated: 0,
            accepted: 0,
            rejected: 0,
            train_examples: train.len(),
            script_examples: train.len(),
            consumed: train.len() * epochs,
            accepted_fast_error: None,
            accepted_slow_error: None,
            seconds: 0.0,
            next_phase,
            next_digits,
            stop_reason,
        };
        let accuracy = self.evaluate_lengths(trainer, stage, Phase::Supervised, n)?;
        Ok(StageOutput { record, data, accuracy, generation: Vec::new() })
    }

    /// Self-training on M digits: the model labels new problems, keeps the
    /// labels that pass the checks, and trains on them with replay.
    fn self_training_stage(&self, trainer: &mut Trainer, stage: usize, m: usize) -> Result<StageOutput> {
        let e = &self.experiment;
        let st = &e.self_training;
        if let Some(lr) = st.lr {
            // Set at every stage's start, so a resumed run trains as an unbroken one.
            (trainer.adam.lr, trainer.adam.warmup_steps, trainer.adam.schedule) = (lr, 0, LrSchedule::Constant);
        }
        if let Some(decay) = st.weight_average {
            trainer.start_average(decay)?;
        }
        let started = Instant::now();
        let labels = self.label_new_problems(trainer, stage, m)?;
        self.log(&format!(
            "stage {stage} self {m}: labelled {} problems in {:.1} s",
            labels.rows.len(),
            started.elapsed().as_secs_f64()
        ));
        let generation = self.audit_methods(&labels, stage, m);
        let mut data = labels.rows;
        let gate = self.hold_out_gate(stage, &mut data, &labels.problems);
        let count = |kind: Kind| data.iter().filter(|r| r.kind == kind && r.accepted).count();
        let (accepted_fast, accepted_slow) = (count(Kind::Fast), count(Kind::Slow));
        let generated = data.len();
        let fast_generated = data.iter().filter(|r| r.kind == Kind::Fast).count();
        let acceptance = rate(accepted_fast, fast_generated);
        let audited_error = |kind: Kind| {
            let kept: Vec<&DataRow> = data.iter().filter(|r| r.kind == kind && r.accepted).collect();
            (!kept.is_empty()).then(|| rate(kept.iter().filter(|r| !r.audited_correct).count(), kept.len()))
        };
        let (accepted_fast_error, accepted_slow_error) = (audited_error(Kind::Fast), audited_error(Kind::Slow));

        // A gate with a positive threshold needs held-out examples of its kind.
        let held_out = |kind: Kind| gate.iter().filter(|g| g.kind == kind).count();
        let thresholds = self_training_gate(&e.supervised, st, m, held_out(Kind::Slow));
        let mut stop_reason = String::new();
        if (held_out(Kind::Fast) == 0 && thresholds.0 > 0.0)
            || (held_out(Kind::Slow) == 0 && e.supervised.slow_gate > 0.0)
        {
            stop_reason = format!(
                "too few labels passed the checks to hold out a gate ({accepted_fast} fast, {accepted_slow} slow)"
            );
        } else if acceptance < st.stop_below_acceptance {
            stop_reason = format!("acceptance {acceptance:.3} fell below self_training.stop_below_acceptance");
        }

        data.extend(self.replay_rows(stage, m)?);
        let train: Vec<Example> = data.iter().filter(|r| r.split == Split::Train).map(DataRow::example).collect();
        let script_examples = data.iter().filter(|r| r.split == Split::Train && r.origin == Origin::Script).count();
        let (epochs, gate_fast, gate_slow, passed) = if stop_reason.is_empty() {
            self.train_until_gate(trainer, stage, &train, &gate, thresholds, &format!("stage {stage} self {m}"))?
        } else {
            (0, 0.0, 0.0, false)
        };
        if stop_reason.is_empty() && !passed {
            stop_reason = format!("self-training stage {m} did not pass its gate in {epochs} epochs");
        }
        if let (true, Some(limit), Some(error)) =
            (stop_reason.is_empty(), st.stop_below_audited_accuracy, accepted_fast_error)
        {
            if 1.0 - error < limit {
                stop_reason = format!("audited accuracy of accepted fast data {:.3} fell below {limit}", 1.0 - error);
            }
        }
        if stop_reason.is_empty() && m >= st.last_digits {
            stop_reason = format!("reached self_training.last_digits ({})", st.last_digits);
        }
        let (next_phase, next_digits) =
            if stop_reason.is_empty() { (Phase::SelfTraining, m + 1) } else { (Phase::Stop, 0) };
        let accuracy =
            if epochs > 0 { self.evaluate_lengths(trainer, stage, Phase::SelfTraining, m)? } else { Vec::new() };
        let record = StageRecord {
            stage,
            phase: Phase::SelfTraining,
            digits: m,
            epochs,
            passed,
            gate_fast,
            gate_slow,
            next_fast: None,
            next_slow: None,
            generated,
            accepted: accepted_fast + accepted_slow,
            rejected: generated - accepted_fast - accepted_slow,
            train_examples: train.len(),
            script_examples,
            consumed: train.len() * epochs,
            accepted_fast_error,
            accepted_slow_error,
            seconds: 0.0,
            next_phase,
            next_digits,
            stop_reason,
        };
        Ok(StageOutput { record, data, accuracy, generation })
    }

    /// New M-digit problems labelled by the model. Slow labels are its own
    /// slow step, checked by simplify-only on the twins; fast labels come
    /// from the configured method, checked by the twins' answers. All three
    /// fast methods are run, for the audit of figure 5.
    fn label_new_problems(&self, trainer: &Trainer, stage: usize, m: usize) -> Result<Labels> {
        let e = &self.experiment;
        let st = &e.self_training;
        let format = e.task.slow_format;
        let mut rng = self.rng(stage, streams::DATA);
        let slow_problems = sample_unique(&mut rng, m, e.generated(SLOW_NEW / SELF_TRAINING_FRACTION), &HashSet::new());
        let fast_problems = sample_unique(&mut rng, m, e.generated(FAST_NEW / SELF_TRAINING_FRACTION), &HashSet::new());
        let mut solver = self.solver(trainer, &format!("labelling {m}-digit problems"));
        solver.digit_offsets = (0..st.offset_vote as u32).collect();
        let slow_traces = solver.simplify_only(&slow_problems)?;
        let slow_answers = first_candidates(&slow_traces);
        let stg: Vec<Trace> = solver.simplify_then_guess(&fast_problems, st.k)?;
        let fast_answers = solver.fast(&fast_problems)?;

        // The stronger check: every column-swap variant must answer alike
        // (none are drawn, and so all agree, with column_swaps = 0).
        let mut variant_rng = self.rng(stage, streams::COLUMN_SWAPS);
        let slow_swaps = ColumnSwaps::draw(&slow_problems, st.column_swaps, &mut variant_rng);
        let fast_swaps = ColumnSwaps::draw(&fast_problems, st.column_swaps, &mut variant_rng);
        let slow_columns_agree =
            slow_swaps.agree(&slow_answers, &first_candidates(&solver.simplify_only(&slow_swaps.problems)?));
        let slow_outputs: Vec<&str> = slow_traces.iter().map(|t| t.slow_outputs[0].as_str()).collect();
        let mut slow_checks_agree = slow_columns_agree;
        if st.mirrored_steps {
            let mirrored = twins_pass(&slow_problems, |i, j| {
                mirrored_slow(slow_outputs[i], format).as_deref() == Some(slow_outputs[j])
            });
            both(&mut slow_checks_agree, &mirrored);
        }
        if st.last_column_variants {
            let restated = last_columns_restated(&solver, &slow_problems, &slow_outputs, &mut variant_rng)?;
            both(&mut slow_checks_agree, &restated);
        }
        // The first step behind each fast label, checked as a slow label is.
        // A one-digit problem takes no step, and has no last-column variant either.
        let first_steps_agree = if st.fast_last_column_variants {
            let first_steps: Vec<&str> =
                stg.iter().map(|t| t.slow_outputs.first().map_or("", String::as_str)).collect();
            last_columns_restated(&solver, &fast_problems, &first_steps, &mut variant_rng)?
        } else {
            vec![true; fast_problems.len()]
        };
        let swapped_stg = solver.simplify_then_guess(&fast_swaps.problems, st.k)?;
        let swapped_fast = solver.fast(&fast_swaps.problems)?;
        let fast_methods: Vec<(LabelMethod, Vec<Option<String>>, Vec<bool>)> = [
            (LabelMethod::Fast, fast_answers, swapped_fast),
            (LabelMethod::SimplifyOnly, first_candidates(&stg), first_candidates(&swapped_stg)),
            (LabelMethod::SimplifyThenGuess, votes(&stg), votes(&swapped_stg)),
        ]
        .into_iter()
        .map(|(method, answers, swapped)| {
            let mut agree = fast_swaps.agree(&answers, &swapped);
            both(&mut agree, &first_steps_agree);
            (method, answers, agree)
        })
        .collect();

        // A label is kept when it parses and, with the checks on, its twin
        // and the stronger checks that are on agree.
        let keep = |answers: &[Option<String>], twin_agrees: &[bool], checks_agree: &[bool], i: usize| {
            answers[i].is_some() && ((twin_agrees[i] && checks_agree[i]) || !st.commutativity_check)
        };
        let mut rows = Vec::new();
        let slow_agree = twins_agree(&slow_problems, &slow_answers);
        for (i, (p, output)) in slow_problems.iter().zip(&slow_outputs).enumerate() {
            rows.push(DataRow {
                input: p.prompt(Kind::Slow),
                audited_correct: **output == self.oracle.slow_target(p, format),
                target: output.to_string(),
                digits: m,
                kind: Kind::Slow,
                origin: Origin::Model,
                method: "slow-greedy".into(),
                accepted: keep(&slow_answers, &slow_agree, &slow_checks_agree, i),
                split: Split::Unused,
            });
        }
        let (_, answers, columns_agree) =
            fast_methods.iter().find(|(method, ..)| *method == st.fast_labels).expect("all methods run");
        let fast_agree = twins_agree(&fast_problems, answers);
        for (i, p) in fast_problems.iter().enumerate() {
            rows.push(DataRow {
                input: p.prompt(Kind::Fast),
                target: answers[i].as_ref().map(|a| format!("A: {a}")).unwrap_or_default(),
                digits: m,
                kind: Kind::Fast,
                origin: Origin::Model,
                method: method_name(st.fast_labels).into(),
                accepted: keep(answers, &fast_agree, columns_agree, i),
                audited_correct: answers[i].as_ref() == Some(&self.oracle.sum(p)),
                split: Split::Unused,
            });
        }
        let problems = slow_problems.into_iter().chain(fast_problems.iter().cloned()).collect();
        Ok(Labels { rows, problems, fast_problems, slow_answers, slow_checks_agree, fast_methods })
    }

    /// Figure 5: the audited error rate of every labelling method, with and
    /// without the commutativity check, and with the stronger checks too
    /// when any is on (ground truth, analysis only).
    fn audit_methods(&self, labels: &Labels, stage: usize, m: usize) -> Vec<GenerationRecord> {
        let st = &self.experiment.self_training;
        // The name of the third check, e.g. "commutativity+columns+mirror"
        // (None when no stronger check is on for that kind).
        let stronger = |kind: Kind| {
            let on = [
                ("columns", st.column_swaps > 0),
                ("mirror", kind == Kind::Slow && st.mirrored_steps),
                (
                    "last-column",
                    match kind {
                        Kind::Slow => st.last_column_variants,
                        Kind::Fast => st.fast_last_column_variants,
                    },
                ),
            ];
            let names: Vec<&str> = on.iter().filter(|(_, on)| *on).map(|(name, _)| *name).collect();
            (!names.is_empty()).then(|| format!("commutativity+{}", names.join("+")))
        };
        let mut records = Vec::new();
        let mut record = |kind: Kind, method: &str, twin_agrees: &[bool], checks_agree: &[bool], correct: &[bool]| {
            // Per check, whether each label passes it.
            let mut checks = vec![
                ("none".to_string(), vec![true; twin_agrees.len()]),
                ("commutativity".into(), twin_agrees.to_vec()),
            ];
            if let Some(name) = stronger(kind) {
                checks.push((name, twin_agrees.iter().zip(checks_agree).map(|(t, c)| *t && *c).collect()));
            }
            for (check, passes) in checks {
                let kept: Vec<usize> = (0..passes.len()).filter(|&i| passes[i]).collect();
                let errors = kept.iter().filter(|&&i| !correct[i]).count();
                records.push(GenerationRecord {
                    stage,
                    digits: m,
                    kind,
                    method: method.to_string(),
                    check,
                    generated: twin_agrees.len(),
                    kept: kept.len(),
                    audited_errors: errors,
                    error_rate: (!kept.is_empty()).then(|| rate(errors, kept.len())),
                });
            }
        };
        let slow_rows: Vec<&DataRow> = labels.rows.iter().filter(|r| r.kind == Kind::Slow).collect();
        let slow_problems = &labels.problems[..slow_rows.len()];
        let correct: Vec<bool> = slow_rows.iter().map(|r| r.audited_correct).collect();
        let twin_agrees = twins_agree(slow_problems, &labels.slow_answers);
        record(Kind::Slow, "slow-greedy", &twin_agrees, &labels.slow_checks_agree, &correct);
        for (method, answers, columns_agree) in &labels.fast_methods {
            let correct: Vec<bool> = labels
                .fast_problems
                .iter()
                .zip(answers)
                .map(|(p, a)| a.as_ref() == Some(&self.oracle.sum(p)))
                .collect();
            let twin_agrees = twins_agree(&labels.fast_problems, answers);
            record(Kind::Fast, method_name(*method), &twin_agrees, columns_agree, &correct);
        }
        records
    }

    /// Holds out up to `gate_size` accepted examples of each kind (at most
    /// half of them) for the gate; the other accepted ones train.
    fn hold_out_gate(&self, stage: usize, rows: &mut [DataRow], problems: &[Problem]) -> Vec<GateExample> {
        let mut rng = self.rng(stage, streams::GATE);
        for kind in [Kind::Fast, Kind::Slow] {
            let mut accepted: Vec<usize> =
                (0..rows.len()).filter(|&i| rows[i].kind == kind && rows[i].accepted).collect();
            accepted.shuffle(&mut rng);
            let held = self.experiment.self_training.gate_size.min(accepted.len() / 2);
            for (j, &i) in accepted.iter().enumerate() {
                rows[i].split = if j < held { Split::Gate } else { Split::Train };
            }
        }
        (0..rows.len())
            .filter(|&i| rows[i].split == Split::Gate)
            .map(|i| GateExample { problem: problems[i].clone(), kind: rows[i].kind, target: rows[i].target.clone() })
            .collect()
    }

    /// Replay for self-training on `m` digits, at a tenth of section 5's
    /// sizes per length: script data for lengths inside the supervised range
    /// (never above it), and a sample of the model's own accepted data from
    /// earlier self-training stages for the lengths it taught itself.
    fn replay_rows(&self, stage: usize, m: usize) -> Result<Vec<DataRow>> {
        let e = &self.experiment;
        let cap = self.supervised_cap();
        let fast = e.scaled(FAST_OLD / SELF_TRAINING_FRACTION);
        let slow = e.scaled(SLOW_OLD / SELF_TRAINING_FRACTION);
        let mut rng = self.rng(stage, streams::REPLAY);
        let mut rows = Vec::new();
        for length in 1..=cap {
            rows.extend(script_rows(e, self.oracle, &mut rng, (length, Kind::Fast, fast), &HashSet::new()));
            if length >= 2 {
                rows.extend(script_rows(e, self.oracle, &mut rng, (length, Kind::Slow, slow), &HashSet::new()));
            }
        }
        let earlier = self.records.iter().filter(|r| r.phase == Phase::SelfTraining && r.digits < m && r.digits > cap);
        for record in earlier {
            let own: Vec<DataRow> = read_csv(&self.dir.join(Self::data_file(record.stage)))?;
            for (kind, count) in [(Kind::Fast, fast), (Kind::Slow, slow)] {
                let mut pool: Vec<&DataRow> = own
                    .iter()
                    .filter(|r| r.kind == kind && r.accepted && r.origin == Origin::Model && r.digits == record.digits)
                    .filter(|r| !r.method.starts_with("replay:"))
                    .collect();
                pool.shuffle(&mut rng);
                rows.extend(pool.into_iter().take(count).map(|r| DataRow {
                    method: format!("replay:{}", r.method),
                    split: Split::Train,
                    ..r.clone()
                }));
            }
        }
        Ok(rows)
    }

    /// Figures 4 and 9 from the checkpoint of the last stage that passed its
    /// gate (the run's result); done once, after the last stage.
    fn analyse_final_checkpoint(&mut self) -> Result<()> {
        if [FINAL_CSV, CARRIES_CSV, VOTES_CSV].iter().all(|name| self.manifest.entries.contains_key(*name)) {
            return Ok(());
        }
        let Some(last) = self.records.iter().rev().find(|r| r.passed).cloned() else {
            self.log("no stage passed its gate: no final checkpoint to analyse");
            return Ok(());
        };
        let e = &self.experiment.eval;
        let trainer = Trainer::load(&self.checkpoint_dir(last.stage), &self.device)?;
        let solver = self.solver(&trainer, &format!("analysing stage {}", last.stage));
        let mut problems = Vec::new();
        for length in 1..=last.digits + e.lengths_beyond {
            let mut rng = self.rng(length, streams::FINAL);
            problems.extend(sample_unique(&mut rng, length, e.final_problems_per_length, &HashSet::new()));
        }
        let accuracy = analysis::final_accuracy(&solver, &problems, self.oracle, last.stage)?;
        let digits = last.digits + e.carry_digits_beyond;
        let problems =
            sample_unique(&mut self.rng(digits, streams::CARRIES), digits, e.carry_problems, &HashSet::new());
        let carries = analysis::carries(&solver, &problems, self.oracle, last.stage)?;
        // Every other problem: a sample holds twins side by side, and one of each pair is enough.
        let examples: Vec<Problem> = sample_unique(
            &mut self.rng(last.digits + 1, streams::VOTES),
            last.digits + 1,
            2 * e.vote_examples,
            &HashSet::new(),
        )
        .into_iter()
        .step_by(2)
        .collect();
        let votes = analysis::votes(&solver, &examples, self.experiment.self_training.k, self.oracle)?;
        drop(solver);
        if !self.writes() {
            return Ok(());
        }
        for (name, bytes) in [
            (FINAL_CSV, csv_bytes(&accuracy, &self.dir.join(FINAL_CSV))?),
            (CARRIES_CSV, csv_bytes(&carries, &self.dir.join(CARRIES_CSV))?),
            (VOTES_CSV, csv_bytes(&votes, &self.dir.join(VOTES_CSV))?),
        ] {
            self.manifest.write_file(&self.dir, name, &bytes)?;
        }
        self.manifest.save(&self.dir)?;
        let fast = carries.iter().filter(|r| r.fast_correct).count();
        self.log(&format!(
            "final checkpoint (stage {}, {} digits): {fast}/{} fast on {digits}-digit problems; {} traced examples",
            last.stage,
            last.digits,
            carries.len(),
            examples.len()
        ));
        Ok(())
    }

    /// Writes a finished stage: dataset, checkpoint, results CSVs, manifest,
    /// in that order, so a stage counts as finished only once its row is in
    /// stages.csv and everything it needs is on disk. Rank 0 writes; every
    /// rank waits until it has (later stages read the datasets back).
    fn finish_stage(&mut self, trainer: &Trainer, output: StageOutput) -> Result<()> {
        self.log(&stage_summary(&output.record));
        self.accuracy.extend(output.accuracy);
        self.generation.extend(output.generation);
        self.records.push(output.record);
        if self.writes() {
            self.write_stage(trainer, &output.data)?;
        }
        Ok(parallel::barrier(self.collective.as_ref())?)
    }

    fn write_stage(&mut self, trainer: &Trainer, data: &[DataRow]) -> Result<()> {
        let stage = self.records.len();
        let data_file = Self::data_file(stage);
        let bytes = csv_bytes(data, &self.dir.join(&data_file))?;
        self.manifest.write_file(&self.dir, &data_file, &bytes)?;
        let checkpoint = self.checkpoint_dir(stage);
        trainer.save(&checkpoint)?;
        let prefix = checkpoint.strip_prefix(&self.dir).expect("inside the run").display().to_string();
        self.manifest.add_checkpoint(&self.dir, &prefix)?;
        write_results(&mut self.manifest, &self.dir, &self.accuracy, &self.generation, &self.records)
    }
}

/// The one-line summary of a stage.
pub fn stage_summary(r: &StageRecord) -> String {
    let phase = match r.phase {
        Phase::Supervised => "supervised",
        _ => "self",
    };
    let mut line = format!(
        "stage {} {phase} {} digits: {} epochs, gate fast {:.2} slow {:.2}{}",
        r.stage,
        r.digits,
        r.epochs,
        r.gate_fast,
        r.gate_slow,
        if r.passed { " (passed)" } else { "" }
    );
    if let (Some(fast), Some(slow)) = (r.next_fast, r.next_slow) {
        line += &format!(", on {} digits fast {fast:.2} slow {slow:.2}", r.digits + 1);
    }
    if r.phase == Phase::SelfTraining {
        line += &format!(", accepted {}/{}", r.accepted, r.generated);
        let pct = |e: Option<f64>| e.map_or("-".to_string(), |e| format!("{:.1} %", 100.0 * e));
        line += &format!(", audited error fast {} slow {}", pct(r.accepted_fast_error), pct(r.accepted_slow_error));
    }
    line += &format!(", {:.1} s", r.seconds);
    if !r.stop_reason.is_empty() {
        line += &format!("; stop: {}", r.stop_reason);
    }
    line
}

/// Seconds as a reader takes them in: "40 s", "25 min" or "2.5 h".
fn duration(seconds: f64) -> String {
    match seconds {
        s if s < 60.0 => format!("{s:.0} s"),
        s if s < 3600.0 => format!("{:.0} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}

/// A finished run on one screen: the digits it was taught and those it
/// taught itself, the stages' wall time, the final checkpoint's fast accuracy
/// (`finals`, final.csv) and where the rendered artifacts of `scale` are.
pub fn run_summary(name: &str, scale: &str, records: &[StageRecord], finals: &[analysis::FinalRecord]) -> String {
    let seconds = |phase: Phase| records.iter().filter(|r| r.phase == phase).map(|r| r.seconds).sum::<f64>();
    let passed = |phase: Phase| records.iter().filter(move |r| r.phase == phase && r.passed).map(|r| r.digits);
    let span = |phase: Phase| match (passed(phase).min(), passed(phase).max()) {
        (Some(first), Some(last)) => format!("{}..{last} ({} lengths)", first, last + 1 - first),
        _ => "none".to_string(),
    };
    // The curriculum teaches 1..N at stage N.
    let supervised = passed(Phase::Supervised).max().map_or("none".to_string(), |last| format!("1..{last}"));
    let mut lines = vec![
        format!(
            "{name}: {} stages, {} of stage wall time",
            records.len(),
            duration(seconds(Phase::Supervised) + seconds(Phase::SelfTraining))
        ),
        format!("  supervised:   {supervised} ({})", duration(seconds(Phase::Supervised))),
        format!(
            "  self-taught:  {}, no ground truth ({})",
            span(Phase::SelfTraining),
            duration(seconds(Phase::SelfTraining))
        ),
    ];
    if let Some(reason) = records.last().map(|r| &r.stop_reason).filter(|r| !r.is_empty()) {
        lines.push(format!("  ended:        {reason}"));
    }
    let last_taught = records.iter().rev().find(|r| r.passed).map_or(0, |r| r.digits);
    let taught: Vec<&analysis::FinalRecord> = finals.iter().filter(|f| f.length <= last_taught).collect();
    if let Some(worst) = taught.iter().min_by(|x, y| x.fast.total_cmp(&y.fast)) {
        let problems = taught.iter().map(|f| f.problems).max().unwrap_or(0);
        lines.push(format!(
            "  final checkpoint (stage {}): fast on 1..{last_taught} digits ({problems} problems a length) {:.2} at worst (on {}-digit problems), 0.98 or more on {} of {}",
            worst.stage,
            worst.fast,
            worst.length,
            taught.iter().filter(|f| f.fast >= 0.98).count(),
            taught.len()
        ));
    }
    lines.push(format!("  Table 1: results/{scale}/tables/table1.md; Figure 6: figures/{scale}/fig6.png (make table1 fig6 SCALE={scale}, from the recording)"));
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_summary_names_the_taught_and_self_taught_digits_and_the_worst_final_length() {
        let stage = |stage: usize, phase: Phase, digits: usize, passed: bool, stop_reason: &str| StageRecord {
            stage,
            phase,
            digits,
            epochs: 1,
            passed,
            gate_fast: 1.0,
            gate_slow: 1.0,
            next_fast: None,
            next_slow: None,
            generated: 0,
            accepted: 0,
            rejected: 0,
            train_examples: 0,
            script_examples: 0,
            consumed: 0,
            accepted_fast_error: None,
            accepted_slow_error: None,
            seconds: 1800.0,
            next_phase: Phase::SelfTraining,
            next_digits: digits + 1,
            stop_reason: stop_reason.into(),
        };
        let records = [
            stage(1, Phase::Supervised, 3, true, ""),
            stage(2, Phase::Supervised, 4, true, ""),
            stage(3, Phase::SelfTraining, 5, true, ""),
            stage(4, Phase::SelfTraining, 6, true, ""),
            stage(5, Phase::SelfTraining, 7, false, "self-training stage 7 did not pass its gate in 20 epochs"),
        ];
        // The final checkpoint is stage 4's (6 digits); lengths beyond it do not count.
        let fast = [1.0, 0.99, 0.95, 1.0, 0.98, 0.97, 0.5, 0.1];
        let finals: Vec<analysis::FinalRecord> = (1..=8)
            .map(|length| analysis::FinalRecord { stage: 4, length, problems: 100, fast: fast[length - 1] })
            .collect();
        let summary = run_summary("cpu-main", "cpu", &records, &finals);
        assert!(summary.starts_with("cpu-main: 5 stages, 2.5 h of stage wall time"), "{summary}");
        assert!(summary.contains("supervised:   1..4 (1.0 h)"), "{summary}");
        assert!(summary.contains("self-taught:  5..6 (2 lengths), no ground truth (1.5 h)"), "{summary}");
        assert!(summary.contains("ended:        self-training stage 7 did not pass its gate"), "{summary}");
        assert!(
            summary.contains(
                "fast on 1..6 digits (100 problems a length) 0.95 at worst (on 3-digit problems), 0.98 or more on 4 of 6"
            ),
            "{summary}"
        );
        assert!(
            summary.contains("results/cpu/tables/table1.md") && summary.contains("figures/cpu/fig6.png"),
            "{summary}"
        );
        // A run that taught itself nothing says so.
        let summary = run_summary("x", "micro", &records[..2], &[]);
        assert!(summary.contains("self-taught:  none"), "{summary}");
    }

    #[test]
    fn a_slow_gate_allowing_one_miss_passes_127_of_128_and_not_126() {
        let (sup, paper) = (SupervisedSettings::default(), SelfTrainingSettings::default());
        let one_miss = SelfTrainingSettings { slow_gate_misses: 1, ..paper.clone() };
        let slow = |sup: &SupervisedSettings, st: &SelfTrainingSettings, held| self_training_gate(sup, st, 9, held).1;
        assert!(rate(127, 128) >= slow(&sup, &one_miss, 128) && rate(126, 128) < slow(&sup, &one_miss, 128));
        // The paper's gate: every held-out label right.
        assert!(rate(128, 128) >= slow(&sup, &paper, 128) && rate(127, 128) < slow(&sup, &paper, 128));
        // Never stricter than the supervised threshold, nor below 0 when few are held out.
        let lenient = SupervisedSettings { slow_gate: 0.0, ..sup.clone() };
        assert_eq!(slow(&lenient, &one_miss, 128), 0.0);
        assert_eq!(slow(&sup, &SelfTrainingSettings { slow_gate_misses: 3, ..paper }, 2), 0.0);
    }

    #[test]
    fn a_self_training_fast_gate_replaces_the_supervised_one_in_self_training_alone() {
        let sup = SupervisedSettings::default();
        let paper = SelfTrainingSettings::default();
        assert_eq!(self_training_gate(&sup, &paper, 9, 128), (sup.fast_gate, 1.0));
        let stricter = SelfTrainingSettings { fast_gate: Some(0.95), ..paper };
        assert_eq!(self_training_gate(&sup, &stricter, 9, 128), (0.95, 1.0));
        assert_eq!(sup.fast_gate, 0.75, "the supervised gate keeps the paper's threshold");
    }

    #[test]
    fn a_last_fast_gate_holds_the_stage_of_last_digits_alone() {
        let sup = SupervisedSettings::default();
        let paper = SelfTrainingSettings::default();
        let last = paper.last_digits;
        assert_eq!(self_training_gate(&sup, &paper, last, 128).0, sup.fast_gate);
        let held = SelfTrainingSettings { last_fast_gate: Some(0.97), ..paper.clone() };
        assert_eq!(self_training_gate(&sup, &held, last - 1, 128).0, sup.fast_gate);
        assert_eq!(self_training_gate(&sup, &held, last, 128), (0.97, 1.0));
        let both = SelfTrainingSettings { fast_gate: Some(0.9), ..held };
        assert_eq!(self_training_gate(&sup, &both, last - 1, 128).0, 0.9);
        assert_eq!(self_training_gate(&sup, &both, last, 128).0, 0.97);
    }

    #[test]
    fn a_label_needs_every_column_swap_variant_to_agree() {
        let problems = [Problem::new("4821", "7395", false), Problem::new("1234", "5678", true)];
        let mut rng = Pcg64::new(1, 2);
        let swaps = ColumnSwaps::draw(&problems, 2, &mut rng);
        assert_eq!(swaps.owners, [0, 0, 1, 1]);
        let answers = [Some("12216".to_string()), Some("6913".to_string())];
        let same = |i: usize| answers[swaps.owners[i]].clone();
        let all_agree: Vec<Option<String>> = (0..4).map(same).collect();
        assert_eq!(swaps.agree(&answers, &all_agree), [true, true]);
        // One variant of the second problem answers differently; an unparsable one disagrees too.
        let mut one_differs = all_agree.clone();
        one_differs[3] = Some("6912".into());
        assert_eq!(swaps.agree(&answers, &one_differs), [true, false]);
        one_differs[0] = None;
        assert_eq!(swaps.agree(&answers, &one_differs), [false, false]);
        // No variants: nothing to disagree with.
        assert_eq!(ColumnSwaps::draw(&problems, 0, &mut rng).agree(&answers, &[]), [true, true]);
    }
}
