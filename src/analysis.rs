//! Analyses of a run's final checkpoint, made once its last stage is done:
//! fast accuracy by length (tables 1 and 3), accuracy against the carries of
//! a problem (figure 9) and simplify-then-guess traced step by step on a few
//! problems (figure 4). All read the ground truth, for analysis only.

use crate::answer::{majority_vote, Solver};
use crate::eval::evaluate;
use crate::task::{parse_fast, Kind, Oracle, Problem};
use serde::{Deserialize, Serialize};

pub const FINAL_CSV: &str = "final.csv";
pub const CARRIES_CSV: &str = "carries.csv";

/// One row of final.csv: the final checkpoint's fast accuracy on one length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalRecord {
    /// The stage whose checkpoint answered.
    pub stage: usize,
    pub length: usize,
    pub problems: usize,
    pub fast: f64,
}
pub const VOTES_CSV: &str = "votes.csv";

/// One row of carries.csv: a problem put to the final checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CarryRecord {
    /// The stage whose checkpoint answered.
    pub stage: usize,
    pub digits: usize,
    pub a: String,
    pub b: String,
    pub c: u8,
    /// Column additions that carry, and the longest run of them.
    pub carries: usize,
    pub longest_streak: usize,
    pub fast_correct: bool,
    pub chain_correct: bool,
}

/// One row of votes.csv: one candidate of simplify-then-guess on an example
/// problem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VoteRecord {
    /// Numbers the example problems 1, 2, ...
    pub example: usize,
    pub a: String,
    pub b: String,
    pub c: u8,
    /// Simplifications before this candidate's guess.
    pub simplifications: usize,
    /// The model's output at this simplification ("" when the chain broke before it).
    pub slow_output: String,
    /// The guess followed by the collected digits ("" when none parsed).
    pub candidate: String,
    /// The majority vote over all candidates of the example, and the true sum.
    pub vote: String,
    pub truth: String,
}

/// Fast accuracy per length of `problems` (grouped by their digits).
pub fn final_accuracy(
    solver: &Solver,
    problems: &[Problem],
    oracle: &dyn Oracle,
    stage: usize,
) -> candle_core::Result<Vec<FinalRecord>> {
    let answers = solver.ask(problems, Kind::Fast)?;
    let mut by_length: std::collections::BTreeMap<usize, (usize, usize)> = Default::default();
    for (p, answer) in problems.iter().zip(&answers) {
        let (hits, total) = by_length.entry(p.digits()).or_default();
        *hits += usize::from(parse_fast(answer) == Some(oracle.sum(p)));
        *total += 1;
    }
    Ok(by_length
        .into_iter()
        .map(|(length, (hits, total))| FinalRecord { stage, length, problems: total, fast: hits as f64 / total as f64 })
        .collect())
}

/// Fast and chain-of-thought correctness of each problem, with its carries.
pub fn carries(
    solver: &Solver,
    problems: &[Problem],
    oracle: &dyn Oracle,
    stage: usize,
) -> candle_core::Result<Vec<CarryRecord>> {
    let results = evaluate(solver, problems, oracle)?;
    Ok(problems
        .iter()
        .zip(results)
        .map(|(p, r)| {
            let (carries, longest_streak) = p.carries();
            CarryRecord {
                stage,
                digits: r.digits,
                a: r.a,
                b: r.b,
                c: r.c,
                carries,
                longest_streak,
                fast_correct: r.fast_correct,
                chain_correct: r.chain_correct,
            }
        })
        .collect())
}

/// Simplify-then-guess with up to `k` simplifications on each problem, one
/// row per candidate.
pub fn votes(
    solver: &Solver,
    problems: &[Problem],
    k: usize,
    oracle: &dyn Oracle,
) -> candle_core::Result<Vec<VoteRecord>> {
    let traces = solver.simplify_then_guess(problems, k)?;
    let mut rows = Vec::new();
    for (example, (p, trace)) in problems.iter().zip(&traces).enumerate() {
        let vote = majority_vote(&trace.candidates).unwrap_or_default();
        for (j, candidate) in trace.candidates.iter().enumerate() {
            rows.push(VoteRecord {
                example: example + 1,
                a: p.a.clone(),
                b: p.b.clone(),
                c: p.carry as u8,
                simplifications: if p.digits() > 1 { j + 1 } else { 0 },
                slow_output: trace.slow_outputs.get(j).cloned().unwrap_or_default(),
                candidate: candidate.clone().unwrap_or_default(),
                vote: vote.clone(),
                truth: oracle.sum(p),
            });
        }
    }
    Ok(rows)
}
