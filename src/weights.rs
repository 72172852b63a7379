//! Where a model's weights come from and go to: seeded random initialisation,
//! Hugging Face checkpoints (safetensors or pytorch_model.bin, from a
//! directory or the hub's local cache), and saving in the same format.

use crate::error::{Error, Result};
use crate::files::Manifest;
use crate::model::{T5Config, T5};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TORCH_WEIGHTS_FILE: &str = "pytorch_model.bin";

/// A T5 and its trainable variables, by Hugging Face tensor name.
pub struct Model {
    pub t5: T5,
    pub vars: BTreeMap<String, Var>,
}

impl Model {
    /// Random weights drawn from a PCG seeded with `seed`, at the scales
    /// transformers' T5 uses (`T5PreTrainedModel._init_weights`).
    pub fn random(cfg: &T5Config, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        let source = Source::Random { rng: Mutex::new(Pcg64::seed_from_u64(seed)), cfg: Box::new(cfg.clone()) };
        Self::build(cfg, source, device, dtype)
    }

    /// Weights from a map of Hugging Face-named tensors read from `file`.
    pub fn from_tensors(
        cfg: &T5Config,
        tensors: HashMap<String, Tensor>,
        file: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::build(cfg, Source::Loaded { tensors, file: file.to_path_buf() }, device, dtype)
    }

    /// Loads a directory with config.json and weights, or a hub id such as
    /// google/byt5-small from the Hugging Face cache (downloading it when the
    /// hub can be reached), in the device's compute dtype.
    /// A directory with a manifest.sha256 (a checkpoint of ours) is checked
    /// against it first.
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        let files = resolve(spec)?;
        let dir = Path::new(spec);
        if dir.join(crate::files::MANIFEST).is_file() {
            let manifest = Manifest::load(dir)?;
            for file in [&files.config, &files.weights] {
                manifest.verify_file(dir, &file.file_name().expect("a file").to_string_lossy())?;
            }
        }
        let cfg = read_config(&files.config)?;
        let tensors = read_tensors(&files.weights)?;
        Self::from_tensors(&cfg, tensors, &files.weights, device, crate::model::compute_dtype(device))
    }

    /// What an experiment names: a preset's config (random weights from
    /// `seed`) or pretrained weights (`load`), in the device's compute dtype.
    pub fn from_preset_or_weights(
        preset: Option<&T5Config>,
        weights: Option<&str>,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        match (preset, weights) {
            (Some(cfg), _) => Self::random(cfg, seed, device, crate::model::compute_dtype(device)),
            (None, Some(weights)) => Self::load(weights, device),
            (None, None) => unreachable!("configs are checked for a preset or weights when read"),
        }
    }

    fn build(cfg: &T5Config, source: Source, device: &Device, dtype: DType) -> Result<Self> {
        let created = Arc::new(Mutex::new(BTreeMap::new()));
        let backend = Backend { source, created: created.clone() };
        let t5 = T5::new(VarBuilder::from_backend(Box::new(backend), dtype, device.clone()), cfg)?;
        let vars = std::mem::take(&mut *created.lock().expect("poisoned"));
        Ok(Model { t5, vars })
    }

    pub fn config(&self) -> &T5Config {
        self.t5.config()
    }

    /// Writes config.json and model.safetensors (with transformers' "format":
    /// "pt" metadata) into `dir`, recording their hashes in `manifest`.
    pub fn save(&self, dir: &Path, manifest: &mut Manifest) -> Result<()> {
        let mut config = serde_json::to_value(self.config()).expect("config serialises");
        // transformers ignores fields it does not know, and so would run a
        // checkpoint with sector's CPU-scale deviations as a plain T5: say so.
        let cfg = self.config();
        let deviations: Vec<&str> = [
            (
                cfg.digit_positions.is_some(),
                "digit_positions: sector's digit-position embeddings (tensors digit_positions_left / _right / \
                 _number, a CPU-scale deviation)",
            ),
            (
                cfg.relative_attention_clip.is_some(),
                "relative_attention_clip: sector's clipped relative positions (a CPU-scale deviation)",
            ),
        ]
        .into_iter()
        .filter_map(|(on, what)| on.then_some(what))
        .collect();
        if !deviations.is_empty() {
            let note = deviations.join("; ")
                + ". transformers' T5 ignores them and cannot reproduce this model; \
                load it with sector.";
            config["sector_note"] = note.into();
        }
        let config = serde_json::to_vec_pretty(&config).expect("config serialises");
        manifest.write_file(dir, CONFIG_FILE, &config)?;
        write_tensors(self.vars.iter().map(|(n, v)| (n, v.as_tensor())), dir, WEIGHTS_FILE, manifest)
    }
}

/// Writes named tensors to `dir/name` as safetensors, with the metadata
/// transformers requires, and records the file's hash. Tensor by tensor into
/// a temporary file that is synced and renamed into place: a checkpoint of
/// byt5-base is 7 GB, which a whole-file buffer would hold a second time.
pub fn write_tensors<'a>(
    tensors: impl Iterator<Item = (&'a String, &'a Tensor)>,
    dir: &Path,
    name: &str,
    manifest: &mut Manifest,
) -> Result<()> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tensors: Vec<(&String, Tensor)> = tensors.map(|(n, t)| Ok((n, t.contiguous()?))).collect::<Result<_>>()?;
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    safetensors::serialize_to_file(tensors, Some(metadata), &tmp)
        .map_err(|e| Error::format(&path, format!("cannot serialise: {e}")))?;
    std::fs::File::open(&tmp).and_then(|file| file.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    manifest.add_file(dir, name)
}

/// Reads a safetensors file, or a PyTorch pickle (`.bin`), onto the CPU.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let is_torch = path.extension().is_some_and(|e| e == "bin" || e == "pt" || e == "pth");
    let loaded = if is_torch {
        candle_core::pickle::read_all(path).map(|v| v.into_iter().collect())
    } else {
        candle_core::safetensors::load(path, &Device::Cpu)
    };
    loaded.map_err(|e| Error::format(path, format!("cannot read weights: {e}")))
}

pub fn read_config(path: &Path) -> Result<T5Config> {
    let bytes = crate::files::read(path)?;
    let cfg: T5Config =
        serde_json::from_slice(&bytes).map_err(|e| Error::format(path, format!("is not a T5 config.json: {e}")))?;
    match cfg.unsupported() {
        Some((field, problem)) => Err(Error::Config { path: path.to_path_buf(), field: field.into(), problem }),
        None => Ok(cfg),
    }
}

/// The two files a model is made of.
#[derive(Debug)]
pub struct ModelFiles {
    pub config: PathBuf,
    pub weights: PathBuf,
}

/// Finds a model's files: `spec` is a directory, or a hub id looked up in the
/// Hugging Face cache (HF_HOME or ~/.cache/huggingface) and, failing that,
/// downloaded.
pub fn resolve(spec: &str) -> Result<ModelFiles> {
    let path = Path::new(spec);
    if path.is_dir() {
        return files_in_dir(path).ok_or_else(|| Error::ModelNotFound {
            spec: spec.into(),
            problem: format!(
                "directory {} needs {CONFIG_FILE} and {WEIGHTS_FILE} or {TORCH_WEIGHTS_FILE}",
                path.display()
            ),
        });
    }
    if spec.split('/').count() != 2 || path.exists() {
        return Err(Error::ModelNotFound {
            spec: spec.into(),
            problem: "it is neither a directory nor a hub id of the form owner/name".into(),
        });
    }
    let cache = hf_hub::Cache::from_env();
    if let Some(files) = find_in_cache(&cache, spec) {
        return Ok(files);
    }
    download(spec).map_err(|problem| Error::ModelNotFound {
        spec: spec.into(),
        problem: format!(
            "not in the Hugging Face cache at {} and the download failed ({problem}). Fix: on a machine \
             with internet run `huggingface-cli download {spec}` and copy the cache (or set HF_HOME), \
             or pass a directory with {CONFIG_FILE} and weights",
            cache.path().display()
        ),
    })
}

fn files_in_dir(dir: &Path) -> Option<ModelFiles> {
    let config = dir.join(CONFIG_FILE);
    let weights = [WEIGHTS_FILE, TORCH_WEIGHTS_FILE].iter().map(|f| dir.join(f)).find(|p| p.is_file())?;
    config.is_file().then_some(ModelFiles { config, weights })
}

/// The hub's main branch of google/byt5-* holds only pytorch_model.bin;
/// safetensors conversions sit on refs/pr/N branches, which the cache records
/// under refs/refs/pr/N. Prefer safetensors from main, then from any cached PR
/// branch, then the pickle from main.
pub fn find_in_cache(cache: &hf_hub::Cache, model_id: &str) -> Option<ModelFiles> {
    use hf_hub::{Repo, RepoType};
    let main = cache.model(model_id.to_string());
    let config = main.get(CONFIG_FILE);
    let repo_dir = cache.path().join(Repo::model(model_id.to_string()).folder_name());
    let mut pr_refs: Vec<String> = std::fs::read_dir(repo_dir.join("refs/refs/pr"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    pr_refs.sort();
    let from_pr = pr_refs.iter().find_map(|pr| {
        let repo = cache.repo(Repo::with_revision(model_id.to_string(), RepoType::Model, format!("refs/pr/{pr}")));
        Some((repo.get(WEIGHTS_FILE)?, repo.get(CONFIG_FILE)))
    });
    let (weights, pr_config) = match (main.get(WEIGHTS_FILE), from_pr) {
        (Some(w), _) => (w, None),
        (None, Some((w, c))) => (w, c),
        (None, None) => (main.get(TORCH_WEIGHTS_FILE)?, None),
    };
    Some(ModelFiles { config: config.or(pr_config)?, weights })
}

/// Downloads config and weights into the cache (HF_HOME, HF_ENDPOINT),
/// unless HF_HUB_OFFLINE=1 says not to try.
fn download(model_id: &str) -> std::result::Result<ModelFiles, String> {
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1") {
        return Err("HF_HUB_OFFLINE=1".into());
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env().build().map_err(|e| e.to_string())?;
    let repo = api.model(model_id.to_string());
    let config = repo.get(CONFIG_FILE).map_err(|e| e.to_string())?;
    let weights = repo.get(WEIGHTS_FILE).or_else(|_| repo.get(TORCH_WEIGHTS_FILE)).map_err(|e| e.to_string())?;
    Ok(ModelFiles { config, weights })
}

/// Standard deviation of a parameter's initial values (None: ones, for the
/// layer norms), following transformers' T5 `_init_weights`.
fn init_std(name: &str, cfg: &T5Config) -> Option<f64> {
    let f = cfg.initializer_factor;
    let (d_model, inner) = (cfg.d_model as f64, (cfg.num_heads * cfg.d_kv) as f64);
    let std = match name.rsplit('.').nth(1)? {
        // Digit places are added to token embeddings: the same spread.
        "shared" | "digit_positions_left" | "digit_positions_right" | "digit_positions_number" => 1.0,
        "lm_head" => cfg.lm_head_init_std.unwrap_or(1.0),
        "q" => (d_model * cfg.d_kv as f64).powf(-0.5),
        "k" | "v" | "wi_0" | "wi_1" | "relative_attention_bias" => d_model.powf(-0.5),
        "o" => inner.powf(-0.5),
        "wo" => (cfg.d_ff as f64).powf(-0.5),
        _ => return None, // layer_norm, final_layer_norm
    };
    Some(f * std)
}

/// A standard normal draw (Box-Muller), so that initial weights depend only
/// on the seed.
fn standard_normal(rng: &mut Pcg64) -> f64 {
    let u1 = 1.0 - rng.random::<f64>(); // in (0, 1], so ln is finite
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

enum Source {
    // Boxed: the config is large beside the other variant's fields.
    Random { rng: Mutex<Pcg64>, cfg: Box<T5Config> },
    Loaded { tensors: HashMap<String, Tensor>, file: PathBuf },
}

/// Hands the model each tensor it asks for, as a fresh Var, and remembers
/// the Vars by name so that they can be trained and saved.
struct Backend {
    source: Source,
    created: Arc<Mutex<BTreeMap<String, Var>>>,
}

impl Backend {
    fn values(&self, shape: &Shape, name: &str) -> candle_core::Result<Tensor> {
        match &self.source {
            Source::Random { rng, cfg } => {
                let values: Vec<f32> = match init_std(name, cfg) {
                    None => vec![1.0; shape.elem_count()],
                    Some(std) => {
                        let mut rng = rng.lock().expect("poisoned");
                        (0..shape.elem_count()).map(|_| (std * standard_normal(&mut rng)) as f32).collect()
                    }
                };
                Tensor::from_vec(values, shape, &Device::Cpu)
            }
            Source::Loaded { tensors, file } => {
                // Some exports keep the shared embedding only under the encoder's name.
                let tensor = tensors
                    .get(name)
                    .or_else(|| tensors.get("encoder.embed_tokens.weight").filter(|_| name == "shared.weight"))
                    .ok_or_else(|| candle_core::Error::Msg(format!("{}: no tensor named {name}", file.display())))?;
                if tensor.shape() != shape {
                    candle_core::bail!(
                        "{}: tensor {name} has shape {:?} but config.json implies {shape:?}",
                        file.display(),
                        tensor.shape()
                    );
                }
                Ok(tensor.clone())
            }
        }
    }
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut created = self.created.lock().expect("poisoned");
        if let Some(var) = created.get(name) {
            return Ok(var.as_tensor().clone());
        }
        let values = self.values(&shape, name)?.to_dtype(dtype)?.to_device(dev)?;
        let var = Var::from_tensor(&values)?;
        created.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: every T5 tensor is requested with its shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match &self.source {
            Source::Random { .. } => true,
            Source::Loaded { tensors, .. } => tensors.contains_key(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_scales_follow_transformers() {
        let cfg = T5Config::preset("cpu-small").unwrap();
        let std = |n| init_std(n, &cfg);
        assert_eq!(std("shared.weight"), Some(1.0));
        assert_eq!(std("encoder.block.0.layer.0.SelfAttention.q.weight"), Some((256.0f64 * 64.0).powf(-0.5)));
        assert_eq!(std("decoder.block.1.layer.1.EncDecAttention.k.weight"), Some(1.0 / 16.0));
        assert_eq!(std("decoder.block.0.layer.2.DenseReluDense.wo.weight"), Some((512f64).powf(-0.5)));
        assert_eq!(std("encoder.final_layer_norm.weight"), None);
        assert_eq!(std("decoder.block.0.layer.2.layer_norm.weight"), None);
        assert_eq!(std("lm_head.weight"), Some(1.0));
        let mesh_tf = T5Config { lm_head_init_std: Some(0.0625), initializer_factor: 2.0, ..cfg };
        assert_eq!(init_std("lm_head.weight", &mesh_tf), Some(0.125));
    }

    #[test]
    fn random_weights_have_the_intended_spread() -> Result<()> {
        let cfg = T5Config::preset("cpu-small").unwrap();
        let model = Model::random(&cfg, 7, &Device::Cpu, DType::F32)?;
        assert_eq!(model.vars.values().map(|v| v.elem_count()).sum::<usize>(), cfg.num_params());
        let wo = model.vars["encoder.block.0.layer.1.DenseReluDense.wo.weight"].as_tensor();
        let std = wo.sqr()?.mean_all()?.to_scalar::<f32>()?.sqrt();
        assert!((std - 512f32.powf(-0.5)).abs() < 0.002, "std {std}");
        Ok(())
    }
}
