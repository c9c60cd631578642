//! `--coupon-rush`: many users race for a few first-come-first-served coupons. Counts the
//! 201s, then checks from the outside (each user's coupon list) that exactly that many users
//! hold the coupon.

use std::{collections::BTreeMap, sync::Arc};

use anyhow::Context;
use futures_util::{StreamExt, stream};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio::time::Instant;

use super::{
    args::RushSettings,
    client::{Api, transport_label},
    meter::Meter,
    progress::Progress,
    report::{Latency, RushReport},
    setup,
};

pub async fn run(api: &Api, s: &RushSettings, progress: &Progress, meter: &Meter) -> anyhow::Result<RushReport> {
    let users = usize::try_from(s.users).context("--users")?;
    let base = setup::user_id_base(s.users);
    let admin = setup::admin_token(api, base)?;
    let (_, tokens) = setup::user_tokens(api, base, users)?;
    let body = json!({"name": format!("bench rush {base}"), "discountType": "PERCENT", "discountValue": 10, "quantity": s.coupons});
    let coupon = api
        .expect(Method::POST, "/api/admin/coupons", &admin, &body, StatusCode::CREATED)
        .await?;
    let coupon_id = coupon["id"].as_i64().context("a created coupon has no id")?;
    let path = Arc::new(format!("/api/coupons/{coupon_id}/issue"));

    let bar = progress.bar("issue", s.users);
    let start_mark = meter.mark().await;
    let started = Instant::now();
    let requests = tokens.iter().cloned().map(|token| {
        let (api, path, bar) = (api.clone(), path.clone(), bar.clone());
        async move {
            let t = Instant::now();
            let res = api.call(Method::POST, &path, &token, None, None).await;
            let took = t.elapsed();
            bar.inc(1);
            (
                res.map(|r| (r.status, r.label())).map_err(|e| transport_label(&e)),
                took,
            )
        }
    });
    let answers: Vec<_> = match s.concurrency {
        // Everyone at once: one task per user, released together.
        None => {
            let tasks: Vec<_> = requests.map(tokio::spawn).collect();
            let mut out = Vec::with_capacity(tasks.len());
            for t in tasks {
                out.push(t.await.context("an issue request panicked")?);
            }
            out
        }
        Some(c) => stream::iter(requests).buffer_unordered(c).collect().await,
    };
    let duration = started.elapsed();
    let end_mark = meter.mark().await;
    bar.finish_and_clear();

    let mut latency = Latency::new();
    let (mut issued, mut sold_out) = (0, 0);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for (answer, took) in answers {
        latency.record(took);
        match answer {
            Ok((StatusCode::CREATED, _)) => issued += 1,
            Ok((StatusCode::GONE, _)) => sold_out += 1,
            Ok((_, label)) | Err(label) => *errors.entry(label).or_default() += 1,
        }
    }

    // Verify from the outside: who holds the coupon now?
    let holds = stream::iter(tokens.iter())
        .map(|token| async move {
            let reply = api.call(Method::GET, "/api/coupons", token, None, None).await.ok()?;
            let list = reply.body.as_array()?;
            Some(list.iter().any(|c| c["couponId"].as_i64() == Some(coupon_id)))
        })
        .buffer_unordered(16)
        .collect::<Vec<Option<bool>>>()
        .await;
    let unknown = holds.iter().filter(|h| h.is_none()).count();
    anyhow::ensure!(
        unknown == 0,
        "{unknown} coupon lists could not be read to verify the rush"
    );
    let issued_verified = holds.iter().filter(|h| **h == Some(true)).count() as u64;

    let mut report = RushReport {
        scenario: "coupon_rush",
        users: s.users,
        coupons: s.coupons,
        concurrency: s.concurrency,
        requests: s.users,
        issued,
        issued_verified,
        sold_out,
        errors: errors.values().sum(),
        errors_by_kind: errors,
        duration_s: 0.0,
        requests_per_s: 0.0,
        p50_ms: 0.0,
        p95_ms: 0.0,
        p99_ms: 0.0,
        max_ms: 0.0,
        cpu: None,
        work: None,
        pg_waits: None,
    };
    report.measure(&latency, duration);
    let costs = meter.costs(&start_mark, &end_mark, report.requests, "requests");
    report.cpu = costs.cpu;
    report.work = costs.work;
    report.pg_waits = costs.pg_waits;
    Ok(report)
}
