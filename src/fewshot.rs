//! Table 2: models out of the box, asked to add with a ten-shot prompt
//! (PROTOCOL.md section 7). The prompt is ten solved lines `{a} + {b} =
//! {a+b}` with N-digit numbers, then `{a} + {b} =`; the first number in the
//! model's continuation is its answer. At paper scale the models are the
//! pretrained ByT5s; at CPU scale, randomly initialised presets, which shows
//! the code path and nothing about pretraining.

use crate::error::{Error, Result};
use crate::generate::{greedy, GreedyOptions};
use crate::model::{select_device, T5Config};
use crate::task::{add_decimal, random_problem};
use crate::tokenizer::{decode, encode};
use crate::weights::Model;
use rand::SeedableRng;
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const FEWSHOT_CSV: &str = "fewshot.csv";

/// A Table 2 config (experiments/*/table2.toml).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FewShotConfig {
    pub name: String,
    pub scale: String,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "defaults::shots")]
    pub shots: usize,
    #[serde(default = "defaults::lengths")]
    pub lengths: Vec<usize>,
    #[serde(default = "defaults::problems_per_length")]
    pub problems_per_length: usize,
    #[serde(default = "defaults::decode_batch")]
    pub decode_batch: usize,
    /// cpu, cuda or cuda:N.
    pub device: String,
    pub models: Vec<FewShotModel>,
}

/// One model of the table: a preset (random weights) or pretrained weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FewShotModel {
    pub label: String,
    pub preset: Option<String>,
    pub weights: Option<String>,
}

mod defaults {
    pub fn shots() -> usize {
        10
    }
    pub fn lengths() -> Vec<usize> {
        vec![1, 2, 3, 4]
    }
    pub fn problems_per_length() -> usize {
        1000
    }
    pub fn decode_batch() -> usize {
        256
    }
}

/// One row of fewshot.csv.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FewShotRecord {
    pub model: String,
    pub digits: usize,
    pub problems: usize,
    pub correct: usize,
    pub accuracy: f64,
}

impl FewShotConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = String::from_utf8(crate::files::read(path)?).map_err(|_| Error::format(path, "is not UTF-8"))?;
        let config: FewShotConfig =
            toml::from_str(&text).map_err(|e| Error::format(path, format!("is not a valid few-shot config: {e}")))?;
        let bad = |field: &str, problem: &str| {
            Err(Error::Config { path: path.to_path_buf(), field: field.into(), problem: problem.into() })
        };
        for model in &config.models {
            match (&model.preset, &model.weights) {
                (Some(p), None) if T5Config::preset(p).is_none() => {
                    return bad("models.preset", "names no preset; use byt5-small, byt5-base or a cpu-* preset")
                }
                (Some(_), None) | (None, Some(_)) => {}
                _ => return bad("models", "each model needs exactly one of preset and weights"),
            }
        }
        if config.models.is_empty() || config.lengths.contains(&0) || config.shots == 0 {
            return bad("models", "needs at least one model, one shot, and lengths of at least 1 digit");
        }
        Ok(config)
    }
}

/// The prompt and the true sum of one query: `shots` solved lines, then the question.
fn query(rng: &mut Pcg64, digits: usize, shots: usize) -> (String, String) {
    let line = |rng: &mut Pcg64| {
        let p = random_problem(rng, digits);
        let sum = add_decimal(&p.a, &p.b, false);
        (format!("{} + {} =", p.a, p.b), sum)
    };
    let mut prompt = String::new();
    for _ in 0..shots {
        let (question, sum) = line(rng);
        prompt += &format!("{question} {sum}\n");
    }
    let (question, sum) = line(rng);
    (prompt + &question, sum)
}

/// The first run of digits in a continuation, if any.
pub fn first_number(text: &str) -> Option<&str> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let rest = &text[start..];
    Some(&rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())])
}

/// Accuracy of every model on every length.
pub fn run(config: &FewShotConfig) -> Result<Vec<FewShotRecord>> {
    let device = select_device(&config.device)?;
    let mut records = Vec::new();
    for model in &config.models {
        let preset = model.preset.as_deref().and_then(T5Config::preset);
        let loaded = Model::from_preset_or_weights(preset.as_ref(), model.weights.as_deref(), config.seed, &device)?;
        for &digits in &config.lengths {
            // The same questions for every model.
            let mut rng = Pcg64::seed_from_u64(config.seed ^ digits as u64);
            let queries: Vec<(String, String)> =
                (0..config.problems_per_length).map(|_| query(&mut rng, digits, config.shots)).collect();
            let mut correct = 0;
            for chunk in queries.chunks(config.decode_batch.max(1)) {
                let inputs: Vec<Vec<u32>> = chunk.iter().map(|(prompt, _)| encode(prompt)).collect();
                let outputs = greedy(&loaded.t5, &inputs, GreedyOptions::new(digits + 8))?;
                correct +=
                    outputs.iter().zip(chunk).filter(|(out, (_, sum))| first_number(&decode(out)) == Some(sum)).count();
            }
            let problems = queries.len();
            records.push(FewShotRecord {
                model: model.label.clone(),
                digits,
                problems,
                correct,
                accuracy: correct as f64 / problems.max(1) as f64,
            });
            eprintln!("[{}] {}: {digits} digits, {correct}/{problems}", config.name, model.label);
        }
    }
    Ok(records)
}

/// Runs the config and writes RUNS_ROOT/<name>/ with the config, fewshot.csv
/// and their manifest; returns the directory.
pub fn run_into(config: &FewShotConfig, runs_root: &Path) -> Result<std::path::PathBuf> {
    let dir = runs_root.join(&config.name);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let records = run(config)?;
    let mut manifest = crate::files::Manifest::default();
    let config_text = toml::to_string(config).expect("a few-shot config serialises");
    manifest.write_file(&dir, crate::files::CONFIG_FILE, config_text.as_bytes())?;
    manifest.write_file(&dir, FEWSHOT_CSV, &crate::files::csv_bytes(&records, &dir.join(FEWSHOT_CSV))?)?;
    crate::provenance::Provenance::record_session(&dir, &mut manifest, 1, &config.device, 1)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_number_of_a_continuation_is_the_answer() {
        assert_eq!(first_number(" 579\n12 + 3 = 15"), Some("579"));
        assert_eq!(first_number("= 42"), Some("42"));
        assert_eq!(first_number("no digits"), None);
    }

    #[test]
    fn prompts_have_the_shots_then_the_question() {
        let (prompt, sum) = query(&mut Pcg64::seed_from_u64(0), 3, 10);
        let lines: Vec<&str> = prompt.lines().collect();
        assert_eq!(lines.len(), 11);
        for line in &lines[..10] {
            let (question, answer) = line.split_once(" = ").unwrap();
            let (a, b) = question.split_once(" + ").unwrap();
            assert_eq!((a.len(), b.len()), (3, 3));
            assert_eq!(add_decimal(a, b, false), answer);
        }
        let (a, b) = lines[10].strip_suffix(" =").unwrap().split_once(" + ").unwrap();
        assert_eq!(add_decimal(a, b, false), sum);
    }
}
