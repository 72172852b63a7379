//! T5 v1.1 as ByT5 uses it, written for training: the whole model in one file.
//!
//! Pre-norm encoder-decoder with RMS layer norm (no mean, no bias), gated-GELU
//! feed-forward, relative position buckets computed once per stack and shared
//! by its layers (bidirectional in the encoder, causal in the decoder), no
//! position bias in cross-attention, no 1/sqrt(d_kv) attention scaling (T5
//! folds it into the initialisation of q) and an untied lm_head.
//!
//! Tensor names follow Hugging Face transformers (`encoder.block.0.layer.0.
//! SelfAttention.q.weight`, ...) through `vb.pp`, so google/byt5-* weights load
//! and our checkpoints load in transformers.
//!
//! Every op here has a backward pass. Two fast candle kernels do not
//! (`candle_nn::ops::softmax_last_dim` and `rms_norm`): their gradients
//! silently vanish, so attention softmax and RMS norm are our own fused
//! kernels with backward passes (src/kernels.rs; composed from candle ops
//! off the CPU). tests/gradients.rs checks this.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use rand::Rng;
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};

/// Added to attention scores that must get zero weight. Large enough that
/// exp underflows to 0 next to any real score, small enough for bf16.
const MASKED: f64 = -1e9;

/// The model's hyper-parameters, read from and written as a Hugging Face
/// `config.json` (missing fields take transformers' T5Config defaults, unknown
/// ones are ignored because that file belongs to another library).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct T5Config {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::d_model")]
    pub d_model: usize,
    /// Size of one attention head.
    #[serde(default = "defaults::d_kv")]
    pub d_kv: usize,
    #[serde(default = "defaults::d_ff")]
    pub d_ff: usize,
    #[serde(default = "defaults::num_heads")]
    pub num_heads: usize,
    /// Encoder layers.
    #[serde(default = "defaults::num_layers")]
    pub num_layers: usize,
    /// Decoder layers; transformers uses num_layers when this is absent.
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    #[serde(default = "defaults::buckets")]
    pub relative_attention_num_buckets: usize,
    /// Offsets beyond this share the last bucket.
    #[serde(default = "defaults::max_distance")]
    pub relative_attention_max_distance: usize,
    /// Ours, not transformers' (CPU scale only; no ByT5 preset has it):
    /// clipped relative positions (Shaw et al. 2018) in place of T5's
    /// buckets. Every distance of K or more shares one bucket, so no
    /// query-key distance is new at a length the model was not taught:
    /// encoder buckets clamp(key - query, -K, K) + K (2K + 1 of them),
    /// decoder clamp(query - key, 0, K) (K + 1). A checkpoint with it does
    /// not run in transformers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relative_attention_clip: Option<usize>,
    /// Dropout probability when training with dropout on.
    #[serde(default = "defaults::dropout_rate")]
    pub dropout_rate: f64,
    #[serde(default = "defaults::layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// Scales every initialisation std (transformers' `initializer_factor`).
    #[serde(default = "defaults::initializer_factor")]
    pub initializer_factor: f64,
    /// Ours, not transformers': the untied output layer's initial std before
    /// `initializer_factor` (absent: transformers' 1.0, which makes initial
    /// logits about sqrt(d_model) wide; Mesh TensorFlow's T5 v1.1 drew it
    /// with its dense default, d_model^-0.5). Only random weights use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lm_head_init_std: Option<f64>,
    /// Ours, not transformers' (CPU scale only; no ByT5 preset has it):
    /// learned embeddings of each digit's place in its number, added to the
    /// token embeddings. A checkpoint with them does not run in transformers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digit_positions: Option<DigitPositions>,
    /// Only "gated-gelu" (T5 v1.1, ByT5) is implemented.
    #[serde(default = "defaults::feed_forward_proj")]
    pub feed_forward_proj: String,
    /// Must be false: ByT5 has its own lm_head.
    #[serde(default = "defaults::tie_word_embeddings")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default = "defaults::eos_token_id")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub decoder_start_token_id: u32,
    /// Written so that transformers recognises the file.
    #[serde(default = "defaults::model_type")]
    pub model_type: String,
    #[serde(default = "defaults::architectures")]
    pub architectures: Vec<String>,
    #[serde(default = "defaults::is_encoder_decoder")]
    pub is_encoder_decoder: bool,
}

mod defaults {
    pub fn vocab_size() -> usize {
        32128
    }
    pub fn d_model() -> usize {
        512
    }
    pub fn d_kv() -> usize {
        64
    }
    pub fn d_ff() -> usize {
        2048
    }
    pub fn num_heads() -> usize {
        8
    }
    pub fn num_layers() -> usize {
        6
    }
    pub fn buckets() -> usize {
        32
    }
    pub fn max_distance() -> usize {
        128
    }
    pub fn dropout_rate() -> f64 {
        0.1
    }
    pub fn layer_norm_epsilon() -> f64 {
        1e-6
    }
    pub fn initializer_factor() -> f64 {
        1.0
    }
    pub fn feed_forward_proj() -> String {
        "relu".into()
    }
    pub fn tie_word_embeddings() -> bool {
        true
    }
    pub fn eos_token_id() -> u32 {
        1
    }
    pub fn model_type() -> String {
        "t5".into()
    }
    pub fn architectures() -> Vec<String> {
        vec!["T5ForConditionalGeneration".into()]
    }
    pub fn is_encoder_decoder() -> bool {
        true
    }
}

impl T5Config {
    /// A ByT5-shaped config (byte vocabulary, gated-GELU, untied head).
    #[allow(clippy::too_many_arguments)]
    pub fn byt5(
        d_model: usize,
        d_ff: usize,
        num_heads: usize,
        d_kv: usize,
        encoder_layers: usize,
        decoder_layers: usize,
    ) -> Self {
        T5Config {
            vocab_size: crate::tokenizer::VOCAB_SIZE,
            d_model,
            d_kv,
            d_ff,
            num_heads,
            num_layers: encoder_layers,
            num_decoder_layers: Some(decoder_layers),
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            relative_attention_clip: None,
            dropout_rate: 0.0,
            layer_norm_epsilon: 1e-6,
            initializer_factor: 1.0,
            lm_head_init_std: None,
            digit_positions: None,
            feed_forward_proj: "gated-gelu".into(),
            tie_word_embeddings: false,
            pad_token_id: 0,
            eos_token_id: 1,
            decoder_start_token_id: 0,
            model_type: defaults::model_type(),
            architectures: defaults::architectures(),
            is_encoder_decoder: true,
        }
    }

    /// Named configs. The byt5-* ones are the hub's google/byt5-* shapes (their
    /// config.json keeps dropout 0.1; ours start with dropout off).
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            "byt5-small" => Self::byt5(1472, 3584, 6, 64, 12, 4),
            "byt5-base" => Self::byt5(1536, 3968, 12, 64, 18, 6),
            "byt5-large" => Self::byt5(1536, 3840, 16, 64, 36, 12),
            "byt5-xl" => Self::byt5(2560, 6720, 32, 64, 36, 12),
            "cpu-tiny" => Self::byt5(64, 128, 2, 32, 2, 2),
            "cpu-small" => Self::byt5(256, 512, 4, 64, 4, 2),
            "cpu-medium" => Self::byt5(512, 1024, 8, 64, 6, 4),
            _ => return None,
        })
    }

    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// The first field that this implementation cannot run, as (field, problem).
    pub fn unsupported(&self) -> Option<(&'static str, String)> {
        if self.feed_forward_proj != "gated-gelu" {
            return Some((
                "feed_forward_proj",
                format!("is {:?}; only \"gated-gelu\" (T5 v1.1 / ByT5) is implemented", self.feed_forward_proj),
            ));
        }
        if self.tie_word_embeddings {
            return Some(("tie_word_embeddings", "is true; ByT5 has an untied lm_head, set it to false".into()));
        }
        if self.relative_attention_num_buckets < 4 {
            return Some(("relative_attention_num_buckets", "must be at least 4".into()));
        }
        if self.relative_attention_clip == Some(0) {
            return Some(("relative_attention_clip", "is 0; clip distances at 1 or more, or leave it unset".into()));
        }
        None
    }

    /// Rows of a stack's position-bias table.
    pub fn position_buckets(&self, is_decoder: bool) -> usize {
        match self.relative_attention_clip {
            Some(clip) if is_decoder => clip + 1,
            Some(clip) => 2 * clip + 1,
            None => self.relative_attention_num_buckets,
        }
    }

    /// The position-bias bucket of `key - query` in the encoder or the decoder.
    pub fn position_bucket(&self, relative: i64, is_decoder: bool) -> u32 {
        match self.relative_attention_clip {
            Some(clip) => clipped_position_bucket(relative, !is_decoder, clip),
            None => relative_position_bucket(
                relative,
                !is_decoder,
                self.relative_attention_num_buckets,
                self.relative_attention_max_distance,
            ),
        }
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        let (d, f, inner) = (self.d_model, self.d_ff, self.num_heads * self.d_kv);
        let attention = 4 * d * inner;
        let ff = 3 * d * f;
        let bias = |is_decoder| self.position_buckets(is_decoder) * self.num_heads;
        let encoder = self.num_layers * (attention + ff + 2 * d) + bias(false) + d;
        let decoder = self.decoder_layers() * (2 * attention + ff + 3 * d) + bias(true) + d;
        let places = self.digit_positions.map_or(0, |p| p.tables() * (p.max_index + 1) * d);
        2 * self.vocab_size * d + encoder + decoder + places
    }
}

/// Digit-position embeddings (McLeish et al. 2024's Abacus embeddings), a
/// CPU-scale deviation. A small T5 from random weights finds "the last digit
/// of the first number" only by the absolute positions of the lengths it was
/// taught, so its slow step fails one digit beyond them; pretrained ByT5
/// brings length-general reading from its text pretraining. Every digit token
/// gets the embedding of its place in its run of digits, counted from the
/// run's first digit (1-based; 0 for every other token), in the encoder and
/// the decoder input alike (one table), and optionally encoder-only tables of
/// the place counted from the run's last digit and of the run's number among
/// the input's runs. In training a random offset is added to every place
/// (`TrainConfig::digit_offset`; not to the run's number), so the rows beyond
/// the taught lengths are trained too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigitPositions {
    /// The largest place a table holds (rows 0..=max_index): the longest
    /// number the model meets plus the largest training offset. A place
    /// beyond it is an error, never clamped.
    pub max_index: usize,
    /// Also the encoder-only table counted from each number's last digit.
    #[serde(default)]
    pub from_right: bool,
    /// Also the encoder-only table of each digit's number: 1 for every digit
    /// of the input's first run of digits, 2 for the second, ... (0 for other
    /// tokens). It tells "the first number's last digit" from the second's
    /// by what it is, not by a distance that grows with the length.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub number_index: bool,
}

impl DigitPositions {
    fn tables(&self) -> usize {
        1 + usize::from(self.from_right) + usize::from(self.number_index)
    }
}

/// Whether `id` is one of the bytes '0'..='9'.
pub fn is_digit(id: u32) -> bool {
    use crate::tokenizer::BYTE_OFFSET;
    (b'0' as u32 + BYTE_OFFSET..=b'9' as u32 + BYTE_OFFSET).contains(&id)
}

/// Each token's place in its run of digits counted from the run's first
/// digit (1-based; 0 for other tokens), for tokens that follow a run of
/// `run` digits; `run` is left holding the digits the tokens end with, so
/// decoding one token at a time gives the places of a whole pass.
pub fn places_from_left(ids: &[u32], run: &mut u32) -> Vec<u32> {
    ids.iter()
        .map(|&id| {
            *run = if is_digit(id) { *run + 1 } else { 0 };
            *run
        })
        .collect()
}

/// Each token's place in its run of digits counted from the run's last
/// digit (1 = the last; 0 for other tokens).
pub fn places_from_right(ids: &[u32]) -> Vec<u32> {
    let mut places = vec![0; ids.len()];
    let mut run = 0;
    for (place, &id) in places.iter_mut().zip(ids).rev() {
        run = if is_digit(id) { run + 1 } else { 0 };
        *place = run;
    }
    places
}

/// Each token's run of digits numbered from the input's first run (1-based;
/// 0 for tokens that are not digits).
pub fn digit_numbers(ids: &[u32]) -> Vec<u32> {
    // A run starts where a digit's place from the left is 1.
    let mut runs = 0;
    places_from_left(ids, &mut 0)
        .into_iter()
        .map(|place| {
            if place == 1 {
                runs += 1;
            }
            if place == 0 {
                0
            } else {
                runs
            }
        })
        .collect()
}

/// The digit-place tables of a model that has them.
struct DigitPlaceTables {
    /// (max_index + 1, d_model), shared by the encoder and the decoder.
    left: Embedding,
    /// (max_index + 1, d_model), encoder only.
    right: Option<Embedding>,
    /// (max_index + 1, d_model), encoder only: the run's number.
    number: Option<Embedding>,
    max_index: u32,
}

impl DigitPlaceTables {
    fn new(vb: VarBuilder, cfg: &T5Config) -> Result<Option<Self>> {
        let Some(p) = cfg.digit_positions else { return Ok(None) };
        let table = |name: &str| candle_nn::embedding(p.max_index + 1, cfg.d_model, vb.pp(name));
        Ok(Some(DigitPlaceTables {
            left: table("digit_positions_left")?,
            right: if p.from_right { Some(table("digit_positions_right")?) } else { None },
            number: if p.number_index { Some(table("digit_positions_number")?) } else { None },
            max_index: p.max_index as u32,
        }))
    }

    /// Embeddings (b, t, d_model) of the places `places` (b rows of t), with
    /// `offsets[row]` (none when empty) added to every digit's place.
    fn embed(&self, table: &Embedding, places: Vec<Vec<u32>>, offsets: &[u32], device: &Device) -> Result<Tensor> {
        let (b, t) = (places.len(), places.first().map_or(0, Vec::len));
        let mut flat = Vec::with_capacity(b * t);
        for (row, places) in places.into_iter().enumerate() {
            let offset = offsets.get(row).copied().unwrap_or(0);
            for place in places {
                let place = if place == 0 { 0 } else { place + offset };
                if place > self.max_index {
                    candle_core::bail!(
                        "digit place {place} (a digit's place in its number plus the training offset {offset}, or \
                         the number's index among the input's numbers) is beyond the model's \
                         digit_positions.max_index {}: raise max_index in the model config",
                        self.max_index
                    );
                }
                flat.push(place);
            }
        }
        table.forward(&Tensor::from_vec(flat, (b, t), device)?)
    }
}

/// T5's relative position bucket of `key - query` (transformers'
/// `_relative_position_bucket`, including its f32 arithmetic for far offsets).
pub fn relative_position_bucket(relative: i64, bidirectional: bool, num_buckets: usize, max_distance: usize) -> u32 {
    let (mut num_buckets, mut bucket) = (num_buckets as i64, 0i64);
    let distance = if bidirectional {
        num_buckets /= 2;
        if relative > 0 {
            bucket += num_buckets;
        }
        relative.abs()
    } else {
        (-relative).max(0)
    };
    let max_exact = num_buckets / 2;
    bucket += if distance < max_exact {
        distance
    } else {
        let log_ratio =
            (distance as f32 / max_exact as f32).ln() / (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = max_exact + (log_ratio * (num_buckets - max_exact) as f32) as i64;
        large.min(num_buckets - 1)
    };
    bucket as u32
}

/// The clipped bucket of `key - query` (T5Config::relative_attention_clip):
/// bidirectional clamp(relative, -clip, clip) + clip, causal
/// clamp(-relative, 0, clip).
pub fn clipped_position_bucket(relative: i64, bidirectional: bool, clip: usize) -> u32 {
    let clip = clip as i64;
    let bucket = if bidirectional { relative.clamp(-clip, clip) + clip } else { (-relative).clamp(0, clip) };
    bucket as u32
}

/// Dropout whose masks come from our own PCG, so a training run with dropout
/// is reproducible. `Dropout::off()` is the identity (evaluation, decoding).
pub struct Dropout {
    rate: f64,
    rng: Option<Pcg64>,
}

impl Dropout {
    pub fn off() -> Self {
        Dropout { rate: 0.0, rng: None }
    }

    pub fn new(rate: f64, rng: Pcg64) -> Self {
        Dropout { rate, rng: Some(rng) }
    }

    fn is_on(&self) -> bool {
        self.rng.is_some() && self.rate > 0.0
    }

    fn apply(&mut self, xs: &Tensor) -> Result<Tensor> {
        let Some(rng) = self.rng.as_mut().filter(|_| self.rate > 0.0) else {
            return Ok(xs.clone());
        };
        let keep = 1.0 / (1.0 - self.rate) as f32;
        let mask: Vec<f32> =
            (0..xs.elem_count()).map(|_| if rng.random::<f64>() < self.rate { 0.0 } else { keep }).collect();
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs * mask
    }
}

/// A linear layer without bias, weight (out, in) as transformers stores it.
/// (b, t, in) inputs are multiplied as one (b * t, in) matrix: one large
/// gemm instead of b small ones against a broadcast weight. The product is
/// src/matmul.rs's, so the weight gradient (summed over all b * t tokens)
/// has the same bits on any CPU.
struct Linear {
    weight: Tensor,
}

impl Linear {
    fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Linear { weight: vb.get((out_dim, in_dim), "weight")? })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, t, in_dim) = xs.dims3()?;
        crate::matmul::matmul(&xs.reshape((b * t, in_dim))?, &self.weight.t()?)?.reshape((b, t, ()))
    }
}

/// T5's RMS layer norm (src/kernels.rs: fused on the CPU, composed
/// elsewhere; in bf16 the statistics are taken in f32, as transformers does).
struct RmsNorm {
    weight: Tensor, // (d_model,)
    eps: f64,
}

impl RmsNorm {
    fn new(vb: VarBuilder, cfg: &T5Config) -> Result<Self> {
        Ok(RmsNorm { weight: vb.get(cfg.d_model, "weight")?, eps: cfg.layer_norm_epsilon })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        crate::kernels::rms_norm(xs, &self.weight, self.eps)
    }
}

/// Multi-head attention without biases. Keys and values are projected
/// separately from queries so that decoding can cache them.
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    num_heads: usize,
    d_kv: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &T5Config) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        Ok(Attention {
            q: Linear::new(cfg.d_model, inner, vb.pp("q"))?,
            k: Linear::new(cfg.d_model, inner, vb.pp("k"))?,
            v: Linear::new(cfg.d_model, inner, vb.pp("v"))?,
            o: Linear::new(inner, cfg.d_model, vb.pp("o"))?,
            num_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    /// (b, t, heads * d_kv) -> (b, heads, t, d_kv)
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        xs.reshape((b, t, self.num_heads, self.d_kv))?.transpose(1, 2)?.contiguous()
    }

    /// Keys and values of `xs` (b, t, d_model), each (b, heads, t, d_kv).
    fn keys_values(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.split_heads(&self.k.forward(xs)?)?, self.split_heads(&self.v.forward(xs)?)?))
    }

    /// Queries from `xs` (b, tq, d_model) attend to `keys`/`values`
    /// (b, heads, tk, d_kv); `bias` broadcasts to (b, heads, tq, tk) and holds
    /// the position bias and the masks. `no_gradients`: the caller takes none,
    /// so a single query may use the fused inference kernel. Returns (b, tq, d_model).
    fn attend(
        &self,
        xs: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        bias: &Tensor,
        no_gradients: bool,
        drop: &mut Dropout,
    ) -> Result<Tensor> {
        let (b, tq, _) = xs.dims3()?;
        let q = self.split_heads(&self.q.forward(xs)?)?; // (b, h, tq, d_kv)
        let out = if no_gradients && tq == 1 && !drop.is_on() {
            crate::kernels::attend_one_query(&q, keys, values, bias)?
        } else {
            let scores = q.matmul(&keys.t()?)?.broadcast_add(bias)?; // (b, h, tq, tk)
            let weights = drop.apply(&crate::kernels::softmax_last_dim(&scores)?)?;
            weights.matmul(values)?
        }; // (b, h, tq, d_kv)
        let out = out.transpose(1, 2)?.reshape((b, tq, self.num_heads * self.d_kv))?;
        self.o.forward(&out)
    }
}

/// T5 v1.1's feed-forward: wo(dropout(gelu(wi_0 x) * wi_1 x)), tanh GELU.
struct GatedGelu {
    wi_0: Linear,
    wi_1: Linear,
    wo: Linear,
}

impl GatedGelu {
    fn new(vb: VarBuilder, cfg: &T5Config) -> Result<Self> {
        Ok(GatedGelu {
            wi_0: Linear::new(cfg.d_model, cfg.d_ff, vb.pp("wi_0"))?,
            wi_1: Linear::new(cfg.d_model, cfg.d_ff, vb.pp("wi_1"))?,
            wo: Linear::new(cfg.d_ff, cfg.d_model, vb.pp("wo"))?,
        })
    }

    fn forward(&self, xs: &Tensor, drop: &mut Dropout) -> Result<Tensor> {
        let hidden = (crate::kernels::gelu(&self.wi_0.forward(xs)?)? * self.wi_1.forward(xs)?)?;
        self.wo.forward(&drop.apply(&hidden)?)
    }
}

/// One block: self-attention, cross-attention (decoder only), feed-forward.
/// Each sub-layer normalises its input and adds its output to the residual
/// stream; transformers numbers them `layer.0`, `layer.1`, `layer.2`.
struct Block {
    self_attn: Attention,
    self_attn_norm: RmsNorm,
    /// Decoder blocks only.
    cross_attn: Option<(Attention, RmsNorm)>,
    ff: GatedGelu,
    ff_norm: RmsNorm,
}

impl Block {
    fn new(vb: VarBuilder, cfg: &T5Config, is_decoder: bool) -> Result<Self> {
        let ff_layer = if is_decoder { 2 } else { 1 };
        let cross_attn = if is_decoder {
            let vb = vb.pp("layer.1");
            Some((Attention::new(vb.pp("EncDecAttention"), cfg)?, RmsNorm::new(vb.pp("layer_norm"), cfg)?))
        } else {
            None
        };
        Ok(Block {
            self_attn: Attention::new(vb.pp("layer.0.SelfAttention"), cfg)?,
            self_attn_norm: RmsNorm::new(vb.pp("layer.0.layer_norm"), cfg)?,
            cross_attn,
            ff: GatedGelu::new(vb.pp(format!("layer.{ff_layer}.DenseReluDense")), cfg)?,
            ff_norm: RmsNorm::new(vb.pp(format!("layer.{ff_layer}.layer_norm")), cfg)?,
        })
    }
}

/// The encoder or the decoder: blocks, the shared position-bias table and the
/// final norm.
struct Stack {
    blocks: Vec<Block>,
    /// (buckets, heads); transformers keeps it in block 0's self-attention.
    relative_attention_bias: Embedding,
    final_layer_norm: RmsNorm,
    is_decoder: bool,
    /// Sorts distances into buckets (T5Config::position_bucket).
    cfg: T5Config,
}

impl Stack {
    fn new(vb: VarBuilder, cfg: &T5Config, is_decoder: bool) -> Result<Self> {
        let num_layers = if is_decoder { cfg.decoder_layers() } else { cfg.num_layers };
        let blocks = (0..num_layers)
            .map(|i| Block::new(vb.pp(format!("block.{i}")), cfg, is_decoder))
            .collect::<Result<Vec<_>>>()?;
        let relative_attention_bias = candle_nn::embedding(
            cfg.position_buckets(is_decoder),
            cfg.num_heads,
            vb.pp("block.0.layer.0.SelfAttention.relative_attention_bias"),
        )?;
        Ok(Stack {
            blocks,
            relative_attention_bias,
            final_layer_norm: RmsNorm::new(vb.pp("final_layer_norm"), cfg)?,
            is_decoder,
            cfg: cfg.clone(),
        })
    }

    /// Self-attention bias of `q_len` queries at positions offset.. against
    /// keys at 0..offset + q_len: (1, heads, q_len, offset + q_len). In the
    /// decoder it also masks the future.
    fn self_attention_bias(&self, q_len: usize, offset: usize, device: &Device) -> Result<Tensor> {
        let k_len = offset + q_len;
        let mut buckets = Vec::with_capacity(q_len * k_len);
        let mut future = Vec::with_capacity(q_len * k_len);
        for q in offset..k_len {
            for k in 0..k_len {
                let relative = k as i64 - q as i64;
                buckets.push(self.cfg.position_bucket(relative, self.is_decoder));
                future.push(if self.is_decoder && k > q { MASKED as f32 } else { 0.0 });
            }
        }
        let buckets = Tensor::from_vec(buckets, q_len * k_len, device)?;
        let bias = self.relative_attention_bias.forward(&buckets)?; // (q_len * k_len, heads)
        let bias = bias.reshape((q_len, k_len, ()))?.permute((2, 0, 1))?; // (heads, q_len, k_len)
        let future = Tensor::from_vec(future, (1, q_len, k_len), device)?.to_dtype(bias.dtype())?;
        bias.broadcast_add(&future)?.unsqueeze(0)
    }
}

/// (b, len) padding mask of 1s and 0s -> (b, 1, 1, len) additive bias.
fn padding_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, len) = mask.dims2()?;
    mask.affine(-MASKED, MASKED)?.to_dtype(dtype)?.reshape((b, 1, 1, len))
}

/// What the decoder needs besides its new tokens: the encoder's keys and
/// values for cross-attention, and for decoding step by step, the keys and
/// values of the tokens it has already seen.
pub struct DecoderState {
    /// Per layer: cross-attention keys and values, (b, heads, src_len, d_kv).
    cross: Vec<(Tensor, Tensor)>,
    /// (b, 1, 1, src_len): masks the encoder's padding.
    cross_bias: Tensor,
    /// Per layer: self-attention keys and values of past tokens.
    past: Vec<Option<(KvBuffer, KvBuffer)>>,
    /// Number of tokens decoded so far.
    len: usize,
    /// Set for generation: no gradients will be taken through the decoder.
    no_gradients: bool,
    /// Per row: the digits its tokens so far end with (their last run).
    digit_runs: Vec<u32>,
    /// Per row: the training offset of its digit places (empty: none).
    digit_offsets: Vec<u32>,
    /// The largest digit place the model has (None: no digit positions).
    max_digit_place: Option<u32>,
}

impl DecoderState {
    /// Keeps only the given batch rows (finished rows leave a decoding batch).
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        let select = |(k, v): &(Tensor, Tensor)| Ok((k.index_select(rows, 0)?, v.index_select(rows, 0)?));
        self.cross = self.cross.iter().map(select).collect::<Result<_>>()?;
        self.cross_bias = self.cross_bias.index_select(rows, 0)?;
        for (k, v) in self.past.iter_mut().flatten() {
            k.select_rows(rows)?;
            v.select_rows(rows)?;
        }
        let rows: Vec<u32> = rows.to_vec1()?;
        let pick = |values: &[u32]| rows.iter().map(|&r| values[r as usize]).collect();
        self.digit_runs = pick(&self.digit_runs);
        if !self.digit_offsets.is_empty() {
            self.digit_offsets = pick(&self.digit_offsets);
        }
        Ok(())
    }

    /// Whether row `row` can take `token` as its next input: false only when
    /// the token would extend a run of digits beyond the model's largest
    /// digit place (a runaway output, which greedy decoding ends there).
    pub fn accepts(&self, row: usize, token: u32) -> bool {
        let offset = self.digit_offsets.get(row).copied().unwrap_or(0);
        self.max_digit_place.is_none_or(|max| !is_digit(token) || self.digit_runs[row] + 1 + offset <= max)
    }
}

/// Keys or values of the tokens a decoder layer has seen, (b, heads, len,
/// d_kv), in a buffer with room to grow along the length: a decoding step
/// writes its one position in place, and the buffer doubles when full. (A
/// fresh concatenation per step copied the whole cache into new pages: half
/// of the time of decoding at batch 256.)
#[derive(Clone)]
struct KvBuffer {
    /// (b, heads, capacity, d_kv); positions len.. are unused.
    buffer: Tensor,
    len: usize,
}

impl KvBuffer {
    /// Appends `new` (b, heads, t, d_kv) to `past`. The first call keeps
    /// `new` itself, so teacher forcing, one call with the whole target,
    /// keeps its gradients.
    fn append(past: Option<KvBuffer>, new: Tensor) -> Result<KvBuffer> {
        let t = new.dim(2)?;
        let Some(mut past) = past else {
            return Ok(KvBuffer { buffer: new, len: t });
        };
        let capacity = past.buffer.dim(2)?;
        if past.len + t > capacity {
            let (b, heads, _, d_kv) = past.buffer.dims4()?;
            let grown = (2 * capacity).max(past.len + t);
            let buffer = Tensor::zeros((b, heads, grown, d_kv), new.dtype(), new.device())?;
            buffer.slice_set(&past.view()?.contiguous()?, 2, 0)?;
            past.buffer = buffer;
        }
        past.buffer.slice_set(&new.contiguous()?, 2, past.len)?;
        past.len += t;
        Ok(past)
    }

    /// (b, heads, len, d_kv), a view into the buffer.
    fn view(&self) -> Result<Tensor> {
        self.buffer.narrow(2, 0, self.len)
    }

    fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        self.buffer = self.buffer.index_select(rows, 0)?;
        Ok(())
    }
}

/// A batch for teacher-forced training or scoring.
pub struct Seq2SeqBatch {
    /// (b, src_len) u32 and its f32 padding mask.
    pub input_ids: Tensor,
    pub input_mask: Tensor,
    /// (b, tgt_len) u32: decoder start token, then the target shifted right.
    pub decoder_input_ids: Tensor,
    /// (b, tgt_len) u32 targets (ending in eos) and their f32 mask.
    pub labels: Tensor,
    pub label_mask: Tensor,
    /// Number of target tokens that count in the loss.
    pub num_target_tokens: usize,
    /// Per row: the training offset of its digit places, the same in the
    /// encoder and the decoder (empty: none, as in evaluation).
    pub digit_offsets: Vec<u32>,
}

impl Seq2SeqBatch {
    /// `inputs` and `targets` are token ids that already end in eos.
    pub fn new(inputs: &[Vec<u32>], targets: &[Vec<u32>], device: &Device) -> Result<Self> {
        use crate::tokenizer::{pad_batch, DECODER_START};
        let input = pad_batch(inputs, device)?;
        let labels = pad_batch(targets, device)?;
        let shifted: Vec<Vec<u32>> = targets
            .iter()
            .map(|t| std::iter::once(DECODER_START).chain(t.iter().copied()).take(t.len()).collect())
            .collect();
        Ok(Seq2SeqBatch {
            input_ids: input.ids,
            input_mask: input.mask,
            decoder_input_ids: pad_batch(&shifted, device)?.ids,
            labels: labels.ids,
            label_mask: labels.mask,
            num_target_tokens: targets.iter().map(Vec::len).sum(),
            digit_offsets: Vec::new(),
        })
    }
}

pub struct T5 {
    shared: Embedding, // (vocab, d_model), the input embedding of both stacks
    digit_places: Option<DigitPlaceTables>,
    encoder: Stack,
    decoder: Stack,
    lm_head: Linear,
    cfg: T5Config,
}

impl T5 {
    pub fn new(vb: VarBuilder, cfg: &T5Config) -> Result<Self> {
        if let Some((field, problem)) = cfg.unsupported() {
            candle_core::bail!("config field `{field}` {problem}");
        }
        Ok(T5 {
            shared: candle_nn::embedding(cfg.vocab_size, cfg.d_model, vb.pp("shared"))?,
            digit_places: DigitPlaceTables::new(vb.clone(), cfg)?,
            encoder: Stack::new(vb.pp("encoder"), cfg, false)?,
            decoder: Stack::new(vb.pp("decoder"), cfg, true)?,
            lm_head: Linear::new(cfg.d_model, cfg.vocab_size, vb.pp("lm_head"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// The dtype of the weights and of the compute.
    pub fn dtype(&self) -> DType {
        self.shared.embeddings().dtype()
    }

    pub fn device(&self) -> &Device {
        self.shared.embeddings().device()
    }

    /// input_ids (b, src_len) u32, input_mask (b, src_len) -> (b, src_len,
    /// d_model). `digit_offsets`: one per row in training, empty otherwise.
    pub fn encode(
        &self,
        input_ids: &Tensor,
        input_mask: &Tensor,
        digit_offsets: &[u32],
        drop: &mut Dropout,
    ) -> Result<Tensor> {
        let src_len = input_ids.dim(1)?;
        let bias = self
            .encoder
            .self_attention_bias(src_len, 0, self.device())?
            .broadcast_add(&padding_bias(input_mask, self.dtype())?)?; // (b, h, src_len, src_len)
        let mut xs = self.shared.forward(input_ids)?;
        if let Some(tables) = &self.digit_places {
            let rows: Vec<Vec<u32>> = input_ids.to_vec2()?;
            let left = rows.iter().map(|ids| places_from_left(ids, &mut 0)).collect();
            xs = (xs + tables.embed(&tables.left, left, digit_offsets, self.device())?)?;
            if let Some(right) = &tables.right {
                let places = rows.iter().map(|ids| places_from_right(ids)).collect();
                xs = (xs + tables.embed(right, places, digit_offsets, self.device())?)?;
            }
            if let Some(number) = &tables.number {
                let numbers = rows.iter().map(|ids| digit_numbers(ids)).collect();
                xs = (xs + tables.embed(number, numbers, &[], self.device())?)?;
            }
        }
        let mut xs = drop.apply(&xs)?;
        for block in &self.encoder.blocks {
            let normed = block.self_attn_norm.forward(&xs)?;
            let (k, v) = block.self_attn.keys_values(&normed)?;
            let attended = block.self_attn.attend(&normed, &k, &v, &bias, false, drop)?;
            xs = (&xs + drop.apply(&attended)?)?;
            let transformed = block.ff.forward(&block.ff_norm.forward(&xs)?, drop)?;
            xs = (&xs + drop.apply(&transformed)?)?;
        }
        drop.apply(&self.encoder.final_layer_norm.forward(&xs)?)
    }

    /// Projects the encoder output for every decoder layer's cross-attention.
    /// Generation passes `no_gradients`, which lets decoding steps use
    /// inference-only kernels.
    /// `digit_offsets` as for `encode`.
    pub fn start_decoder(
        &self,
        encoded: &Tensor,
        input_mask: &Tensor,
        digit_offsets: &[u32],
        no_gradients: bool,
    ) -> Result<DecoderState> {
        let cross = self
            .decoder
            .blocks
            .iter()
            .map(|block| block.cross_attn.as_ref().expect("decoder block").0.keys_values(encoded))
            .collect::<Result<Vec<_>>>()?;
        Ok(DecoderState {
            cross,
            cross_bias: padding_bias(input_mask, self.dtype())?,
            past: vec![None; self.decoder.blocks.len()],
            len: 0,
            no_gradients,
            digit_runs: vec![0; encoded.dim(0)?],
            digit_offsets: digit_offsets.to_vec(),
            max_digit_place: self.digit_places.as_ref().map(|t| t.max_index),
        })
    }

    /// Runs the decoder on `ids` (b, t) u32, the tokens that follow the ones
    /// `state` has seen, and returns their logits (b, t, vocab). Teacher
    /// forcing passes the whole shifted target at once; greedy decoding passes
    /// one token per call. Both go through this one function.
    pub fn decode(&self, ids: &Tensor, state: &mut DecoderState, drop: &mut Dropout) -> Result<Tensor> {
        let new_len = ids.dim(1)?;
        let self_bias = self.decoder.self_attention_bias(new_len, state.len, self.device())?; // (1, h, t, len + t)
        let mut xs = self.shared.forward(ids)?;
        if let Some(tables) = &self.digit_places {
            let rows: Vec<Vec<u32>> = ids.to_vec2()?;
            let places = rows.iter().zip(state.digit_runs.iter_mut()).map(|(ids, run)| places_from_left(ids, run));
            xs = (xs + tables.embed(&tables.left, places.collect(), &state.digit_offsets, self.device())?)?;
        }
        let mut xs = drop.apply(&xs)?;
        for (i, block) in self.decoder.blocks.iter().enumerate() {
            let normed = block.self_attn_norm.forward(&xs)?;
            let (k, v) = block.self_attn.keys_values(&normed)?;
            let (past_k, past_v) = state.past[i].take().unzip();
            let (k, v) = (KvBuffer::append(past_k, k)?, KvBuffer::append(past_v, v)?);
            let attended =
                block.self_attn.attend(&normed, &k.view()?, &v.view()?, &self_bias, state.no_gradients, drop)?;
            xs = (&xs + drop.apply(&attended)?)?;
            state.past[i] = Some((k, v));

            let (cross_attn, cross_norm) = block.cross_attn.as_ref().expect("decoder block");
            let (cross_k, cross_v) = &state.cross[i];
            let normed = cross_norm.forward(&xs)?;
            let attended = cross_attn.attend(&normed, cross_k, cross_v, &state.cross_bias, state.no_gradients, drop)?;
            xs = (&xs + drop.apply(&attended)?)?;
            let transformed = block.ff.forward(&block.ff_norm.forward(&xs)?, drop)?;
            xs = (&xs + drop.apply(&transformed)?)?;
        }
        state.len += new_len;
        let xs = drop.apply(&self.decoder.final_layer_norm.forward(&xs)?)?;
        self.lm_head.forward(&xs)
    }

    /// Teacher-forced logits (b, tgt_len, vocab).
    pub fn forward(&self, batch: &Seq2SeqBatch, drop: &mut Dropout) -> Result<Tensor> {
        let encoded = self.encode(&batch.input_ids, &batch.input_mask, &batch.digit_offsets, drop)?;
        let mut state = self.start_decoder(&encoded, &batch.input_mask, &batch.digit_offsets, false)?;
        self.decode(&batch.decoder_input_ids, &mut state, drop)
    }

    /// Sum of the token cross-entropies over the batch's non-pad targets, as
    /// a scalar of at least f32 precision. Divide by the number of target tokens for the mean.
    pub fn loss_sum(&self, batch: &Seq2SeqBatch, drop: &mut Dropout) -> Result<Tensor> {
        let logits = crate::kernels::at_least_f32(&self.forward(batch, drop)?)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?; // (b, t, vocab)
        let target_log_probs = log_probs.gather(&batch.labels.unsqueeze(2)?, 2)?.squeeze(2)?; // (b, t)
        (&target_log_probs * batch.label_mask.to_dtype(target_log_probs.dtype())?)?.sum_all()?.neg()
    }
}

/// "cpu", "cuda" or "cuda:N".
pub fn select_device(name: &str) -> Result<Device> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Some(0),
        other => other.strip_prefix("cuda:").and_then(|n| n.parse().ok()),
    };
    match ordinal {
        None => candle_core::bail!("unknown device {name:?}: use cpu, cuda or cuda:N"),
        Some(_) if !cfg!(feature = "cuda") => {
            candle_core::bail!("device {name:?} needs a CUDA build: cargo build --release --features cuda")
        }
        Some(ordinal) => Device::new_cuda(ordinal),
    }
}

/// f32 on the CPU, bf16 on CUDA (PROTOCOL.md section 9).
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_transformers() {
        // Values printed by transformers' T5Attention._relative_position_bucket
        // with 32 buckets and max distance 128.
        let bi = |r| relative_position_bucket(r, true, 32, 128);
        assert_eq!([bi(0), bi(1), bi(-1), bi(7), bi(-7), bi(8), bi(-8)], [0, 17, 1, 23, 7, 24, 8]);
        assert_eq!([bi(-20), bi(20), bi(-127), bi(-128), bi(-1000)], [10, 26, 15, 15, 15]);
        let causal = |r| relative_position_bucket(r, false, 32, 128);
        assert_eq!([causal(3), causal(0), causal(-1), causal(-15), causal(-16)], [0, 0, 1, 15, 16]);
        assert_eq!([causal(-40), causal(-127), causal(-500)], [23, 31, 31]);
    }

    #[test]
    fn clipped_buckets_saturate_at_the_clip() {
        let bi = |r| clipped_position_bucket(r, true, 4);
        assert_eq!(
            [bi(-100), bi(-5), bi(-4), bi(-1), bi(0), bi(1), bi(4), bi(5), bi(100)],
            [0, 0, 0, 3, 4, 5, 8, 8, 8]
        );
        // Causal: keys in the past (negative key - query) count back from the query.
        let causal = |r| clipped_position_bucket(r, false, 4);
        assert_eq!([causal(3), causal(0), causal(-1), causal(-4), causal(-5), causal(-500)], [0, 0, 1, 4, 4, 4]);
        let mut cfg = T5Config::preset("cpu-tiny").unwrap();
        cfg.relative_attention_clip = Some(4);
        assert_eq!((cfg.position_buckets(false), cfg.position_buckets(true)), (9, 5));
        // Every bucket a stack can produce is a row of its table.
        for is_decoder in [false, true] {
            let rows = (-300..300).map(|r| cfg.position_bucket(r, is_decoder)).max().unwrap() + 1;
            assert_eq!(rows as usize, cfg.position_buckets(is_decoder));
        }
    }

    #[test]
    fn digit_places_count_within_each_number() {
        let ids = crate::tokenizer::encode("Q: 905 + 12 = ?");
        let left = places_from_left(&ids, &mut 0);
        let right = places_from_right(&ids);
        // "Q: " then 9 0 5, " + ", 1 2, " = ?", eos.
        assert_eq!(left[..14], [0, 0, 0, 1, 2, 3, 0, 0, 0, 1, 2, 0, 0, 0]);
        assert_eq!(right[..14], [0, 0, 0, 3, 2, 1, 0, 0, 0, 2, 1, 0, 0, 0]);
        assert_eq!(digit_numbers(&ids)[..14], [0, 0, 0, 1, 1, 1, 0, 0, 0, 2, 2, 0, 0, 0]);
        // One token at a time continues the run, as cached decoding does.
        let mut run = 0;
        let stepwise: Vec<u32> = ids.iter().flat_map(|&id| places_from_left(&[id], &mut run)).collect();
        assert_eq!(stepwise, left);
    }

    #[test]
    fn presets_have_no_digit_positions() {
        for name in ["byt5-small", "byt5-base", "byt5-large", "byt5-xl", "cpu-tiny", "cpu-small", "cpu-medium"] {
            assert_eq!(T5Config::preset(name).unwrap().digit_positions, None, "{name}");
        }
    }

    #[test]
    fn presets_count_parameters() {
        // transformers reports 299,637,760 for google/byt5-small and
        // 581,653,248 for google/byt5-base.
        assert_eq!(T5Config::preset("byt5-small").unwrap().num_params(), 299_637_760);
        assert_eq!(T5Config::preset("byt5-base").unwrap().num_params(), 581_653_248);
        // The paper's Table 2 gives 1.23B and 3.74B for large and xl.
        assert_eq!(T5Config::preset("byt5-large").unwrap().num_params(), 1_228_183_552);
        assert_eq!(T5Config::preset("byt5-xl").unwrap().num_params(), 3_737_801_728);
    }
}
