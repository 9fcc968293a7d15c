//! The `lamplight` binary: parses the command line, sets up logging and runs the library.

use anyhow::Context;
use clap::Parser;
use lamplight::cli::{Cli, Command};
use lamplight::config::LogFormat;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match cli.command {
        Some(Command::Token(args)) => {
            println!("{}", args.mint()?);
            return Ok(());
        }
        Some(Command::Serve(config)) => config,
        #[cfg(feature = "client")]
        Some(Command::Bench(args)) => return lamplight::bench::main(args),
        #[cfg(feature = "client")]
        Some(command) => std::process::exit(i32::from(lamplight::cli::commands::run(command))),
        None => cli.serve,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        LogFormat::Pretty => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = config.worker_threads {
        runtime.worker_threads(threads);
    }
    let runtime = runtime.build().context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let shutdown = lamplight::shutdown::on_signal();
        lamplight::serve(listener, config, shutdown).await?;
        tracing::info!("stopped");
        anyhow::Ok(())
    })?;
    // Do not wait for lingering connection tasks: the grace period has passed.
    runtime.shutdown_background();
    Ok(())
}
