//! Command-line interface.

mod admin;
mod bench;
mod chat;
mod node;
mod up;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// palaver: a chat platform sharded over many small Raft groups.
#[derive(Debug, Parser)]
#[command(name = "palaver", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run one node.
    Node(node::NodeArgs),
    /// Run a local cluster of nodes as separate processes; Ctrl-C stops them all.
    Up(up::UpArgs),
    /// Operator commands.
    Admin(admin::AdminArgs),
    /// Load generators.
    Bench(bench::BenchArgs),
    /// Chat in a terminal (full screen, or line mode with --plain).
    Chat(chat::ChatArgs),
}

/// Run the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Commands::Node(args) => node::run(args).await,
        Commands::Up(args) => up::run(args).await,
        Commands::Admin(args) => admin::run(args).await,
        Commands::Bench(args) => bench::run(args).await,
        Commands::Chat(args) => chat::run(args).await,
    }
}

/// Log to stderr, filtered by `RUST_LOG` (default: info).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,h2=warn,tower=warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// The default data directory of `palaver up`.
pub fn default_up_dir() -> PathBuf {
    PathBuf::from("./palaver-data")
}
