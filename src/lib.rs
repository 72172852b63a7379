//! sector: a deterministic reproduction of SECToR (Zhang & Parkes 2023,
//! "Chain-of-Thought Reasoning is a Policy Improvement Operator").
//!
//! Modules, from the bottom up:
//! - `tokenizer`: ByT5's byte vocabulary and batch padding;
//! - `model`: T5 v1.1 / ByT5 written for training (one file);
//! - `kernels`: fused CPU softmax, GELU and RMS norm with their backward passes;
//! - `matmul`: CPU matrix products whose bits do not depend on the cache sizes;
//! - `weights`: seeded initialisation, Hugging Face checkpoints and the hub cache;
//! - `train`: Adam, length-grouped micro-batches, resumable checkpoints;
//! - `parallel`: data parallelism over ranks (NCCL between GPUs);
//! - `memory`: the per-GPU memory plan of a training run;
//! - `generate`: batched greedy decoding with a key/value cache;
//! - `task`: the addition problems, their exact strings, sampling and parsing;
//! - `answer`: fast, slow, chain, simplify-only and simplify-then-guess, batched;
//! - `eval`: accuracy by length, and `sector eval` on any problem set;
//! - `config`: experiment configs (TOML);
//! - `pretrain`: CPU scale's stand-in for ByT5's pretraining (string skills);
//! - `sector`: the SECToR loop, its run directory and resume;
//! - `probe`: minutes-long check whether the slow step carries to longer numbers;
//! - `analysis`: carries and traced votes of a run's final checkpoint;
//! - `cost`: FLOPs and GPU hours of a paper-scale experiment;
//! - `fewshot`: Table 2, models out of the box with a ten-shot prompt;
//! - `report`, `figures`: the paper's tables and figures from recorded results;
//! - `files`: atomic writes, sha256 manifests, recording a run's results;
//! - `provenance`: the machine, kernels and build behind a run, and when bytes compare;
//! - `bench`: throughput of the training and decoding kernels;
//! - `smoke`: the paper-scale models trained, decoded, saved and reloaded on the CPU;
//! - `cli`: the `sector` command line.

pub mod analysis;
pub mod answer;
pub mod bench;
pub mod cli;
pub mod config;
pub mod cost;
pub mod error;
pub mod eval;
pub mod fewshot;
pub mod figures;
pub mod files;
pub mod generate;
pub mod kernels;
pub mod matmul;
pub mod memory;
pub mod model;
pub mod parallel;
pub mod pretrain;
pub mod probe;
pub mod provenance;
pub mod report;
pub mod sector;
pub mod smoke;
pub mod task;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use error::{Error, Result};

/// Process-wide settings that make candle fast on the CPU; call it first
/// thing in a program, before any other thread exists (REPRODUCE.md,
/// "Performance").
///
/// - glibc's malloc keeps freed memory for reuse. By default it serves
///   blocks over 128 KiB with mmap and returns them on free, so every tensor
///   of a training step arrives as fresh pages the kernel must fault in and
///   zero: a third of the time of a cpu-small training step went there.
/// - The thread count is fixed once in RAYON_NUM_THREADS. Without it, candle
///   counts physical cores by reading /proc/cpuinfo on every matmul and
///   every parallel op (3,540 reads in a 4-second decoding benchmark).
pub fn tune_cpu_runtime() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning parameters.
    unsafe {
        // glibc caps the mmap threshold at 32 MiB on 64-bit targets.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 1 << 30);
    }
}
