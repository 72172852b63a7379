//! Data parallelism (src/parallel.rs) with two ranks as threads summing in
//! shared memory, the CPU stand-in for NCCL: the ranks take the same steps
//! as one process, decode what one process decodes, and a two-rank SECToR
//! run writes the single-process run's datasets and records.

mod common;

use candle_core::{DType, Device};
use common::{copy_examples, max_abs_diff, records_without_time};
use sector::answer::Solver;
use sector::config::Experiment;
use sector::files::{sha256_file, Manifest};
use sector::model::T5Config;
use sector::parallel::{Collective, SingleRank, ThreadRanks};
use sector::sector::run;
use sector::task::{sample_unique, Kind, SlowFormat, TrueOracle};
use sector::train::{micro_batches, Example, TrainConfig, Trainer};
use sector::weights::Model;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

fn tiny_trainer(collective: Arc<dyn Collective>) -> Trainer {
    let cfg = T5Config::preset("cpu-tiny").unwrap();
    let model = Model::random(&cfg, 3, &Device::Cpu, DType::F32).unwrap();
    // A small token budget cuts each batch of 32 into several micro-batches.
    let config = TrainConfig {
        lr: 1e-3,
        batch_size: 32,
        max_tokens_per_micro_batch: 40,
        dropout: false,
        seed: 3,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(model, config).unwrap();
    trainer.collective = collective;
    trainer
}

/// Runs `work` once per rank of a two-rank group, each on its own thread.
fn on_two_ranks<T: Send>(work: impl Fn(Arc<dyn Collective>) -> T + Sync) -> Vec<T> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = ThreadRanks::group(2)
            .into_iter()
            .map(|rank| {
                let work = &work;
                scope.spawn(move || work(Arc::new(rank)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn two_ranks_take_the_same_steps_as_one_process() {
    let data: Vec<Example> = copy_examples(128, 3, 4);
    let batch: Vec<&Example> = data[..32].iter().collect();
    assert!(micro_batches(&batch, 40, 1).len() >= 4, "the test needs batches split across ranks");
    let train = |trainer: &mut Trainer| (0..2).map(|_| trainer.epoch(&data).unwrap()).collect::<Vec<f32>>();

    let mut single = tiny_trainer(Arc::new(SingleRank));
    let single_losses = train(&mut single);
    let ranks = on_two_ranks(|collective| {
        let mut trainer = tiny_trainer(collective);
        let losses = train(&mut trainer);
        (trainer, losses)
    });

    for (name, var) in &single.model.vars {
        let (zero, one) = (ranks[0].0.model.vars[name].as_tensor(), ranks[1].0.model.vars[name].as_tensor());
        // The ranks apply the same summed gradient: bit for bit the same weights.
        assert_eq!(max_abs_diff(zero, one), 0.0, "{name} differs between the ranks");
        // One process sums the same micro-batch gradients in another order.
        // Adam divides by the root of the second moment, so where a gradient
        // is near zero a rounding-level difference can move an update by a
        // visible fraction of lr; 1 % of the most any weight can have moved
        // (steps x lr) is far below any real difference in training.
        let diff = max_abs_diff(var.as_tensor(), zero);
        let bound = 0.01 * single.adam.steps as f32 * 1e-3;
        assert!(diff < bound, "{name}: two ranks differ from one process by {diff} (bound {bound})");
    }
    for (rank, (_, losses)) in ranks.iter().enumerate() {
        for (one, two) in single_losses.iter().zip(losses) {
            assert!((one - two).abs() < 1e-5, "rank {rank}: epoch loss {two}, one process {one}");
        }
    }
}

#[test]
fn with_a_micro_batch_per_rank_two_ranks_take_one_process_s_steps_bit_for_bit() {
    let data: Vec<Example> = copy_examples(128, 3, 4);
    let halves = |collective: Arc<dyn Collective>| {
        let mut trainer = tiny_trainer(collective);
        (trainer.config.max_tokens_per_micro_batch, trainer.config.micro_batches) = (1 << 20, 2);
        trainer
    };
    for batch in data.chunks(32) {
        let batch: Vec<&Example> = batch.iter().collect();
        assert_eq!(micro_batches(&batch, 1 << 20, 2).len(), 2, "one micro-batch per rank in every batch");
    }
    let mut single = halves(Arc::new(SingleRank));
    let single_losses: Vec<f32> = (0..2).map(|_| single.epoch(&data).unwrap()).collect();
    let ranks = on_two_ranks(|collective| {
        let mut trainer = halves(collective);
        let losses: Vec<f32> = (0..2).map(|_| trainer.epoch(&data).unwrap()).collect();
        (trainer, losses)
    });
    for (rank, (trainer, losses)) in ranks.iter().enumerate() {
        assert_eq!(losses, &single_losses, "rank {rank}: epoch losses");
        for (name, var) in &single.model.vars {
            let diff = max_abs_diff(var.as_tensor(), trainer.model.vars[name].as_tensor());
            assert_eq!(diff, 0.0, "rank {rank}: {name} differs from one process");
        }
    }
}

#[test]
fn two_ranks_decode_what_one_process_decodes() {
    let cfg = T5Config::preset("cpu-tiny").unwrap();
    let model = Model::random(&cfg, 5, &Device::Cpu, DType::F32).unwrap();
    let mut rng = rand_pcg::Pcg64::new(5, 0);
    let problems = sample_unique(&mut rng, 3, 45, &HashSet::new());
    let ask = |collective: &dyn Collective| {
        let solver = Solver {
            model: &model.t5,
            format: SlowFormat::Compact,
            decode_batch: 8,
            progress: indicatif::ProgressBar::hidden(),
            collective,
            digit_offsets: Vec::new(),
        };
        (solver.ask(&problems, Kind::Slow).unwrap(), solver.fast(&problems).unwrap())
    };
    let single = ask(&SingleRank);
    for (rank, outputs) in on_two_ranks(|collective| ask(collective.as_ref())).into_iter().enumerate() {
        assert_eq!(outputs, single, "rank {rank}");
    }
}

/// The micro run with `train.micro_batches` set, once in one process and
/// once on two ranks; the temporary directories hold the two run directories.
fn micro_run_on_one_and_two_ranks(micro_batches: usize) -> [tempfile::TempDir; 2] {
    let micro = || {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/micro/main.toml");
        let mut experiment = Experiment::load(&path).unwrap();
        experiment.train.micro_batches = micro_batches;
        experiment
    };
    let single = tempfile::tempdir().unwrap();
    run(micro(), single.path(), &TrueOracle, Arc::new(SingleRank)).unwrap();
    let two = tempfile::tempdir().unwrap();
    on_two_ranks(|collective| run(micro(), two.path(), &TrueOracle, collective).unwrap());
    [single, two]
}

#[test]
fn a_two_rank_run_writes_the_single_process_datasets_and_records() {
    let dirs = micro_run_on_one_and_two_ranks(1);
    let [single, two] = dirs.each_ref().map(|dir| dir.path().join("micro-main"));
    let records = records_without_time(&single);
    assert!(records.len() >= 3, "the micro run has supervised and self-training stages");
    assert_eq!(records_without_time(&two), records);
    for record in &records {
        let data = format!("data/stage-{:02}.csv", record.stage);
        assert_eq!(sha256_file(&two.join(&data)).unwrap(), sha256_file(&single.join(&data)).unwrap(), "{data}");
    }
    // One writer: the run directory is whole and its manifest verifies.
    let manifest = Manifest::load(&two).unwrap();
    assert_eq!(manifest.problems(&two), Vec::<String>::new());
}

#[test]
fn with_train_micro_batches_2_a_two_rank_run_writes_the_single_process_checkpoints() {
    let dirs = micro_run_on_one_and_two_ranks(2);
    let [single, two] = dirs.each_ref().map(|dir| dir.path().join("micro-main"));
    let (single_files, two_files) = (Manifest::load(&single).unwrap(), Manifest::load(&two).unwrap());
    let saved: Vec<&String> = single_files
        .entries
        .keys()
        .filter(|name| name.starts_with("checkpoints/") || name.starts_with("data/"))
        .collect();
    assert!(saved.iter().any(|name| name.ends_with("model.safetensors")), "the run saved checkpoints");
    for name in saved {
        assert_eq!(two_files.entries.get(name), single_files.entries.get(name), "{name}");
    }
}
