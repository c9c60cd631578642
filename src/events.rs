//! `orderflow events replay --from ... --to ...`: the same replay as
//! `POST /api/admin/events/replay` (`orderflow_shared::db::replay`), run from the command line.
//! It needs only the database: the replayed events go through the outbox, so a relay
//! (`orderflow all` or `orderflow worker relay`) publishes them.
//!
//! In the foreground (the default) it prints the replay's progress as JSON lines on stdout
//! and exits when it is DONE; Ctrl-C cancels it (what it had written to the outbox is still
//! published). With `--detach` it creates the replay, prints it and exits: the API processes
//! run it (they resume RUNNING replays nobody holds within a few seconds). With `--resume ID`
//! it runs a RUNNING replay nobody runs any more (its runner was killed, and no API process is
//! up to resume it) from where it stopped, in the foreground.

use anyhow::Context;
use orderflow_shared::db::{
    self,
    replay::{self, DEFAULT_CHUNK_SIZE, DEFAULT_PAUSE_MS, Plan, Replay},
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Start of the window (inclusive) on the events' confirmedAt, RFC 3339
    /// (e.g. 2026-11-21T10:00:00Z).
    #[arg(long, required_unless_present = "resume")]
    pub from: Option<String>,
    /// End of the window (exclusive), RFC 3339; at most 31 days after --from. An end in the
    /// future is cut at now.
    #[arg(long, required_unless_present = "resume")]
    pub to: Option<String>,
    /// Run the RUNNING replay with this id, which no process runs any more (a runner that was
    /// killed), from where it stopped, instead of creating one.
    #[arg(long, conflicts_with_all = ["from", "to", "detach", "chunk_size", "pause_ms"])]
    pub resume: Option<i64>,
    /// Events written to the outbox at a time (1..=1000).
    #[arg(long, default_value_t = i64::from(DEFAULT_CHUNK_SIZE))]
    pub chunk_size: i64,
    /// Pause after each chunk is published, in milliseconds (0..=10000).
    #[arg(long, default_value_t = i64::from(DEFAULT_PAUSE_MS))]
    pub pause_ms: i64,
    /// Create the replay and exit; the API processes run it.
    #[arg(long)]
    pub detach: bool,
}

/// Creates the replay and (unless `--detach`) runs it until it is DONE, or until `stop` (then
/// it is cancelled and this returns once the runner has stopped). `progress` gets the replay after each step. Returns the replay as it ended.
pub async fn replay(
    database_url: &str,
    args: &ReplayArgs,
    stop: &CancellationToken,
    mut progress: impl FnMut(&Replay),
) -> anyhow::Result<Replay> {
    let plan = match (args.resume, &args.from, &args.to) {
        (Some(_), ..) => None,
        (None, Some(from), Some(to)) => Some(Plan::parse(
            from,
            to,
            Some(args.chunk_size),
            Some(args.pause_ms),
            chrono::Utc::now(),
        )?),
        (None, ..) => anyhow::bail!("--from and --to, or --resume, are required"),
    };
    let pool = db::pool(database_url, 2)?;
    let result = async {
        let mut conn = pool.acquire().await.context("connecting to PostgreSQL")?;
        let owner = uuid::Uuid::new_v4();
        let created = match (plan, args.resume) {
            (Some(plan), _) if args.detach => {
                let created = replay::create(&mut conn, &plan, "cli", None).await?;
                progress(&created);
                return Ok(created);
            }
            (Some(plan), _) => replay::create(&mut conn, &plan, "cli", Some(owner)).await?,
            (None, Some(id)) => resumable(&mut conn, id).await?,
            (None, None) => unreachable!("a plan or an id, checked above"),
        };
        drop(conn);
        // Stopping cancels the replay in the database, where the runner sees it before its next
        // chunk (after counting the one in flight), as it would an operator's cancel.
        let never = CancellationToken::new();
        let run = replay::run(&pool, created.id, owner, &never, &mut progress);
        tokio::pin!(run);
        let ran = tokio::select! {
            ran = &mut run => ran?,
            () = stop.cancelled() => {
                match replay::cancel(&mut *pool.acquire().await?, created.id).await {
                    Ok(_) => {}
                    Err(err) if err.code() == Some("REPLAY_NOT_RUNNING") => {}
                    Err(err) => return Err(err.into()),
                }
                run.await?
            }
        };
        match ran {
            // Not claimed: its lease is current, another process runs it (an API process).
            Some(seen) if seen.state == replay::ReplayState::Running && seen.lease_owner != Some(owner) => {
                anyhow::bail!("replay {} is being run by another process", created.id)
            }
            Some(ended) => Ok(ended),
            None => Ok(created),
        }
    }
    .await;
    pool.close().await;
    result
}

/// Replay `id`, if it is RUNNING.
async fn resumable(conn: &mut sqlx::PgConnection, id: i64) -> anyhow::Result<Replay> {
    let Some(found) = replay::find(conn, id).await? else {
        anyhow::bail!("there is no replay {id}");
    };
    if found.state != replay::ReplayState::Running {
        anyhow::bail!("replay {id} is {}: nothing to resume", found.state.as_str());
    }
    // Whether nobody runs it is for the lease to say, when it is claimed ([`replay::run`]).
    Ok(found)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: ReplayArgs,
    }

    #[test]
    fn a_replay_is_a_window_or_one_to_resume_never_both() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["replay"], args].concat()).map(|c| c.args);
        let window = parse(&["--from", "2026-12-01T00:00:00Z", "--to", "2026-12-02T00:00:00Z"]).unwrap();
        assert_eq!((window.from.is_some(), window.resume), (true, None));
        assert_eq!(parse(&["--resume", "7"]).unwrap().resume, Some(7));
        for wrong in [
            &["--from", "2026-12-01T00:00:00Z"][..],
            &[],
            &["--resume", "7", "--from", "2026-12-01T00:00:00Z"],
            &["--resume", "7", "--detach"],
            &["--resume", "7", "--chunk-size", "10"],
        ] {
            assert!(parse(wrong).is_err(), "{wrong:?}");
        }
    }
}
