//! The database: one schema for SQLite and PostgreSQL behind `sqlx::AnyPool`, embedded migrations.
//!
//! Invariants: migrations are embedded in the binary, applied in order, each in its own
//! transaction together with its row in `schema_migrations`, and never edited once released (a
//! change is a new file); every query is portable SQL with `$n` placeholders (SQLite accepts them
//! as numbered parameters) and binds values, never formats them in, except validated integers.

use std::path::Path;

use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;

/// Migrations, in order: (version, name, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "initial", include_str!("../migrations/0001_initial.sql")),
    (2, "system_vms", include_str!("../migrations/0002_system_vms.sql")),
    (
        3,
        "storage_consoles",
        include_str!("../migrations/0003_storage_consoles.sql"),
    ),
    (4, "fleet", include_str!("../migrations/0004_fleet.sql")),
    (
        5,
        "console_hypervisor_ref",
        include_str!("../migrations/0005_console_hypervisor_ref.sql"),
    ),
    (
        6,
        "zone_configurations",
        include_str!("../migrations/0006_zone_configurations.sql"),
    ),
    (
        7,
        "zone_driver",
        include_str!("../migrations/0007_zone_driver.sql"),
    ),
    (8, "ha", include_str!("../migrations/0008_ha.sql")),
    (9, "fencing", include_str!("../migrations/0009_fencing.sql")),
    (
        10,
        "store_per_ssvm",
        include_str!("../migrations/0010_store_per_ssvm.sql"),
    ),
    (11, "directory", include_str!("../migrations/0011_directory.sql")),
    (12, "updates", include_str!("../migrations/0012_updates.sql")),
    (13, "tags", include_str!("../migrations/0013_tags.sql")),
    (14, "uploads", include_str!("../migrations/0014_uploads.sql")),
    (
        15,
        "template_copies",
        include_str!("../migrations/0015_template_copies.sql"),
    ),
    (
        16,
        "primary_storage",
        include_str!("../migrations/0016_primary_storage.sql"),
    ),
    (17, "snapshots", include_str!("../migrations/0017_snapshots.sql")),
    (
        18,
        "volume_uploads",
        include_str!("../migrations/0018_volume_uploads.sql"),
    ),
    (
        19,
        "object_stores",
        include_str!("../migrations/0019_object_stores.sql"),
    ),
];

/// Opening or migrating the database failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenDbError {
    /// The pool could not connect.
    #[error("failed to connect to the database")]
    Connect(#[source] sqlx::Error),
    /// A migration failed.
    #[error("failed to apply migration {version} ({name})")]
    Migrate {
        /// Migration version.
        version: i64,
        /// Migration name.
        name: &'static str,
        /// Cause.
        #[source]
        source: sqlx::Error,
    },
    /// The database was migrated by a newer build.
    #[error("database schema version {found} is newer than this build's {known}")]
    TooNew {
        /// Version found.
        found: i64,
        /// Newest version this build knows.
        known: i64,
    },
}

/// Which backend a URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite file.
    Sqlite,
    /// PostgreSQL server.
    Postgres,
}

/// The database handle (cheap to clone).
#[derive(Debug, Clone)]
pub struct Db {
    /// The pool.
    pub pool: AnyPool,
    /// The backend behind it.
    pub backend: Backend,
}

impl Db {
    /// The database's clock, Unix milliseconds, as an SQL expression for this backend. Every
    /// comparison between cores (the leader lease, core heartbeats, agent heartbeats) uses it, so
    /// cores whose clocks disagree still agree on who holds what.
    pub fn now_ms_sql(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS BIGINT)",
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// The database's clock now, Unix milliseconds.
    pub async fn now_ms(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(&format!("SELECT {}", self.now_ms_sql()))
            .fetch_one(&self.pool)
            .await
    }

    /// Opens `url` (`postgres://…`), or the SQLite file `DATA_DIR/core.db` when `url` is `None`,
    /// and applies pending migrations.
    pub async fn open(url: Option<&str>, data_dir: &Path) -> Result<Self, OpenDbError> {
        sqlx::any::install_default_drivers();
        let (url, backend) = match url {
            Some(u) if u.starts_with("sqlite:") => (u.to_owned(), Backend::Sqlite),
            Some(u) => (u.to_owned(), Backend::Postgres),
            None => (
                format!("sqlite://{}?mode=rwc", data_dir.join("core.db").display()),
                Backend::Sqlite,
            ),
        };
        // sqlx's SQLite defaults already enable foreign keys and a 5 s busy timeout.
        let opts = AnyPoolOptions::new().max_connections(8);
        let pool = opts.connect(&url).await.map_err(OpenDbError::Connect)?;
        let db = Self { pool, backend };
        db.migrate().await?;
        Ok(db)
    }

    async fn migrate(&self) -> Result<(), OpenDbError> {
        let err = |version, name| {
            move |source| OpenDbError::Migrate {
                version,
                name,
                source,
            }
        };
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL)",
        )
        .execute(&self.pool)
        .await
        .map_err(err(0, "schema_migrations"))?;
        let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_migrations")
            .fetch_one(&self.pool)
            .await
            .map_err(err(0, "schema_migrations"))?;
        let current = current.unwrap_or(0);
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        if current > known {
            return Err(OpenDbError::TooNew {
                found: current,
                known,
            });
        }
        for &(version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            let mut tx = self.pool.begin().await.map_err(err(version, name))?;
            sqlx::raw_sql(sql)
                .execute(&mut *tx)
                .await
                .map_err(err(version, name))?;
            sqlx::query("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)")
                .bind(version)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(err(version, name))?;
            tx.commit().await.map_err(err(version, name))?;
            tracing::info!(version, name, "Applied database migration");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn migrates_once_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(None, dir.path()).await.unwrap();
        sqlx::query("INSERT INTO zones (id, name, network_type, allocation_state, created) VALUES ($1, $2, $3, $4, $5)")
            .bind("z1").bind("n").bind("Advanced").bind("Enabled").bind("t")
            .execute(&db.pool).await.unwrap();
        drop(db);
        let db = Db::open(None, dir.path()).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM zones")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(n, 1);
        let v: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM schema_migrations")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
    }

    #[tokio::test]
    async fn database_clock_is_unix_millis() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(None, dir.path()).await.unwrap();
        let db_now = db.now_ms().await.unwrap();
        let here = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap();
        assert!((db_now - here).abs() < 5_000, "db {db_now} vs {here}");
    }
}
