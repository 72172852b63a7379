//! scripts/gpu-check.sh, which needs a GPU to do its job, checked on the CPU
//! path: its argument handling, and the report it writes (device, golden
//! tests, training, memory, the smoke table and the cost table).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn gpu_check(args: &[&str]) -> Output {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-check.sh");
    Command::new("bash").arg(script).args(args).env("SECTOR", env!("CARGO_BIN_EXE_sector")).output().expect("bash runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn bad_arguments_are_refused_with_the_usage() {
    for (args, says) in [
        (&["--gpus", "8"][..], "unknown argument --gpus"),
        (&["--steps"][..], "--steps needs a value"),
        (&["--steps", "0"][..], "positive whole number, not '0'"),
        (&["--batch", "many"][..], "positive whole number, not 'many'"),
        (&["--device", "tpu"][..], "cpu, cuda or cuda:N, not 'tpu'"),
    ] {
        let output = gpu_check(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(stderr(&output).contains(says), "{args:?}: {}", stderr(&output));
    }
    let help = gpu_check(&["--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("usage: scripts/gpu-check.sh"));
}

#[test]
fn the_cpu_path_writes_the_report() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("check");
    let args = ["--device", "cpu", "--preset", "cpu-tiny", "--steps", "2", "--batch", "8", "--no-build", "--no-golden"];
    let output = gpu_check(&[&args[..], &["--out", dir.to_str().unwrap()]].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
    for line in [
        "# sector GPU check",
        "- device: cpu (no GPU)",
        "- golden tests on cpu: skipped (--no-golden)",
        "- training: passed",
        "- peak GPU memory (nvidia-smi, every 0.5 s): not measured (no GPU: --device cpu); the memory plan is in the table",
        "## cpu-tiny, 2 steps of 8 examples",
        "## sector cost experiments/paper/main.toml",
    ] {
        assert!(report.lines().any(|l| l == line), "no line {line:?} in\n{report}");
    }
    assert!(report.lines().any(|l| l.starts_with("| cpu-tiny |")), "{report}");
    assert!(report.lines().any(|l| l.starts_with("| paper-main |")), "{report}");
    // The measured rate turned into hours: a number, not the "-" of a failed parse.
    let hours = report.lines().find(|l| l.contains("hours of training")).unwrap();
    let number = hours.split(": ").last().unwrap().split(' ').next().unwrap();
    assert!(number.parse::<f64>().is_ok_and(|h| h > 0.0), "{hours}");
    assert!(!Path::new(&dir.join("checkpoint/cpu-tiny")).exists(), "the checkpoint is removed");
}
