//! The task's exact strings, compared byte for byte with hand-written
//! examples (PROTOCOL.md section 3), and the output parsers under fuzzing.

use rand::{Rng, SeedableRng};
use sector::task::{
    mirrored_slow, parse_fast, parse_slow, restated_last_column, Kind, ParsedSlow, Problem, SlowFormat,
};

#[test]
fn prompts_and_fast_targets() {
    let p = Problem::new("141", "123", false);
    assert_eq!(p.prompt(Kind::Fast), "Add fast.\nQ: 141 + 123 = ?");
    assert_eq!(p.prompt(Kind::Slow), "Add slow.\nQ: 141 + 123 = ?");
    assert_eq!(p.fast_target(), "A: 264");
    let c = Problem::new("95", "87", true);
    assert_eq!(c.prompt(Kind::Fast), "Add fast.\nQ: 95 + 87 + 1 = ?");
    assert_eq!(c.fast_target(), "A: 183");
    assert_eq!(Problem::new("9", "9", true).fast_target(), "A: 19");
    assert_eq!(Problem::new("0", "0", false).fast_target(), "A: 0");
}

#[test]
fn english_slow_targets() {
    // The protocol's own example.
    assert_eq!(
        Problem::new("141", "123", false).slow_target(SlowFormat::English),
        "A: The first number's last digit is 1. The second number's last digit is 3. 1 + 3 = 4. \
         The last digit of this sum is 4 so our initial partial answer is 4. We can now recursively \
         solve a smaller problem. Removing the last digit from each number we have 14 and 12. \
         The next subproblem is 14 + 12."
    );
    // Carry in and carry out, down to a one-digit subproblem.
    assert_eq!(
        Problem::new("95", "87", true).slow_target(SlowFormat::English),
        "A: The first number's last digit is 5. The second number's last digit is 7. \
         We are carrying a 1 from the previous step. 5 + 7 + 1 = 13. The last digit of this sum is 3 \
         so our initial partial answer is 3. Since this sum is two digits we carry a 1 to the next step. \
         We can now recursively solve a smaller problem. Removing the last digit from each number we \
         have 9 and 8. The next subproblem is 9 + 8 + 1."
    );
    // Carry in, no carry out.
    assert_eq!(
        Problem::new("20", "31", true).slow_target(SlowFormat::English),
        "A: The first number's last digit is 0. The second number's last digit is 1. \
         We are carrying a 1 from the previous step. 0 + 1 + 1 = 2. The last digit of this sum is 2 \
         so our initial partial answer is 2. We can now recursively solve a smaller problem. Removing \
         the last digit from each number we have 2 and 3. The next subproblem is 2 + 3."
    );
    // a = b, carry out without carry in.
    assert_eq!(
        Problem::new("4646", "4646", false).slow_target(SlowFormat::English),
        "A: The first number's last digit is 6. The second number's last digit is 6. 6 + 6 = 12. \
         The last digit of this sum is 2 so our initial partial answer is 2. Since this sum is two \
         digits we carry a 1 to the next step. We can now recursively solve a smaller problem. \
         Removing the last digit from each number we have 464 and 464. The next subproblem is \
         464 + 464 + 1."
    );
}

#[test]
fn compact_slow_targets() {
    // The protocol's own example.
    assert_eq!(
        Problem::new("95", "87", true).slow_target(SlowFormat::Compact),
        "A: 5 + 7 + 1 = 13. Digit 3. Carry 1. Next 9 + 8 + 1."
    );
    assert_eq!(
        Problem::new("141", "123", false).slow_target(SlowFormat::Compact),
        "A: 1 + 3 = 4. Digit 4. Next 14 + 12."
    );
    assert_eq!(
        Problem::new("20", "31", true).slow_target(SlowFormat::Compact),
        "A: 0 + 1 + 1 = 2. Digit 2. Next 2 + 3."
    );
    assert_eq!(
        Problem::new("4646", "4646", false).slow_target(SlowFormat::Compact),
        "A: 6 + 6 = 12. Digit 2. Carry 1. Next 464 + 464 + 1."
    );
}

#[test]
fn slow_targets_parse_back_to_their_step() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(0);
    for _ in 0..2000 {
        let digits = rng.random_range(2..40);
        let p = sector::task::random_problem(&mut rng, digits);
        let step = p.slow_step();
        for format in [SlowFormat::English, SlowFormat::Compact] {
            let parsed = parse_slow(&p.slow_target(format), format);
            assert_eq!(parsed, Some(ParsedSlow { digit: step.digit, next: step.next.clone() }), "{p:?} {format:?}");
        }
        assert_eq!(parse_fast(&p.fast_target()), Some(p.sum()));
    }
}

#[test]
fn a_slow_output_with_wrong_numbers_still_parses_for_the_chain() {
    // The chain takes the stated digit and subproblem, right or wrong.
    let parsed = parse_slow("A: 5 + 7 + 1 = 12. Digit 7. Carry 1. Next 91 + 8 + 1.", SlowFormat::Compact);
    assert_eq!(parsed, Some(ParsedSlow { digit: 7, next: Problem::new("91", "8", true) }));
    // Carry sentence without the "+ 1" it implies matches no template.
    assert_eq!(parse_slow("A: 5 + 7 = 12. Digit 2. Carry 1. Next 9 + 8.", SlowFormat::Compact), None);
    assert_eq!(parse_slow("A: 5 + 7 = 12. Digit 12. Carry 1. Next 9 + 8 + 1.", SlowFormat::Compact), None);
}

#[test]
fn a_mirrored_step_is_the_twins_step() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(1);
    for _ in 0..500 {
        let digits = rng.random_range(2..20);
        let p = sector::task::random_problem(&mut rng, digits);
        for format in [SlowFormat::English, SlowFormat::Compact] {
            assert_eq!(mirrored_slow(&p.slow_target(format), format), Some(p.twin().slow_target(format)), "{p:?}");
        }
    }
    // A wrong step mirrors as it is: its twin must make the same mistake the other way round.
    let wrong = "A: 2 + 5 = 7. Digit 7. Next 87727914 + 47498904.";
    let mirrored = mirrored_slow(wrong, SlowFormat::Compact);
    assert_eq!(mirrored.as_deref(), Some("A: 5 + 2 = 7. Digit 7. Next 47498904 + 87727914."));
    assert_eq!(mirrored_slow("A: 2 + 5 = 7. Digit 7.", SlowFormat::Compact), None);
}

#[test]
fn a_last_column_variant_takes_the_same_step_but_for_its_last_column() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(2);
    let mut drawn = 0;
    for _ in 0..500 {
        let digits = rng.random_range(2..20);
        let p = sector::task::random_problem(&mut rng, digits);
        let (x, y) = p.last_digits();
        let Some(v) = p.last_column_variant(&mut rng) else {
            assert!([0, 19].contains(&(x + y + p.carry as u8)), "{p:?} has another way");
            continue;
        };
        drawn += 1;
        let (vx, vy) = v.last_digits();
        assert_eq!(vx + vy + v.carry as u8, x + y + p.carry as u8, "{v:?}");
        let column = (vx, vy, v.carry);
        assert!(column != (x, y, p.carry) && column != (y, x, p.carry), "{v:?}: {p:?}'s column or its twin's");
        assert_eq!((&v.a[..digits - 1], &v.b[..digits - 1]), (&p.a[..digits - 1], &p.b[..digits - 1]));
        assert_eq!(v.sum(), p.sum());
        for format in [SlowFormat::English, SlowFormat::Compact] {
            assert_eq!(restated_last_column(&p.slow_target(format), format, &v), Some(v.slow_target(format)));
        }
    }
    assert!(drawn > 450, "{drawn} of 500 problems had a variant");
    // A column summing to 19 (or 0), and a one-digit problem, have no other way.
    assert_eq!(Problem::new("49", "59", true).last_column_variant(&mut rng), None);
    assert_eq!(Problem::new("3", "3", false).last_column_variant(&mut rng), None);
    // A one-column sum the model got wrong is restated as it is, so the
    // variant's right step disagrees with it.
    let wrong = "A: 8 + 9 = 16. Digit 6. Carry 1. Next 85490846202 + 63628266133 + 1.";
    let variant = Problem::new("854908462028", "636282661338", true);
    let restated = restated_last_column(wrong, SlowFormat::Compact, &variant);
    assert_eq!(restated.as_deref(), Some("A: 8 + 8 + 1 = 16. Digit 6. Carry 1. Next 85490846202 + 63628266133 + 1."));
    assert_ne!(restated, Some(variant.slow_target(SlowFormat::Compact)));
}

#[test]
fn parsers_never_panic_on_random_bytes_or_mutations() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(1);
    let alphabet: Vec<u8> = b"A: 0123456789+=.DigtNexCary1 \n\xff\xfe".to_vec();
    for i in 0..20000 {
        let text: String = if i % 2 == 0 {
            // Random bytes, decoded as a model output would be.
            let bytes: Vec<u8> =
                (0..rng.random_range(0..80)).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        } else {
            // A valid target with a few bytes changed, dropped or cut.
            let digits = rng.random_range(2..12);
            let p = sector::task::random_problem(&mut rng, digits);
            let format = if rng.random_bool(0.5) { SlowFormat::English } else { SlowFormat::Compact };
            let mut bytes = p.slow_target(format).into_bytes();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..bytes.len());
                match rng.random_range(0..3) {
                    0 => bytes[at] = alphabet[rng.random_range(0..alphabet.len())],
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes.truncate(at),
                }
                if bytes.is_empty() {
                    break;
                }
            }
            String::from_utf8_lossy(&bytes).into_owned()
        };
        for format in [SlowFormat::English, SlowFormat::Compact] {
            if let Some(parsed) = parse_slow(&text, format) {
                assert!(parsed.digit < 10);
                assert!(!parsed.next.a.is_empty() && !parsed.next.b.is_empty());
            }
        }
        if let Some(answer) = parse_fast(&text) {
            assert!(answer.bytes().all(|b| b.is_ascii_digit()));
        }
    }
}

#[test]
fn one_digit_problems_and_sums() {
    assert_eq!(Problem::new("7", "5", true).sum(), "13");
    assert_eq!(Problem::new("12", "34", false).slow_step().next, Problem::new("1", "3", false));
    assert_eq!(Problem::new("19", "91", true).slow_step().next, Problem::new("1", "9", true));
}
