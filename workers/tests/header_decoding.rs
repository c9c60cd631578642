//! A property test of what every delivery's headers go through: lapin's AMQP decoder (the
//! vendored amq-protocol-types, bounded nesting) and the dead-letter recorder's JSON. Random
//! field tables of every AMQP type, nested up to 200 levels, then the same bytes mutated,
//! truncated and replaced by noise: decoding never panics or overflows the stack, what decodes
//! is the original (tables past the bound as their own encoding, which decodes again), and the
//! recorder's JSON always parses back with serde_json.

#![allow(clippy::unwrap_used)]

use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
    generation::gen_field_table,
    parsing::{MAX_NESTING_DEPTH, parse_field_table, parse_value},
};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, max: u64) -> Vec<u8> {
        (0..self.below(max + 1)).map(|_| self.next() as u8).collect()
    }
}

/// A random scalar of a type that travels in tables (never a byte array that starts like a table or array: those are what the
/// decoder turns too-deep containers into, see `expand`).
fn scalar(rng: &mut Rng) -> AMQPValue {
    match rng.below(15) {
        0 => AMQPValue::Boolean(rng.below(2) == 1),
        1 => AMQPValue::ShortShortInt(rng.next() as i8),
        2 => AMQPValue::ShortShortUInt(rng.next() as u8),
        3 => AMQPValue::ShortInt(rng.next() as i16),
        4 => AMQPValue::ShortUInt(rng.next() as u16),
        5 => AMQPValue::LongInt(rng.next() as i32),
        6 => AMQPValue::LongUInt(rng.next() as u32),
        7 => AMQPValue::LongLongInt(rng.next() as i64),
        8 => AMQPValue::Float(f32::from_bits(rng.next() as u32)),
        9 => AMQPValue::Double(f64::from_bits(rng.next())),
        10 => AMQPValue::DecimalValue(DecimalValue {
            scale: rng.next() as u8,
            value: rng.next() as u32,
        }),
        // (No ShortString: RabbitMQ's tables have no type for it, and lapin never decodes one.)
        11 => AMQPValue::LongString(LongString::from(rng.bytes(8))),
        12 => AMQPValue::LongString(LongString::from(rng.bytes(64))),
        13 => AMQPValue::Timestamp(rng.next()),
        _ => {
            let mut b = rng.bytes(16);
            if matches!(b.first(), Some(b'A' | b'F')) {
                b[0] = 0;
            }
            AMQPValue::ByteArray(ByteArray::from(b))
        }
    }
}

/// A random value; `depth` more levels of tables and arrays may open inside it.
fn value(rng: &mut Rng, depth: usize) -> AMQPValue {
    if depth == 0 || rng.below(3) > 0 {
        return if rng.below(20) == 0 {
            AMQPValue::Void
        } else {
            scalar(rng)
        };
    }
    let width = if rng.below(4) == 0 { 1 } else { rng.below(4) as usize };
    if rng.below(2) == 0 {
        AMQPValue::FieldArray(FieldArray::from(
            (0..width).map(|_| value(rng, depth - 1)).collect::<Vec<_>>(),
        ))
    } else {
        AMQPValue::FieldTable(table(rng, width, depth - 1))
    }
}

fn table(rng: &mut Rng, width: usize, depth: usize) -> FieldTable {
    let mut t = FieldTable::default();
    for i in 0..width {
        t.insert(ShortString::from(format!("k{i}")), value(rng, depth));
    }
    t
}

/// A chain of `levels` tables and arrays around a scalar: the deep case a random tree rarely
/// reaches.
fn chain(rng: &mut Rng, levels: usize) -> AMQPValue {
    (0..levels).fold(scalar(rng), |inner, _| {
        if rng.below(2) == 0 {
            AMQPValue::FieldArray(FieldArray::from(vec![inner]))
        } else {
            let mut t = FieldTable::default();
            t.insert(ShortString::from("c"), inner);
            AMQPValue::FieldTable(t)
        }
    })
}

fn encode(t: &FieldTable) -> Vec<u8> {
    cookie_factory::gen_simple(gen_field_table(t), Vec::new()).unwrap()
}

/// The decoded value with every container the decoder kept as its own encoding (a byte array
/// past [`MAX_NESTING_DEPTH`] enclosing containers) decoded again: what was sent.
fn expand(v: &AMQPValue, enclosing: usize) -> AMQPValue {
    match v {
        AMQPValue::ByteArray(b) if enclosing == MAX_NESTING_DEPTH => {
            let (rest, inner) = parse_value(b.as_slice()).unwrap();
            assert!(rest.is_empty());
            assert!(matches!(inner, AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_)));
            expand(&inner, 0)
        }
        AMQPValue::FieldArray(a) => AMQPValue::FieldArray(FieldArray::from(
            a.as_slice()
                .iter()
                .map(|v| expand(v, enclosing + 1))
                .collect::<Vec<_>>(),
        )),
        AMQPValue::FieldTable(t) => AMQPValue::FieldTable(expand_table(t, enclosing + 1)),
        other => other.clone(),
    }
}

fn expand_table(t: &FieldTable, enclosing: usize) -> FieldTable {
    let mut out = FieldTable::default();
    for (k, v) in t.inner() {
        out.insert(k.clone(), expand(v, enclosing));
    }
    out
}

/// How many containers deep a value goes.
fn depth(v: &AMQPValue) -> usize {
    match v {
        AMQPValue::FieldArray(a) => 1 + a.as_slice().iter().map(depth).max().unwrap_or(0),
        AMQPValue::FieldTable(t) => 1 + t.inner().values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn check(rng: &mut Rng, headers: &FieldTable) {
    let bytes = encode(headers);
    let (rest, decoded) = parse_field_table(&bytes[..]).unwrap();
    assert!(rest.is_empty());
    // Nothing past the bound was decoded as a container ...
    assert!(decoded.inner().values().all(|v| depth(v) <= MAX_NESTING_DEPTH));
    // ... and nothing was lost: the bytes are exactly what was sent.
    assert_eq!(encode(&expand_table(&decoded, 0)), bytes);
    // The recorder's JSON is shallow enough for serde_json to read back.
    let json = orderflow_workers::steps::dead_letters::table_to_json(&decoded).to_string();
    serde_json::from_str::<serde_json::Value>(&json).unwrap();

    // Damaged copies: decoding may fail, never panic, never loop.
    for _ in 0..8 {
        let mut damaged = bytes.clone();
        match rng.below(3) {
            0 if !damaged.is_empty() => {
                let at = rng.below(damaged.len() as u64) as usize;
                damaged[at] = rng.next() as u8;
            }
            1 => damaged.truncate(rng.below(damaged.len() as u64 + 1) as usize),
            _ => {
                let at = rng.below(damaged.len() as u64 + 1) as usize;
                damaged.splice(at..at, rng.bytes(8));
            }
        }
        if let Ok((_, t)) = parse_field_table(&damaged[..]) {
            let _ = orderflow_workers::steps::dead_letters::table_to_json(&t);
        }
    }
}

#[test]
fn random_headers_decode_to_what_was_sent_within_bounded_depth() {
    // Encoding a 200-level chain recurses in the encoder (not under test): give it room.
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(|| {
            let mut rng = Rng(0x0DDB_1A5E_5BAD_5EED);
            for case in 0..3_000 {
                let width = 1 + rng.below(6) as usize;
                let mut headers = table(&mut rng, width, 6);
                if case % 3 == 0 {
                    let levels = rng.below(200) as usize;
                    headers.insert(ShortString::from("deep"), chain(&mut rng, levels));
                }
                check(&mut rng, &headers);
            }
            // Pure noise after a plausible length.
            for _ in 0..3_000 {
                let mut noise = rng.bytes(256);
                let len = (noise.len() as u32).to_be_bytes();
                noise.splice(0..0, len);
                let _ = parse_field_table(&noise[..]);
                let _ = parse_value(&noise[4..]);
            }
        })
        .unwrap()
        .join()
        .unwrap();
}
