//! The `sector` binary: parse flags, run, report the error chain.

fn main() -> std::process::ExitCode {
    sector::keep_freed_memory();
    match sector::cli::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
