//! A schema of a bench run's own in the system's database (the baselines', the floor's):
//! created before the run, dropped with everything in it afterwards, whatever the run did.

use anyhow::Context;
use orderflow_shared::db::{self, quote_ident};
use sqlx::{Connection, Executor, PgConnection};
use uuid::Uuid;

/// A schema named `<prefix>_<12 random hex digits>` and the connection that made it.
pub struct Scratch {
    pub name: String,
    admin: PgConnection,
}

impl Scratch {
    /// Creates the schema. Errors: DATABASE_URL unreachable, or the schema cannot be made.
    pub async fn create(database_url: &str, prefix: &str) -> anyhow::Result<Self> {
        let name = format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let mut admin = db::connect(database_url).await.context("connecting to DATABASE_URL")?;
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {}", quote_ident(&name))))
            .await
            .with_context(|| format!("creating schema {name}"))?;
        Ok(Self { name, admin })
    }

    /// Drops the schema and what is in it; the run's own result comes first, then the drop's.
    pub async fn drop_after<T>(mut self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        let dropped = self
            .admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA {} CASCADE",
                quote_ident(&self.name)
            )))
            .await;
        let _ = self.admin.close().await;
        let value = result?;
        dropped.with_context(|| format!("dropping schema {}", self.name))?;
        Ok(value)
    }
}
