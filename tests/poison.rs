//! Hostile broker input, against the real PostgreSQL and RabbitMQ: outbox rows the broker
//! refuses, dead letters carrying whatever an AMQP message can, replays whose destination is
//! gone. None of them may hold back other messages, loop, or answer 500.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{
    TestApp,
    raw_amqp::{self, Message, long_string, nested_arrays, nested_tables},
};
use lapin::{
    BasicProperties, ExchangeKind,
    options::{BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString},
};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

async fn parked(app: &TestApp) -> Vec<Value> {
    let (status, page) = app.get("/api/admin/outbox/parked", &app.admin_token()).await;
    assert_eq!(status, 200, "{page}");
    page["items"].as_array().unwrap().clone()
}

async fn wait_parked(app: &TestApp, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let rows = parked(app).await;
        if rows.len() >= n {
            return rows;
        }
        assert!(Instant::now() < deadline, "only {} of {n} rows parked", rows.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn insert_outbox(app: &TestApp, exchange: &str, routing_key: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox (message_id, exchange, routing_key, message_type, body)
         VALUES (gen_random_uuid(), $1, $2, 'stock.reserve', '{}') RETURNING id",
    )
    .bind(exchange)
    .bind(routing_key)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

async fn declare_exchange(app: &TestApp, name: &str) {
    let (conn, channel) = app.amqp().await;
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
}

/// Waits until the relay marked outbox row `id` sent.
async fn wait_published(app: &TestApp, id: i64, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let sent: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT sent_at FROM outbox WHERE id = $1")
                .bind(id)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        if sent.is_some() {
            return;
        }
        assert!(Instant::now() < deadline, "{what} was never published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Declares queue `queue` (classic, with `args`: an integer, or -1 for `reject-publish` as
/// `x-overflow`) and binds it to `exchange` with `key`.
async fn bind_queue(app: &TestApp, queue: &str, exchange: &str, key: &str, args: &[(&str, i64)]) {
    let mut table = FieldTable::default();
    for (k, v) in args {
        let value = if *v < 0 {
            AMQPValue::LongString("reject-publish".into())
        } else {
            AMQPValue::LongLongInt(*v)
        };
        table.insert((*k).into(), value);
    }
    app.capture_with(queue, exchange, key, table).await;
}

async fn metric(name: &str) -> Option<f64> {
    orderflow_shared::metrics::render()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

#[tokio::test]
async fn rows_the_broker_refuses_are_set_aside_and_a_hundred_orders_behind_them_confirm() {
    let app = TestApp::spawn().await;
    // Ahead of every order: a row for an exchange that does not exist (the broker closes the
    // channel over it) and one for an exchange that exists but routes nothing (returned).
    declare_exchange(&app, "unbound").await;
    let missing = insert_outbox(&app, "legacy", "stock.reserve").await;
    let unroutable = insert_outbox(&app, "unbound", "nowhere").await;
    // And one the broker nacks ("not now": a queue that is full and rejects publishes, as a
    // quorum queue without a leader does while a node is down): retried, not parked.
    bind_queue(
        &app,
        "full",
        "unbound",
        "full",
        &[("x-max-length", 0), ("x-overflow", -1)],
    )
    .await;
    let nacked = insert_outbox(&app, "unbound", "full").await;

    let product = app.product("Behind poison", 100, 1_000).await;
    for user in 1..=100 {
        app.fund(user, 1_000).await;
    }
    let started = Instant::now();
    let orders = futures_util::future::join_all((1..=100).map(|user| {
        let app = &app;
        async move { (user, app.order(user, &[(product, 1)], None).await) }
    }))
    .await;
    for (user, id) in &orders {
        assert_eq!(app.wait_terminal(*user, id, WAIT).await["status"], "CONFIRMED");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "100 orders took {took:?} behind the poison"
    );
    assert_eq!(app.stock(product).await, 900);

    // Each poison row was tried on its own schedule, then parked with its reason.
    let rows = wait_parked(&app, 2).await;
    assert_eq!(rows.len(), 2);
    let row = |id: i64| rows.iter().find(|r| r["id"] == id).unwrap().clone();
    let (gone, nowhere) = (row(missing), row(unroutable));
    assert_eq!(gone["attempts"], orderflow_workers::relay::MAX_ATTEMPTS);
    assert!(gone["lastError"].as_str().unwrap().contains("NOT_FOUND"), "{gone}");
    assert_eq!(nowhere["attempts"], orderflow_workers::relay::MAX_ATTEMPTS);
    assert!(nowhere["lastError"].as_str().unwrap().contains("NO_ROUTE"), "{nowhere}");
    // Past the refusals that park a row, the nacked one is still being retried.
    let deadline = Instant::now() + WAIT;
    let (attempts, parked_at, last_error) = loop {
        let row: (i32, Option<chrono::DateTime<chrono::Utc>>, Option<String>) =
            sqlx::query_as("SELECT attempts, parked_at, last_error FROM outbox WHERE id = $1")
                .bind(nacked)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        if row.0 > orderflow_workers::relay::MAX_ATTEMPTS || row.1.is_some() {
            break row;
        }
        assert!(Instant::now() < deadline, "the nacked row was not retried: {row:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(attempts < orderflow_workers::relay::MAX_NACKED_ATTEMPTS, "{attempts}");
    assert_eq!(parked_at, None, "a nack is the broker's 'not now'");
    assert!(
        last_error.as_deref().unwrap_or_default().contains("nacked"),
        "{last_error:?}"
    );
    let (_, overview) = app.get("/api/admin/overview", &app.admin_token()).await;
    assert_eq!(overview["outbox"]["parked"], 2);
    assert_eq!(overview["outbox"]["unsent"], 1, "{overview}");
    let deadline = Instant::now() + WAIT;
    while metric("orderflow_outbox_parked ").await != Some(2.0) {
        assert!(Instant::now() < deadline, "the parked gauge never showed 2");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The full queue makes room: the nacked row goes out on its next try, with no operator.
    let (conn, channel) = app.amqp().await;
    channel
        .queue_purge("full".into(), lapin::options::QueuePurgeOptions::default())
        .await
        .unwrap();
    channel
        .queue_delete("full".into(), lapin::options::QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    bind_queue(&app, "full", "unbound", "full", &[]).await;

    // An operator binds a queue to the second exchange and retries it; discards the first.
    let (conn, channel) = app.amqp().await;
    channel
        .queue_declare(
            "catch-all".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            "catch-all".into(),
            "unbound".into(),
            "nowhere".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    let (status, body) = app
        .admin(Method::POST, &format!("/api/admin/outbox/{unroutable}/retry"))
        .await;
    assert_eq!(status, 202, "{body}");
    let (status, _) = app.admin(Method::DELETE, &format!("/api/admin/outbox/{missing}")).await;
    assert_eq!(status, 204);
    wait_published(&app, unroutable, "the retried row").await;
    assert_eq!(app.drain_queue("catch-all").await.len(), 1);
    wait_published(&app, nacked, "the nacked row").await;
    assert_eq!(app.drain_queue("full").await.len(), 1);
    assert!(parked(&app).await.is_empty());
    for (method, path, want, code) in [
        (
            Method::DELETE,
            format!("/api/admin/outbox/{missing}"),
            409,
            "OUTBOX_MESSAGE_NOT_PARKED",
        ),
        (
            Method::POST,
            format!("/api/admin/outbox/{unroutable}/retry"),
            409,
            "OUTBOX_MESSAGE_NOT_PARKED",
        ),
        (
            Method::POST,
            "/api/admin/outbox/999999/retry".to_owned(),
            404,
            "OUTBOX_MESSAGE_NOT_FOUND",
        ),
    ] {
        let (status, problem) = app.admin(method, &path).await;
        assert_eq!(
            (status.as_u16(), problem["code"].as_str()),
            (want, Some(code)),
            "{path}"
        );
    }
    // Discarded is not unsent: the system is at rest.
    app.wait_quiescent(WAIT).await;
    app.stop().await;
}

/// Headers of every AMQP field type, with the strings PostgreSQL cannot store as text.
fn hostile_headers() -> FieldTable {
    let mut nested = FieldTable::default();
    nested.insert("deep".into(), AMQPValue::LongString(LongString::from(&b"x\0y"[..])));
    let mut headers = FieldTable::default();
    let mut put = |k: &str, v| {
        headers.insert(ShortString::from(k), v);
    };
    put("x-note", AMQPValue::LongString(LongString::from(&b"a\0b"[..])));
    put(
        "x-latin1",
        AMQPValue::LongString(LongString::from(&[0x63u8, 0x61, 0x66, 0xe9][..])),
    );
    put("x-bytes", AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 255])));
    put(
        "x-decimal",
        AMQPValue::DecimalValue(DecimalValue { scale: 3, value: 1234 }),
    );
    put("x-at", AMQPValue::Timestamp(1_764_460_800));
    // (RabbitMQ itself refuses non-finite floats: the recorder's marker for them is unit-tested.)
    put("x-double", AMQPValue::Double(1.5));
    put(
        "x-list",
        AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::LongInt(-7),
            AMQPValue::Boolean(false),
            AMQPValue::Void,
        ])),
    );
    put("x-table", AMQPValue::FieldTable(nested));
    put("x-large", AMQPValue::LongString(LongString::from("z".repeat(100_000))));
    headers
}

async fn publish(app: &TestApp, exchange: &str, key: &str, body: &[u8], headers: FieldTable, id: &str) {
    let (conn, channel) = app.amqp().await;
    channel.confirm_select(Default::default()).await.unwrap();
    let confirm = channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default()
                .with_message_id(id.into())
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let _ = conn.close(200, "bye".into()).await;
}

/// Publishes `body` as a `stock.reserve` command through orderflow's own exchange.
async fn publish_stock_reserve(app: &TestApp, body: &str) {
    let id = uuid::Uuid::now_v7().to_string();
    publish(
        app,
        "orderflow.work",
        "stock.reserve",
        body.as_bytes(),
        FieldTable::default(),
        &id,
    )
    .await;
}

async fn wait_letters(app: &TestApp, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, page) = app
            .get("/api/admin/dead-letters?size=100&status=ALL", &app.admin_token())
            .await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap().clone();
        if items.len() >= n {
            return items;
        }
        assert!(Instant::now() < deadline, "only {} of {n} dead letters", items.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_dead_letter_with_nul_bytes_and_every_field_type_is_recorded_once_and_nothing_loops() {
    let app = TestApp::spawn().await;
    publish(
        &app,
        "",
        "orderflow.stock",
        b"{not json",
        hostile_headers(),
        "hostile-1",
    )
    .await;
    let letters = wait_letters(&app, 1).await;
    let letter = &letters[0];
    assert_eq!(
        (letter["sourceQueue"].as_str(), letter["reason"].as_str()),
        (Some("orderflow.stock"), Some("rejected"))
    );
    assert_eq!(letter["body"], "{not json");
    let h = &letter["headers"];
    assert_eq!(h["x-note"], json!({"$bytes": "610062"}));
    assert_eq!(h["x-latin1"], json!({"$bytes": "636166e9"}));
    assert_eq!(h["x-bytes"], json!({"$bytes": "0001ff"}));
    assert_eq!(h["x-decimal"], json!({"$decimal": {"scale": 3, "value": 1234}}));
    assert_eq!(h["x-at"], json!({"$timestamp": 1_764_460_800}));
    assert_eq!(h["x-double"], json!(1.5));
    assert_eq!(h["x-list"], json!([-7, false, null]));
    assert_eq!(h["x-table"], json!({"deep": {"$bytes": "780079"}}));
    assert_eq!(h["x-large"].as_str().map(str::len), Some(100_000));

    // Recorded once, acked: nothing is redelivered, nothing waits in the dead-letter queue.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
    let queues = orderflow_shared::messaging::stats::queue_stats(&app.config.amqp_url)
        .await
        .unwrap();
    let dlq = queues.iter().find(|q| q.name == "orderflow.dead-letters").unwrap();
    assert_eq!(dlq.messages, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_dead_letter_that_cannot_be_recorded_is_parked_after_a_few_attempts_not_redelivered_forever() {
    let app = TestApp::spawn().await;
    // Recording fails for this letter (a stand-in for any non-transient failure); the bare
    // record the recorder falls back to is let through.
    sqlx::query(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.message_id = 'doomed' AND NEW.reason IS DISTINCT FROM 'unrecordable' THEN
             RAISE EXCEPTION 'injected failure';
           END IF;
           RETURN NEW;
         END $$",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("CREATE TRIGGER refuse BEFORE INSERT ON dead_letters FOR EACH ROW EXECUTE FUNCTION refuse()")
        .execute(&app.pool)
        .await
        .unwrap();
    publish(
        &app,
        "",
        "orderflow.stock",
        b"\xff\xfe not even utf-8",
        FieldTable::default(),
        "doomed",
    )
    .await;
    let letters = wait_letters(&app, 1).await;
    let letter = &letters[0];
    assert_eq!(letter["reason"], "unrecordable");
    assert_eq!(letter["messageId"], "doomed");
    assert!(
        letter["headers"]["$unrecordable"]
            .as_str()
            .unwrap()
            .contains("injected failure"),
        "{letter}"
    );
    let body: Vec<u8> = sqlx::query_scalar("SELECT body FROM dead_letters")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(body, b"\xff\xfe not even utf-8");
    // It stays parked: acked, not redelivered.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let queues = orderflow_shared::messaging::stats::queue_stats(&app.config.amqp_url)
        .await
        .unwrap();
    assert_eq!(
        queues
            .iter()
            .find(|q| q.name == "orderflow.dead-letters")
            .unwrap()
            .messages,
        0
    );
    app.stop().await;
}

async fn replay(app: &TestApp, id: i64) -> (u16, Value) {
    let (status, body) = app
        .admin(Method::POST, &format!("/api/admin/dead-letters/{id}/replay"))
        .await;
    (status.as_u16(), body)
}

#[tokio::test]
async fn replays_publish_the_original_bytes_to_where_the_letter_died_or_answer_409_never_500() {
    let app = TestApp::spawn().await;
    // A stock.reserve for no order, with a NUL inside its JSON, published through an exchange
    // of its own that is then deleted: dead-lettered from orderflow.stock.
    let (conn, channel) = app.amqp().await;
    channel
        .exchange_declare(
            "legacy".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            "orderflow.stock".into(),
            "legacy".into(),
            "stock.reserve".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let id = uuid::Uuid::now_v7();
    let body = format!(
        r#"{{"id":"{id}","type":"stock.reserve","occurredAt":"2026-11-30T10:00:00.000Z","orderId":"{}","data":{{"note":"a\u0000b"}}}}"#,
        uuid::Uuid::now_v7()
    );
    publish(
        &app,
        "legacy",
        "stock.reserve",
        body.as_bytes(),
        FieldTable::default(),
        &id.to_string(),
    )
    .await;
    let letters = wait_letters(&app, 1).await;
    assert_eq!(letters[0]["exchange"], "legacy");
    channel
        .exchange_delete("legacy".into(), Default::default())
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;

    // Replayed to the queue it died in, byte for byte: it dies there again (no such order),
    // and the second record holds the very same bytes.
    let first = letters[0]["id"].as_i64().unwrap();
    let (status, replayed) = replay(&app, first).await;
    assert_eq!(status, 202, "{replayed}");
    assert_eq!(replayed["status"], "REPLAYED");
    let letters = wait_letters(&app, 2).await;
    let bodies: Vec<Vec<u8>> = sqlx::query_scalar("SELECT body FROM dead_letters ORDER BY id")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(bodies, [body.as_bytes().to_vec(), body.as_bytes().to_vec()]);
    assert!(letters.iter().all(|l| l["sourceQueue"] == "orderflow.stock"));
    // Meanwhile the pipeline flows.
    let product = app.product("After replay", 1_000, 5).await;
    app.fund(8, 1_000).await;
    let order = app.order(8, &[(product, 1)], None).await;
    assert_eq!(app.wait_terminal(8, &order, WAIT).await["status"], "CONFIRMED");

    // Destinations that are gone or route nothing are refused when asked.
    for (queue, exchange, key) in [
        (Some("orderflow.gone"), None, None),
        (None, Some("legacy"), Some("stock.reserve")),
        (None, Some("orderflow.work"), Some("nothing.here")),
        (None, None, None),
    ] {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO dead_letters (fingerprint, source_queue, exchange, routing_key, body)
             VALUES (gen_random_uuid(), $1, $2, $3, '{}') RETURNING id",
        )
        .bind(queue)
        .bind(exchange)
        .bind(key)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        let (status, problem) = replay(&app, id).await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (409, Some("DEAD_LETTER_NOT_REPLAYABLE")),
            "{queue:?} {exchange:?} {key:?}: {problem}"
        );
    }
    app.wait_quiescent(WAIT).await;
    app.stop().await;
}

/// A dead letter whose type (read from its body: it came without a `type` property) is longer
/// than an AMQP short string holds is not replayable (409): no relay could publish it, and a
/// previous release's relay running beside this one would panic on it. An outbox row like it
/// all the same (written by a release without that check) is parked at once by the relay,
/// saying why, and the relay goes on (it used to panic building the message, which stopped
/// `orderflow all`, and every relay after it stopped on the same row). A dead letter naming a
/// queue too long to exist is not replayable either: 409, never a 500.
#[tokio::test]
async fn a_message_that_cannot_be_put_on_the_wire_is_never_replayed_nor_holds_up_the_relay() {
    let app = TestApp::spawn().await;
    let long_type = "x".repeat(300);
    let body = format!(
        r#"{{"id":"{}","type":"{long_type}","occurredAt":"2026-12-05T10:00:00.000Z","data":{{}}}}"#,
        uuid::Uuid::now_v7(),
    );
    publish_stock_reserve(&app, &body).await;
    let letters = wait_letters(&app, 1).await;
    let (status, problem) = replay(&app, letters[0]["id"].as_i64().unwrap()).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("DEAD_LETTER_NOT_REPLAYABLE")),
        "{problem}"
    );
    assert!(problem["detail"].as_str().unwrap().contains("255"), "{problem}");

    let row: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (message_id, exchange, routing_key, message_type, body)
         VALUES (gen_random_uuid(), '', 'orderflow.stock', $1, '{}') RETURNING id",
    )
    .bind(&long_type)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let rows = wait_parked(&app, 1).await;
    assert_eq!(
        (rows[0]["id"].as_i64(), rows[0]["attempts"].as_i64()),
        (Some(row), Some(1)),
        "parked at once: {rows:?}"
    );
    assert!(
        rows[0]["lastError"]
            .as_str()
            .unwrap()
            .contains("over AMQP's limit of 255"),
        "{rows:?}"
    );
    // The relay lives on: orders confirm.
    let product = app.product("After an unsendable row", 1_000, 5).await;
    app.fund(8, 1_000).await;
    let order = app.order(8, &[(product, 1)], None).await;
    assert_eq!(app.wait_terminal(8, &order, WAIT).await["status"], "CONFIRMED");

    let too_long: i64 = sqlx::query_scalar(
        "INSERT INTO dead_letters (fingerprint, source_queue, body) VALUES (gen_random_uuid(), repeat('q', 300), '{}')
         RETURNING id",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let (status, problem) = replay(&app, too_long).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("DEAD_LETTER_NOT_REPLAYABLE")),
        "{problem}"
    );
    app.stop().await;
}

/// A message far larger than any of orderflow's (here a valid `stock.reserve` for a real order,
/// padded to 4 MiB with a few hundred thousand numbers) is dead-lettered by the worker unread:
/// nothing is reserved, and the letter is recorded with only the first 256 KiB of its body and
/// its whole length, which makes it not replayable; orders go on. (Parsed, as it was, a body
/// costs many times its size: RabbitMQ allows 128 MiB, which took gigabytes.)
#[tokio::test]
async fn a_huge_message_is_dead_lettered_unread_and_recorded_in_part() {
    let app = TestApp::spawn().await;
    let product = app.product("Huge", 1_000, 5).await;
    // An order of its own, with no command of ours on the way: only the huge one names it.
    let order = uuid::Uuid::now_v7();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO orders (id, user_id, status, total_amount, deadline_at)
         VALUES ('{order}', 9, 'PENDING', 1000, now() + interval '1 hour');
         INSERT INTO order_items (order_id, product_id, quantity, unit_price) VALUES ('{order}', {product}, 1, 1000);"
    )))
    .execute(&app.pool)
    .await
    .unwrap();
    let numbers = vec!["0"; 2 * 1024 * 1024].join(",");
    let body = format!(
        r#"{{"id":"{}","type":"stock.reserve","occurredAt":"2026-12-05T10:00:00.000Z","orderId":"{order}","data":{{"orderIds":["{order}"],"pad":[{numbers}]}}}}"#,
        uuid::Uuid::now_v7()
    );
    assert!(body.len() > 4_000_000);
    publish_stock_reserve(&app, &body).await;
    let letters = wait_letters(&app, 1).await;
    assert_eq!(letters[0]["sourceQueue"], "orderflow.stock", "{letters:?}");
    let (kept, whole): (i32, Option<i64>) =
        sqlx::query_as("SELECT length(body), (headers->>'$bodyTruncatedFrom')::int8 FROM dead_letters")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((kept, whole), (256 * 1024, Some(body.len() as i64)));
    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
        .bind(order)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        (status.as_str(), app.stock(product).await),
        ("PENDING", 5),
        "the huge command was acted on"
    );
    let (status, problem) = replay(&app, letters[0]["id"].as_i64().unwrap()).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("DEAD_LETTER_NOT_REPLAYABLE")),
        "{problem}"
    );
    app.fund(8, 1_000).await;
    let order = app.order(8, &[(product, 1)], None).await;
    assert_eq!(app.wait_terminal(8, &order, WAIT).await["status"], "CONFIRMED");
    app.stop().await;
}

/// `value`, `levels` levels down: through arrays (`[0]`) or tables (`["k"]`).
fn descend<'a>(mut value: &'a Value, levels: usize, key: Option<&str>) -> &'a Value {
    for _ in 0..levels {
        value = match key {
            Some(k) => &value[k],
            None => &value[0],
        };
    }
    value
}

/// Headers no client library writes, each confirmed by RabbitMQ: 2,000 nested arrays and 2,000
/// nested tables (about 10 KB each; they aborted every process of `orderflow all` through a
/// stack overflow in the AMQP decoder), 10,000 keys, 100 KB values. On every queue orderflow
/// consumes, the dead-letter queue included: each message is dead-lettered and recorded, every
/// letter can be listed, read, discarded, and shown in its order's timeline, and the pipeline
/// goes on.
#[tokio::test]
async fn headers_thousands_deep_or_wide_on_every_queue_leave_the_process_alive_and_the_letters_manageable() {
    let app = TestApp::spawn().await;
    let product = app.product("Beside hostile frames", 100, 100).await;
    app.fund(9, 1_000).await;
    let victim = app.order(9, &[(product, 1)], None).await;
    assert_eq!(app.wait_terminal(9, &victim, WAIT).await["status"], "CONFIRMED");

    let bottom = || long_string(b"bottom");
    let deep = raw_amqp::table(&[
        ("x-nest", nested_arrays(2_000, bottom())),
        ("x-nest-table", nested_tables(2_000, bottom())),
    ]);
    let wide: Vec<(String, Vec<u8>)> = (0..10_000).map(|i| (format!("k{i}"), long_string(b"v"))).collect();
    let wide = raw_amqp::table(&wide);
    let large = raw_amqp::table(&[("x-large", long_string(&[b'z'; 100_000]))]);
    use orderflow_shared::messaging::topology::*;
    let queues = [
        STOCK_QUEUE,
        COUPON_QUEUE,
        PAYMENT_QUEUE,
        ORDER_QUEUE,
        EXPIRED_QUEUE,
        DEAD_LETTER_QUEUE,
    ];
    for queue in queues {
        for (kind, headers) in [("deep", &deep), ("wide", &wide), ("large", &large)] {
            raw_amqp::publish(
                &app.config.amqp_url,
                Message {
                    exchange: "",
                    routing_key: queue,
                    message_id: &format!("{kind}@{queue}"),
                    correlation_id: Some(&victim),
                    headers,
                    body: b"{not json",
                },
            )
            .await;
        }
    }
    let letters = wait_letters(&app, 3 * queues.len()).await;
    assert_eq!(letters.len(), 3 * queues.len());
    for letter in &letters {
        let id = letter["messageId"].as_str().unwrap();
        let (kind, queue) = id.split_once('@').unwrap();
        if queue != DEAD_LETTER_QUEUE {
            assert_eq!(
                (letter["sourceQueue"].as_str(), letter["reason"].as_str()),
                (Some(queue), Some("rejected")),
                "{id}"
            );
        }
        let h = &letter["headers"];
        match kind {
            "deep" => {
                // 32 levels as JSON, the rest in its AMQP encoding: an array, a table.
                let arrays = descend(&h["x-nest"], 32, None);
                assert!(arrays["$amqp"].as_str().unwrap().starts_with("41"), "{id}: {arrays}");
                let tables = descend(&h["x-nest-table"], 32, Some("k"));
                assert!(tables["$amqp"].as_str().unwrap().starts_with("46"), "{id}: {tables}");
            }
            // (Beside RabbitMQ's own x-death and x-first-death-* headers.)
            "wide" => assert_eq!(
                h.as_object().unwrap().keys().filter(|k| k.starts_with('k')).count(),
                10_000,
                "{id}"
            ),
            _ => assert_eq!(h["x-large"].as_str().map(str::len), Some(100_000), "{id}"),
        }
        let (status, one) = app
            .get(&format!("/api/admin/dead-letters/{}", letter["id"]), &app.admin_token())
            .await;
        assert_eq!((status.as_u16(), &one["headers"]), (200, h), "{id}");
    }

    // A letter stored deeper than serde_json reads (by an earlier release, or by hand) is
    // still listed, shown, discarded: its headers come as their stored text.
    let too_deep = format!("{}1{}", "[".repeat(1_000), "]".repeat(1_000));
    let legacy: i64 = sqlx::query_scalar(
        "INSERT INTO dead_letters (fingerprint, order_id, headers, body)
         VALUES (gen_random_uuid(), $1::uuid, $2::jsonb, '{}') RETURNING id",
    )
    .bind(&victim)
    .bind(&too_deep)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let (status, page) = app
        .get("/api/admin/dead-letters?size=100&status=ALL", &app.admin_token())
        .await;
    assert_eq!(status, 200, "{page}");
    let (status, one) = app
        .get(&format!("/api/admin/dead-letters/{legacy}"), &app.admin_token())
        .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(
        one["headers"]["$json"].as_str().map(|t| t.matches('[').count()),
        Some(1_000)
    );

    // The order the letters named shows all of them in its timeline.
    let (status, timeline) = app
        .get(&format!("/api/admin/orders/{victim}/timeline"), &app.admin_token())
        .await;
    assert_eq!(status, 200, "{timeline}");
    assert_eq!(timeline["deadLetters"].as_array().unwrap().len(), 3 * queues.len() + 1);

    // Each can be discarded; none replayed (their bodies are not JSON); nothing 500s.
    for letter in letters.iter().map(|l| l["id"].as_i64().unwrap()).chain([legacy]) {
        let (status, problem) = replay(&app, letter).await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (409, Some("DEAD_LETTER_NOT_REPLAYABLE"))
        );
        let (status, _) = app
            .admin(Method::DELETE, &format!("/api/admin/dead-letters/{letter}"))
            .await;
        assert_eq!(status, 204);
    }

    // Every consumer is still there, and the pipeline still confirms orders.
    let order = app.order(9, &[(product, 1)], None).await;
    assert_eq!(app.wait_terminal(9, &order, WAIT).await["status"], "CONFIRMED");
    let queues_now = orderflow_shared::messaging::stats::queue_stats(&app.config.amqp_url)
        .await
        .unwrap();
    for queue in queues {
        let q = queues_now.iter().find(|q| q.name == queue).unwrap();
        assert_eq!((q.messages, q.consumers > 0), (0, true), "{queue}");
    }
    app.stop().await;
}

/// A stock step with a bug: it panics on any batch that names `poison` (the first `panics`
/// times; then it takes it too) and records the orders it takes.
#[derive(Clone, Default)]
struct Buggy {
    poison: uuid::Uuid,
    panics: usize,
    attempts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    taken: std::sync::Arc<std::sync::Mutex<Vec<uuid::Uuid>>>,
}

impl orderflow_workers::runtime::Step for Buggy {
    const NAME: &'static str = "buggy";
    const QUEUE: &'static str = orderflow_shared::messaging::topology::STOCK_QUEUE;

    fn accepts(&self, kind: orderflow_shared::messaging::MessageType) -> bool {
        kind == orderflow_shared::messaging::MessageType::StockReserve
    }

    async fn handle(
        &self,
        _tx: &mut sqlx::PgConnection,
        batch: &[&orderflow_workers::runtime::Incoming],
        _attempt: u32,
    ) -> orderflow_shared::Result<Vec<orderflow_workers::runtime::Outcome>> {
        if batch.iter().any(|m| m.order_ids.contains(&self.poison))
            && self.attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < self.panics
        {
            panic!("a step's own bug");
        }
        let ids = batch.iter().flat_map(|m| m.order_ids.iter().copied());
        self.taken.lock().unwrap().extend(ids);
        Ok(vec![orderflow_workers::runtime::Outcome::Done; batch.len()])
    }
}

/// Runs `step` on the test's vhost until the returned token is cancelled.
fn run_buggy(
    app: &TestApp,
    step: Buggy,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let cfg = orderflow_workers::runtime::RuntimeConfig {
        amqp_url: app.config.amqp_url.clone(),
        prefetch: 10,
        concurrency: 2,
        batch: 10,
        linger: Duration::ZERO,
        drain_timeout: Duration::from_secs(1),
        feed: Default::default(),
    };
    let task = tokio::spawn(orderflow_workers::runtime::run(
        step,
        app.pool.clone(),
        cfg,
        shutdown.clone(),
    ));
    (shutdown, task)
}

/// Publishes a `stock.reserve` naming `orders`; returns its message id.
async fn reserve(app: &TestApp, orders: &[uuid::Uuid]) -> uuid::Uuid {
    let message_id = uuid::Uuid::now_v7();
    let body = json!({"id": message_id, "type": "stock.reserve", "occurredAt": "2026-12-07T10:00:00.000Z",
                      "data": {"orderIds": orders}});
    publish(
        app,
        "orderflow.work",
        "stock.reserve",
        body.to_string().as_bytes(),
        FieldTable::default(),
        &message_id.to_string(),
    )
    .await;
    message_id
}

#[tokio::test]
async fn a_delivery_whose_step_panics_goes_back_to_the_queue_at_once_not_when_the_channel_closes() {
    let app = TestApp::spawn_with(common::Options {
        workers: vec![],
        ..Default::default()
    })
    .await;
    let order = uuid::Uuid::now_v7();
    let step = Buggy {
        poison: order,
        panics: 1,
        ..Default::default()
    };
    let (shutdown, consumer) = run_buggy(&app, step.clone());
    let message_id = reserve(&app, &[order]).await;
    // The same consumer, on the same channel, gets it again and takes it: the inbox holds it.
    app.wait_until(
        "the delivery was not given back after the panic",
        WAIT,
        &format!("EXISTS (SELECT FROM inbox WHERE message_id = '{message_id}' AND consumer = 'buggy')"),
    )
    .await;
    assert_eq!(step.attempts.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(*step.taken.lock().unwrap(), [order]);
    shutdown.cancel();
    consumer.await.unwrap().unwrap();
    app.stop().await;
}

#[tokio::test]
async fn a_step_that_panics_on_one_order_fails_that_order_alone() {
    // A relay: a message about several orders that fails is split into one per order.
    let app = TestApp::spawn_with(common::Options {
        workers: vec![orderflow_workers::WorkerKind::Relay],
        ..Default::default()
    })
    .await;
    let (a, poison, b) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let step = Buggy {
        poison,
        panics: usize::MAX,
        ..Default::default()
    };
    let (shutdown, consumer) = run_buggy(&app, step.clone());
    reserve(&app, &[a, poison, b]).await;
    // Its neighbours are taken; the order the bug meets is dead-lettered at the delivery limit.
    let deadline = Instant::now() + WAIT;
    let letters = loop {
        let letters = app.drain_queue("orderflow.dead-letters").await;
        if !letters.is_empty() {
            break letters;
        }
        assert!(Instant::now() < deadline, "the poison order was never dead-lettered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].1["data"]["orderIds"], json!([poison]), "{:?}", letters[0].1);
    let mut taken = step.taken.lock().unwrap().clone();
    taken.sort_unstable();
    assert_eq!(taken, [a, b]);
    shutdown.cancel();
    consumer.await.unwrap().unwrap();
    app.stop().await;
}
