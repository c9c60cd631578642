//! `orderflow`: one binary for the API, every worker, migrations and tooling.

use std::{process::ExitCode, sync::Arc};

use anyhow::Context;
use clap::{Parser, Subcommand};
use orderflow_shared::{auth::Keys, config::Config, db, telemetry};
use orderflow_workers::WorkerKind;
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "orderflow",
    version,
    about = "An order pipeline that never loses money or stock"
)]
struct Cli {
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The API and every worker in one process.
    All,
    /// The HTTP API only.
    Api,
    /// One worker.
    Worker {
        #[arg(value_enum)]
        name: WorkerKind,
    },
    /// Create the database if missing and apply migrations, then exit.
    Migrate,
    /// Check every invariant (stock, ledger, coupons, orders, events); exit 1 on violations.
    Audit(orderflow::audit::AuditArgs),
    /// Load a running system with orders and report throughput and latency.
    Bench(orderflow::bench::BenchArgs),
    /// Print a signed bearer token.
    Token {
        /// The user id (`sub`), a positive integer.
        #[arg(long)]
        user: i64,
        /// Add `role: "admin"`.
        #[arg(long)]
        admin: bool,
        /// Seconds until it expires (at most 10 years).
        #[arg(long, default_value_t = 86_400,
              value_parser = clap::value_parser!(i64).range(1..=orderflow_shared::auth::MAX_TOKEN_TTL_SECS))]
        ttl: i64,
    },
}

// mimalloc instead of glibc malloc: the services allocate many small, short-lived buffers
// per message and request, and glibc's malloc/free showed up in the pipeline's profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let provider = match telemetry::provider(cli.config.otel_exporter_otlp_endpoint.as_deref()) {
        Ok(p) => p,
        Err(err) => {
            eprintln!("cannot set up trace export: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let _telemetry = telemetry::init(cli.config.log_format, provider);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = ?err, "orderflow failed");
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config;
    match cli.command {
        Command::Token { user, admin, ttl } => {
            let (secret, default) = config.jwt_secret();
            if default {
                eprintln!("warning: JWT_SECRET is not set; signing with the development secret");
            }
            println!("{}", Keys::new(secret).issue(user, admin, ttl)?);
            Ok(())
        }
        Command::Migrate => {
            db::connect_and_migrate(&config.database_url, 2).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Audit(args) => {
            if orderflow::audit::run(&config, &args).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::Bench(args) => orderflow::bench::run(&config, &args).await,
        Command::All => serve(config, true, WorkerKind::ALL).await,
        Command::Api => serve(config, true, &[]).await,
        Command::Worker { name } => serve(config, false, &[name]).await,
    }
}

/// Runs the API (if `api`) and `workers` until SIGTERM or Ctrl-C, then shuts down gracefully.
async fn serve(config: Config, api: bool, workers: &[WorkerKind]) -> anyhow::Result<()> {
    tracing::info!(?config, "starting");
    if config.jwt_secret().1 && api {
        tracing::warn!("JWT_SECRET is not set: using the development secret; never do this in production");
    }
    let pool = db::connect_and_migrate(&config.database_url, config.db_pool_size).await?;
    let shutdown = CancellationToken::new();
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();

    orderflow_shared::metrics::install();
    if api {
        let listener = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding {}", config.http_addr))?;
        let state = orderflow_api::AppState::new(pool.clone(), Arc::new(config.clone()));
        tasks.spawn(orderflow_api::serve(listener, state, shutdown.clone()));
        let (pool, amqp_url, shutdown) = (pool.clone(), config.amqp_url.clone(), shutdown.clone());
        tasks.spawn(async move {
            orderflow_shared::metrics::sample_gauges(pool, amqp_url, std::time::Duration::from_secs(5), shutdown).await;
            Ok(())
        });
    } else if let Some(addr) = config.metrics_addr {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding METRICS_ADDR {addr}"))?;
        tasks.spawn(orderflow_api::serve_metrics(listener, shutdown.clone()));
    }
    // Workers get a pool of their own: a burst of deliveries waiting on a hot row's lock must
    // not starve the API of connections (it would answer 503).
    let worker_pool = if api && !workers.is_empty() {
        db::pool(&config.database_url, config.db_pool_size)?
    } else {
        pool.clone()
    };
    orderflow_workers::spawn(&mut tasks, workers, &worker_pool, &config, &shutdown);

    tokio::select! {
        _ = shutdown_signal() => tracing::info!("shutting down"),
        Some(res) = tasks.join_next() => {
            tracing::error!(result = ?res, "a component stopped unexpectedly; shutting down");
        }
    }
    shutdown.cancel();
    let drained = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(res) = tasks.join_next().await {
            if let Ok(Err(err)) = res {
                tracing::warn!(error = ?err, "component ended with an error");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("components did not stop within 30 s");
    }
    pool.close().await;
    worker_pool.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
