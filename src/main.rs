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

/// jemalloc, not the system's malloc: after a connect storm glibc keeps every page the closed connections
/// used (a node that once held 10,000 idle connections stays at its peak RSS), while jemalloc's background
/// thread gives them back within seconds (`dirty_decay_ms`, 10 s). Idle memory per connection is the same
/// with both; mimalloc measured half as much again. Figures: BENCHMARKS.md (issue 13).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's built-in options (the `_RJEM_MALLOC_CONF` environment variable adds to them): a background
/// thread that purges unused pages on its own, so memory is returned even while the server sits idle.
#[cfg(not(target_env = "msvc"))]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: MallocConf = MallocConf(c"background_thread:true".as_ptr());

/// A C string pointer jemalloc reads as `const char *malloc_conf` at start-up.
#[cfg(not(target_env = "msvc"))]
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: the pointer is to a `'static` C string literal, never written.
#[cfg(not(target_env = "msvc"))]
unsafe impl Sync for MallocConf {}
