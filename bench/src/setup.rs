//! Setup through the public API, as a shop would do it: the admin creates the products and
//! coupons, every user charges their balance and takes the coupons their orders will use.

use anyhow::Context;
use futures_util::{StreamExt, TryStreamExt, stream};
use reqwest::{Method, StatusCode};
use serde_json::json;

use super::{
    client::Api,
    plan::{self, COUPON_DISCOUNT, Plan},
    progress::Progress,
};

/// Setup requests in flight at once.
const SETUP_CONCURRENCY: usize = 16;

/// Ids the system gave to what the plan describes by index.
pub struct Fixture {
    pub tokens: Vec<String>,
    pub product_ids: Vec<i64>,
    pub coupon_ids: Vec<i64>,
}

/// Bench users get ids from a block chosen per run, so repeated runs against one system
/// never share a balance (the cap would refuse the charges) or a coupon.
pub fn user_id_base(users: u64) -> i64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let block = (nanos ^ (u128::from(std::process::id()) << 20)) % 1_000_000;
    1_000_000_000 + i64::try_from(block).unwrap_or(0) * (i64::try_from(users).unwrap_or(0) + 1).max(100_001)
}

pub fn admin_token(api: &Api, base: i64) -> anyhow::Result<String> {
    api.token(base, true)
}

pub fn user_tokens(api: &Api, base: i64, users: usize) -> anyhow::Result<(Vec<i64>, Vec<String>)> {
    let ids: Vec<i64> = (1..=users as i64).map(|i| base + i).collect();
    let tokens = ids
        .iter()
        .map(|&id| api.token(id, false))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((ids, tokens))
}

pub async fn run(api: &Api, plan: &Plan, progress: &Progress) -> anyhow::Result<Fixture> {
    let base = user_id_base(plan.users as u64);
    let tag = base;
    let admin = admin_token(api, base)?;
    let (_, tokens) = user_tokens(api, base, plan.users)?;
    let charges: Vec<(usize, i64)> = plan
        .funding
        .iter()
        .enumerate()
        .flat_map(|(u, &amount)| plan::charges(amount).into_iter().map(move |c| (u, c)))
        .collect();
    let issues: Vec<(usize, usize)> = plan
        .coupons
        .iter()
        .enumerate()
        .flat_map(|(k, holders)| holders.iter().map(move |&u| (k, u)))
        .collect();
    let steps = plan.products.len() + plan.coupons.len() + charges.len() + issues.len();
    let bar = progress.bar("setup", steps as u64);

    let product_ids: Vec<i64> = stream::iter(plan.products.iter().enumerate())
        .map(|(i, p)| {
            let (admin, bar) = (&admin, &bar);
            async move {
                let body = json!({"name": format!("bench {tag} product {i}"), "price": p.price, "stock": p.stock});
                let created = api
                    .expect(Method::POST, "/api/admin/products", admin, &body, StatusCode::CREATED)
                    .await?;
                bar.inc(1);
                created["id"].as_i64().context("a created product has no id")
            }
        })
        .buffered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;

    let coupon_ids: Vec<i64> = stream::iter(plan.coupons.iter().enumerate())
        .map(|(k, holders)| {
            let (admin, bar) = (&admin, &bar);
            async move {
                let body = json!({
                    "name": format!("bench {tag} coupon {k}"),
                    "discountType": "FIXED",
                    "discountValue": COUPON_DISCOUNT,
                    "quantity": holders.len(),
                });
                let created = api
                    .expect(Method::POST, "/api/admin/coupons", admin, &body, StatusCode::CREATED)
                    .await?;
                bar.inc(1);
                created["id"].as_i64().context("a created coupon has no id")
            }
        })
        .buffered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;

    stream::iter(charges)
        .map(|(u, amount)| {
            let (tokens, bar) = (&tokens, &bar);
            async move {
                let body = json!({"amount": amount});
                api.expect(Method::POST, "/api/balance/charge", &tokens[u], &body, StatusCode::OK)
                    .await?;
                bar.inc(1);
                anyhow::Ok(())
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect::<()>()
        .await?;

    stream::iter(issues)
        .map(|(k, u)| {
            let (tokens, bar, coupon_ids) = (&tokens, &bar, &coupon_ids);
            async move {
                let path = format!("/api/coupons/{}/issue", coupon_ids[k]);
                api.expect(Method::POST, &path, &tokens[u], &json!({}), StatusCode::CREATED)
                    .await?;
                bar.inc(1);
                anyhow::Ok(())
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect::<()>()
        .await?;
    bar.finish_and_clear();
    Ok(Fixture {
        tokens,
        product_ids,
        coupon_ids,
    })
}
