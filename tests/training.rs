//! Training: the model learns, runs are reproducible, checkpoints resume
//! exactly and refuse to load when corrupted.

mod common;

use candle_core::{DType, Device};
use common::{copy_examples, max_abs_diff};
use sector::files::sha256_file;
use sector::generate::{greedy, GreedyOptions};
use sector::model::T5Config;
use sector::train::{Example, TrainConfig, Trainer};
use sector::weights::{Model, WEIGHTS_FILE};
use std::path::Path;

fn tiny_trainer(seed: u64, lr: f64, batch_size: usize, dropout: bool) -> Trainer {
    let mut cfg = T5Config::preset("cpu-tiny").unwrap();
    cfg.dropout_rate = 0.1;
    let model = Model::random(&cfg, seed, &Device::Cpu, DType::F32).unwrap();
    let config =
        TrainConfig { lr, batch_size, max_tokens_per_micro_batch: 256, dropout, seed, ..TrainConfig::default() };
    Trainer::new(model, config).unwrap()
}

fn exact_match(trainer: &Trainer, data: &[Example]) -> f64 {
    let inputs: Vec<Vec<u32>> = data.iter().map(|(input, _)| input.clone()).collect();
    let outputs = greedy(&trainer.model.t5, &inputs, GreedyOptions::new(12)).unwrap();
    let right = outputs.iter().zip(data).filter(|(out, (_, target))| out == &target).count();
    right as f64 / data.len() as f64
}

#[test]
fn a_tiny_model_learns_to_copy_digit_strings() {
    // Strings of 1 to 3 digits; held-out strings may also occur in training
    // (there are only 1,110), the point is that greedy decoding gets all right.
    let train = copy_examples(4000, 3, 1);
    let held_out = copy_examples(200, 3, 2);
    let mut trainer = tiny_trainer(0, 1e-3, 32, false);
    let mut accuracy = 0.0;
    for epoch in 1..=MAX_EPOCHS {
        trainer.epoch(&train).unwrap();
        accuracy = exact_match(&trainer, &held_out);
        if accuracy == 1.0 {
            eprintln!("copy learned after {epoch} epochs ({} steps)", trainer.adam.steps);
            break;
        }
    }
    assert_eq!(accuracy, 1.0, "held-out exact match after {MAX_EPOCHS} epochs");
}
/// Measured here: 100 % first after 12 epochs (1,500 steps) and at every
/// epoch from the 15th on; copying up to 4 digits took 12 to 20 epochs,
/// depending on float rounding (the same config in PyTorch learns copying
/// just as slowly).
const MAX_EPOCHS: usize = 20;

/// Trains `epochs` epochs, saving and reloading after each one when `resume`,
/// keeping a running average of the weights at `average`'s decay from the
/// second epoch on.
fn train_run(dir: &Path, epochs: usize, resume: bool, average: Option<f64>) -> Trainer {
    let data = copy_examples(96, 3, 5);
    let mut trainer = tiny_trainer(9, 1e-3, 32, true);
    for epoch in 0..epochs {
        if let (1, Some(decay)) = (epoch, average) {
            trainer.start_average(decay).unwrap();
        }
        trainer.epoch(&data).unwrap();
        if resume {
            let checkpoint = dir.join(format!("epoch-{epoch}"));
            trainer.save(&checkpoint).unwrap();
            trainer = Trainer::load(&checkpoint, &Device::Cpu).unwrap();
        }
    }
    trainer.save(&dir.join("final")).unwrap();
    trainer
}

#[test]
fn same_seed_gives_bit_identical_checkpoints() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train_run(a.path(), 2, false, None);
    train_run(b.path(), 2, false, None);
    for file in [WEIGHTS_FILE, "optimizer.safetensors", "trainer.json", "manifest.sha256"] {
        let (ha, hb) =
            (sha256_file(&a.path().join("final").join(file)), sha256_file(&b.path().join("final").join(file)));
        assert_eq!(ha.unwrap(), hb.unwrap(), "{file}");
    }
}

#[test]
fn save_load_and_continue_equals_never_stopping() {
    let (straight, resumed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train_run(straight.path(), 3, false, None);
    train_run(resumed.path(), 3, true, None);
    for file in [WEIGHTS_FILE, "optimizer.safetensors", "trainer.json"] {
        let hash = |dir: &Path| sha256_file(&dir.join("final").join(file)).unwrap();
        assert_eq!(hash(straight.path()), hash(resumed.path()), "{file}");
    }
}

#[test]
fn a_running_average_is_what_is_saved_and_resumes_exactly() {
    let (straight, resumed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let trainer = train_run(straight.path(), 3, false, Some(0.9));
    train_run(resumed.path(), 3, true, Some(0.9));
    for file in [WEIGHTS_FILE, "optimizer.safetensors", "trainer.json"] {
        let hash = |dir: &Path| sha256_file(&dir.join("final").join(file)).unwrap();
        assert_eq!(hash(straight.path()), hash(resumed.path()), "{file}");
    }
    // The checkpoint's model is the average, not the weights trained on.
    let saved = Model::load(straight.path().join("final").to_str().unwrap(), &Device::Cpu).unwrap();
    let average = trainer.published();
    let trained = &trainer.model;
    for (name, var) in &saved.vars {
        assert_eq!(max_abs_diff(var.as_tensor(), average.vars[name].as_tensor()), 0.0, "{name}");
    }
    let moved: f32 = saved.vars.iter().map(|(n, v)| max_abs_diff(v.as_tensor(), trained.vars[n].as_tensor())).sum();
    assert!(moved > 0.0, "the average equals the trained weights");
    let reloaded = Trainer::load(&straight.path().join("final"), &Device::Cpu).unwrap();
    for (name, var) in &reloaded.model.vars {
        assert_eq!(max_abs_diff(var.as_tensor(), trained.vars[name].as_tensor()), 0.0, "trained {name}");
    }
}

#[test]
fn a_flipped_byte_in_a_checkpoint_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    train_run(dir.path(), 1, false, None);
    let weights = dir.path().join("final").join(WEIGHTS_FILE);
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let err = Trainer::load(&dir.path().join("final"), &Device::Cpu).err().expect("corrupt checkpoint refused");
    let message = err.to_string();
    assert!(matches!(err, sector::Error::HashMismatch { .. }), "{message}");
    assert!(message.contains(WEIGHTS_FILE) && message.contains("manifest.sha256"), "{message}");
}

#[test]
fn gradient_accumulation_equals_one_big_batch() {
    let data = copy_examples(64, 3, 7);
    let batch: Vec<&Example> = data.iter().collect();
    let mut whole = tiny_trainer(4, 1e-3, 64, false);
    whole.config.max_tokens_per_micro_batch = usize::MAX;
    let mut split = tiny_trainer(4, 1e-3, 64, false);
    split.config.max_tokens_per_micro_batch = 64; // about 8 micro-batches
    let (loss_whole, grads_whole) = whole.gradients(&batch).unwrap();
    let (loss_split, grads_split) = split.gradients(&batch).unwrap();
    assert!((loss_whole - loss_split).abs() < 1e-5, "loss {loss_whole} vs {loss_split}");
    assert_eq!(grads_whole.keys().collect::<Vec<_>>(), grads_split.keys().collect::<Vec<_>>());
    for (name, grad) in &grads_whole {
        let scale = grad.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = max_abs_diff(grad, &grads_split[name]);
        assert!(diff <= 1e-4 * scale, "{name}: gradients differ by {diff} (largest entry {scale})");
    }
}

#[test]
fn bf16_training_lowers_the_loss() {
    // The paper-scale path (bf16 weights, f32 Adam state), run on the CPU.
    let cfg = T5Config::preset("cpu-tiny").unwrap();
    let model = Model::random(&cfg, 1, &Device::Cpu, DType::BF16).unwrap();
    let config = TrainConfig {
        lr: 1e-3,
        batch_size: 32,
        max_tokens_per_micro_batch: 256,
        dropout: false,
        seed: 1,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(model, config).unwrap();
    let data = copy_examples(128, 3, 3);
    let first = trainer.epoch(&data).unwrap();
    let mut last = first;
    for _ in 0..4 {
        last = trainer.epoch(&data).unwrap();
    }
    assert!(last < first, "bf16 training lowers the loss: {first} -> {last}");
    assert!(trainer.model.vars.values().all(|v| v.dtype() == DType::BF16));
}

#[test]
fn the_paper_smoke_test_trains_decodes_and_round_trips_a_checkpoint() {
    // `make smoke-paper` at a tiny size: the paper config's first supervised
    // stage, a few steps, greedy decoding, and a checkpoint that reloads to
    // the same logits and is removed afterwards.
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/paper/main.toml");
    let mut experiment = sector::config::Experiment::load(&config).unwrap();
    experiment.model.device = "cpu".into();
    let dir = tempfile::tempdir().unwrap();
    let report = sector::smoke::smoke(&experiment, "cpu-tiny", 3, 8, dir.path()).unwrap();
    assert_eq!(report.params, T5Config::preset("cpu-tiny").unwrap().num_params());
    assert_eq!(report.steps, 3);
    let (before, after) = report.first_batch_loss;
    assert!(after < before, "three Adam steps lower the first batch's loss: {before} -> {after}");
    assert_eq!(report.logits_max_diff, 0.0, "a reloaded checkpoint gives the same logits");
    assert_eq!(report.outputs.len(), report.prompts.len());
    assert!(report.prompts.iter().all(|p| p.starts_with("Add ")), "{:?}", report.prompts);
    assert!(report.checkpoint_bytes > 0);
    assert!(!dir.path().join("cpu-tiny").exists(), "the checkpoint is removed after the check");
    assert!(sector::smoke::table(&[report]).contains("| cpu-tiny |"));
}
