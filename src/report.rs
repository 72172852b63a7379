//! The paper's artifacts (PROTOCOL.md section 7) from recorded results.
//!
//! Layout, per scale (micro, cpu, paper):
//! - `results/<scale>/<experiment>/`: a run's recorded CSVs, its config and
//!   manifests (`sector record`);
//! - `results/<scale>/tables/<artifact>.md` and `.csv`: tables, with the
//!   paper's numbers beside ours;
//! - `figures/<scale>/<artifact>.svg` and `.png`: figures.
//!
//! Rendering reads only the recorded CSVs (with polars), so every table and
//! figure is remade in seconds without a model.

use crate::analysis::{CARRIES_CSV, FINAL_CSV, VOTES_CSV};
use crate::config::Experiment;
use crate::error::{Error, Result};
use crate::fewshot::FEWSHOT_CSV;
use crate::figures::{palette, Bar, Bars, Curve, Figure, Grid, GridRow, Lines, Panel, TextPage};
use crate::files::write_atomic;
use crate::sector::{ACCURACY_CSV, GENERATION_CSV, STAGES_CSV};
use polars::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One artifact: its name (the make target), the experiments whose recorded
/// results it reads (results/<scale>/<experiment>/) and what it shows.
pub struct Artifact {
    pub name: &'static str,
    pub experiments: &'static [&'static str],
    pub shows: &'static str,
}

pub const ARTIFACTS: [Artifact; 16] = [
    Artifact {
        name: "table1",
        experiments: &["main"],
        shows: "final checkpoint of the main run: fast accuracy per length",
    },
    Artifact {
        name: "table2",
        experiments: &["table2"],
        shows: "models out of the box: 10-shot accuracy, lengths 1-4",
    },
    Artifact {
        name: "table3",
        experiments: &["second"],
        shows: "final checkpoint of the second run: fast accuracy per length",
    },
    Artifact {
        name: "fig3",
        experiments: &["main"],
        shows: "accuracy on N+1 digits after training on 1..N, fast vs slow",
    },
    Artifact {
        name: "fig4",
        experiments: &["main"],
        shows: "simplify-then-guess on real problems: steps, guesses, vote",
    },
    Artifact {
        name: "fig5",
        experiments: &["main"],
        shows: "audited error rate of generated data by method and check",
    },
    Artifact {
        name: "fig6",
        experiments: &["main"],
        shows: "main run: accuracy of each stage on lengths 1..N+8, fast and chain",
    },
    Artifact { name: "fig7", experiments: &["second"], shows: "second run: accuracy of each stage, fast" },
    Artifact { name: "fig8", experiments: &["second"], shows: "second run: accuracy of each stage, chain of thought" },
    Artifact {
        name: "fig9",
        experiments: &["main"],
        shows: "accuracy at last+2 digits against carries and carry streaks",
    },
    Artifact { name: "fig10", experiments: &["main"], shows: "main run: examples generated and consumed per stage" },
    Artifact {
        name: "fig11",
        experiments: &["second"],
        shows: "second run: examples generated and consumed per stage",
    },
    Artifact {
        name: "ablation-curriculum",
        experiments: &["main", "ablation-curriculum"],
        shows: "one supervised stage on 1..N vs the curriculum: one-step slow at N+1..N+3",
    },
    Artifact {
        name: "emergence",
        experiments: &["emergence-1", "emergence-2", "emergence-3"],
        shows: "per model size: supervised length and examples before slow generalises",
    },
    Artifact { name: "control", experiments: &["control"], shows: "control run: supervised 1..5, then self-training" },
    Artifact {
        name: "ablation-self",
        experiments: &["main", "ablation-no-commutativity", "ablation-fast-labels", "ablation-simplify-only"],
        shows: "self-training ablations from the main run's supervised phase: reach and audited error per stage",
    },
];

pub fn artifact(name: &str) -> Result<&'static Artifact> {
    ARTIFACTS.iter().find(|a| a.name == name).ok_or_else(|| {
        let names: Vec<&str> = ARTIFACTS.iter().map(|a| a.name).collect();
        Error::format(name, format!("is not an artifact; the artifacts are {}", names.join(", ")))
    })
}

/// Where a scale's results, tables and figures live.
pub struct Paths {
    /// The repository root (experiments/ is read from here).
    pub root: PathBuf,
    pub scale: String,
    pub results: PathBuf,
    pub figures: PathBuf,
}

impl Paths {
    pub fn new(root: &Path, scale: &str) -> Self {
        Paths {
            root: root.to_path_buf(),
            scale: scale.to_string(),
            results: root.join("results").join(scale),
            figures: root.join("figures").join(scale),
        }
    }

    fn experiment(&self, name: &str) -> PathBuf {
        self.results.join(name)
    }

    fn tables(&self) -> PathBuf {
        self.results.join("tables")
    }

    /// "CPU scale" etc., with the model of the experiment, for captions.
    fn label(&self) -> String {
        match self.scale.as_str() {
            "paper" => "paper scale".into(),
            "cpu" => "CPU scale (small T5 from random init, 2 cores)".into(),
            other => format!("{other} scale (machinery check, not a result)"),
        }
    }

    /// The CPU-scale deviations the recorded `experiments` ran with, as one
    /// line for a table's notes or under a figure's caption (None: none).
    fn deviations(&self, experiments: &[&str]) -> Result<Option<String>> {
        let mut deviations: Vec<String> = Vec::new();
        for experiment in experiments {
            // Few-shot runs ask models out of the box: nothing to deviate.
            if self.experiment(experiment).join(FEWSHOT_CSV).exists() {
                continue;
            }
            let config = Experiment::load(&self.experiment(experiment).join(crate::files::CONFIG_FILE))?;
            for (_, what) in config.cpu_scale_deviations() {
                if !deviations.contains(&what) {
                    deviations.push(what);
                }
            }
        }
        Ok((!deviations.is_empty()).then(|| format!("CPU-scale deviations (REPRODUCE.md): {}.", deviations.join(", "))))
    }
}

/// Renders one artifact from recorded results; returns the files written.
pub fn render(name: &str, paths: &Paths) -> Result<Vec<PathBuf>> {
    let artifact = artifact(name)?;
    for experiment in artifact.experiments {
        let dir = paths.experiment(experiment);
        if !dir.is_dir() {
            return Err(Error::format(
                &dir,
                format!(
                    "is missing: `{name}` needs the recorded results of `{experiment}`; run `make {name}` to make them"
                ),
            ));
        }
    }
    std::fs::create_dir_all(paths.tables()).map_err(|e| Error::io(paths.tables(), e))?;
    std::fs::create_dir_all(&paths.figures).map_err(|e| Error::io(&paths.figures, e))?;
    match name {
        "table1" | "table3" => final_accuracy_table(paths, artifact),
        "table2" => fewshot_table(paths),
        "fig3" => generalisation_figure(paths),
        "fig4" => vote_figure(paths),
        "fig5" => error_rate_figure(paths),
        "fig6" => stage_grid_figure(paths, "fig6", "main", &[Column::Fast, Column::Chain]),
        "fig7" => stage_grid_figure(paths, "fig7", "second", &[Column::Fast]),
        "fig8" => stage_grid_figure(paths, "fig8", "second", &[Column::Chain]),
        "fig9" => carries_figure(paths),
        "fig10" => examples_figure(paths, "fig10", "main"),
        "fig11" => examples_figure(paths, "fig11", "second"),
        "ablation-curriculum" => curriculum_table(paths),
        "emergence" => emergence_table(paths, artifact),
        "control" => control_table(paths),
        "ablation-self" => self_training_ablations(paths, artifact),
        _ => unreachable!("every artifact has a renderer"),
    }
}

// ---------------------------------------------------------------------------
// Reading recorded CSVs.

/// A recorded CSV as a data frame of text columns; errors name the file.
/// Each column is typed where it is read: inferring types would read a
/// problem's number (`a`, `vote`: 27 digits at 27-digit lengths) as an
/// integer and fail past 19 digits.
pub fn read_frame(path: &Path) -> Result<DataFrame> {
    let bytes = crate::files::read(path)?;
    CsvReadOptions::default()
        .with_has_header(true)
        .with_infer_schema_length(Some(0))
        .into_reader_with_file_handle(std::io::Cursor::new(bytes))
        .finish()
        .map_err(|e| Error::format(path, format!("is not a readable CSV: {e}")))
}

/// Typed columns of a frame, with errors that name the file and the column.
struct Frame<'a> {
    df: DataFrame,
    path: &'a Path,
}

impl<'a> Frame<'a> {
    fn read(path: &'a Path) -> Result<Self> {
        Ok(Frame { df: read_frame(path)?, path })
    }

    fn strings(&self, name: &str) -> Result<Vec<String>> {
        let column = self.df.column(name).map_err(|_| self.bad(name, "is missing".into()))?;
        let values = column.as_materialized_series().str().map_err(|e| self.bad(name, format!("is not text: {e}")))?;
        Ok(values.iter().map(|v| v.unwrap_or_default().to_string()).collect())
    }

    /// The cells of `name` parsed as `T`, an empty cell as `None`; a cell
    /// that does not parse is an error naming its row (polars' own cast
    /// would turn it into an empty cell).
    fn parsed<T: std::str::FromStr>(&self, name: &str, what: &str) -> Result<Vec<Option<T>>> {
        let parse = |(row, cell): (usize, &String)| match cell.as_str() {
            "" => Ok(None),
            text => {
                text.parse().map(Some).map_err(|_| self.bad(name, format!("row {}: `{text}` is not {what}", row + 1)))
            }
        };
        self.strings(name)?.iter().enumerate().map(parse).collect()
    }

    fn f64s(&self, name: &str) -> Result<Vec<Option<f64>>> {
        self.parsed(name, "a number")
    }

    fn usizes(&self, name: &str) -> Result<Vec<usize>> {
        let values = self.parsed(name, "a whole number")?.into_iter().enumerate();
        values.map(|(row, v)| v.ok_or_else(|| self.bad(name, format!("row {} is empty", row + 1)))).collect()
    }

    fn bools(&self, name: &str) -> Result<Vec<bool>> {
        let parse = |v: &String| match v.as_str() {
            "true" => Ok(true),
            "false" | "" => Ok(false),
            other => Err(self.bad(name, format!("`{other}` is not true or false"))),
        };
        self.strings(name)?.iter().map(parse).collect()
    }

    /// The rows where `column` equals `value`.
    fn filter_eq(&self, column: &str, value: usize) -> Result<Frame<'a>> {
        let mask: BooleanChunked = self.usizes(column)?.into_iter().map(|v| v == value).collect();
        let df = self.df.filter(&mask).map_err(|e| Error::format(self.path, e.to_string()))?;
        Ok(Frame { df, path: self.path })
    }

    fn bad(&self, column: &str, problem: String) -> Error {
        Error::format(self.path, format!("column `{column}`: {problem}"))
    }
}

/// One stage of a recorded run (the stages.csv columns the artifacts use).
struct Stage {
    stage: usize,
    supervised: bool,
    digits: usize,
    passed: bool,
    next_fast: Option<f64>,
    next_slow: Option<f64>,
    generated: usize,
    accepted: usize,
    train_examples: usize,
    script_examples: usize,
    consumed: usize,
    accepted_fast_error: Option<f64>,
    accepted_slow_error: Option<f64>,
    stop_reason: String,
}

fn read_stages(dir: &Path) -> Result<Vec<Stage>> {
    let path = dir.join(STAGES_CSV);
    let f = Frame::read(&path)?;
    let (stage, digits, generated, accepted) =
        (f.usizes("stage")?, f.usizes("digits")?, f.usizes("generated")?, f.usizes("accepted")?);
    let (train, script, consumed) = (f.usizes("train_examples")?, f.usizes("script_examples")?, f.usizes("consumed")?);
    let (phase, passed, stop) = (f.strings("phase")?, f.bools("passed")?, f.strings("stop_reason")?);
    let (next_fast, next_slow) = (f.f64s("next_fast")?, f.f64s("next_slow")?);
    let (fast_error, slow_error) = (f.f64s("accepted_fast_error")?, f.f64s("accepted_slow_error")?);
    Ok((0..stage.len())
        .map(|i| Stage {
            stage: stage[i],
            supervised: phase[i] == "supervised",
            digits: digits[i],
            passed: passed[i],
            next_fast: next_fast[i],
            next_slow: next_slow[i],
            generated: generated[i],
            accepted: accepted[i],
            train_examples: train[i],
            script_examples: script[i],
            consumed: consumed[i],
            accepted_fast_error: fast_error[i],
            accepted_slow_error: slow_error[i],
            stop_reason: stop[i].clone(),
        })
        .collect())
}

/// The run's result: the last stage that passed its gate.
fn final_stage(stages: &[Stage], dir: &Path) -> Result<usize> {
    stages
        .iter()
        .rev()
        .find(|s| s.passed)
        .map(|s| s.stage)
        .ok_or_else(|| Error::format(dir.join(STAGES_CSV), "has no stage that passed its gate"))
}

/// Accuracy of one stage's model per length: (length, problems, fast, chain, slow).
type LengthRow = (usize, usize, f64, f64, Option<f64>);

fn read_accuracy(dir: &Path, stage: usize) -> Result<Vec<LengthRow>> {
    let path = dir.join(ACCURACY_CSV);
    let f = Frame::read(&path)?.filter_eq("stage", stage)?;
    let (length, problems) = (f.usizes("length")?, f.usizes("problems")?);
    let (fast, chain, slow) = (f.f64s("fast")?, f.f64s("chain")?, f.f64s("slow")?);
    Ok((0..length.len())
        .map(|i| (length[i], problems[i], fast[i].unwrap_or(0.0), chain[i].unwrap_or(0.0), slow[i]))
        .collect())
}

// ---------------------------------------------------------------------------
// Tables.

/// A table written as Markdown (title, notes, rows) and as CSV (rows only).
struct Table {
    title: String,
    notes: Vec<String>,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn save(&self, paths: &Paths, name: &str) -> Result<Vec<PathBuf>> {
        let mut md = format!("# {}\n\n", self.title);
        let deviations = paths.deviations(artifact(name)?.experiments)?;
        for note in self.notes.iter().chain(&deviations) {
            md += &format!("{note}\n");
        }
        md += &format!("\n| {} |\n|{}\n", self.header.join(" | "), "---|".repeat(self.header.len()));
        for row in &self.rows {
            md += &format!("| {} |\n", row.join(" | "));
        }
        let md_path = paths.tables().join(format!("{name}.md"));
        let csv_path = paths.tables().join(format!("{name}.csv"));
        let mut writer = csv::Writer::from_writer(Vec::new());
        let csv_error = |e: csv::Error| Error::format(&csv_path, e.to_string());
        writer.write_record(&self.header).map_err(csv_error)?;
        for row in &self.rows {
            writer.write_record(row).map_err(csv_error)?;
        }
        let csv = writer.into_inner().map_err(|e| Error::format(&csv_path, e.to_string()))?;
        write_atomic(&md_path, md.as_bytes())?;
        write_atomic(&csv_path, &csv)?;
        Ok(vec![md_path, csv_path])
    }
}

fn percent(value: f64) -> String {
    format!("{:.0}", 100.0 * value)
}

/// The paper's Table 1 (582M) and Table 3 (300M): fast accuracy in % by length.
fn paper_final_accuracy(table: &str, length: usize) -> &'static str {
    let table1 = ["88", "79", "52", "26", "2"]; // lengths 30..34
    let table3 = ["95", "98", "98", "99", "98", "91", "33"]; // lengths 20..26
    match (table, length) {
        ("table1", 1..=29) | ("table3", 1..=19) => "98-100",
        ("table1", 30..=34) => table1[length - 30],
        ("table3", 20..=26) => table3[length - 20],
        _ => "0",
    }
}

fn final_accuracy_table(paths: &Paths, artifact: &Artifact) -> Result<Vec<PathBuf>> {
    let dir = paths.experiment(artifact.experiments[0]);
    let stages = read_stages(&dir)?;
    let last = final_stage(&stages, &dir)?;
    let s = &stages[last - 1];
    let cap = stages.iter().filter(|s| s.supervised).map(|s| s.digits).max().unwrap_or(0);
    let (paper_model, paper_run) = match artifact.name {
        "table1" => ("582M", "supervised 1..6, self-taught to 28"),
        _ => ("300M", "supervised 1..8, self-taught to 24"),
    };
    let path = dir.join(FINAL_CSV);
    let f = Frame::read(&path)?;
    let (lengths, problems, fast) = (f.usizes("length")?, f.usizes("problems")?, f.f64s("fast")?);
    let rows = (0..lengths.len())
        .map(|i| (lengths[i], problems[i], fast[i].unwrap_or(0.0)))
        .map(|(length, problems, fast)| {
            vec![
                length.to_string(),
                problems.to_string(),
                percent(fast),
                paper_final_accuracy(artifact.name, length).into(),
            ]
        })
        .collect();
    let self_taught =
        if s.supervised { "none self-taught".to_string() } else { format!("self-taught to {} digits", s.digits) };
    Table {
        title: format!("{}: fast accuracy of the final checkpoint by length ({})", artifact.name, paths.label()),
        notes: vec![
            format!("Ours: stage {last}, supervised 1..{cap}, {self_taught}. Paper ({paper_model}): {paper_run}."),
            "Accuracy in % of the problems per length; the paper's column is its own table at the same length.".into(),
        ],
        header: vec!["length".into(), "problems".into(), "ours fast %".into(), format!("paper {paper_model} %")],
        rows,
    }
    .save(paths, artifact.name)
}

fn fewshot_table(paths: &Paths) -> Result<Vec<PathBuf>> {
    let path = paths.experiment("table2").join(FEWSHOT_CSV);
    let f = Frame::read(&path)?;
    let (models, digits, accuracy) = (f.strings("model")?, f.usizes("digits")?, f.f64s("accuracy")?);
    let mut ours: BTreeMap<(usize, String), BTreeMap<usize, f64>> = BTreeMap::new();
    for (i, model) in models.iter().enumerate() {
        let order = models.iter().position(|m| m == model).unwrap_or(i);
        ours.entry((order, model.clone())).or_default().insert(digits[i], accuracy[i].unwrap_or(0.0));
    }
    const PAPER: [(&str, [f64; 4]); 4] = [
        ("ByT5 300M", [0.015, 0.004, 0.0, 0.0]),
        ("ByT5 582M", [0.04, 0.005, 0.002, 0.0]),
        ("ByT5 1.23B", [0.0, 0.005, 0.0, 0.0]),
        ("ByT5 3.74B", [0.0, 0.002, 0.0, 0.0]),
    ];
    let mut rows = Vec::new();
    for ((_, model), by_length) in &ours {
        let cell = |n: usize| by_length.get(&n).map_or("-".to_string(), |a| format!("{a:.3}"));
        rows.push(vec!["ours".into(), model.clone(), cell(1), cell(2), cell(3), cell(4)]);
    }
    for (model, accuracy) in PAPER {
        let mut row = vec!["paper".to_string(), model.to_string()];
        row.extend(accuracy.iter().map(|a| format!("{a:.3}")));
        rows.push(row);
    }
    Table {
        title: format!("table2: 10-shot addition accuracy of models out of the box ({})", paths.label()),
        notes: vec![
            "Prompt: ten solved lines `a + b = sum`, then `a + b =`; the first number of the continuation is the answer."
                .into(),
            if paths.scale == "paper" {
                "Ours: pretrained ByT5 checkpoints from the Hugging Face hub.".into()
            } else {
                "Ours: the CPU presets from random initialisation, so this shows the evaluation code, not pretraining."
                    .into()
            },
        ],
        header: ["source", "model", "1 digit", "2 digits", "3 digits", "4 digits"].map(String::from).to_vec(),
        rows,
    }
    .save(paths, "table2")
}

fn curriculum_table(paths: &Paths) -> Result<Vec<PathBuf>> {
    let joint_dir = paths.experiment("ablation-curriculum");
    let joint_stages = read_stages(&joint_dir)?;
    let joint = joint_stages
        .iter()
        .find(|s| s.supervised)
        .ok_or_else(|| Error::format(joint_dir.join(STAGES_CSV), "has no supervised stage"))?;
    let n = joint.digits;
    let main_dir = paths.experiment("main");
    let main = read_stages(&main_dir)?.into_iter().find(|s| s.supervised && s.digits == n).ok_or_else(|| {
        Error::format(main_dir.join(STAGES_CSV), format!("has no supervised stage on 1..{n} to compare with"))
    })?;
    let mut rows = Vec::new();
    for (setting, dir, stage) in
        [("curriculum 3, 4, ..", &main_dir, main.stage), ("one stage", &joint_dir, joint.stage)]
    {
        let by_length = read_accuracy(dir, stage)?;
        let mut row = vec![setting.to_string(), format!("1..{n}")];
        for length in n + 1..=n + 3 {
            let slow = by_length.iter().find(|r| r.0 == length).and_then(|r| r.4);
            row.push(slow.map_or("-".into(), percent));
        }
        rows.push(row);
    }
    let mut header = vec!["setting".to_string(), "trained on".into()];
    header.extend((n + 1..=n + 3).map(|l| format!("slow % at {l}")));
    Table {
        title: format!("ablation-curriculum: one supervised stage vs the curriculum ({})", paths.label()),
        notes: vec![
            format!(
                "One-step slow exact match on {}..{} digits after supervised training on 1..{n} (the paper: 1..6, judged at 7, 8, 9).",
                n + 1,
                n + 3
            ),
            "Paper (582M, Appendix K): the one-stage model generalised to slow 7, 8 and 9 digits perfectly.".into(),
        ],
        header,
        rows,
    }
    .save(paths, "ablation-curriculum")
}

fn emergence_table(paths: &Paths, artifact: &Artifact) -> Result<Vec<PathBuf>> {
    let mut rows = Vec::new();
    for experiment in artifact.experiments {
        let dir = paths.experiment(experiment);
        let config = crate::config::Experiment::load(&dir.join(crate::files::CONFIG_FILE))?;
        // A pretraining config is read from the repository, where the run found it.
        let model_config = match &config.model.pretrain {
            Some(pretrain) => crate::pretrain::PretrainConfig::load(&paths.root.join(pretrain))?.model.preset_config(),
            None => config.model_config(),
        };
        let size = model_config
            .map(|c| format!("{:.2}M", c.num_params() as f64 / 1e6))
            .or(config.model.weights.clone())
            .unwrap_or_default();
        let stages = read_stages(&dir)?;
        let threshold = config.supervised.generalise_threshold;
        let supervised: Vec<&Stage> = stages.iter().filter(|s| s.supervised).collect();
        let emerged = supervised.iter().position(|s| s.next_slow.is_some_and(|a| a >= threshold));
        let examples: usize =
            supervised[..emerged.map_or(supervised.len(), |i| i + 1)].iter().map(|s| s.consumed).sum();
        let best = supervised.iter().filter_map(|s| s.next_slow).fold(0.0, f64::max);
        // A size that never learns its first stage is a different failure from
        // one that learns every stage and still does not generalise.
        let learned = match supervised.iter().filter(|s| s.passed).map(|s| s.digits).max() {
            Some(digits) => format!("1..{digits}"),
            None => format!("none (1..{} failed its gate)", supervised.first().map_or(0, |s| s.digits)),
        };
        rows.push(vec![
            experiment.to_string(),
            size,
            learned,
            emerged.map_or("not within the run".into(), |i| format!("1..{}", supervised[i].digits)),
            examples.to_string(),
            percent(best),
        ]);
    }
    Table {
        title: format!("emergence: supervised training needed before slow generalises to N+1 ({})", paths.label()),
        notes: vec![
            "Generalises: one-step slow exact match on N+1 digits at or above the config's generalise_threshold."
                .into(),
            "Paper: 582M after 1..6 with about 0.5M examples; 300M after 1..8 with almost 4M.".into(),
        ],
        header: ["experiment", "parameters", "learned", "generalised after", "examples consumed", "best slow % on N+1"]
            .map(String::from)
            .to_vec(),
        rows,
    }
    .save(paths, "emergence")
}

fn control_table(paths: &Paths) -> Result<Vec<PathBuf>> {
    let dir = paths.experiment("control");
    let stages = read_stages(&dir)?;
    let rows = stages
        .iter()
        .map(|s| {
            vec![
                s.stage.to_string(),
                if s.supervised { "supervised" } else { "self" }.into(),
                s.digits.to_string(),
                if s.passed { "yes" } else { "no" }.into(),
                if s.supervised { "-".into() } else { format!("{}/{}", s.accepted, s.generated) },
                s.accepted_fast_error.map_or("-".into(), |e| format!("{:.1}", 100.0 * e)),
                s.stop_reason.clone(),
            ]
        })
        .collect();
    let last = stages.iter().filter(|s| !s.supervised && s.passed).map(|s| s.digits).max();
    Table {
        title: format!("control: supervised 1..5, then self-training ({})", paths.label()),
        notes: vec![
            last.map_or("Ours: no length self-taught.".into(), |d| format!("Ours: self-taught up to {d} digits.")),
            "Paper: supervised 1..5, self-training 6..21.".into(),
        ],
        header: ["stage", "phase", "digits", "passed", "accepted/generated", "audited error % (fast)", "stop"]
            .map(String::from)
            .to_vec(),
        rows,
    }
    .save(paths, "control")
}

/// The paper's check alone, recorded where the main run uses stronger ones
/// (CPU scale); drawn beside the other ablations when present.
const COMMUTATIVITY_ONLY: &str = "ablation-commutativity-only";

/// Each self-training ablation beside the main run: the lengths it taught
/// itself and the audited error of the labels it accepted, stage by stage
/// (error avalanching, the paper's section 2.2). A table and a figure.
fn self_training_ablations(paths: &Paths, artifact: &Artifact) -> Result<Vec<PathBuf>> {
    let mut experiments = artifact.experiments.to_vec();
    if paths.experiment(COMMUTATIVITY_ONLY).is_dir() {
        experiments.insert(1, COMMUTATIVITY_ONLY);
    }
    let color = |experiment: &str| match experiment {
        "main" => palette::BLUE,
        COMMUTATIVITY_ONLY => palette::GREEN,
        "ablation-no-commutativity" => palette::RED,
        "ablation-fast-labels" => palette::ORANGE,
        _ => palette::GREY,
    };
    let (mut rows, mut fast_curves, mut slow_curves) = (Vec::new(), Vec::new(), Vec::new());
    for experiment in experiments {
        let color = color(experiment);
        let stages = read_stages(&paths.experiment(experiment))?;
        let labelled: Vec<&Stage> = stages.iter().filter(|s| !s.supervised && s.generated > 0).collect();
        let taught: Vec<usize> = labelled.iter().filter(|s| s.passed).map(|s| s.digits).collect();
        let reach = match (taught.first(), taught.last()) {
            (Some(first), Some(last)) => format!("{first}..{last} ({} lengths)", taught.len()),
            _ => "none".into(),
        };
        let errors = |error: fn(&Stage) -> Option<f64>| -> Vec<(f64, f64)> {
            labelled.iter().filter_map(|s| error(s).map(|e| (s.digits as f64, 100.0 * e))).collect()
        };
        let (fast, slow) = (errors(|s| s.accepted_fast_error), errors(|s| s.accepted_slow_error));
        let span = |points: &[(f64, f64)]| match points {
            [] => "-".to_string(),
            [.., last] => {
                let (low, high) = points.iter().fold((f64::MAX, f64::MIN), |(l, h), p| (l.min(p.1), h.max(p.1)));
                format!("{low:.1}-{high:.1} (last {:.1})", last.1)
            }
        };
        let stop = stages.last().map_or(String::new(), |s| s.stop_reason.clone());
        rows.push(vec![experiment.to_string(), reach, span(&fast), span(&slow), stop]);
        fast_curves.push(Curve { label: experiment.to_string(), color, points: fast });
        slow_curves.push(Curve { label: experiment.to_string(), color, points: slow });
    }
    let mut written = Table {
        title: format!("ablation-self: self-training ablations from the main run's supervised phase ({})", paths.label()),
        notes: vec![
            "Each ablation takes over the main run's supervised phase (supervised.from) and self-trains to its end."
                .into(),
            "Audited error: the share of a stage's accepted labels that the ground truth says are wrong (analysis only)."
                .into(),
            "Paper (section 2.2, figure 5): without simplify-then-guess and the commutativity check errors compound; \
             it does not run these ablations to their end."
                .into(),
        ],
        header: ["experiment", "self-taught", "audited error % of fast labels", "of slow labels", "stopped"]
            .map(String::from)
            .to_vec(),
        rows,
    }
    .save(paths, "ablation-self")?;
    let panel = |title: &str, series: Vec<Curve>| {
        let (low, high) = series
            .iter()
            .flat_map(|c| c.points.iter().map(|p| p.0))
            .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(x), h.max(x)));
        let (low, high) = if low > high { (1.0, 1.0) } else { (low, high) };
        let y_max = series.iter().flat_map(|c| c.points.iter().map(|p| p.1)).fold(5.0, f64::max);
        Panel::Lines(Lines {
            title: title.into(),
            x_label: "self-taught length (digits)".into(),
            y_label: "audited error of accepted labels (%)".into(),
            x_range: (low - 0.5, high + 0.5),
            y_range: (0.0, y_max * 1.1),
            series,
        })
    };
    let panels = vec![panel("fast labels", fast_curves), panel("slow labels", slow_curves)];
    written.extend(figure(paths, "ablation-self", "error avalanching, by ablation", panels, (1200, 500))?);
    Ok(written)
}

// ---------------------------------------------------------------------------
// Figures.

fn figure(paths: &Paths, name: &str, title: &str, panels: Vec<Panel>, size: (u32, u32)) -> Result<Vec<PathBuf>> {
    let caption = format!("{name}: {title} -- {}", paths.label());
    let note = paths.deviations(artifact(name)?.experiments)?;
    Figure { caption, note, panels, size }.save(&paths.figures, name)
}

fn generalisation_figure(paths: &Paths) -> Result<Vec<PathBuf>> {
    let stages = read_stages(&paths.experiment("main"))?;
    let supervised: Vec<&Stage> = stages.iter().filter(|s| s.supervised).collect();
    let points = |value: fn(&Stage) -> Option<f64>| {
        supervised.iter().filter_map(|s| value(s).map(|v| (s.digits as f64, 100.0 * v))).collect::<Vec<_>>()
    };
    let max_n = supervised.iter().map(|s| s.digits).max().unwrap_or(1) as f64;
    let lines = Lines {
        title: "accuracy on N+1 digits after training on 1..N".into(),
        x_label: "N (longest supervised length)".into(),
        y_label: "exact match on N+1 digits (%)".into(),
        x_range: (0.5, max_n + 0.5),
        y_range: (0.0, 105.0),
        series: vec![
            Curve { label: "fast".into(), color: palette::BLUE, points: points(|s| s.next_fast) },
            Curve { label: "one-step slow".into(), color: palette::RED, points: points(|s| s.next_slow) },
        ],
    };
    figure(paths, "fig3", "length generalisation", vec![Panel::Lines(lines)], (800, 500))
}

fn vote_figure(paths: &Paths) -> Result<Vec<PathBuf>> {
    let path = paths.experiment("main").join(VOTES_CSV);
    let f = Frame::read(&path)?;
    let (example, a, b, c) = (f.usizes("example")?, f.strings("a")?, f.strings("b")?, f.usizes("c")?);
    let (steps, slow, candidate) = (f.usizes("simplifications")?, f.strings("slow_output")?, f.strings("candidate")?);
    let (vote, truth) = (f.strings("vote")?, f.strings("truth")?);
    let mut pages = Vec::new();
    for number in 1..=example.iter().copied().max().unwrap_or(0) {
        let rows: Vec<usize> = (0..example.len()).filter(|&i| example[i] == number).collect();
        let Some(&first) = rows.first() else { continue };
        let plus_one = if c[first] == 1 { " + 1" } else { "" };
        let mut lines = vec![format!("{} + {}{plus_one}", a[first], b[first]), String::new()];
        for &i in &rows {
            lines.push(format!("after {} simplification(s):", steps[i]));
            for output_line in slow[i].lines() {
                lines.push(format!("  {output_line}"));
            }
            let shown = if candidate[i].is_empty() { "(no answer)" } else { candidate[i].as_str() };
            lines.push(format!("  guess: {shown}"));
        }
        lines.push(String::new());
        let verdict = if vote[first] == truth[first] { "correct" } else { "wrong" };
        let voted = if vote[first].is_empty() { "(no answer)" } else { vote[first].as_str() };
        lines.push(format!("majority vote: {voted} ({verdict}; true sum {})", truth[first]));
        pages.push(TextPage { title: format!("example {number}"), lines });
    }
    // Every line is shown whole: at 27 digits a slow step is about 100
    // characters, so a column is as wide as its longest line (about 8 px a
    // character of the 13 px monospace font).
    let longest = pages.iter().flat_map(|p| &p.lines).map(|l| l.chars().count()).max().unwrap_or(0) as u32;
    let rows = pages.iter().map(|p| p.lines.len()).max().unwrap_or(10) as u32;
    let (width, height) = (pages.len().max(1) as u32 * (32 + 8 * longest).max(560), 120 + 20 * rows);
    let panels = pages.into_iter().map(Panel::Text).collect();
    figure(paths, "fig4", "simplify-then-guess on problems of the next length", panels, (width, height))
}

fn error_rate_figure(paths: &Paths) -> Result<Vec<PathBuf>> {
    let path = paths.experiment("main").join(GENERATION_CSV);
    let f = Frame::read(&path)?;
    let (kind, method, check) = (f.strings("kind")?, f.strings("method")?, f.strings("check")?);
    let (kept, errors) = (f.usizes("kept")?, f.usizes("audited_errors")?);
    // Summed over every self-training stage: (kind, method, check) -> (kept, errors).
    let mut totals: BTreeMap<(String, String, String), (usize, usize)> = BTreeMap::new();
    for i in 0..kind.len() {
        let total = totals.entry((kind[i].clone(), method[i].clone(), check[i].clone())).or_default();
        total.0 += kept[i];
        total.1 += errors[i];
    }
    let rate = |kind: &str, method: &str, check: &str| {
        totals.get(&(kind.into(), method.into(), check.into())).filter(|t| t.0 > 0).map(|t| t.1 as f64 / t.0 as f64)
    };
    let group = |kind: &str, method: &str, label: &str| {
        (
            label.to_string(),
            vec![
                Bar { label: "no check".into(), color: palette::GREY, value: rate(kind, method, "none") },
                Bar {
                    label: "commutativity".into(),
                    color: palette::GREEN,
                    value: rate(kind, method, "commutativity"),
                },
            ],
        )
    };
    let bars = Bars {
        title: "audited error rate of generated data, all self-training stages".into(),
        y_label: "error rate".into(),
        y_max: 1.3,
        groups: vec![
            group("fast", "fast", "fast: fast"),
            group("fast", "simplify-only", "fast: simplify only"),
            group("fast", "simplify-then-guess", "fast: simplify-then-guess"),
            group("slow", "slow-greedy", "slow: greedy"),
        ],
    };
    figure(paths, "fig5", "error rates by method", vec![Panel::Bars(bars)], (1000, 520))
}

#[derive(Clone, Copy)]
enum Column {
    Fast,
    Chain,
}

fn stage_grid_figure(paths: &Paths, name: &str, experiment: &str, columns: &[Column]) -> Result<Vec<PathBuf>> {
    let dir = paths.experiment(experiment);
    // A stage that ended before training (its labels failed the checks) was
    // never evaluated: it gets no row, rather than a row of zeros.
    let mut evaluated = Vec::new();
    for s in read_stages(&dir)? {
        let by_length = read_accuracy(&dir, s.stage)?;
        if !by_length.is_empty() {
            evaluated.push((s, by_length));
        }
    }
    let mut panels = Vec::new();
    for &column in columns {
        let mut rows = Vec::new();
        for (s, by_length) in &evaluated {
            let longest = by_length.iter().map(|r| r.0).max().unwrap_or(0);
            let cells = (1..=longest)
                .map(|l| {
                    by_length.iter().find(|r| r.0 == l).map(|r| match column {
                        Column::Fast => r.2,
                        Column::Chain => r.3,
                    })
                })
                .collect();
            let phase = if s.supervised { "sup" } else { "self" };
            rows.push(GridRow { label: format!("N={} {phase}", s.digits), trained: s.digits, cells });
        }
        let (title, color) = match column {
            Column::Fast => ("fast (no chain of thought)", palette::BLUE),
            Column::Chain => ("with chain of thought", palette::RED),
        };
        panels.push(Panel::Grid(Grid { title: title.into(), color, rows }));
    }
    let height = 160 + 22 * evaluated.len() as u32;
    let width = 700 * columns.len() as u32;
    figure(paths, name, &format!("accuracy by stage and length, {experiment} run"), panels, (width, height.max(400)))
}

fn carries_figure(paths: &Paths) -> Result<Vec<PathBuf>> {
    let path = paths.experiment("main").join(CARRIES_CSV);
    let f = Frame::read(&path)?;
    let (digits, carries, streak) = (f.usizes("digits")?, f.usizes("carries")?, f.usizes("longest_streak")?);
    let (fast, chain) = (f.bools("fast_correct")?, f.bools("chain_correct")?);
    let n = digits.first().copied().unwrap_or(0);
    let panel = |by: &[usize], label: &str| {
        let mut groups: BTreeMap<usize, (usize, usize, usize)> = BTreeMap::new();
        for i in 0..by.len() {
            let g = groups.entry(by[i]).or_default();
            g.0 += 1;
            g.1 += fast[i] as usize;
            g.2 += chain[i] as usize;
        }
        let series = |pick: fn(&(usize, usize, usize)) -> usize| {
            groups.iter().map(|(&k, g)| (k as f64, 100.0 * pick(g) as f64 / g.0 as f64)).collect::<Vec<_>>()
        };
        let max_x = groups.keys().max().copied().unwrap_or(1) as f64;
        Panel::Lines(Lines {
            title: format!("{n}-digit problems by {label}"),
            x_label: label.into(),
            y_label: "accuracy (%)".into(),
            x_range: (-0.5, max_x + 0.5),
            y_range: (0.0, 105.0),
            series: vec![
                Curve { label: "fast".into(), color: palette::BLUE, points: series(|g| g.1) },
                Curve { label: "chain".into(), color: palette::RED, points: series(|g| g.2) },
            ],
        })
    };
    let panels = vec![panel(&carries, "number of carries"), panel(&streak, "longest carry streak")];
    figure(paths, "fig9", "accuracy against carries", panels, (1200, 500))
}

fn examples_figure(paths: &Paths, name: &str, experiment: &str) -> Result<Vec<PathBuf>> {
    let stages = read_stages(&paths.experiment(experiment))?;
    let cumulative = |value: &dyn Fn(&Stage) -> usize| {
        let mut total = 0;
        stages
            .iter()
            .map(|s| {
                total += value(s);
                (s.stage as f64, total as f64)
            })
            .collect::<Vec<_>>()
    };
    // Examples seen in training, split by the share of script rows in the stage's data.
    let script_consumed = |s: &Stage| (s.consumed * s.script_examples).checked_div(s.train_examples).unwrap_or(0);
    let series = vec![
        Curve {
            label: "consumed, supervised (script)".into(),
            color: palette::BLUE,
            points: cumulative(&script_consumed),
        },
        Curve {
            label: "consumed, self-generated".into(),
            color: palette::RED,
            points: cumulative(&|s| s.consumed - script_consumed(s)),
        },
        Curve { label: "generated by the model".into(), color: palette::ORANGE, points: cumulative(&|s| s.generated) },
    ];
    let y_max = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(1.0, f64::max);
    let lines = Lines {
        title: "cumulative examples over the run".into(),
        x_label: "stage".into(),
        y_label: "examples".into(),
        x_range: (0.5, stages.len() as f64 + 0.5),
        y_range: (0.0, y_max * 1.1),
        series,
    };
    figure(paths, name, &format!("training data of the {experiment} run"), vec![Panel::Lines(lines)], (800, 500))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_columns_keep_numbers_longer_than_an_integer_as_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("votes.csv");
        let long = "583467610113738888270450965";
        std::fs::write(&path, format!("example,a,fast_correct,seen,n\n1,{long},true,,\n2,7,false,0.5,3\n")).unwrap();
        let f = Frame::read(&path).unwrap();
        assert_eq!(f.strings("a").unwrap(), [long, "7"]);
        assert_eq!(f.usizes("example").unwrap(), [1, 2]);
        assert_eq!(f.bools("fast_correct").unwrap(), [true, false]);
        assert_eq!(f.f64s("seen").unwrap(), [None, Some(0.5)]);
        let error = f.bools("a").unwrap_err().to_string();
        assert!(error.contains("votes.csv") && error.contains("column `a`"), "{error}");
        let error = f.f64s("fast_correct").unwrap_err().to_string();
        assert!(error.contains("column `fast_correct`: row 1: `true` is not a number"), "{error}");
        let error = f.usizes("seen").unwrap_err().to_string();
        assert!(error.contains("column `seen`: row 2: `0.5` is not a whole number"), "{error}");
        let error = f.usizes("n").unwrap_err().to_string();
        assert!(error.contains("column `n`: row 1 is empty"), "{error}");
    }
}
