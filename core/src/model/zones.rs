//! Zones: updates, and when one may be deleted.
//!
//! Invariants (updates): names stay unique (431 on a clash); `allocationstate` is `Enabled` or
//! `Disabled`; a field not given is left as it is, an empty one is cleared.
//!
//! Invariants:
//! * a zone is deleted only when nothing is left in it: no system VM (but destroyed ones), image
//!   store, template or ISO (nor a copy of one), storage pool, console target; otherwise the refusal is [`DomainError::InUse`]
//!   naming what is left, never a database error;
//! * the records of destroyed system VMs go with their zone (they are history: not listed, and
//!   nothing can act on them); its zone-scoped settings go by `ON DELETE CASCADE`;
//! * the checks and the delete run in one transaction, and a row added meanwhile (a foreign-key
//!   failure) is the same refusal.

use crate::model::{DomainError, DomainResult, systemvms};

/// What still references a zone, by kind, in the order the refusal names them.
const LEFT: &[(&str, &str)] = &[
    (
        "system VM(s)",
        "SELECT COUNT(*) FROM system_vms WHERE zone_id = $1 AND removed IS NULL",
    ),
    (
        "image store(s)",
        "SELECT COUNT(*) FROM image_stores WHERE zone_id = $1",
    ),
    (
        "template(s) or ISO(s)",
        "SELECT COUNT(*) FROM templates WHERE zone_id = $1 AND removed IS NULL",
    ),
    (
        "copied template(s) or ISO(s)",
        "SELECT COUNT(*) FROM template_copies WHERE zone_id = $1",
    ),
    (
        "storage pool(s)",
        "SELECT COUNT(*) FROM storage_pools WHERE zone_id = $1",
    ),
    (
        "console target(s)",
        "SELECT COUNT(*) FROM console_targets WHERE zone_id = $1",
    ),
];

/// `what` joined as English: "a", "a and b", "a, b and c".
fn join_and(what: &[String]) -> String {
    match what {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// The refusal for a zone named `name` that still has `left` (count, kind).
fn in_use(name: &str, left: &[(i64, &str)]) -> DomainError {
    let what: Vec<String> = left.iter().map(|(n, kind)| format!("{n} {kind}")).collect();
    DomainError::InUse(format!(
        "Cannot delete zone {name}: it still has {}; destroy or delete them first",
        join_and(&what)
    ))
}

async fn left_in(conn: &mut sqlx::AnyConnection, id: &str) -> Result<Vec<(i64, &'static str)>, sqlx::Error> {
    let mut left = Vec::new();
    for (kind, sql) in LEFT {
        let n: i64 = sqlx::query_scalar(sql)
            .bind(id.to_owned())
            .fetch_one(&mut *conn)
            .await?;
        if n > 0 {
            left.push((n, *kind));
        }
    }
    Ok(left)
}

fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_foreign_key_violation())
}

/// Deletes zone `id` when nothing is left in it (see the module invariants).
pub async fn delete(pool: &sqlx::AnyPool, id: &str) -> DomainResult<()> {
    let mut tx = pool.begin().await?;
    let name: Option<String> = sqlx::query_scalar("SELECT name FROM zones WHERE id = $1")
        .bind(id.to_owned())
        .fetch_optional(&mut *tx)
        .await?;
    let name = name.ok_or_else(|| DomainError::NotFound(format!("Unable to find zone by id {id}")))?;
    let left = left_in(&mut tx, id).await?;
    if !left.is_empty() {
        return Err(in_use(&name, &left));
    }
    let deleted = async {
        let destroyed = systemvms::purge_destroyed(&mut tx, id).await?;
        sqlx::query("DELETE FROM zones WHERE id = $1")
            .bind(id.to_owned())
            .execute(&mut *tx)
            .await?;
        Ok::<_, sqlx::Error>(destroyed)
    }
    .await;
    match deleted {
        Ok(destroyed) => {
            tx.commit().await?;
            tracing::info!(zone.id = %id, zone.name = %name, destroyed_vms = destroyed, "Deleted a zone");
            Ok(())
        }
        Err(e) if is_foreign_key_violation(&e) => {
            // Something was added to the zone meanwhile: say what, from a fresh look.
            drop(tx);
            let mut conn = pool.acquire().await?;
            let left = left_in(&mut conn, id).await?;
            Err(if left.is_empty() {
                DomainError::InUse(format!(
                    "Cannot delete zone {name}: records of removed templates or ISOs still reference it"
                ))
            } else {
                in_use(&name, &left)
            })
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn db() -> (tempfile::TempDir, crate::db::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::Db::open(None, dir.path()).await.unwrap();
        (dir, db)
    }

    async fn zone(db: &crate::db::Db, id: &str) {
        sqlx::query("INSERT INTO zones (id, name, network_type, allocation_state, created) VALUES ($1, $2, 'Advanced', 'Enabled', 't')")
            .bind(id)
            .bind(format!("zone-{id}"))
            .execute(&db.pool)
            .await
            .unwrap();
    }

    #[test]
    fn refusal_names_what_is_left() {
        let e = in_use(
            "z1",
            &[
                (2, "system VM(s)"),
                (1, "image store(s)"),
                (3, "console target(s)"),
            ],
        );
        assert!(matches!(&e, DomainError::InUse(_)));
        assert_eq!(
            e.to_string(),
            "Cannot delete zone z1: it still has 2 system VM(s), 1 image store(s) and 3 console target(s); destroy or delete them first"
        );
        assert_eq!(join_and(&["a".into()]), "a");
        assert_eq!(join_and(&["a".into(), "b".into()]), "a and b");
    }

    #[tokio::test]
    async fn refuses_while_vms_are_left_and_takes_destroyed_ones_along() {
        let (_dir, db) = db().await;
        zone(&db, "z1").await;
        sqlx::query("INSERT INTO system_vms (id, name, role, zone_id, state, agent_state, secret_hash, created) VALUES ('vm1', 'v-1-VM', 'consoleproxy', 'z1', 'Starting', 'Disconnected', 'x', 't')")
            .execute(&db.pool)
            .await
            .unwrap();
        let e = delete(&db.pool, "z1").await.unwrap_err();
        assert!(
            matches!(&e, DomainError::InUse(t) if t.contains("1 system VM(s)") && t.contains("zone-z1")),
            "{e:?}"
        );
        // Destroyed: kept as a record, which goes with the zone.
        sqlx::query("UPDATE system_vms SET removed = 't', state = 'Destroyed' WHERE id = 'vm1'")
            .execute(&db.pool)
            .await
            .unwrap();
        delete(&db.pool, "z1").await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM system_vms")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(n, 0);
        assert!(matches!(
            delete(&db.pool, "z1").await,
            Err(DomainError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn a_row_the_checks_do_not_know_is_a_refusal_not_a_database_error() {
        let (_dir, db) = db().await;
        zone(&db, "z2").await;
        sqlx::query("INSERT INTO image_stores (id, name, url, provider, protocol, zone_id, created) VALUES ('s1', 's1', 'file:///x', 'NFS', 'file', 'z2', 't')")
            .execute(&db.pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO templates (id, name, display_text, is_iso, format, hypervisor, url, zone_id, store_id, account_id, install_path, download_state, status, created, removed) VALUES ('t1', 't', 't', 0, 'QCOW2', 'KVM', 'http://x', 'z2', 's1', 'a', 'p', 'DOWNLOADED', '', 't', 't')")
            .execute(&db.pool)
            .await
            .unwrap();
        let e = delete(&db.pool, "z2").await.unwrap_err();
        assert!(
            matches!(&e, DomainError::InUse(t) if t.contains("1 image store(s)")),
            "{e:?}"
        );
        // Only a removed template left (its store moved elsewhere): still a refusal.
        zone(&db, "z3").await;
        sqlx::query("UPDATE image_stores SET zone_id = 'z3'")
            .execute(&db.pool)
            .await
            .unwrap();
        let e = delete(&db.pool, "z2").await.unwrap_err();
        assert!(
            matches!(&e, DomainError::InUse(t) if t.contains("removed templates")),
            "{e:?}"
        );
    }
}

/// Changes to a zone (`updateZone`); `None` leaves a field as it is, `Some("")` clears it.
#[derive(Debug, Default)]
pub struct ZoneUpdate<'a> {
    /// New name.
    pub name: Option<&'a str>,
    /// `Enabled` or `Disabled` (any case).
    pub allocation_state: Option<&'a str>,
    /// `(column, value)` of the text fields: DNS servers, network domain, guest CIDR.
    pub fields: Vec<(&'static str, &'a str)>,
}

/// The columns [`ZoneUpdate::fields`] may name.
pub const UPDATABLE: &[&str] = &[
    "dns1",
    "dns2",
    "internal_dns1",
    "internal_dns2",
    "ip6_dns1",
    "ip6_dns2",
    "domain",
    "guest_cidr",
];

/// Applies `up` to zone `id`.
pub async fn update(pool: &sqlx::AnyPool, id: &str, up: &ZoneUpdate<'_>) -> DomainResult<()> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM zones WHERE id = $1")
        .bind(id.to_owned())
        .fetch_one(pool)
        .await?;
    if n == 0 {
        return Err(DomainError::NotFound(format!("Unable to find zone by id {id}")));
    }
    let state = match up.allocation_state.map(str::to_ascii_lowercase).as_deref() {
        None => None,
        Some("enabled") => Some("Enabled"),
        Some("disabled") => Some("Disabled"),
        Some(other) => {
            return Err(DomainError::Invalid(format!(
                "Invalid allocationstate {other:?}: use Enabled or Disabled"
            )));
        }
    };
    let mut tx = pool.begin().await?;
    if let Some(name) = up.name {
        if name.is_empty() || name.len() > 255 {
            return Err(DomainError::Invalid(
                "A zone name must be 1 to 255 characters".into(),
            ));
        }
        let r = sqlx::query("UPDATE zones SET name = $1 WHERE id = $2")
            .bind(name.to_owned())
            .bind(id.to_owned())
            .execute(&mut *tx)
            .await;
        match r {
            Ok(_) => {}
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                return Err(DomainError::Invalid(format!(
                    "A zone with name {name} already exists"
                )));
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(s) = state {
        sqlx::query("UPDATE zones SET allocation_state = $1 WHERE id = $2")
            .bind(s)
            .bind(id.to_owned())
            .execute(&mut *tx)
            .await?;
    }
    for (col, value) in &up.fields {
        if !UPDATABLE.contains(col) {
            return Err(DomainError::Internal(format!(
                "zone column {col} is not updatable"
            )));
        }
        // `col` is one of the literals above, never caller input.
        sqlx::query(&format!("UPDATE zones SET {col} = $1 WHERE id = $2"))
            .bind(Some((*value).to_owned()).filter(|v| !v.is_empty()))
            .bind(id.to_owned())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    tracing::info!(zone = id, "Zone updated");
    Ok(())
}
