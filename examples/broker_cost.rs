//! What RabbitMQ alone costs per durable message on this machine, measured in isolation
//! (docs/PERFORMANCE.md uses it for the limit of the pipeline/baseline ratio).
//!
//! Publishes N persistent messages of an envelope's size into a fresh quorum queue the way
//! the relay does (batches of up to B, default 500, all confirms of a batch awaited
//! together; under load the relay's batches are what committed meanwhile) while consuming
//! them the way the workers do (prefetch 64, one ack per message), then prints the broker's
//! CPU time (`beam.smp`, read from /proc: Linux only) per message.
//!
//!   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --release --example broker_cost -- 50000 [B]

use std::time::Instant;

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
};

/// CPU time in clock ticks of every `beam.smp` process (with its exited children).
fn beam_ticks() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| stat.contains("(beam.smp)"))
        .filter_map(|stat| {
            // Fields after "(comm) ": state is field 3, utime..cstime are fields 14..=17.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<u64> = rest
                .split_whitespace()
                .skip(11)
                .take(4)
                .filter_map(|f| f.parse().ok())
                .collect();
            Some(fields.iter().sum::<u64>())
        })
        .sum()
}

fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map_or(Ok(50_000), |s| s.parse())?;
    let batch: usize = std::env::args().nth(2).map_or(Ok(500), |s| s.parse())?;
    anyhow::ensure!(batch >= 1, "the batch size must be at least 1");
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let queue = format!("orderflow.broker-cost.{}", uuid::Uuid::new_v4().simple());

    let publisher = Connection::connect(&url, ConnectionProperties::default()).await?;
    let consumer = Connection::connect(&url, ConnectionProperties::default()).await?;
    let out = publisher.create_channel().await?;
    let inc = consumer.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString("quorum".into()),
    );
    out.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    out.confirm_select(ConfirmSelectOptions::default()).await?;
    inc.basic_qos(64, BasicQosOptions::default()).await?;
    let mut deliveries = inc
        .basic_consume(
            queue.as_str().into(),
            "broker-cost".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    // An orderflow envelope's size and shape, with a traceparent header.
    let body = serde_json::to_vec(&serde_json::json!({
        "id": uuid::Uuid::now_v7(), "type": "payment.charge", "version": 1,
        "occurredAt": "2026-11-21T10:00:00.000Z", "orderId": uuid::Uuid::now_v7(), "data": {}
    }))?;
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("traceparent"),
        AMQPValue::LongString("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
    );

    let ticks_before = beam_ticks();
    let started = Instant::now();
    let consume = tokio::spawn(async move {
        let mut seen = 0usize;
        while seen < n {
            let Some(Ok(delivery)) = deliveries.next().await else {
                break;
            };
            delivery.acker.ack(BasicAckOptions::default()).await?;
            seen += 1;
        }
        anyhow::Ok(seen)
    });
    let mut sent = 0usize;
    while sent < n {
        let mut confirms = Vec::with_capacity(batch);
        for _ in 0..batch.min(n - sent) {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(uuid::Uuid::now_v7().to_string().into())
                .with_headers(headers.clone());
            confirms.push(
                out.basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await?,
            );
        }
        for confirm in confirms {
            anyhow::ensure!(confirm.await?.is_ack(), "the broker refused a message");
            sent += 1;
        }
    }
    let consumed = consume.await??;
    let elapsed = started.elapsed();
    let broker_ms = (beam_ticks() - ticks_before) as f64 * 1_000.0 / clock_ticks_per_second() as f64;

    out.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    println!(
        "{n} messages published (confirmed, batches of {batch}) and {consumed} consumed (acked) in {:.2} s: {:.0} messages/s; \
         RabbitMQ used {:.0} core-ms, {:.3} core-ms per message",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        broker_ms,
        broker_ms / n as f64
    );
    Ok(())
}
