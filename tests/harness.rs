//! The reproduction harness against the recorded micro-scale results
//! (results/micro/, figures/micro/): every artifact renders from them to the
//! recorded bytes, `sector verify` passes on them and names a tampered file,
//! and a rerun of the micro pipeline reproduces the recorded datasets
//! exactly and the accuracies within one problem per length.
//!
//! The micro results were recorded with `make all SCALE=micro` on the CI
//! machine type (2 threads). Datasets of supervised stages are the same on
//! any machine; self-generated data and checkpoints are the same on the same
//! machine type and thread count, which is what CI runs on.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sector(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sector")).args(args).output().expect("the sector binary runs")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn flip_a_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

fn manifest(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let (hash, name) = line.split_once("  ").unwrap();
            (name.to_string(), hash.to_string())
        })
        .collect()
}

#[test]
fn every_artifact_renders_from_the_recorded_micro_results_to_the_recorded_files() {
    let work = tempfile::tempdir().unwrap();
    copy_dir(&root().join("results/micro"), &work.path().join("results/micro"));
    std::fs::remove_dir_all(work.path().join("results/micro/tables")).unwrap();
    let out = sector(&["render", "all", "--scale", "micro", "--root", work.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let written: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    // 15 artifacts, each a table (md, csv) or a figure (svg, png), and
    // ablation-self, a table and a figure.
    assert_eq!(written.len(), 2 * 15 + 4, "{written:?}");
    for file in written {
        let rendered = std::fs::read(file).unwrap();
        let relative = Path::new(file).strip_prefix(work.path()).unwrap();
        let recorded = std::fs::read(root().join(relative))
            .unwrap_or_else(|e| panic!("{} is not recorded: {e}", relative.display()));
        assert!(rendered == recorded, "{} differs from the recorded file", relative.display());
        if file.ends_with(".png") {
            assert!(rendered.starts_with(b"\x89PNG"), "{file}");
        }
    }
}

#[test]
fn verify_passes_on_the_recorded_results_and_names_a_tampered_file() {
    let recorded: Vec<PathBuf> = std::fs::read_dir(root().join("results/micro"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("manifest.sha256").exists())
        .collect();
    assert_eq!(recorded.len(), 12, "the eleven micro experiments and the pretraining are recorded: {recorded:?}");
    let mut args = vec!["verify"];
    args.extend(recorded.iter().map(|p| p.to_str().unwrap()));
    let out = sector(&args);
    assert!(out.status.success(), "{}", text(&out));

    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("main");
    copy_dir(&root().join("results/micro/main"), &copy);
    flip_a_byte(&copy.join("accuracy.csv"));
    let out = sector(&["verify", copy.to_str().unwrap()]);
    assert!(!out.status.success());
    let report = text(&out);
    assert!(report.contains("changed") && report.contains("accuracy.csv"), "{report}");
}

/// Reruns the micro main experiment and records it under a scratch root.
fn rerun_micro_main(work: &Path) -> PathBuf {
    let runs = work.join("runs");
    let record = work.join("results/micro/main");
    let config = root().join("experiments/micro/main.toml");
    let out = sector(&[
        "run",
        config.to_str().unwrap(),
        "--runs-dir",
        runs.to_str().unwrap(),
        "--record",
        record.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    runs.join("micro-main")
}

#[test]
fn a_rerun_reproduces_the_recorded_results_and_a_flipped_checkpoint_byte_is_caught() {
    let work = tempfile::tempdir().unwrap();
    let run = rerun_micro_main(work.path());
    let recorded = root().join("results/micro/main");

    // Datasets: exactly the recorded hashes.
    let rerun_hashes = manifest(&run.join("manifest.sha256"));
    let datasets: Vec<&(String, String)> = rerun_hashes.iter().filter(|(name, _)| name.starts_with("data/")).collect();
    assert_eq!(datasets.len(), 3);
    let recorded_hashes = manifest(&recorded.join("run-manifest.sha256"));
    for entry in datasets {
        assert!(recorded_hashes.contains(entry), "{} differs from the recorded dataset", entry.0);
    }

    // Accuracies: within one problem per length of the recorded ones.
    let rows = |path: &Path| -> Vec<Vec<String>> {
        let mut reader = csv::Reader::from_path(path).unwrap();
        reader.records().map(|r| r.unwrap().iter().map(String::from).collect()).collect()
    };
    let (now, then) = (rows(&run.join("accuracy.csv")), rows(&recorded.join("accuracy.csv")));
    assert_eq!(now.len(), then.len());
    for (a, b) in now.iter().zip(&then) {
        assert_eq!(a[..5], b[..5], "stage, phase, digits, length, problems");
        let tolerance = 1.0 / a[4].parse::<f64>().unwrap() + 1e-9;
        for column in 5..8 {
            let (x, y) = (a[column].parse::<f64>().ok(), b[column].parse::<f64>().ok());
            assert_eq!(x.is_some(), y.is_some());
            if let (Some(x), Some(y)) = (x, y) {
                assert!((x - y).abs() <= tolerance, "{a:?} vs recorded {b:?}");
            }
        }
    }

    // The rerun's Table 1 renders to the recorded table.
    let out = sector(&["render", "table1", "--scale", "micro", "--root", work.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let table = "results/micro/tables/table1.md";
    assert_eq!(
        std::fs::read_to_string(work.path().join(table)).unwrap(),
        std::fs::read_to_string(root().join(table)).unwrap()
    );

    // Against the recording, the rerun is held to its datasets and
    // checkpoints: its stages.csv (wall times) is not compared, its datasets
    // match. Checkpoints match only on the recording's machine type, so a
    // mismatch there is allowed here.
    let recorded_manifest = recorded.join("run-manifest.sha256");
    let out = sector(&["verify", run.to_str().unwrap(), "--against", recorded_manifest.to_str().unwrap()]);
    let report = text(&out);
    let mismatches: Vec<&str> =
        report.lines().filter(|l| l.starts_with("missing") || l.starts_with("changed")).collect();
    assert!(mismatches.iter().all(|l| l.contains("/checkpoints/stage-")), "{report}");
    assert!(report.contains("files match"), "{report}");

    // A flipped byte in a checkpoint is named by `sector verify`.
    let out = sector(&["verify", run.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let weights = run.join("checkpoints/stage-01/model.safetensors");
    flip_a_byte(&weights);
    let out = sector(&["verify", run.to_str().unwrap()]);
    assert!(!out.status.success());
    let report = text(&out);
    assert!(report.contains("checkpoints/stage-01/model.safetensors") && report.contains("sha256"), "{report}");
}

#[test]
fn every_experiment_config_loads() {
    use sector::{config::Experiment, fewshot::FewShotConfig, pretrain::PretrainConfig};
    let mut checked = 0;
    for scale in std::fs::read_dir(root().join("experiments")).unwrap() {
        let scale = scale.unwrap().path();
        if !scale.is_dir() {
            continue;
        }
        let sweep = scale.join("sweep");
        let dirs = if sweep.is_dir() { vec![scale.clone(), sweep] } else { vec![scale.clone()] };
        for dir in dirs {
            for file in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()) {
                if file.extension().is_none_or(|e| e != "toml") {
                    continue;
                }
                // A pretraining config has a [strings] table, a few-shot one [[models]].
                let text = std::fs::read_to_string(&file).unwrap();
                let loaded = if text.contains("\n[strings]") {
                    PretrainConfig::load(&file).map(|_| ())
                } else if text.contains("\n[[models]]") {
                    FewShotConfig::load(&file).map(|_| ())
                } else {
                    Experiment::load(&file).map(|_| ())
                };
                loaded.unwrap_or_else(|e| panic!("{e}"));
                checked += 1;
            }
        }
    }
    assert!(checked >= 3 * 8 + 13, "only {checked} configs found");
}
