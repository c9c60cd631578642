//! The Grafana dashboard kept in deploy/ (provisioned by docker-compose.yml) queries only
//! metrics orderflow exports, and shows what an operator needs: the order funnel, step
//! latency, queue depth and consumers, outbox lag and dead letters.
//!
//! The exported names are read from the code (`shared/src/metrics.rs`, where every metric
//! name is a `pub const`), so a metric added there is known here without a list to update.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::BTreeSet;

use orderflow_shared::metrics;
use serde_json::Value;

const DASHBOARD: &str = "deploy/grafana/dashboards/orderflow.json";
const DATASOURCES: &str = "deploy/grafana/provisioning/datasources/prometheus.yml";

fn read(path: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `"orderflow_..."` string constant of shared/src/metrics.rs.
fn exported() -> BTreeSet<String> {
    let source = read("shared/src/metrics.rs");
    let names: BTreeSet<String> = source
        .lines()
        .filter(|l| l.trim_start().starts_with("pub const") && l.contains(": &str = \"orderflow_"))
        .filter_map(|l| l.split('"').nth(1).map(str::to_owned))
        .collect();
    // The reading works: the constants the crate exports are among them.
    for name in [
        metrics::ORDERS,
        metrics::STEP_DURATION,
        metrics::QUEUE_DEPTH,
        metrics::DEAD_LETTERS,
    ] {
        assert!(names.contains(name), "{name} not read from metrics.rs: {names:?}");
    }
    names
}

/// The metric names a PromQL expression mentions (identifiers starting `orderflow_`), with
/// the series suffixes of a histogram (`_bucket`, `_sum`, `_count`) taken off when the
/// histogram itself is the exported name.
fn metrics_in(expr: &str, exported: &BTreeSet<String>) -> Vec<String> {
    let mut found = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("orderflow_") {
        let start = i + at;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |n| start + n);
        if boundary {
            let name = &expr[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| exported.contains(*b)))
                .unwrap_or(name);
            found.push(base.to_owned());
        }
        i = end;
    }
    found
}

#[test]
fn every_panel_queries_metrics_orderflow_exports() {
    let exported = exported();
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let mut used = BTreeSet::new();
    let mut queried = 0;
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap();
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no queries"));
        assert!(!targets.is_empty(), "{title}: no queries");
        assert_eq!(panel["datasource"]["uid"], "prometheus", "{title}");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: a query without expr"));
            let names = metrics_in(expr, &exported);
            assert!(!names.is_empty(), "{title}: {expr} names no orderflow metric");
            for name in names {
                assert!(
                    exported.contains(&name),
                    "{title}: {expr} uses {name}, which orderflow does not export ({exported:?})"
                );
                used.insert(name);
            }
            queried += 1;
        }
    }
    assert!(queried >= 10, "only {queried} queries");

    // What an operator needs to see, by the names the code exports.
    for (what, name) in [
        ("order funnel", metrics::ORDERS),
        ("step latency", metrics::STEP_DURATION),
        ("queue depth", metrics::QUEUE_DEPTH),
        ("consumers per queue", metrics::QUEUE_CONSUMERS),
        ("outbox lag", metrics::OUTBOX_LAG),
        ("dead letters", metrics::DEAD_LETTERS),
    ] {
        assert!(used.contains(name), "no panel shows the {what} ({name})");
    }

    // The panels' datasource is the one Grafana is provisioned with.
    let datasources = read(DATASOURCES);
    assert!(datasources.contains("uid: prometheus"), "{datasources}");
    assert!(datasources.contains("url: http://prometheus:9090"), "{datasources}");
}

#[test]
fn metric_names_are_found_in_promql() {
    let exported: BTreeSet<String> = ["orderflow_step_duration_seconds", "orderflow_orders"]
        .map(str::to_owned)
        .into();
    assert_eq!(
        metrics_in(
            "histogram_quantile(0.99, sum by (le) (rate(orderflow_step_duration_seconds_bucket[1m]))) + orderflow_orders{status=\"x\"}",
            &exported
        ),
        ["orderflow_step_duration_seconds", "orderflow_orders"]
    );
    // An unknown name stays as written (and fails the check above).
    assert_eq!(
        metrics_in("rate(orderflow_nope_total[1m])", &exported),
        ["orderflow_nope_total"]
    );
}
