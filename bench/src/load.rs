//! Sending the orders: the open model (a fixed schedule, whatever the responses do) and the
//! closed model (C clients, each sending its next order once the previous one is accepted).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use indicatif::ProgressBar;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::{sync::mpsc, time::Instant};

use super::{
    args::LoadModel,
    client::{Api, transport_label},
    observe::{Watch, accepted_order_id},
    plan::Plan,
    report::Latency,
    setup::Fixture,
};

/// An order sent later than this after its scheduled time counts as late.
pub const LATE: Duration = Duration::from_millis(10);

/// What sending measured.
#[derive(Debug, Default)]
pub struct Sent {
    /// POST -> 202; in the open model from the scheduled send time, so a slow server cannot
    /// hide queueing by slowing the sender down (no coordinated omission).
    pub accept: Latency,
    /// The same accepts as the API timed them (`Server-Timing`).
    pub accept_api: Latency,
    pub accepted: u64,
    pub errors: BTreeMap<String, u64>,
    pub late: u64,
    pub max_lag: Duration,
    pub duration: Duration,
}

struct Ctx {
    api: Api,
    plan: Arc<Plan>,
    fixture: Arc<Fixture>,
    watch: mpsc::UnboundedSender<Watch>,
    sent: Mutex<Sent>,
    bar: ProgressBar,
}

impl Ctx {
    fn sent(&self) -> std::sync::MutexGuard<'_, Sent> {
        self.sent.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn body(&self, i: usize) -> (Value, usize) {
        let o = &self.plan.orders[i];
        let body = json!({
            "items": [{"productId": self.fixture.product_ids[o.product], "quantity": o.quantity}],
            "couponId": o.coupon.map(|k| self.fixture.coupon_ids[k]),
        });
        (body, o.user)
    }

    /// Sends order `i`, measuring from `start`.
    async fn send(&self, i: usize, start: Instant) {
        let (body, user) = self.body(i);
        let key = uuid::Uuid::new_v4().to_string();
        let res = self
            .api
            .call(
                Method::POST,
                "/api/orders",
                &self.fixture.tokens[user],
                Some(&body),
                Some(&key),
            )
            .await;
        let now = Instant::now();
        let failure = match res {
            Ok(reply) if reply.status == StatusCode::ACCEPTED => match accepted_order_id(&reply.body) {
                Some(order_id) => {
                    {
                        let mut sent = self.sent();
                        sent.accept.record(now.saturating_duration_since(start));
                        if let Some(api) = reply.server {
                            sent.accept_api.record(api);
                        }
                        sent.accepted += 1;
                    }
                    let _ = self.watch.send(Watch {
                        order_id,
                        user,
                        accepted_at: now,
                    });
                    None
                }
                None => Some("202 without orderId".to_owned()),
            },
            Ok(reply) => Some(reply.label()),
            Err(e) => Some(transport_label(&e)),
        };
        if let Some(kind) = failure {
            *self.sent().errors.entry(kind).or_default() += 1;
        }
        self.bar.inc(1);
    }
}

/// Sends every order of `plan` and returns what it measured. Accepted orders go to `watch`
/// as they are accepted; `watch` is dropped when the last order has been answered.
pub async fn send_all(
    api: Api,
    plan: Arc<Plan>,
    fixture: Arc<Fixture>,
    model: LoadModel,
    max_in_flight: usize,
    watch: mpsc::UnboundedSender<Watch>,
    bar: ProgressBar,
) -> Sent {
    let n = plan.orders.len();
    let ctx = Arc::new(Ctx {
        api,
        plan,
        fixture,
        watch,
        sent: Mutex::new(Sent::default()),
        bar,
    });
    let started = Instant::now();
    match model {
        LoadModel::Closed { concurrency } => {
            let next = Arc::new(AtomicUsize::new(0));
            let clients: Vec<_> = (0..concurrency.min(n.max(1)))
                .map(|_| {
                    let (ctx, next) = (ctx.clone(), next.clone());
                    tokio::spawn(async move {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= n {
                                break;
                            }
                            ctx.send(i, Instant::now()).await;
                        }
                    })
                })
                .collect();
            for c in clients {
                let _ = c.await;
            }
        }
        LoadModel::Open { rate } => {
            let slots = u32::try_from(max_in_flight).unwrap_or(u32::MAX).max(1);
            let in_flight = Arc::new(tokio::sync::Semaphore::new(slots as usize));
            let (mut late, mut max_lag) = (0, Duration::ZERO);
            for i in 0..n {
                let at = started + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(at).await;
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let lag = Instant::now().saturating_duration_since(at);
                if lag > LATE {
                    late += 1;
                }
                max_lag = max_lag.max(lag);
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    ctx.send(i, at).await;
                    drop(permit);
                });
            }
            // Every slot back means every order has been answered.
            let _ = in_flight.acquire_many(slots).await;
            let mut sent = ctx.sent();
            sent.late = late;
            sent.max_lag = max_lag;
        }
    }
    let duration = started.elapsed();
    let mut sent = std::mem::take(&mut *ctx.sent());
    sent.duration = duration;
    ctx.bar.finish_and_clear();
    sent
}
