//! sector's T5 against Hugging Face transformers on the committed fixture
//! (tests/fixtures/make_t5_fixture.py), against candle-transformers' T5 (a
//! second, independent Rust implementation) on a checkpoint sector saves, and
//! the model's own consistency: padding does not change a row, and cached
//! decoding equals a full pass.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{fixture_dir, golden, max_abs_diff, test_device, tolerance, unpadded_rows};
use sector::generate::{greedy, GreedyOptions};
use sector::model::{relative_position_bucket, Dropout, Seq2SeqBatch};
use sector::weights::Model;

/// The fixture on the test device (`SECTOR_TEST_DEVICE`, the CPU by default).
fn fixture_model() -> Model {
    Model::load(fixture_dir().to_str().unwrap(), &test_device()).expect("fixture model loads")
}

/// The golden batch as token-id rows (inputs and targets, each ending in eos).
fn golden_rows() -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let g = golden();
    (unpadded_rows(&g["input_ids"], 0), unpadded_rows(&g["labels"], -100))
}

#[test]
fn logits_and_loss_match_transformers() {
    logits_and_loss_match_transformers_in(&fixture_model());
}

#[test]
fn the_encoder_output_matches_transformers() {
    let (model, g) = (fixture_model(), golden());
    let (inputs, targets) = golden_rows();
    let batch = Seq2SeqBatch::new(&inputs, &targets, model.t5.device()).unwrap();
    let ours = model.t5.encode(&batch.input_ids, &batch.input_mask, &[], &mut Dropout::off()).unwrap();
    for (row, input) in inputs.iter().enumerate() {
        // Padded positions are as meaningless in transformers' output as in ours.
        let theirs = g["encoder_output"].i((row, ..input.len())).unwrap();
        let (diff, allowed) =
            (max_abs_diff(&ours.i((row, ..input.len())).unwrap(), &theirs), tolerance(model.t5.dtype(), &theirs));
        eprintln!("row {row}: max |encoder output difference| {diff} ({:?}, allowed {allowed})", model.t5.dtype());
        assert!(diff < allowed, "row {row}: max |encoder output difference| {diff}");
    }
}

#[test]
fn bf16_logits_stay_within_the_bf16_tolerance() {
    // What CUDA computes in (bf16 weights and activations), run on the CPU.
    let dir = fixture_dir();
    let cfg = sector::weights::read_config(&dir.join("config.json")).unwrap();
    let weights = dir.join("model.safetensors");
    let tensors = sector::weights::read_tensors(&weights).unwrap();
    let model = Model::from_tensors(&cfg, tensors, &weights, &Device::Cpu, DType::BF16).unwrap();
    assert_eq!(model.t5.dtype(), DType::BF16);
    logits_and_loss_match_transformers_in(&model);
}

/// Logits and loss of the golden batch against transformers', within the
/// tolerance of the model's dtype.
fn logits_and_loss_match_transformers_in(model: &Model) {
    let g = golden();
    let (inputs, targets) = golden_rows();
    let batch = Seq2SeqBatch::new(&inputs, &targets, model.t5.device()).unwrap();
    assert_eq!(
        batch.input_ids.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap(),
        g["input_ids"].to_vec2::<i64>().unwrap()
    );
    assert_eq!(
        batch.decoder_input_ids.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap(),
        g["decoder_input_ids"].to_vec2::<i64>().unwrap()
    );
    let logits = model.t5.forward(&batch, &mut Dropout::off()).unwrap();
    // Compare only real target positions: transformers' logits at padded
    // decoder positions are as meaningless as ours.
    for (row, target) in targets.iter().enumerate() {
        let ours = logits.i((row, ..target.len())).unwrap();
        let theirs = g["logits"].i((row, ..target.len())).unwrap();
        let (diff, allowed) = (max_abs_diff(&ours, &theirs), tolerance(model.t5.dtype(), &theirs));
        let largest = allowed / common::relative_tolerance(model.t5.dtype());
        eprintln!(
            "row {row}: max |logit difference| {diff} of logits up to {largest} ({:?}, allowed {allowed})",
            model.t5.dtype()
        );
        assert!(diff < allowed, "row {row}: max |logit difference| {diff}");
    }
    let loss = (model.t5.loss_sum(&batch, &mut Dropout::off()).unwrap() / batch.num_target_tokens as f64).unwrap();
    let (ours, theirs) = (loss.to_scalar::<f32>().unwrap(), g["loss"].to_vec1::<f32>().unwrap()[0]);
    // The loss is a mean of log-probabilities: relative to itself.
    let allowed = theirs.abs() * common::relative_tolerance(model.t5.dtype());
    assert!((ours - theirs).abs() < allowed, "loss {ours} vs transformers {theirs}");
}

/// candle-transformers' T5 (0.11) takes no attention mask, so the comparison
/// uses an unpadded batch: prompts of one length, targets of one length. Its
/// decoder buckets relative positions by the encoder's bidirectional rule
/// (its code says "This only handles the bidirectional case"), which equals
/// transformers' causal rule only for distances up to 8 (32 buckets): the
/// logits agree for decoder inputs of up to 9 tokens, and differ beyond,
/// where ours follow transformers (logits_and_loss_match_transformers).
/// Tolerance 1e-4 (measured: at most 7e-5 on the logits, 3e-6 on the
/// encoder output): both compute in f32 and sum in different orders.
#[test]
fn candle_transformers_t5_agrees_on_a_checkpoint_we_save_up_to_its_decoder_limit() {
    use candle_transformers::models::t5 as reference;
    let model =
        Model::random(&sector::model::T5Config::preset("cpu-small").unwrap(), 11, &Device::Cpu, DType::F32).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path(), &mut sector::files::Manifest::default()).unwrap();
    let config: reference::Config =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    let weights = [dir.path().join("model.safetensors")];
    // Safety: the file is ours and nobody writes it while it is mapped.
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&weights, DType::F32, &Device::Cpu) }.unwrap();
    let mut theirs = reference::T5ForConditionalGeneration::load(vb, &config).unwrap();

    let encode = sector::tokenizer::encode;
    let inputs = vec![encode("Add slow.\nQ: 4821 + 7395 = ?"), encode("Add fast.\nQ: 9076 + 1238 = ?")];
    // 20 tokens each.
    let targets = [encode("A: 1 + 5 = 6. Digit"), encode("A: 10314 and more!!")];
    // (max |ours - theirs| of the last position's logits, of the encoder output)
    // with the first `len` target tokens as decoder input.
    let mut differences = |len: usize| {
        let prefixes: Vec<Vec<u32>> = targets.iter().map(|t| t[..len].to_vec()).collect();
        let batch = Seq2SeqBatch::new(&inputs, &prefixes, &Device::Cpu).unwrap();
        let mask_sum = batch.input_mask.to_dtype(DType::F32).unwrap().sum_all().unwrap();
        assert_eq!(mask_sum.to_scalar::<f32>().unwrap() as usize, batch.input_ids.elem_count(), "unpadded");
        let ours = model.t5.encode(&batch.input_ids, &batch.input_mask, &[], &mut Dropout::off()).unwrap();
        theirs.clear_kv_cache();
        let encoded = theirs.encode(&batch.input_ids).unwrap();
        let logits = model.t5.forward(&batch, &mut Dropout::off()).unwrap(); // (batch, len, vocab)
        let last = theirs.decode(&batch.decoder_input_ids, &encoded).unwrap(); // (batch, vocab)
        (max_abs_diff(&logits.i((.., len - 1)).unwrap(), &last), max_abs_diff(&ours, &encoded))
    };
    for len in 1..=9 {
        let (logits, encoder) = differences(len);
        assert!(encoder < 1e-4, "encoder output: max |difference| {encoder}");
        assert!(logits < 1e-4, "{len} decoder tokens: max |logit difference| {logits}");
    }
    let (logits, _) = differences(20);
    assert!(logits > 1e-2, "20 decoder tokens: candle-transformers now agrees ({logits}): update REPRODUCE.md");
}

#[test]
fn greedy_outputs_match_transformers_exactly() {
    let (model, g) = (fixture_model(), golden());
    if model.t5.dtype() != DType::F32 {
        // bf16 may flip a near-tie of the random fixture's logits.
        eprintln!("greedy outputs compared in f32 only: the test device computes in {:?}", model.t5.dtype());
        return;
    }
    let (inputs, _) = golden_rows();
    let expected = g["greedy"].to_vec2::<i64>().unwrap();
    let ours = greedy(&model.t5, &inputs, GreedyOptions::new(expected[0].len())).unwrap();
    for (row, (ours, theirs)) in ours.iter().zip(&expected).enumerate() {
        // transformers pads a row that stopped early with 0.
        let mut ours: Vec<i64> = ours.iter().map(|&t| t as i64).collect();
        ours.resize(theirs.len(), 0);
        assert_eq!(&ours, theirs, "row {row}");
    }
}

#[test]
fn relative_position_buckets_match_transformers_at_every_offset() {
    let g = golden();
    let offsets = g["offsets"].to_vec1::<i64>().unwrap();
    for (bidirectional, kind) in [(true, "bidirectional"), (false, "causal")] {
        for (buckets, distance) in [(32, 128), (8, 20), (64, 256)] {
            let expected = g[&format!("buckets_{kind}_{buckets}_{distance}")].to_vec1::<i64>().unwrap();
            for (&offset, &want) in offsets.iter().zip(&expected) {
                let got = relative_position_bucket(offset, bidirectional, buckets, distance);
                assert_eq!(got as i64, want, "{kind} {buckets}/{distance} offset {offset}");
            }
        }
    }
}

#[test]
fn pytorch_bin_and_safetensors_give_the_same_model() {
    let dir = fixture_dir();
    let from_safetensors = fixture_model();
    let cfg = sector::weights::read_config(&dir.join("config.json")).unwrap();
    let bin = dir.join("pytorch_model.bin");
    let tensors = sector::weights::read_tensors(&bin).unwrap();
    let from_bin = Model::from_tensors(&cfg, tensors, &bin, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(from_bin.vars.keys().collect::<Vec<_>>(), from_safetensors.vars.keys().collect::<Vec<_>>());
    for (name, var) in &from_safetensors.vars {
        assert_eq!(max_abs_diff(var.as_tensor(), from_bin.vars[name].as_tensor()), 0.0, "{name}");
    }
}

#[test]
fn padding_does_not_change_any_rows_logits_or_output() {
    let model = fixture_model();
    let device = model.t5.device().clone();
    let (inputs, targets) = golden_rows();
    let batched =
        model.t5.forward(&Seq2SeqBatch::new(&inputs, &targets, &device).unwrap(), &mut Dropout::off()).unwrap();
    let allowed = tolerance(model.t5.dtype(), &batched);
    let batched_greedy = greedy(&model.t5, &inputs, GreedyOptions::new(30)).unwrap();
    for row in 0..inputs.len() {
        let alone_batch = Seq2SeqBatch::new(&inputs[row..=row], &targets[row..=row], &device).unwrap();
        let alone = model.t5.forward(&alone_batch, &mut Dropout::off()).unwrap();
        let len = targets[row].len();
        let diff = max_abs_diff(&alone.i((0, ..len)).unwrap(), &batched.i((row, ..len)).unwrap());
        assert!(diff < allowed, "row {row}: padding changed logits by {diff}");
        let alone_greedy = greedy(&model.t5, &inputs[row..=row], GreedyOptions::new(30)).unwrap();
        assert_eq!(alone_greedy[0], batched_greedy[row], "row {row}");
    }
}

#[test]
fn cached_decoding_equals_a_full_forward_pass() {
    let model = fixture_model();
    let (inputs, targets) = golden_rows();
    let batch = Seq2SeqBatch::new(&inputs, &targets, model.t5.device()).unwrap();
    let full = model.t5.forward(&batch, &mut Dropout::off()).unwrap(); // (b, t, vocab)
    let encoded = model.t5.encode(&batch.input_ids, &batch.input_mask, &[], &mut Dropout::off()).unwrap();
    let mut state = model.t5.start_decoder(&encoded, &batch.input_mask, &[], true).unwrap();
    let steps: Vec<Tensor> = (0..batch.decoder_input_ids.dim(1).unwrap())
        .map(|t| {
            let ids = batch.decoder_input_ids.i((.., t..t + 1)).unwrap();
            model.t5.decode(&ids, &mut state, &mut Dropout::off()).unwrap()
        })
        .collect();
    let incremental = Tensor::cat(&steps, 1).unwrap();
    // Same bound as against transformers: the logits here reach about 20 and
    // the two paths sum in different orders.
    let diff = max_abs_diff(&incremental, &full);
    assert!(diff < tolerance(model.t5.dtype(), &full), "cached decoding differs by {diff}");
}

#[test]
fn presets_match_the_hub_configs_where_cached() {
    // Needs google/byt5-* in the Hugging Face cache; this machine has none,
    // so here it only reports the skip. On a machine with the cache it fails
    // on any difference in shape.
    let shape = |c: &sector::model::T5Config| {
        (c.vocab_size, c.d_model, c.d_ff, c.d_kv, c.num_heads, c.num_layers, c.decoder_layers())
    };
    for (hub_id, preset) in [("google/byt5-small", "byt5-small"), ("google/byt5-base", "byt5-base")] {
        let Some(files) = sector::weights::find_in_cache(&hf_hub::Cache::from_env(), hub_id) else {
            eprintln!("{hub_id} is not in the Hugging Face cache: preset {preset} not compared");
            continue;
        };
        let cached = sector::weights::read_config(&files.config).unwrap();
        let ours = sector::model::T5Config::preset(preset).unwrap();
        assert_eq!(shape(&ours), shape(&cached), "{preset} vs {}", files.config.display());
        assert_eq!(
            (ours.relative_attention_num_buckets, ours.relative_attention_max_distance),
            (cached.relative_attention_num_buckets, cached.relative_attention_max_distance)
        );
    }
}
