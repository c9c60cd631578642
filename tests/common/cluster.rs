//! The tests' three-node RabbitMQ cluster, through `scripts/cluster.sh`: its own node names,
//! ports and data directory (not the script's defaults, so a cluster a developer started by
//! hand is left alone), next to the default node.
//!
//! Starting three nodes takes about a minute on a busy 2-core machine, so the tests that need
//! the cluster share one: `scripts/test.sh` starts it before them (`tests/cluster.rs` and the
//! cluster scenarios of `tests/faults.rs`) and stops it after them. A test run on its own finds
//! it down, starts it, and stops it again when done ([`Cluster`] remembers who started it).

use std::{path::PathBuf, process::Command};

use super::Broker;

/// Node `i` (1..=3) is `NAME-i@localhost`.
pub const NAME: &str = "orderflow-test";
/// Node `i` listens for AMQP on `PORT + i`, management on `PORT + 10000 + i`.
pub const PORT: u16 = 5690;
pub const NODES: [u16; 3] = [1, 2, 3];

/// Where cluster.sh keeps the nodes' data, logs and pid files.
pub fn dir() -> PathBuf {
    std::env::temp_dir().join("orderflow-cluster-test")
}

/// Runs `scripts/cluster.sh <args>` for the tests' cluster; panics with its stderr on failure.
pub fn script(args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster.sh"))
        .args(args)
        .env("ORDERFLOW_CLUSTER_NAME", NAME)
        .env("ORDERFLOW_CLUSTER_PORT", PORT.to_string())
        .env("ORDERFLOW_CLUSTER_DIR", dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cluster.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn node_name(i: u16) -> String {
    format!("{NAME}-{i}@localhost")
}

pub fn amqp_port(i: u16) -> u16 {
    PORT + i
}

/// Node `i`'s AMQP address without a vhost.
pub fn amqp_node(i: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}", amqp_port(i))
}

/// Node `i`'s management API.
pub fn management(i: u16) -> String {
    format!("http://127.0.0.1:{}", PORT + 10_000 + i)
}

/// The node (1..=3) called `name` (`orderflow-test-2@localhost`).
pub fn index_of(name: &str) -> Option<u16> {
    NODES.into_iter().find(|&i| node_name(i) == name)
}

/// The OS process of node `i`, while it runs.
pub fn pid(i: u16) -> Option<u32> {
    std::fs::read_to_string(dir().join(format!("node-{i}/rabbitmq.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The three nodes, running and joined. Stops them on drop if it started them.
pub struct Cluster {
    /// What `cluster.sh start` printed last: the AMQP_URL of all three nodes (default vhost).
    pub url: String,
    started_here: bool,
}

impl Cluster {
    /// Starts whichever node is down (all of them if none runs) and waits until the three are
    /// one cluster.
    pub fn ensure() -> Self {
        let started_here = NODES
            .iter()
            .all(|&i| std::net::TcpStream::connect(("127.0.0.1", amqp_port(i))).is_err());
        let started = std::time::Instant::now();
        let url = script(&["start"]).lines().last().unwrap().to_owned();
        if started_here {
            println!("cluster.sh start: {:?}, AMQP_URL {url}", started.elapsed());
        }
        Self { url, started_here }
    }

    /// The cluster as a place for a test's vhost: every node's address, node 1's management API.
    pub fn broker(&self) -> Broker {
        Broker {
            nodes: NODES.iter().map(|&i| amqp_node(i)).collect(),
            management: management(1),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.started_here {
            script(&["stop"]);
        }
    }
}
