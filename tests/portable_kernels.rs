//! Checkpoint bytes do not depend on the CPU's cache sizes (REPRODUCE.md,
//! "Hashes"). gemm blocks its sums by the L1 data cache it reads in sysfs, so
//! the test trains the same tiny model in child processes that see a fake
//! L1d (bind-mounted over sysfs in a private mount namespace, `unshare`): 32
//! KiB 8-way and 48 KiB 12-way, the two L1d's seen on this project's machine
//! type. With candle's matmul as it is (`SECTOR_KERNELS=native`) the
//! checkpoints differ, which shows the fake reached gemm; with the portable
//! kernels (the default) they are identical.

mod common;

use candle_core::{DType, Device};
use sector::files::sha256_file;
use sector::model::T5Config;
use sector::train::{TrainConfig, Trainer};
use sector::weights::{Model, WEIGHTS_FILE};
use std::path::Path;
use std::process::Command;

/// Set in a child: the directory to save its checkpoint in.
const CHILD_DIR: &str = "SECTOR_TEST_CHECKPOINT_DIR";
const TEST_NAME: &str = "checkpoints_do_not_depend_on_the_l1_cache_gemm_reads";

#[test]
fn checkpoints_do_not_depend_on_the_l1_cache_gemm_reads() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        return train_tiny_model(Path::new(&dir));
    }
    let hash = |l1: (&str, &str), kernels: &str| {
        let dir = tempfile::tempdir().unwrap();
        train_in_child(dir.path(), l1, kernels);
        sha256_file(&dir.path().join("final").join(WEIGHTS_FILE)).unwrap()
    };
    let (small, large) = (("32K", "8"), ("48K", "12"));
    assert_ne!(
        hash(small, "native"),
        hash(large, "native"),
        "with candle's matmul the two fake L1 caches should give other bits; if not, the fake did not reach gemm"
    );
    assert_eq!(hash(small, "portable"), hash(large, "portable"), "portable kernels, two L1 caches");
}

/// Two epochs of a tiny T5 on batches of 128 strings of up to 8 digits: each
/// micro-batch has more than 512 tokens, so every weight gradient is a
/// product with k > 512, where gemm's blocking depends on the L1 cache.
fn train_tiny_model(dir: &Path) {
    let cfg = T5Config::preset("cpu-tiny").unwrap();
    let model = Model::random(&cfg, 3, &Device::Cpu, DType::F32).unwrap();
    let config =
        TrainConfig { lr: 1e-3, batch_size: 128, max_tokens_per_micro_batch: 1 << 14, ..TrainConfig::default() };
    let mut trainer = Trainer::new(model, config).unwrap();
    let data = common::copy_examples(256, 8, 4);
    for _ in 0..2 {
        trainer.epoch(&data).unwrap();
    }
    trainer.save(&dir.join("final")).unwrap();
}

/// Runs this test in a child process that sees every level-1 data cache in
/// sysfs as `size` and `ways`, with `SECTOR_KERNELS=kernels`.
fn train_in_child(dir: &Path, (size, ways): (&str, &str), kernels: &str) {
    let fake = dir.join("fake-l1d");
    std::fs::create_dir(&fake).unwrap();
    for (name, value) in [
        ("level", "1"),
        ("type", "Data"),
        ("size", size),
        ("ways_of_associativity", ways),
        ("coherency_line_size", "64"),
    ] {
        std::fs::write(fake.join(name), format!("{value}\n")).unwrap();
    }
    std::fs::write(fake.join("shared_cpu_list"), "0\n").unwrap();
    // Mount the fake over each L1d entry, then run the test binary again.
    let script = r#"
        for index in /sys/devices/system/cpu/cpu[0-9]*/cache/index*; do
            if [ "$(cat $index/level)" = 1 ] && [ "$(cat $index/type)" = Data ]; then
                mount --bind "$FAKE" "$index" || exit 90
            fi
        done
        exec "$@"
    "#;
    let root = unsafe { libc::geteuid() } == 0;
    let status = Command::new("unshare")
        .args(if root { &["-m"][..] } else { &["-r", "-m"][..] })
        .args(["sh", "-c", script, "sh"])
        .arg(std::env::current_exe().unwrap())
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads", "1"])
        .env("FAKE", &fake)
        .env(CHILD_DIR, dir)
        .env("SECTOR_KERNELS", kernels)
        .status()
        .expect("this test needs util-linux's `unshare` on the PATH");
    assert!(
        status.success(),
        "the child training run failed ({status}); exit status 90 means the fake L1 cache could not be mounted: \
         the test needs a private mount namespace (`unshare -m` as root, or `unshare -r -m` with user namespaces)"
    );
}
