//! The command line: each subcommand maps its flags to one library call.

use crate::generate::greedy_text;
use crate::model::select_device;
use crate::weights::Model;
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::BufRead;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "sector", version, about = "SECToR reproduction: ByT5 teaches itself addition")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's greedy output for each prompt, one line each.
    ///
    /// Prompts come from --prompt (repeatable) or --prompts FILE (one per
    /// line, `-` for stdin). Inside a prompt, \n stands for a newline and \\
    /// for a backslash; outputs are written with the same escapes.
    Generate {
        /// A directory with config.json and weights, or a hub id such as google/byt5-small.
        #[arg(long)]
        model: String,
        #[arg(long)]
        prompt: Vec<String>,
        #[arg(long, conflicts_with = "prompt")]
        prompts: Option<PathBuf>,
        #[arg(long, default_value_t = 512)]
        max_new_tokens: usize,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Measure training and decoding throughput against the machine's f32 matmul rate.
    Bench {
        /// Timed repetitions per case (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Only the cases whose name contains this text.
        #[arg(long, default_value = "")]
        filter: String,
    },
}

pub fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Generate { model, prompt, prompts, max_new_tokens, device } => {
            let prompts = match prompts {
                Some(path) => read_prompts(&path)?,
                None => prompt,
            };
            if prompts.is_empty() {
                anyhow::bail!("no prompts: pass --prompt TEXT or --prompts FILE (or - for stdin)");
            }
            let device = select_device(&device)?;
            let model = Model::load(&model, &device)?;
            let prompts: Vec<String> = prompts.iter().map(|p| unescape(p)).collect();
            for output in greedy_text(&model.t5, &prompts, max_new_tokens)? {
                println!("{}", escape(&output));
            }
        }
        Command::Bench { reps, filter } => crate::bench::run(reps, &filter)?,
    }
    Ok(())
}

fn read_prompts(path: &PathBuf) -> anyhow::Result<Vec<String>> {
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open prompts file {}", path.display()))?;
        Box::new(std::io::BufReader::new(file))
    };
    reader
        .lines()
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot read prompts from {}", path.display()))
}

/// `\n` -> newline, `\\` -> backslash; any other backslash stays as it is.
pub fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some('n')) => {
                out.push('\n');
                chars.next();
            }
            ('\\', Some('\\')) => {
                out.push('\\');
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

/// The inverse of `unescape`, so each output fits on one line.
pub fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_round_trip() {
        for text in ["Add fast.\nQ: 1 + 2 = ?", "a\\nb", "back\\", "x\\\ny"] {
            assert_eq!(unescape(&escape(text)), text);
        }
        assert_eq!(unescape("Add fast.\\nQ: 1 + 2 = ?"), "Add fast.\nQ: 1 + 2 = ?");
    }
}
