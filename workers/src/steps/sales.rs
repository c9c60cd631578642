//! The sales projection behind popular products: every `order.confirmed` adds its
//! quantities to per-product hourly buckets. The inbox (keyed by event id) makes a
//! re-delivered event count once.

use chrono::{DateTime, Utc};
use orderflow_shared::{
    Result,
    db::orders::OrderRow,
    messaging::{MessageType, envelope::OrderConfirmedData, topology},
};
use sqlx::PgConnection;

use crate::runtime::{Incoming, Outcome, Step};

pub struct Sales;

impl Step for Sales {
    const NAME: &'static str = "sales";
    const QUEUE: &'static str = topology::SALES_QUEUE;

    fn accepts(&self, kind: MessageType) -> bool {
        kind == MessageType::OrderConfirmed
    }

    async fn handle(&self, tx: &mut PgConnection, msg: &Incoming) -> Result<Outcome> {
        let data: OrderConfirmedData =
            serde_json::from_value(msg.envelope.data.clone()).map_err(anyhow::Error::from)?;
        let (ids, quantities): (Vec<i64>, Vec<i64>) =
            data.items.iter().map(|i| (i.product_id, i64::from(i.quantity))).unzip();
        sqlx::query(
            "INSERT INTO product_sales_hourly (product_id, bucket, quantity)
             SELECT pid, date_trunc('hour', $3::timestamptz), qty FROM UNNEST($1::bigint[], $2::bigint[]) AS t(pid, qty)
             ON CONFLICT (product_id, bucket) DO UPDATE SET quantity = product_sales_hourly.quantity + EXCLUDED.quantity",
        )
        .bind(&ids)
        .bind(&quantities)
        .bind(data.confirmed_at)
        .execute(tx)
        .await?;
        Ok(Outcome::Done)
    }

    /// The batch's buckets in key order: missing ones are created (empty) and existing ones
    /// locked by a no-op upsert, so two batches never take bucket rows in opposite orders.
    async fn lock_batch(&self, tx: &mut PgConnection, batch: &[&Incoming]) -> Result<Vec<OrderRow>> {
        let (ids, times): (Vec<i64>, Vec<DateTime<Utc>>) = batch
            .iter()
            .filter_map(|m| serde_json::from_value::<OrderConfirmedData>(m.envelope.data.clone()).ok())
            .flat_map(|data| data.items.into_iter().map(move |i| (i.product_id, data.confirmed_at)))
            .unzip();
        sqlx::query(
            "INSERT INTO product_sales_hourly (product_id, bucket, quantity)
             SELECT DISTINCT pid, date_trunc('hour', at), 0 FROM UNNEST($1::bigint[], $2::timestamptz[]) AS t(pid, at)
             ORDER BY 1, 2
             ON CONFLICT (product_id, bucket) DO UPDATE SET quantity = product_sales_hourly.quantity",
        )
        .bind(&ids)
        .bind(&times)
        .execute(tx)
        .await?;
        Ok(Vec::new())
    }
}
