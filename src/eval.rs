//! Evaluation: each problem answered fast, by full chain of thought and by
//! one slow step, checked against an oracle; summaries by length. Used after
//! every stage of a run and by `sector eval` on any problem set.

use crate::answer::Solver;
use crate::error::{Error, Result};
use crate::task::{parse_fast, Kind, Oracle, Problem};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// One problem put to a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProblemResult {
    pub a: String,
    pub b: String,
    pub c: u8,
    pub digits: usize,
    /// The fast answer as parsed ("" when the output did not parse).
    pub fast_answer: String,
    pub fast_correct: bool,
    pub chain_answer: String,
    pub chain_correct: bool,
    /// The raw one-step slow output ("" for one-digit problems, which have none).
    pub slow_output: String,
    pub slow_correct: bool,
}

/// Accuracies of one length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LengthSummary {
    pub digits: usize,
    pub problems: usize,
    pub fast_accuracy: f64,
    pub chain_accuracy: f64,
    /// One-step slow exact match (empty for one digit).
    pub slow_accuracy: Option<f64>,
}

/// Answers every problem fast and by chain; the chain's first slow output is
/// the one-step slow answer. All lengths advance together, one batched call
/// per step.
pub fn evaluate(solver: &Solver, problems: &[Problem], oracle: &dyn Oracle) -> candle_core::Result<Vec<ProblemResult>> {
    let fast = solver.ask(problems, Kind::Fast)?;
    let steps: Vec<usize> = problems.iter().map(|p| p.digits() - 1).collect();
    let traces = solver.simplify(problems, &steps, false)?;
    Ok(problems
        .iter()
        .zip(fast.iter().zip(&traces))
        .map(|(p, (fast, trace))| {
            let truth = oracle.sum(p);
            let fast_answer = parse_fast(fast).unwrap_or_default();
            let chain_answer = trace.candidates[0].clone().unwrap_or_default();
            let slow_output = trace.slow_outputs.first().cloned().unwrap_or_default();
            ProblemResult {
                a: p.a.clone(),
                b: p.b.clone(),
                c: p.carry as u8,
                digits: p.digits(),
                fast_correct: fast_answer == truth,
                chain_correct: chain_answer == truth,
                slow_correct: p.digits() > 1 && slow_output == oracle.slow_target(p, solver.format),
                fast_answer,
                chain_answer,
                slow_output,
            }
        })
        .collect())
}

pub fn summarize(results: &[ProblemResult]) -> Vec<LengthSummary> {
    let mut by_length: BTreeMap<usize, Vec<&ProblemResult>> = BTreeMap::new();
    for r in results {
        by_length.entry(r.digits).or_default().push(r);
    }
    by_length
        .into_iter()
        .map(|(digits, rows)| {
            let fraction =
                |hit: fn(&ProblemResult) -> bool| rows.iter().filter(|r| hit(r)).count() as f64 / rows.len() as f64;
            LengthSummary {
                digits,
                problems: rows.len(),
                fast_accuracy: fraction(|r| r.fast_correct),
                chain_accuracy: fraction(|r| r.chain_correct),
                slow_accuracy: (digits > 1).then(|| fraction(|r| r.slow_correct)),
            }
        })
        .collect()
}

#[derive(Deserialize)]
struct ProblemLine {
    a: String,
    b: String,
    c: String,
}

/// Reads a problem set: a CSV with columns a, b, c (c is 0 or 1).
pub fn read_problems(path: &Path) -> Result<Vec<Problem>> {
    let mut reader = csv::Reader::from_path(path).map_err(|e| Error::format(path, format!("cannot open: {e}")))?;
    let mut problems = Vec::new();
    for (i, line) in reader.deserialize::<ProblemLine>().enumerate() {
        let line_no = i + 2; // the header is line 1
        let line = line.map_err(|e| Error::format(path, format!("line {line_no}: {e}; the columns are a,b,c")))?;
        let number_ok =
            |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && (n == "0" || !n.starts_with('0'));
        let problem = match line.c.as_str() {
            "0" | "1" if number_ok(&line.a) && number_ok(&line.b) && line.a.len() == line.b.len() => {
                Problem::new(line.a, line.b, line.c == "1")
            }
            _ => {
                return Err(Error::format(
                    path,
                    format!(
                        "line {line_no}: ({:?}, {:?}, {:?}) is not a problem: a and b need the same number of \
                         digits without leading zeros, c is 0 or 1",
                        line.a, line.b, line.c
                    ),
                ))
            }
        };
        problems.push(problem);
    }
    Ok(problems)
}
