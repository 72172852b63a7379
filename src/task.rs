//! The addition task of PROTOCOL.md sections 2 and 3: problems, their exact
//! prompt and target strings, seeded sampling with commutative twins, a
//! parser for model outputs that never panics, and carry statistics.
//!
//! Numbers are decimal digit strings, so no length is too long.

use rand::seq::SliceRandom;
use rand::Rng;
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// a + b (+ 1 when `carry`), where a and b have the same number of digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Problem {
    pub a: String,
    pub b: String,
    pub carry: bool,
}

/// How a slow (one chain-of-thought step) target is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SlowFormat {
    /// The paper's sentences (PROTOCOL.md section 3).
    English,
    /// The same content in about a quarter of the bytes (a declared CPU-scale deviation).
    Compact,
}

/// Fast (answer at once) or slow (one simplification step).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Fast,
    Slow,
}

impl Problem {
    pub fn new(a: impl Into<String>, b: impl Into<String>, carry: bool) -> Self {
        Problem { a: a.into(), b: b.into(), carry }
    }

    /// Number of digits of each operand.
    pub fn digits(&self) -> usize {
        self.a.len()
    }

    /// (b, a, carry): the same sum asked the other way round.
    pub fn twin(&self) -> Problem {
        Problem { a: self.b.clone(), b: self.a.clone(), carry: self.carry }
    }

    /// The problem with the digits of `column` (0: the last digits) exchanged
    /// between the two numbers: the same sum and the same carry into and out
    /// of every column (both leading digits stay non-zero).
    pub fn swap_column(&self, column: usize) -> Problem {
        let (mut a, mut b) = (self.a.clone().into_bytes(), self.b.clone().into_bytes());
        let place = a.len() - 1 - column;
        std::mem::swap(&mut a[place], &mut b[place]);
        let digits = |bytes| String::from_utf8(bytes).expect("digits are ASCII");
        Problem { a: digits(a), b: digits(b), carry: self.carry }
    }

    /// Up to `count` problems with this one's sum and carries, each with the
    /// digits of another column exchanged; the columns are drawn from those
    /// whose two digits differ (exchanging equal digits changes nothing).
    pub fn column_swaps(&self, count: usize, rng: &mut Pcg64) -> Vec<Problem> {
        let (a, b) = (self.a.as_bytes(), self.b.as_bytes());
        let mut columns: Vec<usize> =
            (0..self.digits()).filter(|&c| a[a.len() - 1 - c] != b[b.len() - 1 - c]).collect();
        columns.shuffle(rng);
        columns.truncate(count);
        columns.into_iter().map(|c| self.swap_column(c)).collect()
    }

    /// The last digit of each number.
    pub fn last_digits(&self) -> (u8, u8) {
        let last = |n: &str| n.as_bytes()[n.len() - 1] - b'0';
        (last(&self.a), last(&self.b))
    }

    /// The problem with its last column made another way: two last digits
    /// and a carry in with the same sum, drawn from those that are neither
    /// this column nor its twin's (3 + 3: 0 + 6, 1 + 5, 2 + 4, 4 + 2, 5 + 1,
    /// 6 + 0, 0 + 5 + 1, ..., 5 + 0 + 1). Its step has the same sum, digit,
    /// carry out and subproblem. None when the column has no other way (it
    /// sums to 0 or 19) or is the leading one.
    pub fn last_column_variant(&self, rng: &mut Pcg64) -> Option<Problem> {
        if self.digits() < 2 {
            return None;
        }
        let (x, y) = self.last_digits();
        let sum = x + y + self.carry as u8;
        let ways: Vec<(u8, bool)> = [false, true]
            .into_iter()
            .flat_map(|carry| (0..=9).map(move |d| (d, carry)))
            .filter(|&(d, carry)| d + carry as u8 <= sum && sum - d - (carry as u8) <= 9)
            .filter(|&(d, carry)| carry != self.carry || (d != x && d != y))
            .collect();
        if ways.is_empty() {
            return None;
        }
        let (d, carry) = ways[rng.random_range(0..ways.len())];
        let restate = |n: &str, digit: u8| format!("{}{}", &n[..n.len() - 1], digit);
        Some(Problem::new(restate(&self.a, d), restate(&self.b, sum - d - carry as u8), carry))
    }

    /// `Q: {a} + {b} = ?` or `Q: {a} + {b} + 1 = ?`
    pub fn question(&self) -> String {
        format!("Q: {} + {}{} = ?", self.a, self.b, plus_one(self.carry))
    }

    pub fn prompt(&self, kind: Kind) -> String {
        match kind {
            Kind::Fast => format!("Add fast.\n{}", self.question()),
            Kind::Slow => format!("Add slow.\n{}", self.question()),
        }
    }

    /// a + b + carry, in decimal.
    pub fn sum(&self) -> String {
        add_decimal(&self.a, &self.b, self.carry)
    }

    /// `A: {a + b + c}`
    pub fn fast_target(&self) -> String {
        format!("A: {}", self.sum())
    }

    /// The simplification step of this problem (needs at least 2 digits).
    pub fn slow_step(&self) -> SlowStep {
        let (x, y) = self.last_digits();
        let s = x + y + self.carry as u8;
        SlowStep {
            x,
            y,
            carry_in: self.carry,
            s,
            digit: s % 10,
            next: Problem::new(&self.a[..self.a.len() - 1], &self.b[..self.b.len() - 1], s >= 10),
        }
    }

    pub fn slow_target(&self, format: SlowFormat) -> String {
        self.slow_step().render(format)
    }

    /// Total number of carries in the column addition, and the longest run
    /// of consecutive columns that carry (the carry-in counts as a carry
    /// into the first column).
    pub fn carries(&self) -> (usize, usize) {
        let (mut carry, mut total, mut streak, mut longest) = (self.carry, 0, 0, 0);
        for (x, y) in self.a.bytes().rev().zip(self.b.bytes().rev()) {
            carry = (x - b'0') + (y - b'0') + carry as u8 >= 10;
            streak = if carry { streak + 1 } else { 0 };
            total += carry as usize;
            longest = longest.max(streak);
        }
        (total, longest)
    }
}

fn plus_one(carry: bool) -> &'static str {
    if carry {
        " + 1"
    } else {
        ""
    }
}

/// The decimal sum of two digit strings and a carry.
pub fn add_decimal(a: &str, b: &str, carry: bool) -> String {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut digits = Vec::with_capacity(a.len().max(b.len()) + 1);
    let mut carry = carry as u8;
    for i in 0..a.len().max(b.len()) {
        let digit = |n: &[u8]| if i < n.len() { n[n.len() - 1 - i] - b'0' } else { 0 };
        let s = digit(a) + digit(b) + carry;
        digits.push(b'0' + s % 10);
        carry = s / 10;
    }
    if carry > 0 {
        digits.push(b'0' + carry);
    }
    while digits.len() > 1 && digits.last() == Some(&b'0') {
        digits.pop();
    }
    digits.reverse();
    String::from_utf8(digits).expect("ASCII digits")
}

/// One simplification step: the last digits, their sum, the digit of the
/// answer it yields, and the smaller problem that remains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlowStep {
    pub x: u8,
    pub y: u8,
    pub carry_in: bool,
    pub s: u8,
    pub digit: u8,
    pub next: Problem,
}

/// The ground truth. Everything in the SECToR loop that needs a true answer
/// (script data, audits, evaluation) asks an oracle, so a test can poison it
/// above the supervised range and show that training never saw it.
pub trait Oracle {
    fn sum(&self, problem: &Problem) -> String;
    fn slow_target(&self, problem: &Problem, format: SlowFormat) -> String;

    fn target(&self, problem: &Problem, kind: Kind, format: SlowFormat) -> String {
        match kind {
            Kind::Fast => format!("A: {}", self.sum(problem)),
            Kind::Slow => self.slow_target(problem, format),
        }
    }
}

/// The real one: column addition.
pub struct TrueOracle;

impl Oracle for TrueOracle {
    fn sum(&self, problem: &Problem) -> String {
        problem.sum()
    }

    fn slow_target(&self, problem: &Problem, format: SlowFormat) -> String {
        problem.slow_target(format)
    }
}

/// A piece of a slow-target template: fixed text, or a number.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Piece {
    Text(&'static str),
    X,
    Y,
    S,
    Digit,
    NextA,
    NextB,
}

/// The template of a slow target for the given carry in and carry out. One
/// template serves both writing targets and parsing model outputs.
fn slow_template(format: SlowFormat, carry_in: bool, carry_out: bool) -> Vec<Piece> {
    use Piece::*;
    let mut t = Vec::new();
    match format {
        SlowFormat::English => {
            t.extend([
                Text("A: The first number's last digit is "),
                X,
                Text(". The second number's last digit is "),
                Y,
            ]);
            t.push(Text(". "));
            if carry_in {
                t.push(Text("We are carrying a 1 from the previous step. "));
            }
            t.extend([X, Text(" + "), Y, Text(if carry_in { " + 1 = " } else { " = " }), S]);
            t.extend([
                Text(". The last digit of this sum is "),
                Digit,
                Text(" so our initial partial answer is "),
                Digit,
            ]);
            t.push(Text(". "));
            if carry_out {
                t.push(Text("Since this sum is two digits we carry a 1 to the next step. "));
            }
            t.extend([
                Text(
                    "We can now recursively solve a smaller problem. Removing the last digit from each number we have ",
                ),
                NextA,
                Text(" and "),
                NextB,
                Text(". The next subproblem is "),
                NextA,
                Text(" + "),
                NextB,
            ]);
        }
        SlowFormat::Compact => {
            t.extend([Text("A: "), X, Text(" + "), Y, Text(if carry_in { " + 1 = " } else { " = " }), S]);
            t.extend([Text(". Digit "), Digit, Text(".")]);
            if carry_out {
                t.push(Text(" Carry 1."));
            }
            t.extend([Text(" Next "), NextA, Text(" + "), NextB]);
        }
    }
    t.push(Text(if carry_out { " + 1." } else { "." }));
    t
}

impl SlowStep {
    pub fn render(&self, format: SlowFormat) -> String {
        let mut out = String::new();
        for piece in slow_template(format, self.carry_in, self.next.carry) {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::X => out.push_str(&self.x.to_string()),
                Piece::Y => out.push_str(&self.y.to_string()),
                Piece::S => out.push_str(&self.s.to_string()),
                Piece::Digit => out.push_str(&self.digit.to_string()),
                Piece::NextA => out.push_str(&self.next.a),
                Piece::NextB => out.push_str(&self.next.b),
            }
        }
        out
    }
}

/// What a chain needs from a slow output: the digit of the answer it
/// claims, and the subproblem it hands on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedSlow {
    pub digit: u8,
    pub next: Problem,
}

/// Reads a model's slow output. It must follow one of the four templates
/// (carry in or not, carry out or not) exactly, with any numbers; the digit
/// and the subproblem are taken from the sentences that state them ("...
/// partial answer is d" / "Digit d", and "The next subproblem is ..." /
/// "Next ..."). Anything else is None.
pub fn parse_slow(output: &str, format: SlowFormat) -> Option<ParsedSlow> {
    let read = read_slow(output, format)?;
    let last = |piece: Piece| read.numbers.iter().rev().find(|(p, _)| *p == piece).map(|(_, number)| *number);
    let digit: u8 = last(Piece::Digit)?.parse().ok().filter(|d| *d < 10)?;
    let next = Problem::new(last(Piece::NextA)?, last(Piece::NextB)?, read.carry_out);
    Some(ParsedSlow { digit, next })
}

/// The step the commutative twin (b + a) takes if this output is a + b's:
/// the same sentences with the two last digits and the two remaining
/// numbers exchanged. None if the output follows no template.
pub fn mirrored_slow(output: &str, format: SlowFormat) -> Option<String> {
    restate_slow(output, format, None, |piece, k, read| {
        let partner = match piece {
            Piece::X => Piece::Y,
            Piece::Y => Piece::X,
            Piece::NextA => Piece::NextB,
            Piece::NextB => Piece::NextA,
            other => other,
        };
        read.number(partner, k).map(str::to_string)
    })
}

/// The step of `variant` if this output is that of a problem whose last
/// column `variant` makes another way (`Problem::last_column_variant`): the
/// same sentences with the variant's last digits and carry in. None if the
/// output follows no template.
pub fn restated_last_column(output: &str, format: SlowFormat, variant: &Problem) -> Option<String> {
    let (x, y) = variant.last_digits();
    restate_slow(output, format, Some(variant.carry), |piece, k, read| match piece {
        Piece::X => Some(x.to_string()),
        Piece::Y => Some(y.to_string()),
        other => read.number(other, k).map(str::to_string),
    })
}

/// The output with each number restated by `restate(piece, k, read)`, k
/// counting earlier numbers of the same piece (the English format states
/// some twice), in the template of `carry_in` (None: the output's own).
/// None if the output follows no template or `restate` is None.
fn restate_slow(
    output: &str,
    format: SlowFormat,
    carry_in: Option<bool>,
    restate: impl Fn(Piece, usize, &SlowText) -> Option<String>,
) -> Option<String> {
    let read = read_slow(output, format)?;
    let mut seen = Vec::new();
    let mut restated = String::new();
    for piece in slow_template(format, carry_in.unwrap_or(read.carry_in), read.carry_out) {
        if let Piece::Text(text) = piece {
            restated.push_str(text);
            continue;
        }
        let k = seen.iter().filter(|&&p| p == piece).count();
        seen.push(piece);
        restated.push_str(&restate(piece, k, &read)?);
    }
    Some(restated)
}

/// A slow output that follows a template: which one (its carries), and its
/// numbers in order.
struct SlowText<'a> {
    carry_in: bool,
    carry_out: bool,
    numbers: Vec<(Piece, &'a str)>,
}

impl SlowText<'_> {
    /// The k-th number the output states for `piece`.
    fn number(&self, piece: Piece, k: usize) -> Option<&str> {
        self.numbers.iter().filter(|(p, _)| *p == piece).nth(k).map(|(_, number)| *number)
    }
}

fn read_slow(output: &str, format: SlowFormat) -> Option<SlowText<'_>> {
    [(false, false), (false, true), (true, false), (true, true)].iter().find_map(|&(carry_in, carry_out)| {
        let template = slow_template(format, carry_in, carry_out);
        let mut rest = output;
        let mut numbers = Vec::new();
        for &piece in &template {
            if let Piece::Text(text) = piece {
                rest = rest.strip_prefix(text)?;
                continue;
            }
            let len = rest.bytes().take_while(u8::is_ascii_digit).count();
            let (number, tail) = rest.split_at(len);
            if number.is_empty() {
                return None;
            }
            numbers.push((piece, number));
            rest = tail;
        }
        rest.is_empty().then_some(SlowText { carry_in, carry_out, numbers })
    })
}

/// Reads a model's fast output `A: <digits>`; anything else is None.
pub fn parse_fast(output: &str) -> Option<String> {
    let number = output.strip_prefix("A: ")?;
    (!number.is_empty() && number.bytes().all(|b| b.is_ascii_digit())).then(|| number.to_string())
}

/// Number of distinct problems with `digits`-digit operands (both carries).
pub fn count_problems(digits: usize) -> f64 {
    let operands = if digits == 1 { 10.0 } else { 9.0 * 10f64.powi(digits as i32 - 1) };
    2.0 * operands * operands
}

pub fn random_operand(rng: &mut Pcg64, digits: usize) -> String {
    if digits == 1 {
        return char::from(b'0' + rng.random_range(0..10u8)).to_string();
    }
    let mut s = String::with_capacity(digits);
    s.push(char::from(b'0' + rng.random_range(1..10u8)));
    s.extend((1..digits).map(|_| char::from(b'0' + rng.random_range(0..10u8))));
    s
}

pub fn random_problem(rng: &mut Pcg64, digits: usize) -> Problem {
    let a = random_operand(rng, digits);
    let b = random_operand(rng, digits);
    Problem::new(a, b, rng.random_bool(0.5))
}

/// Every problem with `digits`-digit operands, in a fixed order.
fn all_problems(digits: usize) -> Vec<Problem> {
    let (low, high) = if digits == 1 { (0, 10) } else { (10u64.pow(digits as u32 - 1), 10u64.pow(digits as u32)) };
    let mut all = Vec::new();
    for a in low..high {
        for b in low..high {
            for carry in [false, true] {
                all.push(Problem::new(a.to_string(), b.to_string(), carry));
            }
        }
    }
    all
}

/// Up to `count` distinct `digits`-digit problems, none of them in
/// `exclude`, drawn with their commutative twins: a problem is followed by
/// its twin (unless a = b), so that twins stay side by side. When fewer than
/// `count` problems exist, all of them are returned (in random order).
pub fn sample_unique(rng: &mut Pcg64, digits: usize, count: usize, exclude: &HashSet<Problem>) -> Vec<Problem> {
    let available = count_problems(digits) - exclude.len() as f64;
    // Rejection sampling slows down as the space fills: enumerate small spaces.
    if available <= 2.0 * count as f64 {
        let mut pairs: Vec<Vec<Problem>> = all_problems(digits)
            .into_iter()
            .filter(|p| p.a <= p.b)
            .map(|p| {
                let twin = p.twin();
                let mut pair = if twin == p { vec![p] } else { vec![p, twin] };
                pair.retain(|q| !exclude.contains(q));
                pair
            })
            .filter(|pair| !pair.is_empty())
            .collect();
        rand::seq::SliceRandom::shuffle(pairs.as_mut_slice(), rng);
        let mut problems: Vec<Problem> = pairs.into_iter().flatten().collect();
        problems.truncate(count);
        return problems;
    }
    let mut seen = HashSet::new();
    let mut problems = Vec::with_capacity(count);
    while problems.len() < count {
        let p = random_problem(rng, digits);
        if exclude.contains(&p) || seen.contains(&p) {
            continue;
        }
        let twin = p.twin();
        seen.insert(p.clone());
        problems.push(p);
        if problems.len() < count && seen.insert(twin.clone()) {
            problems.push(twin);
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn sums_in_decimal() {
        assert_eq!(add_decimal("141", "123", false), "264");
        assert_eq!(add_decimal("95", "87", true), "183");
        assert_eq!(add_decimal("0", "0", false), "0");
        assert_eq!(add_decimal("9", "0", true), "10");
        assert_eq!(add_decimal("99999999999999999999999999999999999", "1", false), "1".to_string() + &"0".repeat(35));
    }

    #[test]
    fn parse_fast_accepts_only_the_answer_format() {
        assert_eq!(parse_fast("A: 264"), Some("264".into()));
        assert_eq!(parse_fast("A: 0"), Some("0".into()));
        for bad in ["A:264", "A: ", "A: 26 4", "A: 264.", "264", "", "A: -1", "A: 2\u{fffd}"] {
            assert_eq!(parse_fast(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_column_swap_keeps_the_sum_and_every_carry() {
        assert_eq!(Problem::new("4821", "7395", true).swap_column(0), Problem::new("4825", "7391", true));
        assert_eq!(Problem::new("4821", "7395", true).swap_column(3), Problem::new("7821", "4395", true));
        let mut rng = Pcg64::seed_from_u64(3);
        for _ in 0..200 {
            let p = random_problem(&mut rng, 12);
            let variants = p.column_swaps(3, &mut rng);
            assert!(variants.len() <= 3);
            for v in &variants {
                assert_ne!(&v, &&p, "a swap of equal digits is no variant");
                assert_eq!(v.sum(), p.sum());
                // Every column's digit sum is the same, so every carry is.
                let column_sums =
                    |q: &Problem| -> Vec<u8> { q.a.bytes().zip(q.b.bytes()).map(|(x, y)| x + y).collect() };
                assert_eq!(column_sums(v), column_sums(&p));
            }
            let distinct: HashSet<&Problem> = variants.iter().collect();
            assert_eq!(distinct.len(), variants.len(), "one column each");
        }
        // Equal digits everywhere: no variant exists.
        assert!(Problem::new("555", "555", false).column_swaps(2, &mut rng).is_empty());
    }

    #[test]
    fn carries_and_streaks() {
        assert_eq!(Problem::new("141", "123", false).carries(), (0, 0));
        assert_eq!(Problem::new("95", "87", true).carries(), (2, 2));
        assert_eq!(Problem::new("909", "191", false).carries(), (3, 3));
        assert_eq!(Problem::new("5050", "5050", false).carries(), (2, 1));
        assert_eq!(Problem::new("10", "10", true).carries(), (0, 0));
    }

    #[test]
    fn sampling_is_unique_with_twins_and_seeded() {
        let mut rng = Pcg64::seed_from_u64(3);
        let problems = sample_unique(&mut rng, 4, 1000, &HashSet::new());
        assert_eq!(problems.len(), 1000);
        let set: HashSet<_> = problems.iter().cloned().collect();
        assert_eq!(set.len(), 1000, "unique");
        assert!(problems.iter().all(|p| p.digits() == 4 && p.b.len() == 4 && !p.a.starts_with('0')));
        let twins = problems.windows(2).filter(|w| w[1] == w[0].twin()).count();
        assert!(twins >= 490, "twins side by side: {twins}");
        let again = sample_unique(&mut Pcg64::seed_from_u64(3), 4, 1000, &HashSet::new());
        assert_eq!(problems, again);
        let carries = problems.iter().filter(|p| p.carry).count();
        assert!((400..600).contains(&carries), "carry-in is a fair coin: {carries}");
    }

    #[test]
    fn small_spaces_are_enumerated_and_exclusions_respected() {
        let mut rng = Pcg64::seed_from_u64(4);
        let all = sample_unique(&mut rng, 1, 1000, &HashSet::new());
        assert_eq!(all.len(), 200, "10 x 10 x 2 one-digit problems");
        assert_eq!(all.iter().collect::<HashSet<_>>().len(), 200);
        let exclude: HashSet<Problem> = all[..50].iter().cloned().collect();
        let rest = sample_unique(&mut rng, 1, 1000, &exclude);
        assert_eq!(rest.len(), 150);
        assert!(rest.iter().all(|p| !exclude.contains(p)));
    }
}
