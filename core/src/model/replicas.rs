//! Replicas: which artefact of a staging store (a template or ISO install, a cross-zone copy, a
//! snapshot image) is copied to which object store of its zone, and how far that went.
//!
//! States: `Pending` (to send) → `Replicating` (sent to a storage VM) → `Replicated` (the object
//! is complete and verified) or `Failed` (`error` says why; tried again after a backoff). When the
//! artefact goes (deleted template, removed snapshot), its replica becomes `Deleting` until a
//! storage VM removed the object, then the row goes.
//!
//! Invariants:
//! * a row exists for every installed artefact (verified, with a SHA-256 on record) and every
//!   object store of its zone ([`reconcile`]); the object's key is the artefact's path in the
//!   store, so a bucket mirrors the staging store's layout;
//! * only a `Replicating` row becomes `Replicated` or `Failed`, so a delete that came meanwhile
//!   (`Deleting`) is never undone by a late answer;
//! * `Replicated` is written only from a storage VM's answer that the object was verified.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::Row as _;

use crate::state::State;
use crate::util::now_ms;

/// Replica states.
pub mod state {
    /// To be sent to a storage VM.
    pub const PENDING: &str = "Pending";
    /// Sent; a storage VM is copying it.
    pub const REPLICATING: &str = "Replicating";
    /// The object is complete and verified.
    pub const REPLICATED: &str = "Replicated";
    /// The last attempt failed; tried again after a backoff.
    pub const FAILED: &str = "Failed";
    /// The artefact is gone; its object is being removed.
    pub const DELETING: &str = "Deleting";
}

/// What a replica is of.
pub mod kind {
    /// A template's or ISO's own install.
    pub const TEMPLATE: &str = "template";
    /// A template's or ISO's copy in another zone (`copyTemplate`).
    pub const COPY: &str = "copy";
    /// A snapshot's image.
    pub const SNAPSHOT: &str = "snapshot";
}

/// The longest wait between two attempts of a failing replica.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Wait before attempt `attempts + 1`: 10 s, doubling, at most [`MAX_BACKOFF`].
pub fn backoff(attempts: i64) -> Duration {
    let exp = u32::try_from(attempts.clamp(1, 20) - 1).unwrap_or(0);
    Duration::from_secs(10u64.saturating_mul(1u64 << exp)).min(MAX_BACKOFF)
}

/// A replica row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Object store.
    pub store_id: String,
    /// [`kind`].
    pub kind: String,
    /// The template, copy or snapshot id.
    pub artefact_id: String,
    /// Zone.
    pub zone_id: String,
    /// The staging store the file lives on.
    pub source_url: String,
    /// The file's path in it.
    pub path: String,
    /// The object's key.
    pub key: String,
    /// The file's SHA-256.
    pub sha256: String,
    /// [`state`].
    pub state: String,
    /// Attempts so far.
    pub attempts: i64,
}

const COLUMNS: &str =
    "store_id, kind, artefact_id, zone_id, source_url, path, object_key, sha256, state, attempts";

fn replica(r: &sqlx::any::AnyRow) -> Result<Replica, sqlx::Error> {
    Ok(Replica {
        store_id: r.try_get("store_id")?,
        kind: r.try_get("kind")?,
        artefact_id: r.try_get("artefact_id")?,
        zone_id: r.try_get("zone_id")?,
        source_url: r.try_get("source_url")?,
        path: r.try_get("path")?,
        key: r.try_get("object_key")?,
        sha256: r.try_get("sha256")?,
        state: r.try_get("state")?,
        attempts: r.try_get("attempts")?,
    })
}

/// Per kind: the installed artefacts that want a replica in each object store of their zone,
/// as `(store_id, artefact_id, zone_id, source_url, path, sha256, size)`.
const WANTED: &[(&str, &str)] = &[
    (
        kind::TEMPLATE,
        "SELECT o.id AS store_id, t.id AS artefact_id, t.zone_id AS zone_id, st.url AS source_url, \
         t.installed_file AS path, t.installed_sha256 AS sha256, COALESCE(t.physical_size, 0) AS size \
         FROM templates t JOIN image_stores st ON st.id = t.store_id JOIN object_stores o ON o.zone_id = t.zone_id \
         WHERE t.removed IS NULL AND t.download_state = 'DOWNLOADED' AND t.installed_file IS NOT NULL AND t.installed_sha256 IS NOT NULL",
    ),
    (
        kind::COPY,
        "SELECT o.id AS store_id, c.id AS artefact_id, c.zone_id AS zone_id, st.url AS source_url, \
         c.installed_file AS path, c.installed_sha256 AS sha256, COALESCE(c.physical_size, 0) AS size \
         FROM template_copies c JOIN templates t ON t.id = c.template_id JOIN image_stores st ON st.id = c.store_id JOIN object_stores o ON o.zone_id = c.zone_id \
         WHERE c.removed IS NULL AND t.removed IS NULL AND c.download_state = 'DOWNLOADED' AND c.installed_file IS NOT NULL AND c.installed_sha256 IS NOT NULL",
    ),
    (
        kind::SNAPSHOT,
        "SELECT o.id AS store_id, s.id AS artefact_id, s.zone_id AS zone_id, s.store_url AS source_url, \
         s.file AS path, s.sha256 AS sha256, s.physical_size AS size \
         FROM snapshots s JOIN object_stores o ON o.zone_id = s.zone_id \
         WHERE s.state IN ('BackedUp', 'Destroyed') AND s.file IS NOT NULL AND s.sha256 IS NOT NULL AND s.store_url IS NOT NULL",
    ),
];

/// Brings the rows in line with the artefacts: a `Pending` row for each installed artefact
/// without one, `Deleting` for each replica whose artefact is gone (a `Pending` one just goes).
/// Returns how many rows were added.
pub async fn reconcile(state: &State) -> Result<u64, sqlx::Error> {
    let now = now_ms();
    let mut added = 0;
    for (k, wanted) in WANTED {
        let r = sqlx::query(&format!(
            "INSERT INTO replicas (store_id, kind, artefact_id, zone_id, source_url, path, object_key, sha256, size, state, updated_ms) \
             SELECT w.store_id, $1, w.artefact_id, w.zone_id, w.source_url, w.path, w.path, w.sha256, w.size, $2, $3 FROM ({wanted}) w \
             WHERE NOT EXISTS (SELECT 1 FROM replicas r WHERE r.store_id = w.store_id AND r.kind = $1 AND r.artefact_id = w.artefact_id)"
        ))
        .bind(*k)
        .bind(state::PENDING)
        .bind(now)
        .execute(&state.db.pool)
        .await?;
        added += r.rows_affected();
        let gone = format!(
            "kind = $1 AND NOT EXISTS (SELECT 1 FROM ({wanted}) w WHERE w.store_id = replicas.store_id AND w.artefact_id = replicas.artefact_id)"
        );
        sqlx::query(&format!("DELETE FROM replicas WHERE state = $2 AND {gone}"))
            .bind(*k)
            .bind(state::PENDING)
            .execute(&state.db.pool)
            .await?;
        sqlx::query(&format!(
            "UPDATE replicas SET state = $2, next_try_ms = 0, attempts = 0, error = NULL, updated_ms = $3 WHERE state IN ($4, $5, $6) AND {gone}"
        ))
        .bind(*k)
        .bind(state::DELETING)
        .bind(now)
        .bind(state::REPLICATED)
        .bind(state::REPLICATING)
        .bind(state::FAILED)
        .execute(&state.db.pool)
        .await?;
    }
    Ok(added)
}

/// Rows with work due now (to send, to send again, to remove), oldest first.
pub async fn due(state: &State, limit: i64) -> Result<Vec<Replica>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM replicas WHERE state IN ($1, $2, $3, $4) AND next_try_ms <= $5 ORDER BY updated_ms, artefact_id LIMIT $6"
    ))
    .bind(state::PENDING)
    .bind(state::REPLICATING)
    .bind(state::FAILED)
    .bind(state::DELETING)
    .bind(now_ms())
    .bind(limit)
    .fetch_all(&state.db.pool)
    .await?;
    rows.iter().map(replica).collect()
}

/// The complete replicas in object store `store_id`.
pub async fn replicated_in(state: &State, store_id: &str) -> Result<Vec<Replica>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM replicas WHERE store_id = $1 AND state = $2 ORDER BY kind, object_key"
    ))
    .bind(store_id.to_owned())
    .bind(state::REPLICATED)
    .fetch_all(&state.db.pool)
    .await?;
    rows.iter().map(replica).collect()
}

/// `AND state IN (…)` of our own constants.
fn in_states(states: &[&str]) -> String {
    let list = states
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("state IN ({list})")
}

/// Runs `UPDATE replicas SET {set}, updated_ms = …` on `r`'s row while it is in one of `states`;
/// `bind` binds `$1…$n` of `set`, the row's key follows. Whether the row changed.
type Query<'a> = sqlx::query::Query<'a, sqlx::Any, sqlx::any::AnyArguments<'a>>;

async fn update(
    state: &State,
    r: &Replica,
    set: &str,
    n: usize,
    states: &[&str],
    bind: impl for<'a> FnOnce(Query<'a>) -> Query<'a>,
) -> Result<bool, sqlx::Error> {
    let sql = format!(
        "UPDATE replicas SET {set}, updated_ms = ${} WHERE store_id = ${} AND kind = ${} AND artefact_id = ${} AND {}",
        n + 1,
        n + 2,
        n + 3,
        n + 4,
        in_states(states)
    );
    let q = bind(sqlx::query(&sql))
        .bind(now_ms())
        .bind(r.store_id.clone())
        .bind(r.kind.clone())
        .bind(r.artefact_id.clone());
    Ok(q.execute(&state.db.pool).await?.rows_affected() > 0)
}

fn later(after: Duration) -> i64 {
    now_ms().saturating_add(i64::try_from(after.as_millis()).unwrap_or(i64::MAX / 2))
}

/// The replica was sent to a storage VM (an attempt more).
pub async fn sending(state: &State, r: &Replica) -> Result<bool, sqlx::Error> {
    let states = [state::PENDING, state::REPLICATING, state::FAILED];
    update(state, r, "state = $1, attempts = attempts + 1", 1, &states, |q| {
        q.bind(state::REPLICATING)
    })
    .await
}

/// No storage VM can take it now: it waits (no attempt counted).
pub async fn waiting(state: &State, r: &Replica, why: &str, retry: Duration) -> Result<(), sqlx::Error> {
    let states = [state::PENDING, state::REPLICATING, state::FAILED, state::DELETING];
    let why = why.to_owned();
    update(state, r, "error = $1, next_try_ms = $2", 2, &states, |q| {
        q.bind(why).bind(later(retry))
    })
    .await
    .map(|_| ())
}

/// The storage VM verified the object.
pub async fn replicated(state: &State, r: &Replica, size: u64, parts: u32) -> Result<bool, sqlx::Error> {
    let set = "state = $1, size = $2, parts = $3, error = NULL, next_try_ms = 0";
    update(state, r, set, 3, &[state::REPLICATING], |q| {
        q.bind(state::REPLICATED)
            .bind(i64::try_from(size).unwrap_or(i64::MAX))
            .bind(i64::from(parts))
    })
    .await
}

/// The attempt failed: tried again after [`backoff`].
pub async fn failed(state: &State, r: &Replica, why: &str) -> Result<bool, sqlx::Error> {
    let why: String = why.chars().take(2000).collect();
    let next = later(backoff(r.attempts + 1));
    update(
        state,
        r,
        "state = $1, error = $2, next_try_ms = $3",
        3,
        &[state::REPLICATING],
        |q| q.bind(state::FAILED).bind(why).bind(next),
    )
    .await
}

/// A removal failed: tried again after [`backoff`].
pub async fn delete_failed(state: &State, r: &Replica, why: &str) -> Result<(), sqlx::Error> {
    let why: String = why.chars().take(2000).collect();
    let next = later(backoff(r.attempts + 1));
    let set = "error = $1, attempts = attempts + 1, next_try_ms = $2";
    update(state, r, set, 2, &[state::DELETING], |q| q.bind(why).bind(next))
        .await
        .map(|_| ())
}

/// The object is gone: so is the row.
pub async fn removed(state: &State, r: &Replica) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM replicas WHERE store_id = $1 AND kind = $2 AND artefact_id = $3 AND state = $4")
        .bind(r.store_id.clone())
        .bind(r.kind.clone())
        .bind(r.artefact_id.clone())
        .bind(state::DELETING)
        .execute(&state.db.pool)
        .await?;
    Ok(())
}

/// A replica as listed (`listReplicas`, and the per-store details of `listTemplates` and
/// `listSnapshots`).
#[derive(Debug, Clone)]
pub struct Listed {
    /// Object store.
    pub store_id: String,
    /// Its name.
    pub store_name: String,
    /// [`kind`].
    pub kind: String,
    /// Template, copy or snapshot id.
    pub artefact_id: String,
    /// Zone.
    pub zone_id: String,
    /// Object key.
    pub key: String,
    /// Size (once replicated).
    pub size: i64,
    /// Parts of its upload.
    pub parts: i64,
    /// [`state`].
    pub state: String,
    /// Why the last attempt failed, or what it waits for.
    pub error: Option<String>,
    /// Attempts so far.
    pub attempts: i64,
    /// Last change (ms since the epoch).
    pub updated_ms: i64,
}

/// Replicas, filtered by any of store, kind and artefact ids; by store creation, then key.
pub async fn list(
    state: &State,
    store_id: Option<&str>,
    kinds: &[&str],
    artefact_ids: Option<&[String]>,
) -> Result<Vec<Listed>, sqlx::Error> {
    let mut f = crate::model::Filter::default();
    if let Some(id) = store_id {
        f.eq("r.store_id", id);
    }
    if !kinds.is_empty() {
        f.any_of("r.kind", kinds);
    }
    if let Some(ids) = artefact_ids {
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        f.any_of("r.artefact_id", &ids);
    }
    let rows = f
        .rows(
            &state.db.pool,
            "SELECT r.store_id, o.name AS store_name, r.kind, r.artefact_id, r.zone_id, r.object_key, r.size, r.parts, r.state, r.error, r.attempts, r.updated_ms \
             FROM replicas r JOIN object_stores o ON o.id = r.store_id",
            " ORDER BY o.created, r.object_key",
        )
        .await?;
    let mut out = Vec::new();
    for r in &rows {
        let l = Listed {
            store_id: r.try_get("store_id")?,
            store_name: r.try_get("store_name")?,
            kind: r.try_get("kind")?,
            artefact_id: r.try_get("artefact_id")?,
            zone_id: r.try_get("zone_id")?,
            key: r.try_get("object_key")?,
            size: r.try_get("size")?,
            parts: r.try_get("parts")?,
            state: r.try_get("state")?,
            error: r.try_get("error")?,
            attempts: r.try_get("attempts")?,
            updated_ms: r.try_get("updated_ms")?,
        };
        out.push(l);
    }
    Ok(out)
}

/// The replicas of these artefacts, by artefact id.
pub async fn by_artefact(
    state: &State,
    kinds: &[&str],
    ids: &[String],
) -> Result<HashMap<String, Vec<Listed>>, sqlx::Error> {
    let mut m: HashMap<String, Vec<Listed>> = HashMap::new();
    for l in list(state, None, kinds, Some(ids)).await? {
        m.entry(l.artefact_id.clone()).or_default().push(l);
    }
    Ok(m)
}

/// The replicas of templates' and ISOs' installs (their own and their copies'), by
/// (template id, zone id): `(store name, state)`.
pub async fn of_templates(
    state: &State,
    template_ids: &[String],
) -> Result<HashMap<(String, String), Vec<(String, String)>>, sqlx::Error> {
    let mut m: HashMap<(String, String), Vec<(String, String)>> = HashMap::new();
    if template_ids.is_empty() {
        return Ok(m);
    }
    let ids: Vec<&str> = template_ids.iter().map(String::as_str).collect();
    let mut f = crate::model::Filter::default();
    f.any_of("r.kind", &[kind::TEMPLATE, kind::COPY]);
    f.any_of("COALESCE(c.template_id, r.artefact_id)", &ids);
    let rows = f
        .rows(
            &state.db.pool,
            "SELECT COALESCE(c.template_id, r.artefact_id) AS template_id, r.zone_id, o.name AS store_name, r.state FROM replicas r \
             JOIN object_stores o ON o.id = r.store_id LEFT JOIN template_copies c ON r.kind = 'copy' AND c.id = r.artefact_id",
            " ORDER BY o.created, o.name",
        )
        .await?;
    for r in &rows {
        let key = (r.try_get("template_id")?, r.try_get("zone_id")?);
        m.entry(key)
            .or_default()
            .push((r.try_get("store_name")?, r.try_get("state")?));
    }
    Ok(m)
}

/// CloudStack's download state for a replica's state (`downloaddetails`).
pub fn download_state(s: &str) -> &'static str {
    match s {
        state::REPLICATED => "DOWNLOADED",
        state::REPLICATING => "DOWNLOAD_IN_PROGRESS",
        state::FAILED => "DOWNLOAD_ERROR",
        state::DELETING => "ABANDONED",
        _ => "NOT_DOWNLOADED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        assert_eq!(backoff(0), Duration::from_secs(10));
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(2), Duration::from_secs(20));
        assert_eq!(backoff(4), Duration::from_secs(80));
        assert_eq!(backoff(100), MAX_BACKOFF);
    }
}
