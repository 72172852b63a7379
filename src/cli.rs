//! The command line: each subcommand maps its flags to one library call.

use crate::answer::Solver;
use crate::config::Experiment;
use crate::eval::{evaluate, read_problems, summarize};
use crate::fewshot::FewShotConfig;
use crate::files::{csv_bytes, record_run, write_atomic, Manifest};
use crate::generate::{greedy_text, GreedyOptions};
use crate::model::select_device;
use crate::parallel::{Collective, SingleRank, ThreadRanks};
use crate::pretrain::PretrainConfig;
use crate::sector::StageRecord;
use crate::task::{SlowFormat, TrueOracle};
use crate::weights::Model;
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "sector", version, about = "SECToR reproduction: ByT5 teaches itself addition")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's greedy output for each prompt, one line each.
    ///
    /// Prompts come from --prompt (repeatable) or --prompts FILE (one per
    /// line, `-` for stdin). Inside a prompt, \n stands for a newline and \\
    /// for a backslash; outputs are written with the same escapes.
    Generate {
        /// A directory with config.json and weights, or a hub id such as google/byt5-small.
        #[arg(long)]
        model: String,
        #[arg(long)]
        prompt: Vec<String>,
        #[arg(long, conflicts_with = "prompt")]
        prompts: Option<PathBuf>,
        #[arg(long, default_value_t = 512)]
        max_new_tokens: usize,
        /// Add this to every digit's place, as training adds a random offset
        /// per example (a model with model.digit_positions): a new length's
        /// slow step can be right at one offset and wrong at another.
        #[arg(long, default_value_t = 0)]
        digit_offset: u32,
        /// Prompts decoded together; it bounds the memory a long prompt file
        /// takes (outputs are the same at any size).
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
        decode_batch: u64,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Run an experiment (supervised curriculum, then self-training) in
    /// RUNS_DIR/<name>; an existing run directory is resumed from its last
    /// finished stage.
    Run {
        /// An experiment config, e.g. experiments/micro/main.toml.
        config: PathBuf,
        #[command(flatten)]
        output: RunOptions,
        /// Train data-parallel on this many GPUs of this machine, one
        /// process each (needs a build with --features nccl).
        #[arg(long, default_value_t = 1)]
        gpus: usize,
        /// Train and decode data-parallel on this many CPU cores: ranks as
        /// threads of this process, one thread each. When every batch is cut
        /// into exactly this many micro-batches (train.micro_batches equal to
        /// it, no part over the token budget), the run's files are those of
        /// one rank, bit for bit.
        #[arg(long, default_value_t = 1)]
        cpu_ranks: usize,
        /// Set by the launcher: this process's rank (and GPU) of --gpus.
        #[arg(long, hide = true, requires = "nccl_id")]
        rank: Option<usize>,
        /// Set by the launcher: the job's NCCL id, as hex.
        #[arg(long, hide = true)]
        nccl_id: Option<String>,
    },
    /// CPU scale: string skills (copy, last digits, drop last digits) on
    /// random numbers, standing in for ByT5's pretraining; the checkpoint
    /// lands in RUNS_DIR/<name>/checkpoint.
    Pretrain {
        /// A pretraining config, e.g. experiments/cpu/pretrain.toml.
        config: PathBuf,
        #[command(flatten)]
        output: RunOptions,
    },
    /// Does one slow step carry to longer numbers? Trains the config's model
    /// on fresh problems of up to [probe] max_digits digits for a bounded
    /// number of steps and reports one-step slow, fast, simplify-only and
    /// simplify-then-guess exact match on the lengths from there on, into
    /// RUNS_DIR/<name>/probe.csv.
    Probe {
        /// An experiment config with a [probe] table, e.g. experiments/cpu/probe/q01-left-o30.toml.
        config: PathBuf,
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
    },
    /// Table 2: models out of the box asked to add with a ten-shot prompt,
    /// into RUNS_DIR/<name>/fewshot.csv.
    Fewshot {
        /// A few-shot config, e.g. experiments/cpu/table2.toml.
        config: PathBuf,
        #[command(flatten)]
        output: RunOptions,
    },
    /// Render tables and figures from the recorded results of a scale:
    /// results/<scale>/ -> results/<scale>/tables/ and figures/<scale>/.
    Render {
        /// Artifact names (table1 ... fig11, ablation-curriculum, emergence, control), or `all`.
        artifacts: Vec<String>,
        /// micro, cpu or paper.
        #[arg(long, default_value = "cpu")]
        scale: String,
        /// The repository root that holds results/ and figures/.
        #[arg(long, default_value = ".")]
        root: PathBuf,
    },
    /// Recompute the sha256 of every file a directory's manifest.sha256
    /// lists (a run directory or recorded results) and name each missing or
    /// changed file; with --against, also hold a rerun's datasets and
    /// checkpoints to a recording (its directory or its run-manifest.sha256;
    /// by bytes where both ran the portable kernels on x86-64 with AVX2 and
    /// FMA; elsewhere the supervised datasets by bytes and the accuracies
    /// within 0.10).
    Verify {
        dirs: Vec<PathBuf>,
        #[arg(long)]
        against: Option<PathBuf>,
    },
    /// Put a problem set (CSV with columns a,b,c) to a checkpoint: per
    /// problem the fast answer, the chain answer and the one-step slow
    /// output, each checked; a per-length summary on stdout.
    Eval {
        /// A directory with config.json and weights, or a hub id.
        #[arg(long)]
        model: String,
        #[arg(long)]
        problems: PathBuf,
        /// Where the per-problem CSV goes.
        #[arg(long)]
        out: PathBuf,
        /// Also write the per-length summary as CSV here.
        #[arg(long)]
        summary: Option<PathBuf>,
        /// The slow format the model was trained with.
        #[arg(long, value_enum, default_value = "english")]
        slow_format: SlowFormat,
        #[arg(long, default_value_t = 256)]
        decode_batch: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// The FLOPs of experiments from their data schedules and model sizes,
    /// and hours on V100, A100 and H100 GPUs, as a Markdown table.
    Cost {
        /// Experiment configs, e.g. experiments/paper/*.toml.
        configs: Vec<PathBuf>,
    },
    /// Paper-scale models from seeded random weights on the CPU: a few
    /// optimiser steps of the config's first supervised stage at a small
    /// batch, greedy decoding, a checkpoint saved, reloaded and compared.
    Smoke {
        /// The paper config whose first stage is trained, e.g. experiments/paper/main.toml.
        config: PathBuf,
        /// Model presets (repeatable).
        #[arg(long = "preset", default_values_t = ["byt5-small".to_string(), "byt5-base".to_string()])]
        presets: Vec<String>,
        /// Optimiser steps per model.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Examples per optimiser step.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Where each checkpoint is written (and removed after the check).
        #[arg(long, default_value = "runs/smoke")]
        out: PathBuf,
        /// Override the config's device (cpu, cuda or cuda:N); CUDA trains in bf16.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Override the config's learning rate (the paper's: 1e-4).
        #[arg(long)]
        lr: Option<f64>,
    },
    /// Measure training and decoding throughput against the machine's f32 matmul rate.
    Bench {
        /// Timed repetitions per case (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Only the cases whose name contains this text.
        #[arg(long, default_value = "")]
        filter: String,
        /// Rounds per case, alternating sector and the peer (the median round is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// A peer benchmark command run after each case with `--case NAME
        /// --reps N`, e.g. "benches/.venv/bin/python benches/peer.py".
        #[arg(long)]
        peer: Option<String>,
    },
}

/// Where `run` and `fewshot` write, and on which device.
#[derive(clap::Args)]
struct RunOptions {
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    /// When done, record the results here (e.g. results/cpu/main).
    #[arg(long)]
    record: Option<PathBuf>,
    /// Override the config's device (cpu, cuda or cuda:N).
    #[arg(long)]
    device: Option<String>,
}

impl RunOptions {
    /// Records the finished run directory when --record was given.
    fn record(&self, run_dir: &std::path::Path) -> anyhow::Result<()> {
        if let Some(dest) = &self.record {
            let recorded = record_run(run_dir, dest)?;
            println!("recorded {} files in {}", recorded.files.len(), dest.display());
            if !recorded.absent.is_empty() {
                println!(
                    "{} datasets and checkpoint files were not on disk (a run carried between machines keeps \
                     only what resuming needs); run-manifest.sha256 holds their hashes as written",
                    recorded.absent.len()
                );
            }
        }
        Ok(())
    }
}

pub fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Generate { model, prompt, prompts, max_new_tokens, digit_offset, decode_batch, device } => {
            let prompts = match prompts {
                Some(path) => read_prompts(&path)?,
                None => prompt,
            };
            if prompts.is_empty() {
                anyhow::bail!("no prompts: pass --prompt TEXT or --prompts FILE (or - for stdin)");
            }
            let device = select_device(&device)?;
            let model = Model::load(&model, &device)?;
            if digit_offset > 0 && model.config().digit_positions.is_none() {
                anyhow::bail!("--digit-offset {digit_offset}: the model has no digit places (model.digit_positions); leave it out");
            }
            let prompts: Vec<String> = prompts.iter().map(|p| unescape(p)).collect();
            let opts = GreedyOptions { digit_offset, ..GreedyOptions::new(max_new_tokens) };
            for batch in prompts.chunks(decode_batch as usize) {
                for output in greedy_text(&model.t5, batch, opts)? {
                    println!("{}", escape(&output));
                }
            }
        }
        Command::Run { config, output, gpus, cpu_ranks, rank, nccl_id } => {
            let mut experiment = Experiment::load(&config)?;
            if let Some(device) = &output.device {
                experiment.model.device = device.clone();
                // model.dtype, when given, must suit the new device.
                experiment.model.check(&config)?;
            }
            let run_dir = output.runs_dir.join(&experiment.name);
            let (name, scale) = (experiment.name.clone(), experiment.scale.clone());
            if cpu_ranks == 0 {
                anyhow::bail!("--cpu-ranks must be at least 1");
            }
            if gpus > 1 && cpu_ranks > 1 {
                anyhow::bail!("--gpus {gpus} and --cpu-ranks {cpu_ranks}: choose one kind of rank");
            }
            let records = match (gpus, rank, nccl_id) {
                (0, _, _) => anyhow::bail!("--gpus must be at least 1"),
                (1, _, _) => run_on_cpu_ranks(experiment, &output.runs_dir, cpu_ranks)?,
                (_, None, _) => {
                    launch_ranks(&config, &output.runs_dir, gpus)?;
                    return output.record(&run_dir);
                }
                (_, Some(rank), Some(id)) => {
                    let (ranks, device) = join_rank(rank, gpus, &id)?;
                    experiment.model.device = device;
                    let records = crate::sector::run(experiment, &output.runs_dir, &TrueOracle, ranks)?;
                    if rank > 0 {
                        return Ok(());
                    }
                    records
                }
                (_, Some(_), None) => unreachable!("clap requires --nccl-id with --rank"),
            };
            println!("{} stages:", records.len());
            for record in &records {
                println!("{}", crate::sector::stage_summary(record));
            }
            let finals = crate::files::read_csv(&run_dir.join(crate::analysis::FINAL_CSV))?;
            println!("\n{}", crate::sector::run_summary(&name, &scale, &records, &finals));
            if rank.is_none() {
                output.record(&run_dir)?;
            }
        }
        Command::Pretrain { config, output } => {
            let mut config = PretrainConfig::load(&config)?;
            if let Some(device) = &output.device {
                config.model.device = device.clone();
            }
            output.record(&crate::pretrain::run_into(&config, &output.runs_dir)?)?;
        }
        Command::Probe { config, runs_dir } => {
            let experiment = Experiment::load(&config)?;
            let probe = experiment.probe.clone().ok_or_else(|| crate::Error::Config {
                path: config.clone(),
                field: "probe".into(),
                problem: "is missing: add a [probe] table (max_digits, steps, eval_every, ...)".into(),
            })?;
            if experiment.model.pretrain.is_some() {
                return Err(crate::Error::Config {
                    path: config.clone(),
                    field: "model.pretrain".into(),
                    problem: "is set, but a probe starts from a preset or weights: give model.preset instead".into(),
                }
                .into());
            }
            let records = crate::probe::run_into(&experiment, &probe, &runs_dir)?;
            println!("| step | digits | slow | fast | simplify-only | simplify-then-guess |\n|---:|---:|---:|---:|---:|---:|");
            let last = records.last().map_or(0, |r| r.step);
            for r in records.iter().filter(|r| r.step == last) {
                println!(
                    "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                    r.step, r.digits, r.slow, r.fast, r.simplify_only, r.simplify_then_guess
                );
            }
        }
        Command::Fewshot { config, output } => {
            let mut config = FewShotConfig::load(&config)?;
            if let Some(device) = &output.device {
                config.device = device.clone();
            }
            output.record(&crate::fewshot::run_into(&config, &output.runs_dir)?)?;
        }
        Command::Render { artifacts, scale, root } => {
            let paths = crate::report::Paths::new(&root, &scale);
            let names: Vec<String> = if artifacts.iter().any(|a| a == "all") {
                crate::report::ARTIFACTS.iter().map(|a| a.name.to_string()).collect()
            } else {
                artifacts
            };
            for name in &names {
                for path in crate::report::render(name, &paths)? {
                    println!("{}", path.display());
                }
            }
        }
        Command::Verify { dirs, against } => {
            let mut failed = false;
            for dir in &dirs {
                let (notes, problems, summary) = match &against {
                    Some(recorded) => {
                        let check = crate::provenance::check_rerun(dir, recorded)?;
                        (check.notes, check.problems, check.summary)
                    }
                    None => {
                        let manifest = Manifest::load(dir)?;
                        let problems = manifest.problems(dir);
                        let matching = manifest.entries.len() - problems.len();
                        let summary =
                            format!("{}: {matching} of {} files match", dir.display(), manifest.entries.len());
                        (Vec::new(), problems, summary)
                    }
                };
                for line in notes.iter().chain(&problems) {
                    println!("{line}");
                }
                println!("{summary}");
                failed |= !problems.is_empty();
            }
            if failed {
                anyhow::bail!("verification failed: see the files named above");
            }
        }
        Command::Eval { model, problems, out, summary, slow_format, decode_batch, device } => {
            let problems = read_problems(&problems)?;
            let device = select_device(&device)?;
            let model = Model::load(&model, &device)?;
            let progress = indicatif::ProgressBar::new(problems.len() as u64 * 2).with_style(
                indicatif::ProgressStyle::with_template("answering: {pos} rows decoded, {per_sec}, {elapsed}")?,
            );
            let solver = Solver {
                model: &model.t5,
                format: slow_format,
                decode_batch,
                progress,
                collective: &SingleRank,
                digit_offsets: Vec::new(),
            };
            let results = evaluate(&solver, &problems, &TrueOracle)?;
            write_atomic(&out, &csv_bytes(&results, &out)?)?;
            let lengths = summarize(&results);
            println!("| digits | problems | fast | chain | one-step slow |\n|---:|---:|---:|---:|---:|");
            for s in &lengths {
                let slow = s.slow_accuracy.map_or("-".into(), |a| format!("{a:.3}"));
                println!(
                    "| {} | {} | {:.3} | {:.3} | {slow} |",
                    s.digits, s.problems, s.fast_accuracy, s.chain_accuracy
                );
            }
            if let Some(path) = summary {
                write_atomic(&path, &csv_bytes(&lengths, &path)?)?;
            }
        }
        Command::Cost { configs } => {
            let mut costs = Vec::new();
            for path in &configs {
                let experiment = Experiment::load(path)?;
                let (cfg, model) = experiment.model_config_for_cost(path)?;
                costs.push(crate::cost::cost(&experiment, &cfg, &model));
            }
            print!("{}", crate::cost::table(&costs));
        }
        Command::Smoke { config, presets, steps, batch, out, device, lr } => {
            let mut experiment = Experiment::load(&config)?;
            experiment.model.device = device;
            experiment.model.check(&config)?;
            if let Some(lr) = lr {
                experiment.train.lr = lr;
            }
            if let Some(unknown) = presets.iter().find(|p| crate::model::T5Config::preset(p).is_none()) {
                anyhow::bail!("--preset {unknown}: not a preset; use byt5-small or byt5-base");
            }
            let mut reports = Vec::new();
            for preset in &presets {
                eprintln!("smoke: {preset}, {steps} steps of {batch} examples ...");
                reports.push(crate::smoke::smoke(&experiment, preset, steps, batch, &out)?);
            }
            print!("{}", crate::smoke::table(&reports));
        }
        Command::Bench { reps, rounds, filter, peer } => crate::bench::run(reps, rounds, &filter, peer.as_deref())?,
    }
    Ok(())
}

/// Starts one `sector run` process per GPU, each told its rank and the
/// job's NCCL id, and waits for all of them; they write RUNS_DIR/<name>.
#[cfg(feature = "nccl")]
fn launch_ranks(config: &std::path::Path, runs_dir: &std::path::Path, gpus: usize) -> anyhow::Result<()> {
    let id = crate::parallel::NcclId::new()?.to_hex();
    let exe = std::env::current_exe().context("cannot find the sector executable to launch the ranks")?;
    let mut children = Vec::new();
    for rank in 0..gpus {
        let child = std::process::Command::new(&exe)
            .arg("run")
            .arg(config)
            .arg("--runs-dir")
            .arg(runs_dir)
            .args(["--gpus", &gpus.to_string(), "--rank", &rank.to_string(), "--nccl-id", &id])
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"))?;
        children.push(child);
    }
    let mut failed = Vec::new();
    for (rank, mut child) in children.into_iter().enumerate() {
        if !child.wait().with_context(|| format!("rank {rank}"))?.success() {
            failed.push(rank.to_string());
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("rank(s) {} failed: see their messages above; rerun to resume", failed.join(", "));
    }
    Ok(())
}

/// Runs `experiment` with `ranks` data-parallel ranks on the CPU and returns
/// rank 0's stage records. Each rank is a thread with a one-thread rayon pool
/// of its own, so the ranks' kernels never queue for one shared worker. A
/// rank that fails ends the process: the others would wait for it forever.
fn run_on_cpu_ranks(
    experiment: Experiment,
    runs_dir: &std::path::Path,
    ranks: usize,
) -> anyhow::Result<Vec<StageRecord>> {
    match ranks {
        1 => return Ok(crate::sector::run(experiment, runs_dir, &TrueOracle, Arc::new(SingleRank))?),
        _ if experiment.model.device != "cpu" => {
            anyhow::bail!("--cpu-ranks {ranks}: the model is on {}; use --gpus for GPUs", experiment.model.device)
        }
        _ => {}
    }
    if experiment.train.micro_batches != ranks {
        eprintln!(
            "note: train.micro_batches is {}, not {ranks}: the ranks share training unevenly, and the weights \
             need not be one rank's bit for bit",
            experiment.train.micro_batches
        );
    }
    // The ranks are the parallelism: candle's kernels and gemm read their
    // thread count from here. No other thread runs yet.
    std::env::set_var("RAYON_NUM_THREADS", "1");
    // Stacks as roomy as the main thread's and more: the backward pass walks
    // the graph recursively.
    let pools = (0..ranks)
        .map(|_| rayon::ThreadPoolBuilder::new().num_threads(1).stack_size(64 << 20).build())
        .collect::<Result<Vec<_>, _>>()
        .context("cannot start the ranks' threads")?;
    std::thread::scope(|scope| {
        let handles: Vec<_> = ThreadRanks::group(ranks)
            .into_iter()
            .zip(&pools)
            .map(|(collective, pool)| {
                let experiment = experiment.clone();
                scope.spawn(move || {
                    let rank = collective.rank();
                    let run =
                        || pool.install(|| crate::sector::run(experiment, runs_dir, &TrueOracle, Arc::new(collective)));
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                        Ok(Ok(records)) => records,
                        Ok(Err(err)) => {
                            eprintln!("error on rank {rank} of {ranks}: {err:#}");
                            std::process::exit(1)
                        }
                        // The panic hook has printed the message.
                        Err(_) => std::process::exit(101),
                    }
                })
            })
            .collect();
        let mut records: Vec<_> =
            handles.into_iter().map(|handle| handle.join().expect("a rank's panic ends the process")).collect();
        Ok(records.swap_remove(0))
    })
}

/// Joins a launched job as `rank` on GPU `rank`; returns the ranks and the device name.
#[cfg(feature = "nccl")]
fn join_rank(rank: usize, gpus: usize, id: &str) -> anyhow::Result<(Arc<dyn Collective>, String)> {
    let id = crate::parallel::NcclId::from_hex(id)?;
    let ranks = crate::parallel::NcclRanks::join(rank, gpus, &id)?;
    Ok((Arc::new(ranks), format!("cuda:{rank}")))
}

#[cfg(not(feature = "nccl"))]
fn launch_ranks(_: &std::path::Path, _: &std::path::Path, gpus: usize) -> anyhow::Result<()> {
    Err(without_nccl(gpus))
}

#[cfg(not(feature = "nccl"))]
fn join_rank(_: usize, gpus: usize, _: &str) -> anyhow::Result<(Arc<dyn Collective>, String)> {
    Err(without_nccl(gpus))
}

#[cfg(not(feature = "nccl"))]
fn without_nccl(gpus: usize) -> anyhow::Error {
    anyhow::anyhow!(
        "--gpus {gpus} needs NCCL: build with `cargo build --release --features nccl` (REPRODUCE.md, paper \
         scale), or run on one device without --gpus"
    )
}

fn read_prompts(path: &PathBuf) -> anyhow::Result<Vec<String>> {
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open prompts file {}", path.display()))?;
        Box::new(std::io::BufReader::new(file))
    };
    reader
        .lines()
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot read prompts from {}", path.display()))
}

/// `\n` -> newline, `\\` -> backslash; any other backslash stays as it is.
pub fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some('n')) => {
                out.push('\n');
                chars.next();
            }
            ('\\', Some('\\')) => {
                out.push('\\');
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

/// The inverse of `unescape`, so each output fits on one line.
pub fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_round_trip() {
        for text in ["Add fast.\nQ: 1 + 2 = ?", "a\\nb", "back\\", "x\\\ny"] {
            assert_eq!(unescape(&escape(text)), text);
        }
        assert_eq!(unescape("Add fast.\\nQ: 1 + 2 = ?"), "Add fast.\nQ: 1 + 2 = ?");
    }
}
