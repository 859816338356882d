//! The `palaver` binary: a thin shell over [`palaver_node`].
//!
//! - `palaver node`: run one node.
//! - `palaver up`: run a local cluster of nodes as separate processes.
//! - `palaver admin`: operator commands against any node.
//! - `palaver bench`: load generators.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("palaver: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palaver: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
