//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use sector::train::Example;
use std::collections::HashMap;
use std::path::PathBuf;

/// The tiny random T5 made by tests/fixtures/make_t5_fixture.py.
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/t5-tiny")
}

/// The tensors recorded from transformers, on the CPU.
pub fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("golden.safetensors"), &Device::Cpu).expect("golden fixture")
}

/// Rows of an i64 matrix with the padding value removed from their ends.
pub fn unpadded_rows(t: &Tensor, pad: i64) -> Vec<Vec<u32>> {
    t.to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|row| {
            let len = row.iter().rposition(|&x| x != pad).map_or(0, |p| p + 1);
            row[..len].iter().map(|&x| x as u32).collect()
        })
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Copy task: a string of 1 to `max_digits` digits, and the same string as
/// the target.
pub fn copy_examples(n: usize, max_digits: usize, seed: u64) -> Vec<Example> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(1..=max_digits);
            let digits: String = (0..len).map(|_| char::from(b'0' + rng.random_range(0..10u8))).collect();
            (sector::tokenizer::encode(&digits), sector::tokenizer::encode(&digits))
        })
        .collect()
}

/// A run's stage records without their wall times.
pub fn records_without_time(run_dir: &std::path::Path) -> Vec<sector::sector::StageRecord> {
    let mut records: Vec<sector::sector::StageRecord> = sector::files::read_csv(&run_dir.join("stages.csv")).unwrap();
    for r in &mut records {
        r.seconds = 0.0;
    }
    records
}
