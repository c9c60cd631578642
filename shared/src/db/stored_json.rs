//! A JSON column read whatever it holds.
//!
//! `serde_json` refuses JSON nested deeper than 128 levels (its guard against stack
//! overflow) while PostgreSQL stores `jsonb` far deeper, so a row written by anything else
//! (an older release, a hand-made fix) could make every query that reads it fail. Columns
//! that keep what came from outside (a dead letter's headers) are read as [`StoredJson`]: the
//! value when it parses, else `{"$json": "<the stored text>"}`, whole and unparsed.

use serde_json::{Value, json};
use sqlx::{
    Decode, Postgres, Type, TypeInfo, ValueRef,
    error::BoxDynError,
    postgres::{PgTypeInfo, PgValueFormat, PgValueRef},
    types::Json,
};

/// A `json`/`jsonb` column's value; see the module documentation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct StoredJson(pub Value);

impl StoredJson {
    /// Reads JSON text; text serde_json cannot parse (too deep) is kept as the `$json` marker.
    pub fn read(text: &[u8]) -> Self {
        Self(serde_json::from_slice(text).unwrap_or_else(|_| json!({ "$json": String::from_utf8_lossy(text) })))
    }
}

impl Type<Postgres> for StoredJson {
    fn type_info() -> PgTypeInfo {
        <Json<Value> as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <Json<Value> as Type<Postgres>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for StoredJson {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        let binary_jsonb = value.format() == PgValueFormat::Binary && value.type_info().name() == "JSONB";
        let mut text = value.as_bytes()?;
        if binary_jsonb {
            // jsonb's binary form is a version byte (1) before the text.
            match text.split_first() {
                Some((1, rest)) => text = rest,
                _ => return Err("unsupported jsonb format version".into()),
            }
        }
        Ok(Self::read(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_too_deep_for_serde_is_kept_as_text() {
        assert_eq!(StoredJson::read(br#"{"a":[1]}"#).0, json!({"a": [1]}));
        let deep = format!("{}{}", "[".repeat(1_000), "]".repeat(1_000));
        assert_eq!(StoredJson::read(deep.as_bytes()).0, json!({ "$json": deep }));
    }
}
