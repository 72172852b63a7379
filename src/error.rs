//! The library's errors. Each message names the file (and field) at fault
//! and, where there is one, the fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{}: field `{field}` {problem}", path.display())]
    Config { path: PathBuf, field: String, problem: String },

    #[error(
        "{}: sha256 is {actual} but {} records {expected}; the file is corrupt or was changed. \
         Fix: restore it, or delete it and rerun the step that wrote it",
        path.display(), manifest.display()
    )]
    HashMismatch { path: PathBuf, manifest: PathBuf, expected: String, actual: String },

    #[error("{}: {problem}", path.display())]
    Format { path: PathBuf, problem: String },

    #[error("model `{spec}` not found: {problem}")]
    ModelNotFound { spec: String, problem: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub fn format(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::Format { path: path.into(), problem: problem.into() }
    }
}
