//! Digit-position embeddings (model.rs `DigitPositions`) and clipped
//! relative positions (`T5Config::relative_attention_clip`), the CPU-scale
//! model options: cached decoding carries each row's digit run, offsets
//! reach both stacks, a place beyond the table is an error, and checkpoints
//! keep them.

mod common;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use sector::answer::Solver;
use sector::generate::{greedy, GreedyOptions};
use sector::model::{DigitPositions, Dropout, Seq2SeqBatch, T5Config};
use sector::parallel::SingleRank;
use sector::task::{Kind, SlowFormat};
use sector::tokenizer::encode;
use sector::train::{DigitOffset, OffsetDraw, TrainConfig, Trainer};
use sector::weights::Model;

fn model_with_places(max_index: usize, encoder_tables: bool) -> Model {
    model_with(max_index, encoder_tables, None)
}

fn model_with(max_index: usize, encoder_tables: bool, clip: Option<usize>) -> Model {
    let mut cfg = T5Config::preset("cpu-tiny").unwrap();
    cfg.digit_positions = Some(DigitPositions { max_index, from_right: encoder_tables, number_index: encoder_tables });
    cfg.relative_attention_clip = clip;
    Model::random(&cfg, 5, &Device::Cpu, DType::F32).unwrap()
}

fn rows() -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let inputs = vec![encode("Add slow.\nQ: 4821 + 7395 = ?"), encode("Add fast.\nQ: 7 + 8 = ?")];
    let targets = vec![encode("A: 1 + 5 = 6. Digit 6. Next 482 + 739."), encode("A: 15")];
    (inputs, targets)
}

#[test]
fn cached_decoding_equals_a_full_pass_with_digit_places() {
    cached_decoding_equals_a_full_pass(&model_with_places(40, true));
}

#[test]
fn cached_decoding_equals_a_full_pass_with_clipped_positions() {
    // Clipped at 2: the rows' targets run far past it, so the decoder's
    // saturated bucket is on the path at every later step.
    cached_decoding_equals_a_full_pass(&model_with(40, true, Some(2)));
}

fn cached_decoding_equals_a_full_pass(model: &Model) {
    let (inputs, targets) = rows();
    let mut batch = Seq2SeqBatch::new(&inputs, &targets, &Device::Cpu).unwrap();
    // Training offsets too: the decoder's places must carry them step by step.
    batch.digit_offsets = vec![7, 0];
    let full = model.t5.forward(&batch, &mut Dropout::off()).unwrap();
    let encoded =
        model.t5.encode(&batch.input_ids, &batch.input_mask, &batch.digit_offsets, &mut Dropout::off()).unwrap();
    let mut state = model.t5.start_decoder(&encoded, &batch.input_mask, &batch.digit_offsets, true).unwrap();
    let steps: Vec<Tensor> = (0..batch.decoder_input_ids.dim(1).unwrap())
        .map(|t| model.t5.decode(&batch.decoder_input_ids.narrow(1, t, 1).unwrap(), &mut state, &mut Dropout::off()))
        .collect::<candle_core::Result<_>>()
        .unwrap();
    let diff = max_abs_diff(&Tensor::cat(&steps, 1).unwrap(), &full);
    assert!(diff < 1e-4, "cached decoding differs by {diff}");
    // And the places matter: without the offsets the logits change.
    batch.digit_offsets.clear();
    let plain = model.t5.forward(&batch, &mut Dropout::off()).unwrap();
    assert!(max_abs_diff(&plain, &full) > 1e-3, "offsets changed nothing");
}

#[test]
fn greedy_decoding_at_a_digit_offset_takes_the_full_pass_argmax_at_that_offset() {
    let model = model_with_places(40, true);
    let inputs = vec![encode("Add slow.\nQ: 4821 + 7395 = ?")];
    let opts = GreedyOptions { digit_offset: 3, ..GreedyOptions::new(20) };
    let outputs = greedy(&model.t5, &inputs, opts).unwrap();
    // Fed back as a target, each token is the full pass's argmax at offset 3.
    let mut batch = Seq2SeqBatch::new(&inputs, &outputs, &Device::Cpu).unwrap();
    batch.digit_offsets = vec![3];
    let full = model.t5.forward(&batch, &mut Dropout::off()).unwrap(); // (1, len, vocab)
    let argmax: Vec<u32> = full.argmax(candle_core::D::Minus1).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    assert_eq!(argmax, outputs[0]);
}

#[test]
fn a_solver_asking_at_several_digit_offsets_answers_with_their_majority_and_stops_once_it_is_settled() {
    let model = model_with_places(40, true);
    let mut rng = rand_pcg::Pcg64::new(3, 0);
    let problems = sector::task::sample_unique(&mut rng, 4, 30, &std::collections::HashSet::new());
    // The outputs, and the rows decoded to get them.
    let ask = |digit_offsets: Vec<u32>| {
        let progress = indicatif::ProgressBar::hidden();
        let solver = Solver {
            model: &model.t5,
            format: SlowFormat::Compact,
            decode_batch: 16,
            progress: progress.clone(),
            collective: &SingleRank,
            digit_offsets,
        };
        (solver.ask(&problems, Kind::Slow).unwrap(), progress.position() as usize)
    };
    let ((at_0, _), (at_1, _)) = (ask(vec![0]), ask(vec![1]));
    let differ = (0..problems.len()).filter(|&i| at_0[i] != at_1[i]).count();
    assert!(differ > 0, "the offsets change some outputs");
    assert_eq!(ask(Vec::new()).0, at_0, "no offsets: the places themselves");
    // Two votes beat one; a tie goes to the first offset.
    assert_eq!(ask(vec![0, 1, 1]).0, at_1);
    assert_eq!(ask(vec![1, 0, 0]).0, at_0);
    assert_eq!(ask(vec![1, 0]).0, at_1);
    // A problem is asked again only while its majority is open: where the
    // offsets agree, three votes settle it; where they differ, the fourth
    // (0, 1, 1, 1: three to one with one left).
    let (outputs, rows) = ask(vec![0, 1, 1, 1, 0]);
    assert_eq!(outputs, at_1);
    assert_eq!(rows, 3 * problems.len() + differ);
    let (outputs, rows) = ask(vec![0, 0, 0, 1, 1]);
    assert_eq!((outputs, rows), (at_0, 3 * problems.len()));
}

#[test]
fn a_place_beyond_the_table_is_an_error() {
    let model = model_with_places(4, false);
    let inputs = [encode("Q: 12345 + 1 = ?")];
    let batch = Seq2SeqBatch::new(&inputs, &[encode("A: 12346")], &Device::Cpu).unwrap();
    let error = model.t5.forward(&batch, &mut Dropout::off()).unwrap_err().to_string();
    assert!(error.contains("digit place 5") && error.contains("max_index 4"), "{error}");
    // Four digits fit, until a training offset pushes them past the table.
    let inputs = [encode("Q: 1234 + 1 = ?")];
    let mut batch = Seq2SeqBatch::new(&inputs, &[encode("A: 1235")], &Device::Cpu).unwrap();
    model.t5.forward(&batch, &mut Dropout::off()).unwrap();
    batch.digit_offsets = vec![1];
    assert!(model.t5.forward(&batch, &mut Dropout::off()).is_err());
}

#[test]
fn decoding_ends_a_row_whose_digits_run_past_the_table() {
    let model = model_with_places(3, false);
    let input = sector::tokenizer::pad_batch(&[encode("Q: 1 + 2 = ?")], &Device::Cpu).unwrap();
    let encoded = model.t5.encode(&input.ids, &input.mask, &[], &mut Dropout::off()).unwrap();
    let mut state = model.t5.start_decoder(&encoded, &input.mask, &[], true).unwrap();
    let digit = encode("7")[0];
    for _ in 0..3 {
        assert!(state.accepts(0, digit));
        model.t5.decode(&Tensor::new(&[[digit]], &Device::Cpu).unwrap(), &mut state, &mut Dropout::off()).unwrap();
    }
    assert!(!state.accepts(0, digit), "a fourth digit is beyond max_index 3");
    assert!(state.accepts(0, encode(" ")[0]), "any other token still fits");
    // Greedy decoding never fails on it: whatever the model writes fits or ends the row.
    let outputs = greedy(&model.t5, &[encode("Q: 1 + 2 = ?")], GreedyOptions::new(40)).unwrap();
    assert!(outputs[0].len() <= 40);
}

#[test]
fn checkpoints_keep_digit_places_and_warn_transformers_users() {
    let model = model_with(20, true, Some(4));
    let dir = std::env::temp_dir().join(format!("sector-digit-places-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    model.save(&dir, &mut sector::files::Manifest::default()).unwrap();
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(config.contains("\"digit_positions\"") && config.contains("cannot reproduce"), "{config}");
    assert!(config.contains("\"relative_attention_clip\": 4") && config.contains("clipped relative"), "{config}");
    let loaded = Model::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(
        loaded.config().digit_positions,
        Some(DigitPositions { max_index: 20, from_right: true, number_index: true })
    );
    assert_eq!(loaded.config().relative_attention_clip, Some(4));
    let (inputs, targets) = rows();
    let batch = Seq2SeqBatch::new(&inputs, &targets, &Device::Cpu).unwrap();
    let (a, b) = (model.t5.forward(&batch, &mut Dropout::off()), loaded.t5.forward(&batch, &mut Dropout::off()));
    assert_eq!(max_abs_diff(&a.unwrap(), &b.unwrap()), 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn offsets_come_from_the_seeded_stream_and_change_training() {
    let train = |offset: DigitOffset| {
        let config = TrainConfig { lr: 1e-3, batch_size: 4, digit_offset: offset, seed: 2, ..TrainConfig::default() };
        let mut trainer = Trainer::new(model_with_places(40, false), config).unwrap();
        let (inputs, targets) = rows();
        let data: Vec<_> = inputs.into_iter().zip(targets).collect();
        (0..3).map(|_| trainer.step(&data.iter().collect::<Vec<_>>()).unwrap()).collect::<Vec<f32>>()
    };
    let per_example = DigitOffset { max: 30, per: OffsetDraw::Example };
    assert_eq!(train(per_example), train(per_example), "same seed, same offsets");
    let none = train(DigitOffset::default());
    assert_ne!(train(per_example), none);
    assert_ne!(train(DigitOffset { max: 30, per: OffsetDraw::Batch }), none);
}
