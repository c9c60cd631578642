//! Identity-provider users as orderflow users: (issuer, `sub`) gets an integer user id on first
//! sight (`external_users`, ids from `FIRST_PROVIDER_USER_ID` up), so balances, orders and
//! coupons keep their integer ids. Two first requests at once make one user: the insert
//! skips a conflicting row and the loser reads the winner's. Ids never change, so each API
//! process keeps the ones it has seen.

use std::{collections::HashMap, sync::Mutex};

use orderflow_shared::{Result, auth::Identity};
use sqlx::PgPool;

/// Identities a process remembers before it starts over (each costs one read to find again).
const REMEMBERED: usize = 100_000;

/// (issuer, `sub`) to user id, remembered.
#[derive(Default)]
pub struct Identities {
    known: Mutex<HashMap<Identity, i64>>,
}

impl Identities {
    /// The user id of `identity`, given on first sight.
    pub async fn user_id(&self, pool: &PgPool, identity: &Identity) -> Result<i64> {
        if let Some(id) = self.known.lock().ok().and_then(|k| k.get(identity).copied()) {
            return Ok(id);
        }
        let made: Option<i64> = sqlx::query_scalar(
            "INSERT INTO external_users (issuer, subject) VALUES ($1, $2)
             ON CONFLICT (issuer, subject) DO NOTHING
             RETURNING user_id",
        )
        .bind(&identity.issuer)
        .bind(&identity.subject)
        .fetch_optional(pool)
        .await?;
        // Someone made it first (now or long ago): a statement of its own sees their row.
        let id = match made {
            Some(id) => id,
            None => {
                sqlx::query_scalar("SELECT user_id FROM external_users WHERE issuer = $1 AND subject = $2")
                    .bind(&identity.issuer)
                    .bind(&identity.subject)
                    .fetch_one(pool)
                    .await?
            }
        };
        if let Ok(mut known) = self.known.lock() {
            if known.len() >= REMEMBERED {
                known.clear();
            }
            known.insert(identity.clone(), id);
        }
        Ok(id)
    }

    /// The identities of `user_ids` that came from a provider (for admin views).
    pub async fn of(pool: &PgPool, user_ids: &[i64]) -> Result<HashMap<i64, Identity>> {
        let rows: Vec<(i64, String, String)> =
            sqlx::query_as("SELECT user_id, issuer, subject FROM external_users WHERE user_id = ANY($1)")
                .bind(user_ids)
                .fetch_all(pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(id, issuer, subject)| (id, Identity { issuer, subject }))
            .collect())
    }
}
