//! The `sector` binary as a user runs it: `generate` on a directory, on a hub
//! id found in the Hugging Face cache, with prompts from flags, a file or
//! stdin; and clear errors when a model is missing or corrupt.

mod common;

use common::{fixture_dir, golden};
use sector::tokenizer::decode;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const PROMPTS: [&str; 3] = [
    "Add fast.\\nQ: 12 + 34 = ?",
    "hi",
    "Add slow.\\nQ: 95123 + 87456 + 1 = ? and some more text to pass max_distance",
];

fn sector(args: &[&str], hf_home: &Path, stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sector"))
        .args(args)
        .env("HF_HOME", hf_home)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sector runs");
    child.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// transformers' greedy outputs for the golden prompts, as text.
fn expected_lines() -> Vec<String> {
    common::unpadded_rows(&golden()["greedy"], 0).iter().map(|ids| sector::cli::escape(&decode(ids))).collect()
}

fn stdout_lines(output: &Output) -> Vec<String> {
    assert!(output.status.success(), "sector failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).unwrap().lines().map(String::from).collect()
}

/// A Hugging Face cache holding the fixture as `test/t5-tiny`: main has the
/// pytorch_model.bin, like google/byt5-*; `with_pr` adds a refs/pr branch
/// with the safetensors conversion.
fn fake_cache(with_pr: bool) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--test--t5-tiny");
    let snapshot = |commit: &str, files: &[&str]| {
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        for file in files {
            std::fs::copy(fixture_dir().join(file), repo.join("snapshots").join(commit).join(file)).unwrap();
        }
    };
    std::fs::create_dir_all(repo.join("refs/refs/pr")).unwrap();
    snapshot("aaaa", &["config.json", "pytorch_model.bin"]);
    std::fs::write(repo.join("refs/main"), "aaaa").unwrap();
    if with_pr {
        snapshot("bbbb", &["model.safetensors"]);
        std::fs::write(repo.join("refs/refs/pr/3"), "bbbb").unwrap();
    }
    home
}

#[test]
fn generate_from_a_directory_matches_transformers() {
    let home = tempfile::tempdir().unwrap();
    let dir = fixture_dir();
    let mut args = vec!["generate", "--model", dir.to_str().unwrap(), "--max-new-tokens", "40"];
    for prompt in &PROMPTS {
        args.extend(["--prompt", prompt]);
    }
    assert_eq!(stdout_lines(&sector(&args, home.path(), None)), expected_lines());
}

#[test]
fn generate_reads_prompts_from_stdin_and_files() {
    let home = tempfile::tempdir().unwrap();
    let dir = fixture_dir();
    let text = PROMPTS.join("\n") + "\n";
    let model = ["generate", "--model", dir.to_str().unwrap(), "--max-new-tokens", "40", "--prompts"];
    let from_stdin = sector(&[&model[..], &["-"]].concat(), home.path(), Some(&text));
    assert_eq!(stdout_lines(&from_stdin), expected_lines());
    let file = home.path().join("prompts.txt");
    std::fs::write(&file, &text).unwrap();
    let from_file = sector(&[&model[..], &[file.to_str().unwrap()]].concat(), home.path(), None);
    assert_eq!(stdout_lines(&from_file), expected_lines());
}

#[test]
fn generate_in_batches_of_one_prompt_gives_every_output_in_order() {
    let home = tempfile::tempdir().unwrap();
    let dir = fixture_dir();
    let mut args = vec!["generate", "--model", dir.to_str().unwrap(), "--max-new-tokens", "40", "--decode-batch", "1"];
    for prompt in &PROMPTS {
        args.extend(["--prompt", prompt]);
    }
    assert_eq!(stdout_lines(&sector(&args, home.path(), None)), expected_lines());
    let zero = sector(
        &["generate", "--model", dir.to_str().unwrap(), "--decode-batch", "0", "--prompt", "hi"],
        home.path(),
        None,
    );
    assert!(!zero.status.success());
    assert!(String::from_utf8_lossy(&zero.stderr).contains("--decode-batch"));
}

#[test]
fn generate_finds_hub_models_in_the_cache_in_both_formats() {
    for with_pr in [false, true] {
        let home = fake_cache(with_pr);
        let files =
            sector::weights::find_in_cache(&hf_hub::Cache::new(home.path().join("hub")), "test/t5-tiny").unwrap();
        let expected_file = if with_pr { "model.safetensors" } else { "pytorch_model.bin" };
        assert!(files.weights.ends_with(expected_file), "{files:?}");
        let text = PROMPTS.join("\n");
        let args = ["generate", "--model", "test/t5-tiny", "--max-new-tokens", "40", "--prompts", "-"];
        assert_eq!(stdout_lines(&sector(&args, home.path(), Some(&text))), expected_lines());
    }
}

#[test]
fn a_missing_model_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let output = sector(&["generate", "--model", "google/byt5-small", "--prompt", "hi"], home.path(), None);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("google/byt5-small") && stderr.contains("not in the Hugging Face cache"), "{stderr}");
    assert!(stderr.contains("huggingface-cli download"), "the error names the fix: {stderr}");
}

#[test]
fn a_digit_offset_for_a_model_without_digit_places_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let dir = fixture_dir();
    let args = ["generate", "--model", dir.to_str().unwrap(), "--digit-offset", "2", "--prompt", "hi"];
    let output = sector(&args, home.path(), None);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--digit-offset 2") && stderr.contains("model.digit_positions"), "{stderr}");
}

#[test]
fn a_corrupt_weights_file_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(fixture_dir().join("config.json"), dir.join("config.json")).unwrap();
    std::fs::write(dir.join("model.safetensors"), b"not a safetensors file").unwrap();
    let output = sector(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "hi"], home.path(), None);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("model.safetensors") && stderr.contains("cannot read weights"), "{stderr}");
}

#[test]
fn eval_writes_a_row_per_problem_and_a_summary() {
    let home = tempfile::tempdir().unwrap();
    let problems = home.path().join("problems.csv");
    std::fs::write(&problems, "a,b,c\n12,34,0\n95,87,1\n7,5,0\n").unwrap();
    let (out, summary) = (home.path().join("out.csv"), home.path().join("summary.csv"));
    let dir = fixture_dir();
    let args = [
        "eval",
        "--model",
        dir.to_str().unwrap(),
        "--problems",
        problems.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--summary",
        summary.to_str().unwrap(),
        "--slow-format",
        "compact",
    ];
    let stdout = stdout_lines(&sector(&args, home.path(), None));
    assert!(stdout[0].starts_with("| digits |"), "{stdout:?}");
    let rows: Vec<sector::eval::ProblemResult> = sector::files::read_csv(&out).unwrap();
    assert_eq!(
        rows.iter().map(|r| (r.a.as_str(), r.b.as_str(), r.c)).collect::<Vec<_>>(),
        [("12", "34", 0), ("95", "87", 1), ("7", "5", 0)]
    );
    // The fixture is a random model: every answer is wrong, and one-digit problems have no slow step.
    assert!(rows.iter().all(|r| !r.fast_correct && !r.chain_correct && !r.slow_correct));
    assert_eq!(rows[2].slow_output, "");
    let lengths: Vec<sector::eval::LengthSummary> = sector::files::read_csv(&summary).unwrap();
    assert_eq!(lengths.iter().map(|l| (l.digits, l.problems)).collect::<Vec<_>>(), [(1, 1), (2, 2)]);
}

#[test]
fn eval_names_the_bad_line_of_a_problem_set() {
    let home = tempfile::tempdir().unwrap();
    let problems = home.path().join("problems.csv");
    std::fs::write(&problems, "a,b,c\n12,34,0\n12,345,0\n").unwrap();
    let dir = fixture_dir();
    let out = home.path().join("out.csv");
    let args = [
        "eval",
        "--model",
        dir.to_str().unwrap(),
        "--problems",
        problems.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let output = sector(&args, home.path(), None);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("problems.csv") && stderr.contains("line 3") && stderr.contains("same number of digits"),
        "{stderr}"
    );
    assert!(!out.exists(), "nothing written on bad input");
}

#[test]
fn probe_refuses_a_config_it_cannot_probe() {
    let dir = tempfile::tempdir().unwrap();
    let head = "name = \"p\"\nscale = \"cpu\"\n[model]\n";
    for (body, field) in [
        ("preset = \"cpu-tiny\"\ndevice = \"cpu\"\n", "probe"),
        ("pretrain = \"experiments/cpu/pretrain.toml\"\ndevice = \"cpu\"\n[probe]\nmax_digits = 3\n", "model.pretrain"),
    ] {
        let config = dir.path().join("p.toml");
        std::fs::write(&config, format!("{head}{body}")).unwrap();
        let runs = dir.path().join("runs");
        let output =
            sector(&["probe", config.to_str().unwrap(), "--runs-dir", runs.to_str().unwrap()], dir.path(), None);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains("p.toml") && stderr.contains(field), "{field}: {stderr}");
        assert!(!runs.exists(), "nothing is written for a refused config");
    }
}
