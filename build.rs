//! Records what the binary was built from, for each run's provenance.toml
//! (src/provenance.rs): the commit of the source tree and the compiler.

use std::process::Command;

fn main() {
    let output = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into())
    };
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    println!("cargo:rustc-env=SECTOR_RUSTC={}", output(&rustc, &["--version"]));
    println!("cargo:rustc-env=SECTOR_COMMIT={}", output("git", &["describe", "--always", "--dirty", "--abbrev=40"]));
    // A commit or an edit changes the description.
    for path in [".git/HEAD", ".git/refs/heads", "src", "Cargo.lock", "build.rs"] {
        println!("cargo:rerun-if-changed={path}");
    }
}
