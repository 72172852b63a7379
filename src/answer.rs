//! The ways a model answers an addition problem (PROTOCOL.md section 4):
//! fast, one-step slow, full chain, simplify-only and simplify-then-guess.
//!
//! All of them are batched: a whole set of problems advances one step per
//! batched decoding call, so answering P problems of N digits by chain costs
//! N calls of P rows, not P * N calls of one row.

use crate::generate::{greedy, GreedyOptions};
use crate::model::T5;
use crate::parallel::{gather_texts, is_mine, Collective};
use crate::task::{parse_fast, parse_slow, Kind, Problem, SlowFormat};
use crate::tokenizer::{decode, encode};
use candle_core::Result;
use indicatif::ProgressBar;

/// A model with the settings that decide how it is asked.
pub struct Solver<'a> {
    pub model: &'a T5,
    pub format: SlowFormat,
    /// Rows per greedy decoding call.
    pub decode_batch: usize,
    /// Counts decoded rows (`ProgressBar::hidden()` for none); cleared when
    /// the solver is dropped.
    pub progress: ProgressBar,
    /// The ranks that share the decoding (`&SingleRank` for one process).
    pub collective: &'a dyn Collective,
    /// Digit offsets every question is asked at, the output being the
    /// majority of the answers (ties: the first offset's); empty: asked
    /// once at the places themselves (`self_training.offset_vote`).
    pub digit_offsets: Vec<u32>,
}

impl Drop for Solver<'_> {
    fn drop(&mut self) {
        self.progress.finish_and_clear();
    }
}

/// What happened while simplifying one problem step by step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    /// The model's raw slow output at each step taken.
    pub slow_outputs: Vec<String>,
    /// Candidate answers: after j = 1, 2, ... steps, the fast guess of the
    /// remaining subproblem followed by the j digits collected (None when a
    /// step or the guess did not parse). A problem taking no step has one
    /// candidate, its fast answer.
    pub candidates: Vec<Option<String>>,
}

/// Upper bound on the bytes of a correct answer of `kind` for an n-digit
/// problem, plus slack for a model that is nearly right.
fn max_new_tokens(kind: Kind, digits: usize, format: SlowFormat) -> usize {
    let worst = Problem::new("9".repeat(digits), "9".repeat(digits), true);
    let bytes = match kind {
        Kind::Fast => worst.fast_target().len(),
        Kind::Slow if digits < 2 => worst.fast_target().len(),
        Kind::Slow => worst.slow_target(format).len(),
    };
    bytes + 8
}

/// The majority answer; ties go to the candidate seen first (the one with
/// the fewest simplifications). An unparsable candidate takes part as a vote
/// for no answer.
pub fn majority_vote(candidates: &[Option<String>]) -> Option<String> {
    let mut best: Option<(&Option<String>, usize)> = None;
    for candidate in candidates {
        let votes = candidates.iter().filter(|c| *c == candidate).count();
        if best.is_none_or(|(_, most)| votes > most) {
            best = Some((candidate, votes));
        }
    }
    best.and_then(|(candidate, _)| candidate.clone())
}

/// Whether `left` more votes cannot change the majority of `votes`: its
/// leader is ahead of every other output by more than `left`.
fn settled(votes: &[Option<String>], left: usize) -> bool {
    let mut outputs: Vec<&Option<String>> = votes.iter().collect();
    outputs.sort();
    outputs.dedup();
    let mut counts: Vec<usize> = outputs.iter().map(|&o| votes.iter().filter(|v| *v == o).count()).collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let (leader, runner_up) = (counts.first().copied().unwrap_or(0), counts.get(1).copied().unwrap_or(0));
    leader > runner_up + left
}

impl Solver<'_> {
    /// Greedy outputs for `problems` asked as `kind`, as text: the majority
    /// of their outputs at `digit_offsets`, or asked once. A problem is
    /// asked at the next offset only while the offsets left could still
    /// change its majority (three of five agreeing settle it).
    pub fn ask(&self, problems: &[Problem], kind: Kind) -> Result<Vec<String>> {
        if self.digit_offsets.is_empty() {
            return self.ask_at(problems, kind, 0);
        }
        // votes[i]: problem i's outputs so far, in the order of the offsets.
        let mut votes: Vec<Vec<Option<String>>> = vec![Vec::new(); problems.len()];
        for (asked, &offset) in self.digit_offsets.iter().enumerate() {
            let left = self.digit_offsets.len() - asked;
            let open: Vec<usize> = (0..problems.len()).filter(|&i| !settled(&votes[i], left)).collect();
            if open.is_empty() {
                break;
            }
            let subset: Vec<Problem> = open.iter().map(|&i| problems[i].clone()).collect();
            for (&i, output) in open.iter().zip(self.ask_at(&subset, kind, offset)?) {
                votes[i].push(Some(output));
            }
        }
        Ok(votes.iter().map(|v| majority_vote(v).expect("every output is a vote")).collect())
    }

    /// Greedy outputs asked at one digit offset. Prompts are sorted by
    /// length and decoded `decode_batch` at a time; with several ranks each
    /// decodes its share of these chunks and all get every output.
    fn ask_at(&self, problems: &[Problem], kind: Kind, digit_offset: u32) -> Result<Vec<String>> {
        let mut order: Vec<usize> = (0..problems.len()).collect();
        order.sort_by_key(|&i| problems[i].digits());
        // (problem index, output) for the chunks this rank decodes.
        let mut mine: Vec<(usize, String)> = Vec::new();
        let chunks = order.chunks(self.decode_batch.max(1));
        for (_, chunk) in chunks.enumerate().filter(|(c, _)| is_mine(self.collective, *c)) {
            let inputs: Vec<Vec<u32>> = chunk.iter().map(|&i| encode(&problems[i].prompt(kind))).collect();
            let longest = chunk.iter().map(|&i| problems[i].digits()).max().unwrap_or(1);
            let opts = GreedyOptions { digit_offset, ..GreedyOptions::new(max_new_tokens(kind, longest, self.format)) };
            for (&i, ids) in chunk.iter().zip(greedy(self.model, &inputs, opts)?) {
                mine.push((i, decode(&ids)));
            }
            self.progress.inc(chunk.len() as u64);
        }
        let mut outputs = vec![String::new(); problems.len()];
        for (i, out) in gather_texts(self.collective, mine)? {
            outputs[i] = out;
        }
        Ok(outputs)
    }

    /// Fast answers (None where the output does not parse).
    pub fn fast(&self, problems: &[Problem]) -> Result<Vec<Option<String>>> {
        Ok(self.ask(problems, Kind::Fast)?.iter().map(|out| parse_fast(out)).collect())
    }

    /// Takes `steps[i]` slow steps on problem i, guessing fast after every
    /// step (`guess_every_step`) or only after the last. Each round is one
    /// batched slow call over the problems still going and one batched fast
    /// call over those that guess.
    pub fn simplify(&self, problems: &[Problem], steps: &[usize], guess_every_step: bool) -> Result<Vec<Trace>> {
        let mut traces = vec![Trace::default(); problems.len()];
        // Problems that take no step are answered fast.
        let immediate: Vec<usize> = (0..problems.len()).filter(|&i| steps[i] == 0).collect();
        let picked: Vec<Problem> = immediate.iter().map(|&i| problems[i].clone()).collect();
        for (&i, answer) in immediate.iter().zip(self.fast(&picked)?) {
            traces[i].candidates.push(answer);
        }
        // Per problem: the current subproblem and the digits collected so far.
        let mut current: Vec<Problem> = problems.to_vec();
        let mut digits: Vec<String> = vec![String::new(); problems.len()];
        let mut going: Vec<usize> = (0..problems.len()).filter(|&i| steps[i] > 0).collect();
        for step in 1.. {
            if going.is_empty() {
                break;
            }
            let subproblems: Vec<Problem> = going.iter().map(|&i| current[i].clone()).collect();
            let (mut still_going, mut guessing) = (Vec::new(), Vec::new());
            for (&i, output) in going.iter().zip(self.ask(&subproblems, Kind::Slow)?) {
                match parse_slow(&output, self.format) {
                    Some(parsed) => {
                        digits[i].insert(0, char::from(b'0' + parsed.digit));
                        current[i] = parsed.next;
                        if guess_every_step || step == steps[i] {
                            guessing.push(i);
                        }
                        if step < steps[i] {
                            still_going.push(i);
                        }
                    }
                    // A broken chain: every guess it still owed is no answer.
                    None => {
                        let owed = if guess_every_step { steps[i] - step + 1 } else { 1 };
                        traces[i].candidates.extend(std::iter::repeat_n(None, owed));
                    }
                }
                traces[i].slow_outputs.push(output);
            }
            let subproblems: Vec<Problem> = guessing.iter().map(|&i| current[i].clone()).collect();
            for (&i, guess) in guessing.iter().zip(self.fast(&subproblems)?) {
                traces[i].candidates.push(guess.map(|g| g + &digits[i]));
            }
            going = still_going;
        }
        Ok(traces)
    }

    /// Full chain of thought: N - 1 slow steps, then fast on the one-digit
    /// subproblem (a one-digit problem is answered fast).
    pub fn chain(&self, problems: &[Problem]) -> Result<Vec<Option<String>>> {
        let steps: Vec<usize> = problems.iter().map(|p| p.digits() - 1).collect();
        Ok(self.simplify(problems, &steps, false)?.into_iter().map(|t| t.candidates[0].clone()).collect())
    }

    /// One slow step, then a fast answer of the subproblem.
    pub fn simplify_only(&self, problems: &[Problem]) -> Result<Vec<Trace>> {
        let steps: Vec<usize> = problems.iter().map(|p| p.digits().min(2) - 1).collect();
        self.simplify(problems, &steps, true)
    }

    /// Guesses after 1..=min(k, N - 1) simplifications; the answer is their
    /// majority vote (`majority_vote`).
    pub fn simplify_then_guess(&self, problems: &[Problem], k: usize) -> Result<Vec<Trace>> {
        let steps: Vec<usize> = problems.iter().map(|p| (p.digits() - 1).min(k)).collect();
        self.simplify(problems, &steps, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn majority_vote_breaks_ties_by_fewest_simplifications() {
        assert_eq!(majority_vote(&[some("12"), some("13"), some("13")]), some("13"));
        assert_eq!(majority_vote(&[some("12"), some("13"), some("13"), some("12")]), some("12"));
        assert_eq!(majority_vote(&[None, some("7"), None]), None);
        assert_eq!(majority_vote(&[some("7"), None]), some("7"));
        assert_eq!(majority_vote(&[]), None);
    }

    #[test]
    fn decoding_budgets_cover_the_longest_answer() {
        let p = Problem::new("99999", "99999", true);
        assert!(max_new_tokens(Kind::Fast, 5, SlowFormat::English) > p.fast_target().len());
        assert!(max_new_tokens(Kind::Slow, 5, SlowFormat::English) > p.slow_target(SlowFormat::English).len());
        assert!(max_new_tokens(Kind::Slow, 5, SlowFormat::Compact) > p.slow_target(SlowFormat::Compact).len());
    }
}
