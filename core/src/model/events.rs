//! Events: what core decided and did (system VM starts, restarts, scaling, lifecycle commands),
//! recorded for `listEvents` and logged.
//!
//! Invariants: an event is never lost silently (a failed write is logged with the event); event
//! types follow CloudStack's names (`PROXY.START`, `SSVM.RESTART`, …).

use systemvm_proto::agent::AgentRole;

use crate::state::State;
use crate::util::{new_uuid, now_cs, now_ms};

/// How serious an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Something done as planned.
    Info,
    /// Something went wrong and core acted on it.
    Warn,
    /// Something failed.
    Error,
}

impl Level {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "INFO",
            Self::Warn => "WARN",
            Self::Error => "ERROR",
        }
    }
}

/// CloudStack's event type prefix of a role (`PROXY`, `SSVM`).
pub fn prefix(role: AgentRole) -> &'static str {
    match role {
        AgentRole::ConsoleProxy => "PROXY",
        AgentRole::SecStorage => "SSVM",
    }
}

/// Records an event (`listEvents`) and logs it.
pub async fn record(
    state: &State,
    kind: &str,
    level: Level,
    description: &str,
    resource: Option<&str>,
    zone: Option<&str>,
) {
    if level == Level::Info {
        tracing::info!(event = kind, resource, %description, "Fleet event");
    } else {
        tracing::warn!(event = kind, resource, %description, "Fleet event");
    }
    let Ok(id) = new_uuid() else { return };
    let r = sqlx::query(
        "INSERT INTO events (id, type, level, description, resource_id, zone_id, created, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id)
    .bind(kind.to_owned())
    .bind(level.as_str())
    .bind(description.to_owned())
    .bind(resource.map(str::to_owned))
    .bind(zone.map(str::to_owned))
    .bind(now_cs())
    .bind(now_ms())
    .execute(&state.db.pool)
    .await;
    if let Err(error) = r {
        tracing::error!(%error, event = kind, "Failed to record an event");
    }
}
