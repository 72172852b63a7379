//! The SECToR loop on the micro config (experiments/micro/main.toml: supervised
//! to 3 digits, self-training to 5): a killed run resumes to the same result,
//! datasets are deterministic, no ground truth above the supervised cap
//! reaches training, and a run directory refuses a different config.

mod common;

use common::records_without_time;
use sector::config::Experiment;
use sector::files::{read_csv, sha256_file};
use sector::parallel::SingleRank;
use sector::provenance::Provenance;
use sector::sector::{run, DataRow, GenerationRecord, Origin, Phase, StageRecord};
use sector::task::{Kind, Oracle, Problem, SlowFormat, TrueOracle};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

fn micro_config() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("experiments/micro/main.toml")
}

fn micro() -> Experiment {
    Experiment::load(&micro_config()).unwrap()
}

/// Ground truth that lies about every problem longer than `cap` digits,
/// and counts how often it lied.
struct PoisonedOracle {
    cap: usize,
    lies: Cell<usize>,
}

impl PoisonedOracle {
    fn new(cap: usize) -> Self {
        PoisonedOracle { cap, lies: Cell::new(0) }
    }

    fn poison(&self, p: &Problem, truth: String, lie: impl FnOnce(String) -> String) -> String {
        if p.digits() <= self.cap {
            return truth;
        }
        self.lies.set(self.lies.get() + 1);
        lie(truth)
    }
}

impl Oracle for PoisonedOracle {
    fn sum(&self, p: &Problem) -> String {
        self.poison(p, p.sum(), |truth| truth + "7")
    }

    fn slow_target(&self, p: &Problem, format: SlowFormat) -> String {
        self.poison(p, p.slow_target(format), |truth| truth.replace("Next", "Then"))
    }
}

/// The uninterrupted run with the true oracle, shared by the tests.
fn reference_run() -> &'static Path {
    static RUN: OnceLock<(tempfile::TempDir, Vec<StageRecord>)> = OnceLock::new();
    let (dir, _) = RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let records = run(micro(), dir.path(), &TrueOracle, Arc::new(SingleRank)).unwrap();
        (dir, records)
    });
    dir.path()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

#[test]
fn the_micro_run_goes_from_supervised_3_to_self_taught_5() {
    let records = records_without_time(&reference_run().join("micro-main"));
    let stages: Vec<(Phase, usize)> = records.iter().map(|r| (r.phase, r.digits)).collect();
    assert_eq!(stages, vec![(Phase::Supervised, 3), (Phase::SelfTraining, 4), (Phase::SelfTraining, 5)]);
    assert_eq!(records.last().unwrap().next_phase, Phase::Stop);
    assert!(records.iter().all(|r| r.epochs == 4 && r.train_examples > 0));
    // Every file the run wrote is in its manifest, with the right hash.
    let dir = reference_run().join("micro-main");
    let manifest = sector::files::Manifest::load(&dir).unwrap();
    manifest.verify(&dir).unwrap();
    for file in files_under(&dir) {
        let name = file.strip_prefix(&dir).unwrap().to_str().unwrap().to_string();
        if !["manifest.sha256", "run.log", sector::files::LOCK_FILE].contains(&name.as_str()) {
            assert!(manifest.entries.contains_key(&name), "{name} is not in the manifest");
        }
    }
}

#[test]
fn a_killed_run_resumes_to_the_same_result() {
    let runs = tempfile::tempdir().unwrap();
    let stages_csv = runs.path().join("micro-main/stages.csv");
    let sector = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sector"))
            .args(["run", micro_config().to_str().unwrap(), "--runs-dir", runs.path().to_str().unwrap()])
            .args(args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = sector(&[]);
    // Kill it as soon as the first stage is recorded: it is then inside stage 2.
    let started = Instant::now();
    while read_csv::<StageRecord>(&stages_csv).map(|r| r.len()).unwrap_or(0) < 1 {
        assert!(started.elapsed() < Duration::from_secs(600), "stage 1 never finished");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
    child.kill().unwrap();
    child.wait().unwrap();
    let finished: Vec<StageRecord> = read_csv(&stages_csv).unwrap();
    assert!(finished.len() < 3, "killed with {} of 3 stages done", finished.len());

    assert!(sector(&[]).wait().unwrap().success(), "the resumed run succeeds");
    let (resumed, reference) = (runs.path().join("micro-main"), reference_run().join("micro-main"));
    assert_eq!(records_without_time(&resumed), records_without_time(&reference));
    // provenance.toml has a session per start: the first from stage 1, the
    // resumed one from the first unfinished stage.
    let sessions =
        |dir: &Path| -> Vec<usize> { Provenance::load(dir).unwrap().session.iter().map(|s| s.from).collect() };
    assert_eq!(sessions(&reference), [1]);
    assert_eq!(sessions(&resumed), [1, finished.len() + 1]);
    // Datasets, checkpoints and results: byte for byte.
    let compared: Vec<PathBuf> = files_under(&reference)
        .into_iter()
        .filter(|f| {
            !["stages.csv", "manifest.sha256", "run.log", "provenance.toml"]
                .contains(&f.file_name().unwrap().to_str().unwrap())
        })
        .collect();
    assert!(compared.iter().any(|f| f.ends_with("data/stage-01.csv")));
    for file in compared {
        let twin = resumed.join(file.strip_prefix(&reference).unwrap());
        assert_eq!(sha256_file(&file).unwrap(), sha256_file(&twin).unwrap(), "{}", file.display());
    }
}

/// Equal row for row; on a difference, shows only the first one.
fn assert_same_rows<T: PartialEq + std::fmt::Debug>(a: &[T], b: &[T], what: &str) {
    if let Some(i) = (0..a.len().min(b.len())).find(|&i| a[i] != b[i]) {
        panic!("{what} differ first at row {i}:\n  honest:    {:?}\n  poisoned:  {:?}", a[i], b[i]);
    }
    assert_eq!(a.len(), b.len(), "{what}: number of rows");
}

/// What training depends on: datasets without their audit column, the
/// checkpoints, and the stage decisions without ground-truth measurements.
fn training_view(run_dir: &Path) -> (Vec<Vec<DataRow>>, Vec<String>, Vec<StageRecord>) {
    let mut data = Vec::new();
    for stage in 1..=3 {
        let mut rows: Vec<DataRow> = read_csv(&run_dir.join(format!("data/stage-{stage:02}.csv"))).unwrap();
        rows.iter_mut().for_each(|r| r.audited_correct = false);
        data.push(rows);
    }
    let checkpoints = files_under(&run_dir.join("checkpoints"))
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "safetensors" || e == "json"))
        .map(|f| sha256_file(f).unwrap())
        .collect();
    let mut records = records_without_time(run_dir);
    for r in &mut records {
        (r.next_fast, r.next_slow, r.accepted_fast_error, r.accepted_slow_error) = (None, None, None, None);
    }
    (data, checkpoints, records)
}

#[test]
fn no_ground_truth_above_the_supervised_cap_reaches_training() {
    let poisoned = tempfile::tempdir().unwrap();
    let oracle = PoisonedOracle::new(3);
    run(micro(), poisoned.path(), &oracle, Arc::new(SingleRank)).unwrap();
    let reference = reference_run().join("micro-main");
    let (honest, lied_to) = (training_view(&reference), training_view(&poisoned.path().join("micro-main")));
    for (stage, (a, b)) in honest.0.iter().zip(&lied_to.0).enumerate() {
        assert_same_rows(a, b, &format!("dataset of stage {}", stage + 1));
    }
    assert_same_rows(&honest.1, &lied_to.1, "checkpoint hashes");
    assert_same_rows(&honest.2, &lied_to.2, "stage records");
    // The lies were told: to what may read the truth above the cap (audits
    // of generated data, evaluation of 4- and 5-digit problems).
    assert!(oracle.lies.get() > 0, "the poisoned oracle was consulted");
}

#[test]
fn the_poison_test_can_fail_a_leak_inside_the_cap_changes_training() {
    // The same lie told from 3 digits up reaches the supervised data of stage 1,
    // so this comparison is able to see a leak.
    let poisoned = tempfile::tempdir().unwrap();
    let mut experiment = micro();
    experiment.self_training.last_digits = 3; // only the supervised stage is needed
    run(experiment, poisoned.path(), &PoisonedOracle::new(2), Arc::new(SingleRank)).unwrap();
    let honest: Vec<DataRow> = read_csv(&reference_run().join("micro-main/data/stage-01.csv")).unwrap();
    let lied_to: Vec<DataRow> = read_csv(&poisoned.path().join("micro-main/data/stage-01.csv")).unwrap();
    assert_ne!(honest, lied_to);
    let weights = |dir: &Path| sha256_file(&dir.join("checkpoints/stage-01/model.safetensors")).unwrap();
    assert_ne!(weights(&reference_run().join("micro-main")), weights(&poisoned.path().join("micro-main")));
}

#[test]
fn a_run_directory_made_by_another_config_is_refused() {
    let runs = tempfile::tempdir().unwrap();
    let mut experiment = micro();
    experiment.self_training.last_digits = 3;
    run(experiment.clone(), runs.path(), &TrueOracle, Arc::new(SingleRank)).unwrap();
    experiment.train.lr = 5e-4;
    let err = run(experiment, runs.path(), &TrueOracle, Arc::new(SingleRank)).unwrap_err().to_string();
    assert!(err.contains("micro-main") && err.contains("another config") && err.contains("Fix"), "{err}");
}

#[test]
fn an_ablation_takes_over_the_supervised_phase_and_refuses_a_different_one() {
    let runs = copy_of_the_reference_run();
    let parent = reference_run().join("micro-main");
    let mut ablation = micro();
    ablation.name = "micro-no-commutativity".into();
    ablation.supervised.from = Some(micro_config().display().to_string());
    ablation.self_training.commutativity_check = false;

    let mut different = ablation.clone();
    different.name = "micro-other-lr".into();
    different.train.lr *= 2.0;
    let err = run(different, runs.path(), &TrueOracle, Arc::new(SingleRank)).unwrap_err().to_string();
    assert!(err.contains("supervised.from") && err.contains("train differs"), "{err}");

    let records = run(ablation, runs.path(), &TrueOracle, Arc::new(SingleRank)).unwrap();
    let own = runs.path().join("micro-no-commutativity");
    let parent_records: Vec<StageRecord> = read_csv(&parent.join("stages.csv")).unwrap();
    // Stage 1 (supervised 1..3) is the parent's, row and files; stages 2 and 3 are its own.
    assert_eq!(records[0], parent_records[0]);
    assert_eq!(
        records.iter().map(|r| (r.phase, r.digits)).collect::<Vec<_>>()[1..],
        [(Phase::SelfTraining, 4), (Phase::SelfTraining, 5)]
    );
    for name in ["data/stage-01.csv", "checkpoints/stage-01/model.safetensors"] {
        assert_eq!(sha256_file(&own.join(name)).unwrap(), sha256_file(&parent.join(name)).unwrap(), "{name}");
    }
    sector::files::Manifest::load(&own).unwrap().verify(&own).unwrap();
    let log = std::fs::read_to_string(own.join("run.log")).unwrap();
    assert!(log.contains("took over stages 1..1"), "{log}");
}

/// Runs `change`d micro config named `name`, taking over the reference run's
/// supervised stage and self-training to 4 digits; returns its runs directory.
fn self_training_from_the_reference(name: &str, change: impl FnOnce(&mut Experiment)) -> tempfile::TempDir {
    let runs = copy_of_the_reference_run();
    let mut experiment = micro();
    experiment.name = name.into();
    experiment.supervised.from = Some(micro_config().display().to_string());
    experiment.self_training.last_digits = 4;
    change(&mut experiment);
    run(experiment, runs.path(), &TrueOracle, Arc::new(SingleRank)).unwrap();
    runs
}

/// A directory holding a copy of the reference run, for runs that take over its stages.
fn copy_of_the_reference_run() -> tempfile::TempDir {
    let runs = tempfile::tempdir().unwrap();
    let parent = reference_run().join("micro-main");
    for file in files_under(&parent) {
        let copy = runs.path().join("micro-main").join(file.strip_prefix(&parent).unwrap());
        std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
        std::fs::copy(&file, copy).unwrap();
    }
    runs
}

#[test]
fn a_self_training_rate_changes_how_self_training_stages_train_and_nothing_before() {
    let runs = self_training_from_the_reference("micro-self-training-lr", |e| e.self_training.lr = Some(1e-5));
    let (own, reference) = (runs.path().join("micro-self-training-lr"), reference_run().join("micro-main"));
    let file = |dir: &Path, name: &str| sha256_file(&dir.join(name)).unwrap();
    // Stage 2's labels come from the same stage-1 model; its training differs.
    assert_eq!(file(&own, "data/stage-02.csv"), file(&reference, "data/stage-02.csv"));
    let weights = "checkpoints/stage-02/model.safetensors";
    assert_ne!(file(&own, weights), file(&reference, weights));
}

#[test]
fn column_swaps_mirrored_steps_and_last_column_variants_check_labels_beside_the_twins() {
    let runs = self_training_from_the_reference("micro-column-swaps", |e| {
        e.self_training.column_swaps = 2;
        e.self_training.mirrored_steps = true;
        e.self_training.last_column_variants = true;
        // Fast labels by the fast method: the micro model's twins agree on most of them.
        e.self_training.fast_labels = sector::config::LabelMethod::Fast;
    });
    let own = runs.path().join("micro-column-swaps");
    let generation: Vec<GenerationRecord> = read_csv(&own.join("generation.csv")).unwrap();
    let kept = |method: &str, check: &str| {
        let row = generation.iter().find(|g| g.method == method && g.check == check);
        row.unwrap_or_else(|| panic!("no {method} / {check} row")).kept
    };
    // Slow labels meet all three stronger checks, fast labels the column swaps.
    let stronger = |method: &str| {
        if method == "slow-greedy" {
            "commutativity+columns+mirror+last-column"
        } else {
            "commutativity+columns"
        }
    };
    for method in ["slow-greedy", "fast", "simplify-only", "simplify-then-guess"] {
        assert!(kept(method, stronger(method)) <= kept(method, "commutativity"), "{method}");
    }
    assert!(kept("fast", "commutativity") > 0, "the check has labels to look at");
    let data: Vec<DataRow> = read_csv(&own.join("data/stage-02.csv")).unwrap();
    let accepted =
        |kind: Kind| data.iter().filter(|r| r.origin == Origin::Model && r.kind == kind && r.accepted).count();
    assert_eq!(accepted(Kind::Fast), kept("fast", stronger("fast")));
    assert_eq!(accepted(Kind::Slow), kept("slow-greedy", stronger("slow-greedy")));
}

#[test]
fn last_column_variants_of_fast_labels_drop_labels_whose_first_step_fails_and_leave_slow_labels_alone() {
    let labelled = |name: &str, on: bool| {
        let runs = self_training_from_the_reference(name, |e| {
            e.self_training.last_column_variants = true;
            e.self_training.fast_last_column_variants = on;
            // Fast labels by the fast method: the micro model's twins agree on many.
            e.self_training.fast_labels = sector::config::LabelMethod::Fast;
        });
        let dir = runs.path().join(name);
        let generation: Vec<GenerationRecord> = read_csv(&dir.join("generation.csv")).unwrap();
        let data: Vec<DataRow> = read_csv(&dir.join("data/stage-02.csv")).unwrap();
        (generation, data)
    };
    let (generation, data) = labelled("micro-fast-last-column", true);
    let (_, plain_data) = labelled("micro-slow-last-column", false);
    let kept = |check: &str| {
        let row = generation.iter().find(|g| g.stage == 2 && g.method == "fast" && g.check == check);
        row.unwrap_or_else(|| panic!("no fast / {check} row")).kept
    };
    // The micro model's first steps do not parse, so the check drops the
    // labels its twins agreed on.
    assert!(kept("commutativity") > 0, "the check has labels to look at");
    assert!(kept("commutativity+last-column") < kept("commutativity"));
    let model_rows = |data: &[DataRow], kind: Kind| -> Vec<DataRow> {
        data.iter().filter(|r| r.origin == Origin::Model && r.kind == kind).cloned().collect()
    };
    let accepted = model_rows(&data, Kind::Fast).iter().filter(|r| r.accepted).count();
    assert_eq!(accepted, kept("commutativity+last-column"));
    assert_eq!(model_rows(&data, Kind::Slow), model_rows(&plain_data, Kind::Slow));
}

#[test]
fn rehearsal_trains_on_string_skills_beside_the_recorded_task_data() {
    let runs = tempfile::tempdir().unwrap();
    let mut rehearsing = micro();
    rehearsing.task.rehearsal = 0.5;
    rehearsing.self_training.last_digits = 3;
    let records = run(rehearsing, runs.path(), &TrueOracle, Arc::new(SingleRank)).unwrap();
    let own = runs.path().join("micro-main");
    let reference = reference_run().join("micro-main");
    // The stage's dataset is the task's alone; its training also saw half as many string-skill examples.
    let stage_file = |dir: &Path, name: &str| sha256_file(&dir.join(name)).unwrap();
    assert_eq!(stage_file(&own, "data/stage-01.csv"), stage_file(&reference, "data/stage-01.csv"));
    let weights = "checkpoints/stage-01/model.safetensors";
    assert_ne!(stage_file(&own, weights), stage_file(&reference, weights));
    let log = std::fs::read_to_string(own.join("run.log")).unwrap();
    let count = (0.5 * records[0].train_examples as f64).round();
    let expected = format!("{count} rehearsal examples of experiments/micro/pretrain.toml");
    assert!(log.contains(&expected), "{expected} not in {log}");
}
