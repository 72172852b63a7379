//! scripts/carry-run.sh, which carries an unfinished run directory between
//! machines: a pack keeps every dataset and result, the checkpoints of the
//! last stage, of the last that passed its gate and of the last supervised
//! stage, and no lock; an unpack restores it and refuses to overwrite a run
//! directory.

use std::path::{Path, PathBuf};
use std::process::Command;

fn carry(args: &[&Path]) -> std::process::Output {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/carry-run.sh");
    Command::new("bash").arg(script).args(args).output().expect("bash runs")
}

/// Every file under `dir`, relative to it, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(next).unwrap().map(|e| e.unwrap().path()) {
            if entry.is_dir() {
                pending.push(entry);
            } else {
                found.push(entry.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    found.sort();
    found
}

#[test]
fn a_carried_run_keeps_its_data_and_the_checkpoints_resuming_analysis_and_supervised_from_need() {
    let work = tempfile::tempdir().unwrap();
    let run = work.path().join("runs/cpu-main");
    // Supervised 5, 6; self-taught 7 and 8; the stages for 9 and 10 failed their gates.
    let mut stages = String::from("stage,phase,digits,passed\n");
    for stage in 1..=6 {
        let phase = if stage <= 2 { "supervised" } else { "self" };
        stages.push_str(&format!("{stage},{phase},{},{}\n", stage + 4, stage < 5));
        let checkpoint = run.join(format!("checkpoints/stage-{stage:02}"));
        std::fs::create_dir_all(&checkpoint).unwrap();
        std::fs::write(checkpoint.join("model.safetensors"), [stage as u8]).unwrap();
        std::fs::create_dir_all(run.join("data")).unwrap();
        std::fs::write(run.join(format!("data/stage-{stage:02}.csv")), "rows").unwrap();
    }
    std::fs::write(run.join("stages.csv"), stages).unwrap();
    std::fs::write(run.join(".lock"), "").unwrap();

    let bundle = work.path().join("cpu-main.tar.xz");
    let out = carry(&[Path::new("pack"), &run, &bundle]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let elsewhere = work.path().join("elsewhere");
    let out = carry(&[Path::new("unpack"), &bundle, &elsewhere]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let mut expected: Vec<String> = (1..=6).map(|s| format!("data/stage-{s:02}.csv")).collect();
    expected.extend([2, 4, 6].map(|s| format!("checkpoints/stage-{s:02}/model.safetensors")));
    expected.push("stages.csv".into());
    expected.sort();
    assert_eq!(files(&elsewhere.join("cpu-main")), expected);

    let out = carry(&[Path::new("unpack"), &bundle, &elsewhere]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"), "{}", String::from_utf8_lossy(&out.stderr));
}
