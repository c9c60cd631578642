//! The tests' highly available PostgreSQL, through `scripts/pg-ha.sh`: a pg_auto_failover
//! monitor and two data nodes on ports and in a directory of their own (not the script's
//! defaults, so a formation a developer started by hand is left alone), beside the default
//! PostgreSQL on 5432.
//!
//! `scripts/test.sh` starts it once before the scenarios that need it and stops it after them;
//! a test run on its own finds it down, starts it, and stops it again when done ([`Formation`]
//! remembers who started it).

#![allow(dead_code)]

use std::{path::PathBuf, process::Command};

/// The monitor listens on `PORT`, data node `i` (1, 2) on `PORT + i`.
pub const PORT: u16 = 6100;

/// Where pg-ha.sh keeps the formation's data, configuration and logs.
pub fn dir() -> PathBuf {
    std::env::temp_dir().join("orderflow-pg-ha-test")
}

/// Runs `scripts/pg-ha.sh <args>` for the tests' formation; panics with its stderr on failure.
pub fn script(args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/pg-ha.sh"))
        .args(args)
        .env("ORDERFLOW_PG_HA_PORT", PORT.to_string())
        .env("ORDERFLOW_PG_HA_DIR", dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg-ha.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The data node (1, 2) listening on `port`.
pub fn node_of(port: &str) -> u16 {
    port.trim().parse::<u16>().unwrap() - PORT
}

/// The formation, up: one primary, one synchronous secondary. Stops it on drop if it started it.
pub struct Formation {
    /// What `pg-ha.sh start` printed last: the DATABASE_URL of both nodes (database orderflow).
    pub url: String,
    started_here: bool,
}

impl Formation {
    /// Starts whatever is down (everything if nothing runs) and waits until the formation has
    /// a primary and a synchronous secondary.
    pub fn ensure() -> Self {
        let started_here = std::net::TcpStream::connect(("127.0.0.1", PORT)).is_err();
        let started = std::time::Instant::now();
        let url = script(&["start"]).lines().last().unwrap().to_owned();
        if started_here {
            println!("pg-ha.sh start: {:?}, DATABASE_URL {url}", started.elapsed());
        }
        Self { url, started_here }
    }

    /// The DATABASE_URL with another database.
    pub fn url_for(&self, database: &str) -> String {
        self.url.replacen("/orderflow?", &format!("/{database}?"), 1)
    }
}

impl Drop for Formation {
    fn drop(&mut self) {
        if self.started_here {
            script(&["stop"]);
        }
    }
}
