//! `sector bench`: throughput of the two kernels a CPU-scale run spends its
//! time in (teacher-forced training and batched greedy decoding), each also
//! given as a fraction of this machine's f32 matmul rate measured in the same
//! run. Random weights and tokens; one warm-up run, then the median.

use crate::generate::{greedy, GreedyOptions};
use crate::model::T5Config;
use crate::train::{Example, TrainConfig, Trainer};
use crate::weights::Model;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::time::Instant;

/// Source length of every benchmark input.
const SRC_LEN: usize = 40;
/// Tokens generated per row when decoding.
const NEW_TOKENS: usize = 64;

enum Kind {
    /// Training with this many target tokens per row.
    Train { tgt_len: usize },
    /// Greedy decoding of NEW_TOKENS per row.
    Decode,
}

struct Case {
    preset: &'static str,
    batch: usize,
    kind: Kind,
}

impl Case {
    fn name(&self) -> String {
        match self.kind {
            Kind::Train { tgt_len } => format!("train {} b{}x{tgt_len}", self.preset, self.batch),
            Kind::Decode => format!("decode {} b{} +{NEW_TOKENS}", self.preset, self.batch),
        }
    }
}

const CASES: [Case; 6] = [
    Case { preset: "cpu-small", batch: 32, kind: Kind::Train { tgt_len: 300 } },
    Case { preset: "cpu-small", batch: 128, kind: Kind::Train { tgt_len: 16 } },
    Case { preset: "cpu-small", batch: 256, kind: Kind::Decode },
    Case { preset: "cpu-small", batch: 32, kind: Kind::Decode },
    Case { preset: "cpu-medium", batch: 32, kind: Kind::Train { tgt_len: 300 } },
    Case { preset: "cpu-medium", batch: 32, kind: Kind::Decode },
];

/// Measures every case whose name contains `filter`. With `peer` (a shell
/// command such as "python benches/peer.py"), runs it after each of sector's
/// measurements with `--case NAME --reps N` and puts its tokens/s beside
/// ours. Each case alternates sector and the peer `rounds` times and reports
/// the median round of each, so that a slow minute of a shared machine lands
/// on both sides or on neither.
pub fn run(reps: usize, rounds: usize, filter: &str, peer: Option<&str>) -> crate::Result<()> {
    let reps = reps.max(1);
    let threads = candle_core::utils::get_num_threads();
    let peak = matmul_flops_per_s(reps)?;
    println!("f32 matmul peak (2048x2048x2048, {threads} threads): {:.1} GFLOP/s\n", peak / 1e9);
    println!("| case | params | sector tokens/s | peer tokens/s | sector / peer | sector GFLOP/s | of matmul peak |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for case in CASES.iter().filter(|c| c.name().contains(filter)) {
        let cfg = T5Config::preset(case.preset).expect("bench presets exist");
        let model = Model::random(&cfg, 0, &Device::Cpu, DType::F32)?;
        let mut rng = Pcg64::seed_from_u64(1);
        let tokens = |rng: &mut Pcg64, len: usize| -> Vec<u32> { (0..len).map(|_| rng.random_range(3..259)).collect() };
        let inputs: Vec<Vec<u32>> = (0..case.batch).map(|_| tokens(&mut rng, SRC_LEN)).collect();
        // One timed unit of work, the tokens it processes and its matmul FLOPs.
        let (mut run_once, tokens_per_run, flops_per_run): (Box<dyn FnMut() -> crate::Result<()>>, usize, f64) =
            match case.kind {
                Kind::Train { tgt_len } => {
                    let examples: Vec<Example> =
                        inputs.into_iter().map(|input| (input, tokens(&mut rng, tgt_len))).collect();
                    let config = TrainConfig {
                        batch_size: case.batch,
                        max_tokens_per_micro_batch: usize::MAX,
                        ..TrainConfig::default()
                    };
                    let mut trainer = Trainer::new(model, config)?;
                    let step = move || trainer.step(&examples.iter().collect::<Vec<_>>()).map(|_| ());
                    (Box::new(step), case.batch * tgt_len, 3.0 * forward_flops(&cfg, case.batch, SRC_LEN, tgt_len))
                }
                Kind::Decode => {
                    let opts = GreedyOptions { stop_at_eos: false, ..GreedyOptions::new(NEW_TOKENS) };
                    let decode = move || Ok(greedy(&model.t5, &inputs, opts).map(|_| ())?);
                    (Box::new(decode), case.batch * NEW_TOKENS, decode_flops(&cfg, case.batch, SRC_LEN, NEW_TOKENS))
                }
            };
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..rounds.max(1) {
            ours.push(tokens_per_run as f64 / median_seconds(reps, &mut run_once)?);
            if let Some(command) = peer {
                theirs.push(peer_tokens_per_s(command, &case.name(), reps)?);
            }
        }
        let ours = median(ours);
        let flops_per_s = flops_per_run * ours / tokens_per_run as f64;
        let (theirs, ratio) = match peer {
            Some(_) => {
                let theirs = median(theirs);
                (format!("{theirs:.0}"), format!("{:.2}x", ours / theirs))
            }
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {:.2}M | {ours:.0} | {theirs} | {ratio} | {:.1} | {:.1} % |",
            case.name(),
            cfg.num_params() as f64 / 1e6,
            flops_per_s / 1e9,
            100.0 * flops_per_s / peak
        );
    }
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs the peer benchmark on one case; it prints {"tokens_per_s": ...}.
fn peer_tokens_per_s(command: &str, case: &str, reps: usize) -> crate::Result<f64> {
    let peer_error = |problem: String| crate::Error::format(command, problem);
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{command} --case '{case}' --reps {reps}"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| peer_error(format!("cannot start: {e}")))?;
    if !output.status.success() {
        return Err(peer_error(format!(
            "failed on {case:?} ({}); is the venv there? run `make bench-peer`",
            output.status
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v["tokens_per_s"].as_f64())
        .ok_or_else(|| peer_error(format!("printed {line:?}, not {{\"tokens_per_s\": ...}}")))
}

/// Median wall time of `reps` runs after one warm-up run.
fn median_seconds(reps: usize, mut f: impl FnMut() -> crate::Result<()>) -> crate::Result<f64> {
    f()?;
    let times = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f().map(|_| start.elapsed().as_secs_f64())
        })
        .collect::<crate::Result<Vec<f64>>>()?;
    Ok(median(times))
}

/// FLOP/s of a large square f32 matmul on the CPU: the best of a few runs,
/// since a peak is what the machine can do when nothing else runs.
fn matmul_flops_per_s(reps: usize) -> crate::Result<f64> {
    const N: usize = 2048;
    let mut rng = Pcg64::seed_from_u64(2);
    let mut random =
        || Tensor::from_vec((0..N * N).map(|_| rng.random::<f32>()).collect::<Vec<_>>(), (N, N), &Device::Cpu);
    let (a, b) = (random()?, random()?);
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(3) {
        let start = Instant::now();
        a.matmul(&b)?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (N * N * N) as f64 / best)
}

/// Matmul FLOPs of a teacher-forced forward pass (the backward pass costs
/// about twice as much). Norms, softmax and element-wise ops are left out.
pub fn forward_flops(cfg: &T5Config, batch: usize, src: usize, tgt: usize) -> f64 {
    let (b, s, t) = (batch as f64, src as f64, tgt as f64);
    let (d, f, v) = (cfg.d_model as f64, cfg.d_ff as f64, cfg.vocab_size as f64);
    let inner = (cfg.num_heads * cfg.d_kv) as f64;
    let linear = |rows: f64, i: f64, o: f64| 2.0 * rows * i * o;
    // Scores and weighted values: two (q x k) by inner products.
    let attention = |q: f64, k: f64| 2.0 * 2.0 * b * q * k * inner;
    let ff = |rows: f64| 3.0 * linear(rows, d, f);
    let encoder_layer = 4.0 * linear(b * s, d, inner) + attention(s, s) + ff(b * s);
    let decoder_layer = 4.0 * linear(b * t, d, inner)
        + attention(t, t)
        + 2.0 * linear(b * t, d, inner)
        + 2.0 * linear(b * s, d, inner)
        + attention(t, s)
        + ff(b * t);
    cfg.num_layers as f64 * encoder_layer + cfg.decoder_layers() as f64 * decoder_layer + linear(b * t, d, v)
}

/// Matmul FLOPs of encoding `src` tokens and decoding `new` tokens one at a
/// time with a cache: the encoder pass (with the decoder's cross-attention
/// keys and values) plus, per step, one decoder row per batch element.
fn decode_flops(cfg: &T5Config, batch: usize, src: usize, new: usize) -> f64 {
    let full = forward_flops(cfg, batch, src, 1);
    let (b, d, inner) = (batch as f64, cfg.d_model as f64, (cfg.num_heads * cfg.d_kv) as f64);
    let per_step = |past: f64| {
        let linear = |i: f64, o: f64| 2.0 * b * i * o;
        let layer = 4.0 * linear(d, inner)
            + 2.0 * 2.0 * b * past * inner
            + 2.0 * linear(d, inner)
            + 2.0 * 2.0 * b * src as f64 * inner
            + 3.0 * linear(d, cfg.d_ff as f64);
        cfg.decoder_layers() as f64 * layer + linear(d, cfg.vocab_size as f64)
    };
    // forward_flops(.., 1) already counts the first step.
    full + (2..=new).map(|t| per_step(t as f64)).sum::<f64>()
}
