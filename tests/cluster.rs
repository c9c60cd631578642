//! orderflow on a three-node RabbitMQ cluster (issue 14, items 1 and 2): the cluster is
//! started through `scripts/cluster.sh` (its own node names, ports and data directory, next
//! to the default node and to a developer's own cluster), every process gets the three
//! addresses, the queues spread over the nodes, and when the node holding the relay's
//! connection is killed (-9) the processes connected to it reconnect to the others and every
//! order completes, its event on the data platform's queue.
//!
//! Starting three nodes takes a minute on a busy 2-core machine, so the test is ignored in
//! the parallel run; `scripts/test.sh` starts the cluster once for it and the fault suite's
//! cluster scenarios and runs it on its own:
//! `cargo nextest run --profile ci --test cluster --run-ignored only` (run alone, it starts
//! the cluster itself and stops it at the end).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::{Duration, Instant},
};

use common::{
    Broker, Options, TestApp,
    cluster::{self, Cluster, management, node_name, script},
    worker_queue,
};
use orderflow::audit::{self, AuditArgs};
use orderflow_shared::messaging::topology::{DATA_PLATFORM_QUEUE, QUEUES};
use orderflow_workers::WorkerKind;
use reqwest::Method;

async fn connections_by_node(mgmt: &str, vhost: &str) -> BTreeMap<String, Vec<String>> {
    let list = common::mgmt_at(
        mgmt,
        Method::GET,
        &format!("/api/vhosts/{}/connections", enc(vhost)),
        None,
    )
    .await;
    let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in list.as_array().unwrap() {
        by_node.entry(c["node"].as_str().unwrap().to_owned()).or_default().push(
            c["client_properties"]["connection_name"]
                .as_str()
                .unwrap_or("?")
                .to_owned(),
        );
    }
    by_node
}

/// The long-lived connections by node once the management API's listing has caught up: each
/// node reports its own every 5 s, so wait until the listing has not changed for 6 s.
async fn settled_connections(mgmt: &str, vhost: &str) -> BTreeMap<String, Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = BTreeMap::new();
    let mut since = Instant::now();
    loop {
        let now: BTreeMap<String, Vec<String>> = connections_by_node(mgmt, vhost)
            .await
            .into_iter()
            .map(|(node, mut names)| {
                names.retain(|n| n != "?" && !n.starts_with("orderflow-audit"));
                names.sort();
                (node, names)
            })
            .filter(|(_, names)| !names.is_empty())
            .collect();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_secs(6) && long_lived(&last).contains("relay") {
            return last;
        }
        assert!(Instant::now() < deadline, "connection listing never settled: {last:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The names of the connections that live as long as their process (relay, consumers), not
/// the short ones of samplers, the audit or the test.
fn long_lived(by_node: &BTreeMap<String, Vec<String>>) -> BTreeSet<String> {
    by_node
        .values()
        .flatten()
        .filter(|n| *n != "?" && !n.starts_with("orderflow-audit"))
        .cloned()
        .collect()
}

fn enc(s: &str) -> String {
    s.replace('/', "%2F")
}

/// Waits until every consuming worker has a consumer on its queue again; returns how long.
async fn consumers_back(app: &TestApp, since: Instant, within: Duration) -> Duration {
    let queues: Vec<&str> = WorkerKind::ALL.iter().filter_map(|w| worker_queue(*w)).collect();
    loop {
        let mut all = true;
        if let Ok(conn) = orderflow_shared::messaging::connect(&app.config.amqp_url, Default::default()).await {
            for queue in &queues {
                let Ok(channel) = conn.create_channel().await else {
                    all = false;
                    break;
                };
                let passive = lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                match channel
                    .queue_declare((*queue).into(), passive, Default::default())
                    .await
                {
                    Ok(q) if q.consumer_count() > 0 => {}
                    _ => all = false,
                }
                let _ = channel.close(200, "bye".into()).await;
            }
            let _ = conn.close(200, "bye".into()).await;
        } else {
            all = false;
        }
        if all {
            return since.elapsed();
        }
        assert!(since.elapsed() < within, "consumers not back within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn place_orders(app: &TestApp, users: &[i64], product: i64, n: usize) -> Vec<(i64, String)> {
    let mut orders = Vec::with_capacity(n);
    for k in 0..n {
        let user = users[k % users.len()];
        orders.push((user, app.order(user, &[(product, 1)], None).await));
    }
    orders
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "starts a three-node RabbitMQ cluster (about a minute); scripts/test.sh runs it alone"]
async fn orders_complete_when_the_node_holding_the_relay_is_killed() {
    let cluster = Cluster::ensure();
    let url = cluster.url.clone();
    let nodes: Vec<String> = url
        .split(',')
        .map(|u| u.strip_suffix("/%2f").unwrap().to_owned())
        .collect();
    assert_eq!(nodes.len(), 3, "{url}");
    // Idempotent: a second start changes nothing and prints the same URL.
    assert_eq!(script(&["start"]).lines().last(), Some(url.as_str()));

    let app = TestApp::spawn_with(Options {
        broker: Broker {
            nodes,
            management: management(1),
        },
        ..Options::default()
    })
    .await;
    assert_eq!(app.config.amqp_url.split(',').count(), 3);

    // Every queue has a replica on each node and asks for a balanced leader. Where the leader
    // ends up is the broker's: it starts each queue's first election on the node with the
    // fewest leaders, but another member may win that election on a busy machine, so the
    // spread (usually 3/3/2) is printed, not asserted.
    let queues = app.mgmt(Method::GET, &format!("/api/queues/{}", enc(&app.vhost))).await;
    let mut leaders = BTreeMap::<String, usize>::new();
    for spec in QUEUES {
        let q = queues
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == spec.name)
            .unwrap_or_else(|| panic!("{} not declared", spec.name));
        assert_eq!(
            q["members"].as_array().map(Vec::len),
            Some(3),
            "{}: {}",
            spec.name,
            q["members"]
        );
        assert_eq!(q["arguments"]["x-queue-leader-locator"], "balanced");
        *leaders.entry(q["leader"].as_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    println!("queue leaders by node: {leaders:?}");

    let product = app.product("Cable", 1_000, 10_000).await;
    let users: Vec<i64> = (7_001..=7_020).collect();
    for &user in &users {
        app.fund(user, 100_000).await;
    }

    // Before the fault: orders flow.
    let mut orders = place_orders(&app, &users, product, 30).await;
    for (user, id) in &orders {
        assert_eq!(
            app.wait_terminal(*user, id, Duration::from_secs(60)).await["status"],
            "CONFIRMED"
        );
    }

    // The node holding the relay's connection (the one publisher) dies, with whichever
    // consumers share it. The management API lists a connection once its statistics are
    // collected (every 5 s).
    let before = settled_connections(&management(1), &app.vhost).await;
    let (victim, names) = before
        .iter()
        .find(|(_, names)| names.iter().any(|n| n == "relay"))
        .unwrap_or_else(|| panic!("no relay connection listed: {before:?}"));
    let victim = victim.clone();
    let i: u16 = (1..=3).find(|&i| node_name(i) == victim).unwrap();
    let survivor = (1..=3).find(|&j| j != i).unwrap();
    println!(
        "connections by node before the kill: {before:?}; killing {victim} ({} of them)",
        names.len()
    );
    let pid = cluster::pid(i).unwrap();
    let killed = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );

    // Orders keep coming while the processes find another node.
    let during = place_orders(&app, &users, product, 60).await;
    let back = consumers_back(&app, killed, Duration::from_secs(60)).await;
    println!("every consumer back {back:?} after the kill");
    orders.extend(during);
    for (user, id) in &orders {
        assert_eq!(
            app.wait_terminal(*user, id, Duration::from_secs(90)).await["status"],
            "CONFIRMED"
        );
    }
    let settled = killed.elapsed();
    app.wait_quiescent(Duration::from_secs(60)).await;

    // No connection is left on the dead node; every long-lived one is back elsewhere.
    let after = settled_connections(&management(survivor), &app.vhost).await;
    println!("connections by node after: {after:?}");
    assert!(!after.contains_key(&victim), "{after:?}");
    assert_eq!(long_lived(&after), long_lived(&before));

    // The data platform got every confirmed order's event (at least once; once after dedup).
    let events = app.drain_queue(DATA_PLATFORM_QUEUE).await;
    let distinct: BTreeSet<String> = events
        .iter()
        .map(|(_, e)| e["id"].as_str().unwrap().to_owned())
        .collect();
    let confirmed: BTreeSet<String> = events
        .iter()
        .map(|(_, e)| e["subject"].as_str().unwrap().to_owned())
        .collect();
    let ours: BTreeSet<String> = orders.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(confirmed, ours);
    assert_eq!(distinct.len(), orders.len());
    println!(
        "{} orders confirmed, {} events received ({} distinct), all terminal {settled:?} after the kill",
        orders.len(),
        events.len(),
        distinct.len()
    );

    // Stock, money and histories add up (events already drained: skip that check).
    let report = audit::audit(
        &app.pool,
        Some(&app.config.amqp_url),
        &AuditArgs {
            skip_events: true,
            ..AuditArgs::default()
        },
    )
    .await
    .unwrap();
    assert!(report.clean, "{:#}", report.to_json());
    let stock: i64 = sqlx::query_scalar("SELECT stock FROM products WHERE id = $1")
        .bind(product)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stock, 10_000 - 90);

    // The dead node comes back through the same idempotent start and rejoins its cluster.
    let restarted = Instant::now();
    assert_eq!(script(&["start"]).lines().last(), Some(url.as_str()));
    println!("{victim} back in {:?}", restarted.elapsed());
    let status = script(&["status"]);
    assert!(status.contains("running nodes: 3"), "{status}");
    app.stop().await;
}
