//! The `sector` binary: parse flags, run, report the error chain.

fn main() -> std::process::ExitCode {
    sector::tune_cpu_runtime();
    match sector::cli::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
