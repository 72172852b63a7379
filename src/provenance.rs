//! What produced a run: the machine, the kernels and the build, written to
//! the run directory as provenance.toml (one entry per start or resume), and
//! whether a rerun's bytes can be held to a recording's.
//!
//! Checkpoints have the same bits on every x86-64 CPU with AVX2 and FMA when
//! the kernels are the portable ones (src/matmul.rs), whatever the thread
//! count. Elsewhere (native kernels, another architecture, a GPU) a rerun is
//! compared by its accuracies instead (REPRODUCE.md, "Hashes").

use crate::error::{Error, Result};
use crate::files::{Manifest, RUN_MANIFEST};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const PROVENANCE_FILE: &str = "provenance.toml";

/// Where a rerun's accuracies may differ from the recording's when its
/// bytes cannot be compared: an absolute difference, per length and stage.
pub const ACCURACY_TOLERANCE: f64 = 0.10;

/// The machine and kernels a stretch of a run ran on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub arch: String,
    /// /proc/cpuinfo's model name.
    pub cpu: String,
    /// The CPU features gemm dispatches on, of avx2, fma, avx512f.
    pub features: Vec<String>,
    /// The L1d, L2 and L3 as sysfs reports them (what gemm reads).
    pub caches: String,
    pub threads: usize,
    /// "portable" or "native" (src/matmul.rs) for the CPU; the device otherwise.
    pub kernels: String,
}

/// The build that ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Build {
    pub sector: String,
    /// `git describe --always --dirty` of the source tree at build time.
    pub commit: String,
    pub rustc: String,
    /// sha256 of Cargo.lock: every crate's version.
    pub cargo_lock_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// The first stage (or epoch) this session ran.
    pub from: usize,
    pub machine: Machine,
    pub build: Build,
    /// Data-parallel ranks (`sector run --gpus` or `--cpu-ranks`).
    #[serde(default = "crate::train::single", skip_serializing_if = "crate::train::is_single")]
    pub ranks: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub session: Vec<Session>,
}

impl Machine {
    /// This process's machine, for a run on `device` ("cpu", "cuda", "cuda:1").
    pub fn current(device: &str) -> Result<Machine> {
        let kernels = if device == "cpu" {
            crate::matmul::Kernels::current().map_err(Error::Candle)?.name().to_string()
        } else {
            device.to_string()
        };
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| info.lines().find(|l| l.starts_with("model name")).map(|l| l.to_string()))
            .and_then(|line| line.split_once(':').map(|(_, name)| name.trim().to_string()))
            .unwrap_or_else(|| "unknown".into());
        Ok(Machine {
            arch: std::env::consts::ARCH.to_string(),
            cpu,
            features: cpu_features(),
            caches: caches(),
            threads: candle_core::utils::get_num_threads(),
            kernels,
        })
    }

    /// Why bytes made here cannot be held to bytes made on `other`, or
    /// None when they must be identical.
    pub fn incomparable_with(&self, other: &Machine) -> Option<String> {
        let portable = |m: &Machine| {
            m.arch == "x86_64"
                && m.kernels == "portable"
                && ["avx2", "fma"].iter().all(|f| m.features.iter().any(|g| g == f))
        };
        match (portable(self), portable(other)) {
            (true, true) => None,
            _ => Some(format!(
                "bytes are identical only between x86-64 CPUs with AVX2 and FMA running the portable kernels; \
                 the recording ran on {} and this rerun on {}",
                other.describe(),
                self.describe()
            )),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} ({}, {}; {}; {} threads, {} kernels)",
            self.cpu,
            self.arch,
            if self.features.is_empty() { "none of avx2, fma, avx512f".into() } else { self.features.join(" ") },
            self.caches,
            self.threads,
            self.kernels
        )
    }
}

impl Build {
    pub fn current() -> Build {
        Build {
            sector: env!("CARGO_PKG_VERSION").to_string(),
            commit: env!("SECTOR_COMMIT").to_string(),
            rustc: env!("SECTOR_RUSTC").to_string(),
            cargo_lock_sha256: crate::files::sha256_hex(include_bytes!("../Cargo.lock")),
        }
    }
}

impl Provenance {
    pub fn load(dir: &Path) -> Result<Provenance> {
        let path = dir.join(PROVENANCE_FILE);
        if !path.exists() {
            return Ok(Provenance::default());
        }
        let text = String::from_utf8_lossy(&crate::files::read(&path)?).into_owned();
        toml::from_str(&text).map_err(|e| {
            Error::format(&path, format!("cannot read: {e}. Fix: restore it from the run's manifest, or delete it"))
        })
    }

    /// Appends this process's session (from stage or epoch `from`, on
    /// `ranks` data-parallel ranks) to the run's dir/provenance.toml (a fresh
    /// one if `manifest` does not list it), written through the manifest.
    pub fn record_session(
        dir: &Path,
        manifest: &mut Manifest,
        from: usize,
        device: &str,
        ranks: usize,
    ) -> Result<Machine> {
        let mut provenance =
            if manifest.entries.contains_key(PROVENANCE_FILE) { Provenance::load(dir)? } else { Provenance::default() };
        let machine = Machine::current(device)?;
        provenance.session.push(Session { from, machine: machine.clone(), build: Build::current(), ranks });
        let text = toml::to_string(&provenance).expect("provenance serialises");
        manifest.write_file(dir, PROVENANCE_FILE, text.as_bytes())?;
        manifest.save(dir)?;
        Ok(machine)
    }
}

fn cpu_features() -> Vec<String> {
    #[cfg(target_arch = "x86_64")]
    {
        let detected = [
            ("avx2", is_x86_feature_detected!("avx2")),
            ("fma", is_x86_feature_detected!("fma")),
            ("avx512f", is_x86_feature_detected!("avx512f")),
        ];
        detected.iter().filter(|(_, on)| *on).map(|(name, _)| name.to_string()).collect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

/// cpu0's data and unified caches from sysfs, e.g. "L1d 48K 12-way, L2 1024K
/// 16-way, L3 32768K 16-way".
fn caches() -> String {
    let base = Path::new("/sys/devices/system/cpu/cpu0/cache");
    let read = |index: &Path, name: &str| std::fs::read_to_string(index.join(name)).map(|s| s.trim().to_string());
    let mut entries: Vec<(String, String)> = Vec::new();
    for i in 0..8 {
        let index = base.join(format!("index{i}"));
        let (Ok(level), Ok(kind), Ok(size)) = (read(&index, "level"), read(&index, "type"), read(&index, "size"))
        else {
            continue;
        };
        if kind == "Instruction" {
            continue;
        }
        let ways = read(&index, "ways_of_associativity").unwrap_or_else(|_| "?".into());
        let name = if kind == "Data" { format!("L{level}d") } else { format!("L{level}") };
        entries.push((name, format!("{size} {ways}-way")));
    }
    if entries.is_empty() {
        return "caches unknown".into();
    }
    entries.iter().map(|(name, size)| format!("{name} {size}")).collect::<Vec<_>>().join(", ")
}

/// The results CSVs whose accuracies are compared when bytes cannot be, and
/// their accuracy columns (rows are matched in order; other columns, such as
/// the stage and length, must be equal).
const RESULTS: [&str; 4] = ["accuracy.csv", "final.csv", "pretrain.csv", "fewshot.csv"];
const ACCURACY_COLUMNS: [&str; 7] = ["fast", "chain", "slow", "copy", "last_digits", "drop_last_digits", "accuracy"];
/// Columns that are expected to differ between machines.
const UNCOMPARED_COLUMNS: [&str; 2] = ["seconds", "loss"];

/// What `sector verify RUN --against RECORDING` found:
/// how it compared, one line per problem, and a summary.
pub struct RerunCheck {
    pub notes: Vec<String>,
    pub problems: Vec<String>,
    pub summary: String,
}

/// Holds a rerun to its recording. First the rerun's files against its own
/// manifest (a flipped byte is named as such). Then, where both ran the
/// portable kernels on x86-64 with AVX2 and FMA, every dataset and
/// checkpoint the recording lists must have its bytes; elsewhere only the
/// supervised datasets (made by the script, not the model) must, and the
/// results CSVs' accuracies must be within [`ACCURACY_TOLERANCE`].
/// `recorded` is the recording's run-manifest.sha256 or its directory.
pub fn check_rerun(run_dir: &Path, recorded: &Path) -> Result<RerunCheck> {
    let recorded_manifest = if recorded.is_dir() { recorded.join(RUN_MANIFEST) } else { recorded.to_path_buf() };
    let recorded_manifest = recorded_manifest.as_path();
    // Every file is hashed once, here; below the rerun's manifest stands for
    // its files (any file that disagrees with it is already a problem).
    let own = Manifest::load(run_dir)?;
    let failing = own.failing(run_dir);
    let mut problems: Vec<String> = failing.values().cloned().collect();
    let recording_dir = recorded_manifest.parent().unwrap_or(Path::new("."));
    let mut recorded = Manifest::load_file(recorded_manifest)?;
    // The results CSVs carry wall times; their numbers are compared below or
    // by the regression tests.
    recorded.entries.retain(|name, _| name.contains('/'));
    let (present, past) = (Provenance::load(run_dir)?, Provenance::load(recording_dir)?);
    let incomparable = present.incomparable_with(&past);
    let mut notes = Vec::new();
    if let Some(reason) = &incomparable {
        let supervised = supervised_datasets(recording_dir)?;
        recorded.entries.retain(|name, _| supervised.contains(name));
        notes.push(format!(
            "checkpoints and self-generated data not compared by bytes: {reason}. Comparing the supervised \
             datasets by bytes and the accuracies within {ACCURACY_TOLERANCE:.2} instead"
        ));
        for name in RESULTS.iter().filter(|name| recording_dir.join(name).exists()) {
            problems.extend(compare_accuracies(&run_dir.join(name), &recording_dir.join(name))?);
        }
    }
    let mut matching = 0;
    for (name, expected) in &recorded.entries {
        let path = run_dir.join(name);
        match own.entries.get(name) {
            None => problems.push(format!("missing: {} (the recording has it)", path.display())),
            Some(actual) if actual != expected => problems.push(format!(
                "differs from the recording: {} has sha256 {actual}, {} records {expected}",
                path.display(),
                recorded_manifest.display()
            )),
            Some(_) if !failing.contains_key(name) => matching += 1,
            Some(_) => {} // missing or changed: named by the rerun's own check above
        }
    }
    let summary = format!(
        "{}: {matching} of {} recorded files match{}",
        run_dir.display(),
        recorded.entries.len(),
        if incomparable.is_some() { " (bytes of the supervised datasets only)" } else { "" }
    );
    Ok(RerunCheck { notes, problems, summary })
}

impl Provenance {
    /// Why this run's bytes cannot be held to `recording`'s, or None.
    pub fn incomparable_with(&self, recording: &Provenance) -> Option<String> {
        if recording.session.is_empty() {
            return Some(
                "the recording has no provenance.toml (it was made before sector recorded its machine and \
                 kernels)"
                    .into(),
            );
        }
        for present in self.session.iter().map(|s| &s.machine) {
            for past in recording.session.iter().map(|s| &s.machine) {
                if let Some(reason) = present.incomparable_with(past) {
                    return Some(reason);
                }
            }
        }
        None
    }
}

/// data/stage-NN.csv of the recording's supervised stages.
fn supervised_datasets(recording_dir: &Path) -> Result<Vec<String>> {
    let stages: Vec<crate::sector::StageRecord> =
        crate::files::read_csv(&recording_dir.join(crate::sector::STAGES_CSV))?;
    Ok(stages
        .iter()
        .filter(|r| r.phase == crate::sector::Phase::Supervised)
        .map(|r| format!("data/stage-{:02}.csv", r.stage))
        .collect())
}

/// One line per row or accuracy of `rerun` that is missing or off by more
/// than the tolerance from `recorded`, same-named columns compared.
fn compare_accuracies(rerun: &Path, recorded: &Path) -> Result<Vec<String>> {
    let read = |path: &Path| -> Result<(csv::StringRecord, Vec<csv::StringRecord>)> {
        let mut reader = csv::Reader::from_path(path).map_err(|e| Error::format(path, format!("cannot read: {e}")))?;
        let header = reader.headers().map_err(|e| Error::format(path, format!("cannot read: {e}")))?.clone();
        let rows = reader.records().collect::<std::result::Result<Vec<_>, _>>();
        Ok((header, rows.map_err(|e| Error::format(path, format!("cannot read: {e}")))?))
    };
    if !rerun.exists() {
        return Ok(vec![format!("missing: {} (the recording has it)", rerun.display())]);
    }
    let ((header, rows), (_, recorded_rows)) = (read(rerun)?, read(recorded)?);
    let mut problems = Vec::new();
    if rows.len() != recorded_rows.len() {
        problems.push(format!(
            "differs from the recording: {} has {} rows, {} has {}",
            rerun.display(),
            rows.len(),
            recorded.display(),
            recorded_rows.len()
        ));
    }
    for (i, (row, past)) in rows.iter().zip(&recorded_rows).enumerate() {
        for (column, (value, recorded_value)) in header.iter().zip(row.iter().zip(past.iter())) {
            if UNCOMPARED_COLUMNS.contains(&column) || value == recorded_value {
                continue;
            }
            let close = ACCURACY_COLUMNS.contains(&column)
                && matches!((value.parse::<f64>(), recorded_value.parse::<f64>()),
                    (Ok(a), Ok(b)) if (a - b).abs() <= ACCURACY_TOLERANCE);
            if !close {
                problems.push(format!(
                    "differs from the recording: {} row {} {column} is {value:?}, the recording's {recorded_value:?}",
                    rerun.display(),
                    i + 2
                ));
            }
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(features: &[&str], kernels: &str) -> Machine {
        Machine {
            arch: "x86_64".into(),
            cpu: "Some CPU".into(),
            features: features.iter().map(|f| f.to_string()).collect(),
            caches: "L1d 32K 8-way".into(),
            threads: 1,
            kernels: kernels.into(),
        }
    }

    fn provenance(machine: Machine) -> Provenance {
        let build = Build::current();
        Provenance { session: vec![Session { from: 1, machine, build, ranks: 1 }] }
    }

    #[test]
    fn bytes_compare_only_between_portable_avx2_fma_machines() {
        let portable = machine(&["avx2", "fma"], "portable");
        let with_avx512 = machine(&["avx2", "fma", "avx512f"], "portable");
        assert_eq!(portable.incomparable_with(&with_avx512), None);
        let native = machine(&["avx2", "fma"], "native");
        let why = native.incomparable_with(&portable).expect("native kernels are not portable");
        assert!(why.contains("native kernels") && why.contains("portable kernels"), "{why}");
        assert!(machine(&["avx2"], "portable").incomparable_with(&portable).is_some(), "no FMA");
        assert!(machine(&["avx2", "fma"], "cuda").incomparable_with(&portable).is_some(), "a GPU");
    }

    const STAGES: &str = "stage,phase,digits,epochs,passed,gate_fast,gate_slow,next_fast,next_slow,generated,accepted,\
rejected,train_examples,script_examples,consumed,accepted_fast_error,accepted_slow_error,seconds,next_phase,next_digits,stop_reason
1,supervised,3,1,true,1.0,1.0,0.0,0.0,0,0,0,10,10,10,,,1.0,self,4,
2,self,4,1,true,1.0,1.0,,,8,4,4,10,2,10,0.0,0.0,1.0,stop,0,done
";

    /// A run directory with a supervised and a self-generated dataset, a
    /// checkpoint, accuracy.csv and provenance; returns its manifest path.
    fn run_dir(dir: &Path, made_on: Machine, checkpoint: &[u8], fast: f64) -> std::path::PathBuf {
        let mut manifest = Manifest::default();
        for (name, bytes) in [
            ("stages.csv", STAGES.as_bytes().to_vec()),
            ("data/stage-01.csv", b"supervised rows".to_vec()),
            ("data/stage-02.csv", checkpoint.to_vec()), // made by the model
            ("checkpoints/stage-02/model.safetensors", checkpoint.to_vec()),
            ("accuracy.csv", format!("stage,length,fast,seconds\n2,4,{fast},{}\n", fast * 7.0).into_bytes()),
            (PROVENANCE_FILE, toml::to_string(&provenance(made_on)).unwrap().into_bytes()),
        ] {
            std::fs::create_dir_all(dir.join(name).parent().unwrap()).unwrap();
            manifest.write_file(dir, name, &bytes).unwrap();
        }
        manifest.save(dir).unwrap();
        dir.join(crate::files::MANIFEST)
    }

    #[test]
    fn a_portable_rerun_is_held_to_every_recorded_byte() {
        let (recording, rerun) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let recorded = run_dir(recording.path(), machine(&["avx2", "fma"], "portable"), b"weights", 0.5);
        run_dir(rerun.path(), machine(&["avx2", "fma", "avx512f"], "portable"), b"weights", 0.5);
        let check = check_rerun(rerun.path(), &recorded).unwrap();
        assert!(check.problems.is_empty() && check.notes.is_empty(), "{:?}", check.problems);
        assert!(check.summary.contains("3 of 3 recorded files match"), "{}", check.summary);

        // The recording's directory stands for its run-manifest.sha256.
        let missing = check_rerun(rerun.path(), recording.path()).err().expect("no run-manifest.sha256 yet");
        assert!(missing.to_string().contains(RUN_MANIFEST), "{missing}");
        std::fs::copy(&recorded, recording.path().join(RUN_MANIFEST)).unwrap();
        let check = check_rerun(rerun.path(), recording.path()).unwrap();
        assert!(check.summary.contains("3 of 3 recorded files match"), "{}", check.summary);

        // Other weights: named as differing from the recording, not as tampering.
        run_dir(rerun.path(), machine(&["avx2", "fma"], "portable"), b"other weights", 0.5);
        let check = check_rerun(rerun.path(), &recorded).unwrap();
        assert_eq!(check.problems.len(), 2, "{:?}", check.problems);
        assert!(check.problems.iter().all(|p| p.starts_with("differs from the recording")), "{:?}", check.problems);

        // A flipped byte in the rerun itself is named as such, and that file
        // does not count as matching even though its manifest entry does.
        run_dir(rerun.path(), machine(&["avx2", "fma"], "portable"), b"weights", 0.5);
        std::fs::write(rerun.path().join("checkpoints/stage-02/model.safetensors"), b"weightz").unwrap();
        let check = check_rerun(rerun.path(), &recorded).unwrap();
        assert!(
            check.problems.iter().any(|p| p.starts_with("changed") && p.contains("corrupt")),
            "{:?}",
            check.problems
        );
        assert!(check.summary.contains("2 of 3 recorded files match"), "{}", check.summary);
    }

    #[test]
    fn an_incomparable_rerun_is_held_to_its_supervised_data_and_accuracies() {
        let (recording, rerun) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let recorded = run_dir(recording.path(), machine(&["avx2", "fma"], "portable"), b"weights", 0.5);
        run_dir(rerun.path(), machine(&["avx2", "fma"], "native"), b"other weights", 0.55);
        let check = check_rerun(rerun.path(), &recorded).unwrap();
        assert!(check.problems.is_empty(), "{:?}", check.problems);
        assert!(
            check.notes[0].contains("not compared by bytes") && check.notes[0].contains("native"),
            "{:?}",
            check.notes
        );
        assert!(check.summary.contains("1 of 1 recorded files match"), "{}", check.summary);

        run_dir(rerun.path(), machine(&["avx2", "fma"], "native"), b"other weights", 0.7);
        let check = check_rerun(rerun.path(), &recorded).unwrap();
        assert_eq!(check.problems.len(), 1, "{:?}", check.problems);
        assert!(check.problems[0].contains("fast") && check.problems[0].contains("0.7"), "{:?}", check.problems);
    }
}
