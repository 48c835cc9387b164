//! `hivemind`: parse the command line, then run the daemon (`up`) or a client command.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use hivemind::cli::{Cli, Command, UpArgs, run_client};
use hivemind::{Daemon, HostConfig};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => run_daemon(cli.data_dir, args),
        command => {
            restore_sigpipe();
            run_client(cli.data_dir.as_deref(), command)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hivemind: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_daemon(data_dir: Option<std::path::PathBuf>, args: UpArgs) -> anyhow::Result<()> {
    // Colour only on a terminal: a log piped to a file or journald keeps
    // plain text.
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=warn")))
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    let flags = args.as_config(data_dir)?;
    let (config, notes) = HostConfig::load_for_start(args.config.as_deref(), flags)?;
    for note in notes {
        tracing::info!("{note}");
    }
    hivemind_core::limits::raise_descriptor_limit();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let daemon = Daemon::start(config).await?;
        wait_for_signal().await;
        tracing::info!("shutting down");
        daemon.shutdown().await;
        anyhow::Ok(())
    })
}

/// A client piped into `head` should end quietly when the pipe closes, as
/// other command-line tools do, not panic on the failed write. (The daemon
/// keeps Rust's default of ignoring SIGPIPE: a closed socket is an error to
/// handle there, not a reason to exit.)
fn restore_sigpipe() {
    // SAFETY: called before any other thread exists; resetting a signal's
    // disposition to the default has no other effect on this process.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
