//! Finite-difference check of the loss gradient, in f64 on a tiny config.
//!
//! Every parameter tensor is checked at a few entries, so a layer whose
//! gradient silently vanishes (as it would through candle's fast softmax or
//! RMS norm kernels, which have no backward pass) fails here.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use sector::model::{DigitPositions, Dropout, Seq2SeqBatch, T5Config};
use sector::tokenizer::encode;
use sector::weights::Model;

fn mean_loss(model: &Model, batch: &Seq2SeqBatch) -> Tensor {
    (model.t5.loss_sum(batch, &mut Dropout::off()).unwrap() / batch.num_target_tokens as f64).unwrap()
}

#[test]
fn loss_gradient_matches_finite_differences() {
    let mut cfg = T5Config::byt5(16, 24, 2, 8, 2, 2);
    cfg.relative_attention_num_buckets = 8;
    cfg.relative_attention_max_distance = 12;
    check_gradients(&cfg, &[]);
}

#[test]
fn loss_gradient_matches_finite_differences_with_digit_places() {
    // All three tables, with training offsets (CPU-scale option).
    let mut cfg = T5Config::byt5(16, 24, 2, 8, 2, 2);
    cfg.relative_attention_num_buckets = 8;
    cfg.relative_attention_max_distance = 12;
    cfg.digit_positions = Some(DigitPositions { max_index: 6, from_right: true, number_index: true });
    check_gradients(&cfg, &[1, 3]);
}

#[test]
fn loss_gradient_matches_finite_differences_with_clipped_positions() {
    // Clipped at 2, so the inputs reach the saturated buckets of both stacks.
    let mut cfg = T5Config::byt5(16, 24, 2, 8, 2, 2);
    cfg.relative_attention_clip = Some(2);
    cfg.digit_positions = Some(DigitPositions { max_index: 6, from_right: false, number_index: false });
    check_gradients(&cfg, &[1, 3]);
}

fn check_gradients(cfg: &T5Config, digit_offsets: &[u32]) {
    let model = Model::random(cfg, 3, &Device::Cpu, DType::F64).unwrap();
    // Two rows of different lengths, so padding masks are on the path too.
    let inputs = [encode("Add fast.\nQ: 12 + 34 = ?"), encode("Q: 9")];
    let targets = [encode("A: 46"), encode("A: 9 + 0 = 9.")];
    let mut batch = Seq2SeqBatch::new(&inputs, &targets, &Device::Cpu).unwrap();
    batch.digit_offsets = digit_offsets.to_vec();
    let grads = mean_loss(&model, &batch).backward().unwrap();

    let mut rng = rand_pcg::Pcg64::seed_from_u64(11);
    let h = 1e-6;
    for (name, var) in &model.vars {
        let analytic = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
        let analytic = analytic.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!(analytic.iter().any(|g| g.abs() > 1e-10), "{name}: gradient is zero everywhere");
        let original = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // Entries whose gradient is at least 1 % of the tensor's largest: central
        // differences with h = 1e-6 carry an absolute error near 1e-9, too much
        // for the relative bound on tiny entries (position-bias buckets that no
        // offset uses have none at all).
        let largest = analytic.iter().fold(0f64, |m, g| m.max(g.abs()));
        let candidates: Vec<usize> = (0..analytic.len()).filter(|&i| analytic[i].abs() >= 0.01 * largest).collect();
        for _ in 0..3 {
            let i = candidates[rng.random_range(0..candidates.len())];
            let loss_at = |value: f64| {
                let mut values = original.clone();
                values[i] = value;
                var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap()).unwrap();
                mean_loss(&model, &batch).to_scalar::<f64>().unwrap()
            };
            let numeric = (loss_at(original[i] + h) - loss_at(original[i] - h)) / (2.0 * h);
            loss_at(original[i]);
            let relative = (numeric - analytic[i]).abs() / (numeric.abs() + analytic[i].abs());
            assert!(relative < 1e-5, "{name}[{i}]: autograd {} vs finite difference {numeric}", analytic[i]);
        }
    }
}
