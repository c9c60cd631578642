//! A publisher that writes AMQP 0-9-1 frames by hand (the spec's section 4.2), so a test can
//! send what no client library would encode: headers nested thousands of levels deep, which
//! RabbitMQ accepts and confirms. Only what one publish needs: handshake with PLAIN, one
//! channel in confirm mode, `basic.publish` with a content header whose `headers` property is
//! the caller's raw field-table bytes, then `connection.close`.

#![allow(dead_code)]

use std::str::FromStr;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A field value: a long string.
pub fn long_string(s: &[u8]) -> Vec<u8> {
    let mut v = vec![b'S'];
    v.extend_from_slice(&(s.len() as u32).to_be_bytes());
    v.extend_from_slice(s);
    v
}

/// A field value: a field array holding `items` (each a field value).
pub fn array(items: &[Vec<u8>]) -> Vec<u8> {
    let contents: Vec<u8> = items.concat();
    let mut v = vec![b'A'];
    v.extend_from_slice(&(contents.len() as u32).to_be_bytes());
    v.extend_from_slice(&contents);
    v
}

/// A field table's encoding (length, then name/value pairs), without a type octet.
pub fn table<K: AsRef<str>>(entries: &[(K, Vec<u8>)]) -> Vec<u8> {
    let mut contents = Vec::new();
    for (name, value) in entries {
        let name = name.as_ref();
        contents.push(name.len() as u8);
        contents.extend_from_slice(name.as_bytes());
        contents.extend_from_slice(value);
    }
    let mut v = (contents.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(&contents);
    v
}

/// A field value: a field table.
pub fn table_value(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut v = vec![b'F'];
    v.extend_from_slice(&table(entries));
    v
}

/// `levels` arrays, each holding the next, around `inner` (built without recursion).
pub fn nested_arrays(levels: usize, inner: Vec<u8>) -> Vec<u8> {
    (0..levels).fold(inner, |v, _| array(&[v]))
}

/// `levels` tables, each holding the next under key `k`, around `inner`.
pub fn nested_tables(levels: usize, inner: Vec<u8>) -> Vec<u8> {
    (0..levels).fold(inner, |v, _| table_value(&[("k", v)]))
}

/// What one raw publish sends.
pub struct Message<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub message_id: &'a str,
    pub correlation_id: Option<&'a str>,
    /// A field table's encoding (see [`table`]).
    pub headers: &'a [u8],
    pub body: &'a [u8],
}

/// Publishes one persistent message to the broker and vhost of `amqp_url` and waits for the
/// broker's confirm. Panics on anything unexpected.
pub async fn publish(amqp_url: &str, m: Message<'_>) {
    let Message {
        exchange,
        routing_key,
        message_id,
        correlation_id,
        headers,
        body,
    } = m;
    let uri = lapin::uri::AMQPUri::from_str(amqp_url).expect("an AMQP URL");
    let mut s = TcpStream::connect((uri.authority.host.as_str(), uri.authority.port))
        .await
        .expect("the broker");
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    expect_method(&mut s, 10, 10).await; // connection.start

    let mut start_ok = Vec::new();
    start_ok.extend_from_slice(&table::<&str>(&[]));
    short_str(&mut start_ok, "PLAIN");
    let response = format!(
        "\0{}\0{}",
        uri.authority.userinfo.username, uri.authority.userinfo.password
    );
    start_ok.extend_from_slice(&(response.len() as u32).to_be_bytes());
    start_ok.extend_from_slice(response.as_bytes());
    short_str(&mut start_ok, "en_US");
    method(&mut s, 0, 10, 11, &start_ok).await;

    let tune = expect_method(&mut s, 10, 30).await;
    let frame_max = u32::from_be_bytes([tune[2], tune[3], tune[4], tune[5]]);
    let mut tune_ok = tune[..2].to_vec();
    tune_ok.extend_from_slice(&frame_max.to_be_bytes());
    tune_ok.extend_from_slice(&0u16.to_be_bytes());
    method(&mut s, 0, 10, 31, &tune_ok).await;

    let mut open = Vec::new();
    short_str(&mut open, &uri.vhost);
    short_str(&mut open, "");
    open.push(0);
    method(&mut s, 0, 10, 40, &open).await;
    expect_method(&mut s, 10, 41).await;

    method(&mut s, 1, 20, 10, &[0]).await; // channel.open
    expect_method(&mut s, 20, 11).await;
    method(&mut s, 1, 85, 10, &[0]).await; // confirm.select
    expect_method(&mut s, 85, 11).await;

    let mut publish = 0u16.to_be_bytes().to_vec();
    short_str(&mut publish, exchange);
    short_str(&mut publish, routing_key);
    publish.push(0);
    method(&mut s, 1, 60, 40, &publish).await;

    // Content header: class, weight, body size, property flags, then the properties in flag
    // order: headers (bit 13), delivery-mode (12), correlation-id (10), message-id (7).
    let mut header = Vec::new();
    header.extend_from_slice(&60u16.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    let flags = 0x2000u16 | 0x1000 | 0x0080 | if correlation_id.is_some() { 0x0400 } else { 0 };
    header.extend_from_slice(&flags.to_be_bytes());
    header.extend_from_slice(headers);
    header.push(2);
    if let Some(id) = correlation_id {
        short_str(&mut header, id);
    }
    short_str(&mut header, message_id);
    assert!(
        header.len() + 8 <= frame_max as usize,
        "a content header must fit one frame"
    );
    frame(&mut s, 2, 1, &header).await;
    frame(&mut s, 3, 1, body).await;
    expect_method(&mut s, 60, 80).await; // basic.ack (a nack would be 60,120)

    let mut close = 200u16.to_be_bytes().to_vec();
    short_str(&mut close, "bye");
    close.extend_from_slice(&[0, 0, 0, 0]);
    method(&mut s, 0, 10, 50, &close).await;
    expect_method(&mut s, 10, 51).await;
}

fn short_str(buf: &mut Vec<u8>, s: &str) {
    buf.push(s.len() as u8);
    buf.extend_from_slice(s.as_bytes());
}

async fn frame(s: &mut TcpStream, kind: u8, channel: u16, payload: &[u8]) {
    let mut f = vec![kind];
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(0xCE);
    s.write_all(&f).await.unwrap();
}

async fn method(s: &mut TcpStream, channel: u16, class: u16, id: u16, args: &[u8]) {
    let mut payload = class.to_be_bytes().to_vec();
    payload.extend_from_slice(&id.to_be_bytes());
    payload.extend_from_slice(args);
    frame(s, 1, channel, &payload).await;
}

/// Reads frames until a method frame, which must be `class.id`; returns its arguments.
async fn expect_method(s: &mut TcpStream, class: u16, id: u16) -> Vec<u8> {
    loop {
        let mut head = [0u8; 7];
        s.read_exact(&mut head).await.unwrap();
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        s.read_exact(&mut payload).await.unwrap();
        assert_eq!(payload[size], 0xCE, "frame end");
        if head[0] != 1 {
            continue; // heartbeat or content
        }
        let got = (
            u16::from_be_bytes([payload[0], payload[1]]),
            u16::from_be_bytes([payload[2], payload[3]]),
        );
        assert_eq!(
            got,
            (class, id),
            "expected method {class}.{id}, got {got:?}: {:?}",
            String::from_utf8_lossy(&payload[4..size])
        );
        payload.truncate(size);
        return payload.split_off(4);
    }
}
