//! String-skill pretraining (src/pretrain.rs) on the micro config: a killed
//! run resumes to the same checkpoint, a run directory refuses another
//! config, and a SECToR run refuses a pretrained checkpoint that does not
//! match its manifest.

use sector::config::Experiment;
use sector::files::sha256_file;
use sector::parallel::SingleRank;
use sector::pretrain::{run_into, PretrainConfig, CHECKPOINT_DIR, PRETRAIN_CSV};
use sector::task::TrueOracle;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn micro() -> PretrainConfig {
    PretrainConfig::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("experiments/micro/pretrain.toml")).unwrap()
}

fn weights(dir: &Path) -> String {
    sha256_file(&dir.join(CHECKPOINT_DIR).join("model.safetensors")).unwrap()
}

#[test]
fn a_resumed_pretraining_ends_as_an_uninterrupted_one() {
    let config = micro();
    assert!(config.train.epochs >= 2);
    let whole = tempfile::tempdir().unwrap();
    let dir = run_into(&config, whole.path()).unwrap();

    // Killed after its first epoch: what is on disk then is what one epoch leaves.
    let parts = tempfile::tempdir().unwrap();
    let mut first = config.clone();
    first.train.epochs = 1;
    let first_dir = run_into(&first, parts.path()).unwrap();
    let config_text = toml::to_string(&config).unwrap();
    std::fs::write(first_dir.join("config.toml"), &config_text).unwrap();
    let resumed = run_into(&config, parts.path()).unwrap();

    assert_eq!(weights(&dir), weights(&resumed));
    let csv = |d: &Path| std::fs::read_to_string(d.join(PRETRAIN_CSV)).unwrap();
    let without_seconds = |text: String| -> Vec<String> {
        text.lines().map(|l| l.rsplit_once(',').map_or(l, |(head, _)| head).to_string()).collect()
    };
    assert_eq!(without_seconds(csv(&dir)), without_seconds(csv(&resumed)));
}

#[test]
fn a_pretraining_directory_refuses_another_config() {
    let runs = tempfile::tempdir().unwrap();
    let mut config = micro();
    config.train.epochs = 1;
    run_into(&config, runs.path()).unwrap();
    config.train.lr *= 2.0;
    let message = run_into(&config, runs.path()).unwrap_err().to_string();
    assert!(message.contains("another config") && message.contains("micro-pretrain"), "{message}");
}

#[test]
fn a_run_refuses_a_corrupt_pretrained_checkpoint() {
    let runs = tempfile::tempdir().unwrap();
    let experiment =
        Experiment::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("experiments/micro/main.toml")).unwrap();
    assert!(experiment.model.pretrain.is_some(), "micro main starts from the micro pretraining");
    let pretrained = run_into(&micro(), runs.path()).unwrap().join(CHECKPOINT_DIR).join("model.safetensors");
    let mut bytes = std::fs::read(&pretrained).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&pretrained, bytes).unwrap();
    let message =
        sector::sector::run(experiment, runs.path(), &TrueOracle, Arc::new(SingleRank)).unwrap_err().to_string();
    assert!(message.contains("model.safetensors") && message.contains("sha256"), "{message}");
}
