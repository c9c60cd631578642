//! `orderflow`: one binary for the API, every worker, migrations and tooling.

use std::{process::ExitCode, sync::Arc};

use anyhow::Context;
use clap::{Parser, Subcommand};
use orderflow_shared::{
    auth::Keys,
    config::{self, Config, LogFormat},
    db, telemetry,
};
use orderflow_workers::WorkerKind;
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

/// The server processes (`all`, `api`, `worker`, `migrate`) take the whole configuration
/// ([`Config`]: every setting of the README's table, as a flag or its environment variable);
/// the tools take only what they use, so `orderflow bench --help` shows the bench's own flags.
#[derive(Parser)]
#[command(
    name = "orderflow",
    version,
    about = "An order pipeline that never loses money or stock"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The API and every worker in one process.
    All(Config),
    /// The HTTP API only.
    Api(Config),
    /// One worker.
    Worker {
        #[arg(value_enum)]
        name: WorkerKind,
        #[command(flatten)]
        config: Config,
    },
    /// Create the database if missing and apply migrations, then exit.
    Migrate(Config),
    /// Check every invariant (stock, ledger, coupons, orders, events); exit 1 on violations.
    Audit {
        /// PostgreSQL URL of the system's database.
        #[arg(long, env = "DATABASE_URL", default_value = config::DEFAULT_DATABASE_URL)]
        database_url: String,
        /// RabbitMQ URL (the data-platform events check reads its queue).
        #[arg(long, env = "AMQP_URL", default_value = config::DEFAULT_AMQP_URL)]
        amqp_url: String,
        #[command(flatten)]
        args: orderflow::audit::AuditArgs,
    },
    /// Public events: replay `order.confirmed` for a window, with the original event ids.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Load a running system with orders and report throughput, latency and CPU per order.
    Bench(orderflow_bench::BenchArgs),
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
        /// HS256 secret the system verifies tokens with. Unset: the development secret.
        #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
        jwt_secret: Option<String>,
    },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Publish again, through the outbox and with their original event ids and bodies, the
    /// order.confirmed events of the orders confirmed in [--from, --to). Prints its progress
    /// as JSON lines; Ctrl-C cancels it. A relay must be running to publish.
    Replay {
        /// PostgreSQL URL of the system's database.
        #[arg(long, env = "DATABASE_URL", default_value = config::DEFAULT_DATABASE_URL)]
        database_url: String,
        #[command(flatten)]
        args: orderflow::events::ReplayArgs,
    },
}

impl Command {
    /// Log format and trace export: the servers' from their configuration, plain text and no
    /// export for the tools.
    fn telemetry(&self) -> (LogFormat, Option<&str>) {
        match self {
            Self::All(c) | Self::Api(c) | Self::Migrate(c) | Self::Worker { config: c, .. } => {
                (c.log_format, c.otel_exporter_otlp_endpoint.as_deref())
            }
            Self::Audit { .. } | Self::Bench(_) | Self::Token { .. } | Self::Events { .. } => (LogFormat::Text, None),
        }
    }
}

// mimalloc instead of glibc malloc: the services allocate many small, short-lived buffers
// per message and request, and glibc's malloc/free showed up in the pipeline's profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (log_format, otlp_endpoint) = cli.command.telemetry();
    let provider = match telemetry::provider(otlp_endpoint) {
        Ok(p) => p,
        Err(err) => {
            eprintln!("cannot set up trace export: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let _telemetry = telemetry::init(log_format, provider);
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
    match cli.command {
        Command::Token {
            user,
            admin,
            ttl,
            jwt_secret,
        } => {
            let secret = match jwt_secret.as_deref() {
                Some(s) if !s.is_empty() => s,
                _ => {
                    eprintln!("warning: JWT_SECRET is not set; signing with the development secret");
                    config::DEV_JWT_SECRET
                }
            };
            println!("{}", Keys::new(secret).issue(user, admin, ttl)?);
            Ok(())
        }
        Command::Migrate(config) => {
            db::connect_and_migrate(&config.database_url, 2).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Audit {
            database_url,
            amqp_url,
            args,
        } => {
            if orderflow::audit::run(&database_url, &amqp_url, &args).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::Events {
            command: EventsCommand::Replay { database_url, args },
        } => {
            let stop = CancellationToken::new();
            let on_signal = stop.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                on_signal.cancel();
            });
            let mut last = None;
            let ended = orderflow::events::replay(&database_url, &args, &stop, |r| {
                // One line per change of progress.
                let line = (r.state, r.enqueued, r.published, r.parked);
                if last != Some(line) {
                    last = Some(line);
                    if let Ok(json) = serde_json::to_string(r) {
                        println!("{json}");
                    }
                }
            })
            .await?;
            if ended.state == orderflow_shared::db::replay::ReplayState::Cancelled {
                eprintln!("replay {} cancelled", ended.id);
            }
            Ok(())
        }
        Command::Bench(args) => orderflow_bench::run(&args).await,
        Command::All(config) => serve(config, true, WorkerKind::ALL).await,
        Command::Api(config) => serve(config, true, &[]).await,
        Command::Worker { name, config } => serve(config, false, &[name]).await,
    }
}

/// Runs the API (if `api`) and `workers` until SIGTERM or Ctrl-C, then shuts down gracefully.
async fn serve(config: Config, api: bool, workers: &[WorkerKind]) -> anyhow::Result<()> {
    tracing::info!(?config, "starting");
    orderflow_api::server::raise_file_limit(config.http_max_connections);
    match config.hs256_secret() {
        Some(config::DEV_JWT_SECRET) if api => {
            tracing::warn!("JWT_SECRET is not set: using the development secret; never do this in production")
        }
        // RFC 7518 §3.2: an HS256 key of fewer than 256 bits can be guessed offline from any
        // one token, and with it an admin token minted.
        Some(secret) if api && secret.len() < 32 => {
            tracing::warn!(
                "JWT_SECRET is shorter than 32 bytes (RFC 7518 §3.2 requires 256 bits); use a long random one"
            )
        }
        _ => {}
    }
    let pool = db::connect_and_migrate(&config.database_url, config.db_pool_size).await?;
    let shutdown = CancellationToken::new();
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let feed = Arc::new(orderflow_shared::db::outbox::Feed::default());

    orderflow_shared::metrics::install();
    if api {
        let listener = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding {}", config.http_addr))?;
        // Orders accepted here are handed to the relay started below, if it leads.
        let state = orderflow_api::AppState::with_feed(pool.clone(), Arc::new(config.clone()), Some(feed.clone()));
        // The gauges share the dashboard's order counts and its connection for the queues.
        let (orders, queues) = (state.orders.clone(), state.queues.clone());
        tasks.spawn(orderflow_api::serve(listener, state, shutdown.clone()));
        let (pool, shutdown) = (pool.clone(), shutdown.clone());
        tasks.spawn(async move {
            let interval = std::time::Duration::from_secs(5);
            orderflow_shared::metrics::sample_gauges(pool, orders, queues, interval, shutdown).await;
            Ok(())
        });
    } else if let Some(addr) = config.metrics_addr {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding METRICS_ADDR {addr}"))?;
        tasks.spawn(orderflow_api::serve_metrics(
            listener,
            orderflow_api::server::Limits::of(&config),
            shutdown.clone(),
        ));
    }
    // Workers get a pool of their own: a burst of deliveries waiting on a hot row's lock must
    // not starve the API of connections (it would answer 503), and their statements are planned
    // once ([`db::worker_pool`]). A process without the API closes the first pool at once (with
    // several hosts it would follow the primary for nothing).
    let worker_pool = if workers.is_empty() {
        pool.clone()
    } else {
        let workers_own =
            db::worker_pool(&config.database_url, config.db_pool_size, config.worker_generic_plans).await?;
        if !api {
            pool.close().await;
        }
        workers_own
    };
    orderflow_workers::spawn_fed(&mut tasks, workers, &worker_pool, &config, feed, &shutdown);

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    fn help(command: &str) -> String {
        let mut cli = Cli::command();
        cli.find_subcommand_mut(command).unwrap().render_long_help().to_string()
    }

    #[test]
    fn the_tools_show_only_what_they_use() {
        let server_only = [
            "HTTP_ADDR",
            "ORDER_TIMEOUT",
            "SWEEP_INTERVAL",
            "PREFETCH",
            "WORKER_CONCURRENCY",
            "WORKER_BATCH",
            "WORKER_LINGER",
            "WORKER_GENERIC_PLANS",
            "DB_POOL_SIZE",
            "METRICS_ADDR",
            "LOG_FORMAT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ];
        for (tool, uses, not) in [
            // The bench's --floor talks to the broker itself.
            ("bench", &["DATABASE_URL", "JWT_SECRET", "AMQP_URL"][..], &[][..]),
            ("audit", &["DATABASE_URL", "AMQP_URL"], &["JWT_SECRET"]),
            ("token", &["JWT_SECRET"], &["DATABASE_URL", "AMQP_URL"]),
        ] {
            let help = help(tool);
            for var in uses {
                assert!(help.contains(&format!("[env: {var}")), "{tool} lacks {var}:\n{help}");
            }
            for var in server_only.iter().chain(not) {
                assert!(!help.contains(var), "{tool} shows {var}:\n{help}");
            }
        }
        for server in ["all", "api", "worker", "migrate"] {
            let help = help(server);
            for var in server_only.iter().chain(&["DATABASE_URL", "AMQP_URL", "JWT_SECRET"]) {
                assert!(help.contains(var), "{server} lacks {var}:\n{help}");
            }
        }
    }

    #[test]
    fn events_replay_takes_a_window_and_only_the_database() {
        let cli = Cli::try_parse_from([
            "orderflow",
            "events",
            "replay",
            "--from",
            "2026-11-21T10:00:00Z",
            "--to",
            "2026-11-21T11:00:00Z",
            "--chunk-size",
            "50",
        ])
        .unwrap();
        let Command::Events {
            command: EventsCommand::Replay { args, .. },
        } = &cli.command
        else {
            panic!("expected events replay");
        };
        assert_eq!((args.chunk_size, args.pause_ms, args.detach), (50, 100, false));
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("events")
            .and_then(|e| e.find_subcommand_mut("replay"))
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(help.contains("[env: DATABASE_URL"), "{help}");
        for var in ["AMQP_URL", "JWT_SECRET", "HTTP_ADDR"] {
            assert!(!help.contains(var), "events replay shows {var}:\n{help}");
        }
    }

    #[test]
    fn the_servers_take_every_setting_as_a_flag() {
        let cli = Cli::try_parse_from([
            "orderflow",
            "worker",
            "relay",
            "--prefetch",
            "5",
            "--order-timeout",
            "2s",
            "--log-format",
            "json",
        ])
        .unwrap();
        let Command::Worker { name, config } = &cli.command else {
            panic!("expected the worker command");
        };
        assert_eq!(*name, WorkerKind::Relay);
        assert_eq!(config.prefetch, 5);
        assert_eq!(config.order_timeout, Duration::from_secs(2));
        assert_eq!(cli.command.telemetry().0, LogFormat::Json);
        // A server setting means nothing to a tool, and is refused there.
        assert!(Cli::try_parse_from(["orderflow", "bench", "--prefetch", "5"]).is_err());
    }
}
