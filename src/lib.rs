//! sector: a deterministic reproduction of SECToR (Zhang & Parkes 2023,
//! "Chain-of-Thought Reasoning is a Policy Improvement Operator").
//!
//! Modules, from the bottom up:
//! - `tokenizer`: ByT5's byte vocabulary and batch padding;
//! - `model`: T5 v1.1 / ByT5 written for training (one file);
//! - `weights`: seeded initialisation, Hugging Face checkpoints and the hub cache;
//! - `train`: Adam, length-grouped micro-batches, resumable checkpoints;
//! - `generate`: batched greedy decoding with a key/value cache;
//! - `task`: the addition problems, their exact strings, sampling and parsing;
//! - `answer`: fast, slow, chain, simplify-only and simplify-then-guess, batched;
//! - `eval`: accuracy by length, and `sector eval` on any problem set;
//! - `config`: experiment configs (TOML);
//! - `sector`: the SECToR loop, its run directory and resume;
//! - `files`: atomic writes and sha256 manifests;
//! - `bench`: throughput of the training and decoding kernels;
//! - `cli`: the `sector` command line.

pub mod answer;
pub mod bench;
pub mod cli;
pub mod config;
pub mod error;
pub mod eval;
pub mod files;
pub mod generate;
pub mod model;
pub mod sector;
pub mod task;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
