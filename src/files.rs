//! Atomic writes and sha256 manifests.
//!
//! Every file the project writes goes through `write_atomic`, so a killed run
//! leaves either the old file or the new one, never half of one. A directory's
//! `manifest.sha256` lists its files in `sha256sum` format, so a reviewer can
//! also check it with `sha256sum -c manifest.sha256`.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.sha256";
/// The config a run directory was made by.
pub const CONFIG_FILE: &str = "config.toml";
const LOG_FILE: &str = "run.log";
/// Held (flock) by the process writing a run directory; never in a manifest.
pub const LOCK_FILE: &str = ".lock";

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames
/// it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    };
    write().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

pub fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The sha256 of a file, read in pieces (checkpoints of the paper's models
/// are several GB).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    std::fs::File::open(path)
        .and_then(|mut file| std::io::copy(&mut file, &mut hasher))
        .map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// The sha256 of each file of a directory, by path relative to it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Manifest {
    pub entries: BTreeMap<String, String>,
}

impl Manifest {
    /// Writes `bytes` atomically to `dir/name` and records its hash.
    pub fn write_file(&mut self, dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
        write_atomic(&dir.join(name), bytes)?;
        self.entries.insert(name.to_string(), sha256_hex(bytes));
        Ok(())
    }

    /// Records the hash of `dir/name`, a file written atomically by other code.
    pub fn add_file(&mut self, dir: &Path, name: &str) -> Result<()> {
        self.entries.insert(name.to_string(), sha256_file(&dir.join(name))?);
        Ok(())
    }

    /// Lists the files of the checkpoint `dir/sub` (and its own manifest) under `sub/`.
    pub fn add_checkpoint(&mut self, dir: &Path, sub: &str) -> Result<()> {
        let checkpoint = dir.join(sub);
        for (name, hash) in Manifest::load(&checkpoint)?.entries {
            self.entries.insert(format!("{sub}/{name}"), hash);
        }
        self.entries.insert(format!("{sub}/{MANIFEST}"), sha256_file(&checkpoint.join(MANIFEST))?);
        Ok(())
    }

    /// Writes `dir/manifest.sha256`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text: String = self.entries.iter().map(|(name, hash)| format!("{hash}  {name}\n")).collect();
        write_atomic(&dir.join(MANIFEST), text.as_bytes())
    }

    /// Reads `dir/manifest.sha256`.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_file(&dir.join(MANIFEST))
    }

    /// The directory's manifest, or an empty one where it has none yet.
    pub fn load_or_default(dir: &Path) -> Result<Self> {
        if dir.join(MANIFEST).exists() {
            Self::load(dir)
        } else {
            Ok(Self::default())
        }
    }

    /// Reads a manifest in `sha256sum` format from any path.
    pub fn load_file(path: &Path) -> Result<Self> {
        let path = path.to_path_buf();
        let text = String::from_utf8(read(&path)?).map_err(|_| Error::format(&path, "is not UTF-8"))?;
        let mut entries = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let parsed = line.split_once("  ").filter(|(hash, name)| {
                hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) && !name.is_empty()
            });
            let Some((hash, name)) = parsed else {
                return Err(Error::format(&path, format!("line {} is not `<64 hex digits>  <file>`: {line:?}", i + 1)));
            };
            entries.insert(name.to_string(), hash.to_ascii_lowercase());
        }
        Ok(Manifest { entries })
    }

    /// Recomputes every listed file's hash; the first mismatch or missing file
    /// is an error that names it.
    pub fn verify(&self, dir: &Path) -> Result<()> {
        for name in self.entries.keys() {
            self.verify_file(dir, name)?;
        }
        Ok(())
    }

    /// Every missing or changed file under `dir`, each as a message naming it
    /// (empty when all match). `sector verify` reports them all at once.
    pub fn problems(&self, dir: &Path) -> Vec<String> {
        self.failing(dir).into_values().collect()
    }

    /// `problems`, keyed by the manifest name of the file each is about.
    pub fn failing(&self, dir: &Path) -> BTreeMap<String, String> {
        self.entries
            .keys()
            .filter_map(|name| {
                let problem = match sha256_file(&dir.join(name)) {
                    Err(e) => Some(format!("missing: {e}")),
                    Ok(actual) => self.check(dir, name, actual).err().map(|e| format!("changed: {e}")),
                };
                Some((name.clone(), problem?))
            })
            .collect()
    }

    /// Checks bytes already read from `dir/name` against the manifest.
    pub fn verify_bytes(&self, dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
        self.check(dir, name, sha256_hex(bytes))
    }

    /// Checks the file `dir/name` against the manifest, reading it in pieces.
    pub fn verify_file(&self, dir: &Path, name: &str) -> Result<()> {
        self.check(dir, name, sha256_file(&dir.join(name))?)
    }

    fn check(&self, dir: &Path, name: &str, actual: String) -> Result<()> {
        let path = dir.join(name);
        let Some(expected) = self.entries.get(name) else {
            return Err(Error::format(dir.join(MANIFEST), format!("does not list {name}")));
        };
        if &actual != expected {
            return Err(Error::HashMismatch { path, manifest: dir.join(MANIFEST), expected: expected.clone(), actual });
        }
        Ok(())
    }
}

/// A run directory held by this process: two processes writing one run
/// (say `make` and a run that makes its pretraining itself) would interleave
/// their checkpoints. The operating system drops the lock when the process
/// ends, however it ends, so a killed run leaves nothing to clean up.
pub struct RunLock {
    _file: std::fs::File,
}

/// Creates (or reopens) a run directory made by the config whose canonical
/// text is `canonical`, refusing one made by another config or in use by
/// another process, and stores the config as config.toml. Returns the
/// directory's manifest and the lock to hold while writing to it.
pub fn open_run_dir(dir: &Path, name: &str, canonical: &str) -> Result<(Manifest, RunLock)> {
    let config_path = dir.join(CONFIG_FILE);
    if config_path.exists() {
        let stored = String::from_utf8_lossy(&read(&config_path)?).into_owned();
        if stored != canonical {
            return Err(Error::format(
                dir,
                format!(
                    "was made by another config than `{name}`. Fix: give the config another name, or move the \
                     directory away to start afresh (compare {} with the config file)",
                    config_path.display()
                ),
            ));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let lock_path = dir.join(LOCK_FILE);
    let lock = std::fs::File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    if let Err(e) = lock.try_lock() {
        return Err(match e {
            std::fs::TryLockError::WouldBlock => Error::format(
                dir,
                format!(
                    "is in use by another sector process (it holds {LOCK_FILE}). Fix: wait for that run to \
                     finish or stop it, then run again; the run resumes after its last finished stage"
                ),
            ),
            std::fs::TryLockError::Error(e) => Error::io(&lock_path, e),
        });
    }
    let mut manifest = Manifest::load_or_default(dir)?;
    manifest.write_file(dir, CONFIG_FILE, canonical.as_bytes())?;
    Ok((manifest, RunLock { _file: lock }))
}

/// Appends a line to the run's log (and prints it, labelled with the run's name).
pub fn append_log(dir: &Path, name: &str, line: &str) {
    eprintln!("[{name}] {line}");
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(LOG_FILE))
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = appended {
        eprintln!("warning: cannot append to {}: {e}", dir.join(LOG_FILE).display());
    }
}

/// The recorded run's full manifest (datasets and checkpoints included),
/// kept beside its recorded results.
pub const RUN_MANIFEST: &str = "run-manifest.sha256";

/// What `record_run` did.
pub struct Recorded {
    /// The files written under `dest`.
    pub files: Vec<String>,
    /// Datasets and checkpoints in the run's manifest that were not on disk.
    pub absent: Vec<String>,
}

/// Records a finished run under `dest` (e.g. results/cpu/main): its config
/// and results CSVs, its manifest as `run-manifest.sha256` (the hashes of
/// the datasets and checkpoints, which stay out of git) and a manifest of
/// the recorded files. Every file on disk is verified first. Datasets and
/// checkpoints may be absent: a run carried between machines
/// (scripts/carry-run.sh) keeps only what resuming needs, and the others'
/// hashes are the ones written when they were made.
pub fn record_run(run_dir: &Path, dest: &Path) -> Result<Recorded> {
    let run_manifest = Manifest::load(run_dir)?;
    let mut absent = Vec::new();
    for name in run_manifest.entries.keys() {
        let path = run_dir.join(name);
        if name.contains('/') && !path.exists() {
            absent.push(name.clone());
        } else {
            run_manifest.verify_bytes(run_dir, name, &read(&path)?)?;
        }
    }
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let mut recorded = Manifest::default();
    // Top-level files are the config and the results; data/ and checkpoints/ are not copied.
    for name in run_manifest.entries.keys().filter(|name| !name.contains('/')) {
        recorded.write_file(dest, name, &read(&run_dir.join(name))?)?;
    }
    recorded.write_file(dest, RUN_MANIFEST, &read(&run_dir.join(MANIFEST))?)?;
    recorded.save(dest)?;
    Ok(Recorded { files: recorded.entries.into_keys().collect(), absent })
}

/// Rows of a CSV file with a header (none if the file does not exist).
pub fn read_csv<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let mut reader = csv::Reader::from_path(path).map_err(|e| Error::format(path, format!("cannot read: {e}")))?;
    reader
        .deserialize()
        .enumerate()
        .map(|(i, row)| {
            row.map_err(|e| {
                Error::format(path, format!("row {}: {e}. Fix: restore the file or delete the run directory", i + 2))
            })
        })
        .collect()
}

/// `rows` as CSV with a header; `path` only names the file in errors.
pub fn csv_bytes<T: serde::Serialize>(rows: &[T], path: &Path) -> Result<Vec<u8>> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for row in rows {
        writer.serialize(row).map_err(|e| Error::format(path, format!("cannot write: {e}")))?;
    }
    writer.into_inner().map_err(|e| Error::format(path, format!("cannot write: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_abc() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn manifest_round_trip_and_tamper() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = Manifest::default();
        manifest.write_file(dir.path(), "a.txt", b"hello")?;
        manifest.save(dir.path())?;
        let loaded = Manifest::load(dir.path())?;
        assert_eq!(loaded, manifest);
        loaded.verify(dir.path())?;
        std::fs::write(dir.path().join("a.txt"), b"hellO").unwrap();
        let err = loaded.verify(dir.path()).unwrap_err().to_string();
        assert!(err.contains("a.txt") && err.contains("sha256"), "{err}");
        Ok(())
    }

    #[test]
    fn recording_a_run_verifies_what_is_on_disk_and_lists_absent_checkpoints() -> Result<()> {
        let run = tempfile::tempdir().unwrap();
        let mut manifest = Manifest::default();
        for name in ["stages.csv", "data/stage-01.csv", "checkpoints/stage-01/model.safetensors"] {
            std::fs::create_dir_all(run.path().join(name).parent().unwrap()).unwrap();
            manifest.write_file(run.path(), name, name.as_bytes())?;
        }
        manifest.save(run.path())?;
        std::fs::remove_file(run.path().join("checkpoints/stage-01/model.safetensors")).unwrap();
        let dest = tempfile::tempdir().unwrap();
        let recorded = record_run(run.path(), dest.path())?;
        assert_eq!(recorded.absent, ["checkpoints/stage-01/model.safetensors"]);
        assert_eq!(recorded.files, [RUN_MANIFEST, "stages.csv"]);
        std::fs::write(run.path().join("data/stage-01.csv"), b"changed").unwrap();
        let err = record_run(run.path(), dest.path()).err().expect("a changed dataset is refused").to_string();
        assert!(err.contains("stage-01.csv"), "{err}");
        std::fs::remove_file(run.path().join("stages.csv")).unwrap();
        std::fs::write(run.path().join("data/stage-01.csv"), b"data/stage-01.csv").unwrap();
        assert!(record_run(run.path(), dest.path()).is_err(), "a missing result file is refused");
        Ok(())
    }

    #[test]
    fn problems_lists_every_missing_and_changed_file() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = Manifest::default();
        for name in ["a.txt", "b.txt", "c.txt"] {
            manifest.write_file(dir.path(), name, name.as_bytes())?;
        }
        assert!(manifest.problems(dir.path()).is_empty());
        std::fs::remove_file(dir.path().join("a.txt")).unwrap();
        std::fs::write(dir.path().join("c.txt"), b"C.txt").unwrap();
        let problems = manifest.problems(dir.path());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("missing") && problems[0].contains("a.txt"), "{problems:?}");
        assert!(problems[1].starts_with("changed") && problems[1].contains("c.txt"), "{problems:?}");
        Ok(())
    }

    #[test]
    fn a_run_dir_in_use_is_refused_until_its_holder_lets_go() -> Result<()> {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("run");
        let (_, held) = open_run_dir(&dir, "run", "name = \"run\"\n")?;
        let err = open_run_dir(&dir, "run", "name = \"run\"\n").err().expect("a second writer is refused");
        assert!(err.to_string().contains("in use by another sector process"), "{err}");
        drop(held);
        let (manifest, _) = open_run_dir(&dir, "run", "name = \"run\"\n")?;
        assert!(manifest.entries.contains_key(CONFIG_FILE) && !manifest.entries.contains_key(LOCK_FILE));
        Ok(())
    }

    #[test]
    fn malformed_manifest_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MANIFEST), "not a manifest line\n").unwrap();
        let err = Manifest::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("manifest.sha256") && err.contains("line 1"), "{err}");
    }
}
