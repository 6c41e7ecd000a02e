//! Volume snapshots and snapshot policies: a snapshot is requested (`Allocated`), backed up by
//! the lease holder's backup runner (`BackingUp`, then `BackedUp` or `Error` with the reason),
//! and deleted along the chain rules of docs/snapshots.md; a policy (HOURLY, DAILY, WEEKLY,
//! MONTHLY with CloudStack's schedule and a time zone) queues snapshots when due, and keeps at
//! most `maxsnaps` of them.
//!
//! Invariants: a snapshot's image is `snapshots/<account>/<volume>/<snapshot>.qcow2` on the
//! zone's image store; an incremental names its parent (the snapshot before it in the chain);
//! a deleted snapshot that a later one still builds on stays as `Destroyed` (not listed, file
//! kept) until nothing builds on it, and is removed then; one policy per volume and interval
//! (creating it again updates it); a policy's next run is computed in its time zone.

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use sqlx::Row as _;

use crate::model::volumes::Volume;
use crate::model::{DomainError, DomainResult, settings, stores};
use crate::state::{Caller, State};
use crate::util::{new_uuid, now_cs, now_ms};

/// Snapshot states (CloudStack's names).
pub mod state {
    /// Requested, not started.
    pub const ALLOCATED: &str = "Allocated";
    /// Being copied to secondary storage.
    pub const BACKING_UP: &str = "BackingUp";
    /// Complete.
    pub const BACKED_UP: &str = "BackedUp";
    /// Failed (`error` says why).
    pub const ERROR: &str = "Error";
    /// Deleted, kept while a later snapshot builds on it.
    pub const DESTROYED: &str = "Destroyed";
}

/// The interval types of policies, in CloudStack's order (the response's number).
pub const INTERVALS: &[&str] = &["HOURLY", "DAILY", "WEEKLY", "MONTHLY"];

/// A snapshot row.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// The volume.
    pub volume_id: String,
    /// Zone.
    pub zone_id: String,
    /// Owner.
    pub account_id: String,
    /// The image store holding it.
    pub store_url: String,
    /// State.
    pub state: String,
    /// `MANUAL` or the policy's interval.
    pub interval_type: String,
    /// The policy that took it.
    pub policy_id: Option<String>,
    /// The snapshot an incremental builds on.
    pub parent_id: Option<String>,
    /// Image path in the store.
    pub file: Option<String>,
    /// The libvirt checkpoint taken with it.
    pub checkpoint: Option<String>,
    /// Virtual size.
    pub virtual_size: u64,
}

const COLUMNS: &str = "id, name, volume_id, zone_id, account_id, store_url, state, interval_type, policy_id, parent_id, file, checkpoint, virtual_size";

fn from_row(r: &sqlx::any::AnyRow) -> Result<Snapshot, sqlx::Error> {
    Ok(Snapshot {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        volume_id: r.try_get("volume_id")?,
        zone_id: r.try_get("zone_id")?,
        account_id: r.try_get("account_id")?,
        store_url: r.try_get::<Option<String>, _>("store_url")?.unwrap_or_default(),
        state: r.try_get("state")?,
        interval_type: r.try_get("interval_type")?,
        policy_id: r.try_get("policy_id")?,
        parent_id: r.try_get("parent_id")?,
        file: r.try_get("file")?,
        checkpoint: r.try_get("checkpoint")?,
        virtual_size: u64::try_from(r.try_get::<i64, _>("virtual_size")?).unwrap_or(0),
    })
}

async fn is_true(state: &State, zone: &str, s: &settings::Setting) -> bool {
    settings::zone_text(state, zone, s)
        .await
        .eq_ignore_ascii_case("true")
}

/// Requests a snapshot of `volume` (the caller's or one it manages); returns its id. The
/// backup runner takes it from there.
pub async fn request(
    state: &State,
    caller: &Caller,
    volume_id: &str,
    name: Option<&str>,
    policy: Option<(&str, &str)>,
) -> DomainResult<String> {
    let vol = crate::model::volumes::get(state, volume_id).await?;
    crate::model::templates::ensure_manages(state, caller, &vol.account_id, "volume", volume_id).await?;
    {
        use crate::model::volume_uploads::state::{READY, UPLOADED};
        if vol.state != READY && vol.state != UPLOADED {
            return Err(DomainError::Invalid(format!(
                "Volume {} is {}: it can be snapshotted once it is uploaded",
                vol.name, vol.state
            )));
        }
    }
    if !is_true(state, &vol.zone_id, &settings::SNAPSHOT_TO_SECONDARY).await {
        return Err(DomainError::Invalid(
            "snapshot.backup.to.secondary is false: snapshots are kept on secondary storage only, so none can be taken".into(),
        ));
    }
    let store = stores::first_url_of_zone(&state.db.pool, &vol.zone_id)
        .await?
        .ok_or_else(|| {
            DomainError::Invalid(format!(
                "Zone {} has no image store to back snapshots up to",
                vol.zone_id
            ))
        })?;
    let name = match name.filter(|n| !n.is_empty()) {
        Some(n) if n.len() > 255 => {
            return Err(DomainError::Invalid("name is longer than 255 characters".into()));
        }
        Some(n) => n.to_owned(),
        None => {
            let vm = match &vol.guest {
                Some((_, domain, _)) => domain.clone(),
                None => "detached".into(),
            };
            let stamp = jiff::Timestamp::now().strftime("%Y%m%d%H%M%S");
            format!("{vm}_{}_{stamp}", vol.name)
        }
    };
    let id = new_uuid().map_err(|e| DomainError::Internal(e.to_string()))?;
    let (interval, policy_id) = match policy {
        Some((p, i)) => (i.to_owned(), Some(p.to_owned())),
        None => ("MANUAL".to_owned(), None),
    };
    sqlx::query(
        "INSERT INTO snapshots (id, name, volume_id, volume_name, zone_id, account_id, store_url, state, interval_type, policy_id, created, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(id.clone())
    .bind(name)
    .bind(vol.id.clone())
    .bind(vol.name.clone())
    .bind(vol.zone_id.clone())
    .bind(vol.account_id.clone())
    .bind(store)
    .bind(state::ALLOCATED)
    .bind(interval)
    .bind(policy_id)
    .bind(now_cs())
    .bind(now_ms())
    .execute(&state.db.pool)
    .await?;
    tracing::info!(%id, volume = %vol.id, "Snapshot requested");
    state.dispatch_wakeup.notify_waiters();
    Ok(id)
}

/// Snapshot `id` (any state).
pub async fn get(state: &State, id: &str) -> DomainResult<Snapshot> {
    let r = sqlx::query(&format!("SELECT {COLUMNS} FROM snapshots WHERE id = $1"))
        .bind(id.to_owned())
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| DomainError::NotFound(format!("unable to find a snapshot with id {id}")))?;
    Ok(from_row(&r)?)
}

/// A snapshot the caller may act on (listed states only).
pub async fn get_managed(state: &State, caller: &Caller, id: &str) -> DomainResult<Snapshot> {
    let s = get(state, id).await?;
    if s.state == state::DESTROYED {
        return Err(DomainError::NotFound(format!(
            "unable to find a snapshot with id {id}"
        )));
    }
    crate::model::templates::ensure_manages(state, caller, &s.account_id, "snapshot", id).await?;
    Ok(s)
}

/// Snapshots waiting for the runner, oldest first.
pub async fn queued(state: &State) -> DomainResult<Vec<Snapshot>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM snapshots WHERE state = $1 ORDER BY created_ms, id"
    ))
    .bind(state::ALLOCATED)
    .fetch_all(&state.db.pool)
    .await?;
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}

/// Marks a queued snapshot as running; false when it is not queued any more.
pub async fn start(state: &State, id: &str) -> DomainResult<bool> {
    let r = sqlx::query("UPDATE snapshots SET state = $1 WHERE id = $2 AND state = $3")
        .bind(state::BACKING_UP)
        .bind(id.to_owned())
        .bind(state::ALLOCATED)
        .execute(&state.db.pool)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Puts running snapshots back in the queue (a new lease holder: nobody runs them now), except
/// those in `running`.
pub async fn requeue_running(state: &State, running: &[String]) -> DomainResult<()> {
    let rows: Vec<String> = sqlx::query_scalar("SELECT id FROM snapshots WHERE state = $1")
        .bind(state::BACKING_UP)
        .fetch_all(&state.db.pool)
        .await?;
    for id in rows.into_iter().filter(|id| !running.contains(id)) {
        sqlx::query("UPDATE snapshots SET state = $1 WHERE id = $2 AND state = $3")
            .bind(state::ALLOCATED)
            .bind(id.clone())
            .bind(state::BACKING_UP)
            .execute(&state.db.pool)
            .await?;
        tracing::info!(%id, "Snapshot backup queued again");
    }
    Ok(())
}

/// The last snapshot of a volume's chain an incremental could build on (backed up, or deleted
/// but kept), and how many incrementals lead to it.
pub async fn chain_head(state: &State, volume_id: &str) -> DomainResult<Option<(Snapshot, u64)>> {
    let Some(r) = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM snapshots WHERE volume_id = $1 AND file IS NOT NULL AND state IN ($2, $3) ORDER BY created_ms DESC, id DESC LIMIT 1"
    ))
    .bind(volume_id.to_owned())
    .bind(state::BACKED_UP)
    .bind(state::DESTROYED)
    .fetch_optional(&state.db.pool)
    .await?
    else {
        return Ok(None);
    };
    let head = from_row(&r)?;
    let mut depth = 0;
    let mut at = head.parent_id.clone();
    while let Some(p) = at {
        depth += 1;
        at = sqlx::query_scalar::<_, Option<String>>("SELECT parent_id FROM snapshots WHERE id = $1")
            .bind(p)
            .fetch_optional(&state.db.pool)
            .await?
            .flatten();
        if depth > 4096 {
            break;
        }
    }
    Ok(Some((head, depth)))
}

/// What a finished backup wrote.
#[derive(Debug, Clone)]
pub struct BackedUp<'a> {
    /// The image's path.
    pub file: &'a str,
    /// The snapshot it builds on (an incremental).
    pub parent_id: Option<&'a str>,
    /// The checkpoint taken with it.
    pub checkpoint: Option<&'a str>,
    /// Sizes and bytes read.
    pub virtual_size: u64,
    /// The image's size.
    pub physical_size: u64,
    /// Bytes read from the disk.
    pub bytes_read: u64,
    /// The image's SHA-256.
    pub sha256: &'a str,
}

/// Records a completed backup.
pub async fn backed_up(state: &State, id: &str, b: &BackedUp<'_>) -> DomainResult<()> {
    let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    sqlx::query(
        "UPDATE snapshots SET state = $1, file = $2, parent_id = $3, checkpoint = $4, virtual_size = $5, physical_size = $6, bytes_read = $7, sha256 = $8, error = NULL WHERE id = $9",
    )
    .bind(state::BACKED_UP)
    .bind(b.file.to_owned())
    .bind(b.parent_id.map(str::to_owned))
    .bind(b.checkpoint.map(str::to_owned))
    .bind(i(b.virtual_size))
    .bind(i(b.physical_size))
    .bind(i(b.bytes_read))
    .bind(b.sha256.to_owned())
    .bind(id.to_owned())
    .execute(&state.db.pool)
    .await?;
    tracing::info!(%id, file = b.file, bytes_read = b.bytes_read, "Snapshot backed up");
    Ok(())
}

/// Records a failed backup.
pub async fn failed(state: &State, id: &str, error: &str) -> DomainResult<()> {
    sqlx::query("UPDATE snapshots SET state = $1, error = $2 WHERE id = $3")
        .bind(state::ERROR)
        .bind(error.to_owned())
        .bind(id.to_owned())
        .execute(&state.db.pool)
        .await?;
    tracing::warn!(%id, error, "Snapshot backup failed");
    Ok(())
}

/// The state and error of snapshot `id`.
pub async fn outcome(state: &State, id: &str) -> DomainResult<(String, Option<String>)> {
    let r = sqlx::query("SELECT state, error FROM snapshots WHERE id = $1")
        .bind(id.to_owned())
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| DomainError::NotFound(format!("unable to find a snapshot with id {id}")))?;
    Ok((r.try_get("state")?, r.try_get("error")?))
}

/// Deletes snapshot `id` as far as the chain rules allow: returns the snapshots whose images
/// are to be removed now (the snapshot itself when nothing builds on it, then each kept
/// ancestor nothing else builds on); the rest is marked `Destroyed`. A snapshot being backed up
/// is not deleted.
pub async fn delete_plan(state: &State, id: &str) -> DomainResult<Vec<Snapshot>> {
    let s = get(state, id).await?;
    if s.state == state::BACKING_UP {
        return Err(DomainError::InUse(format!(
            "Snapshot {id} is being backed up; delete it once it is done"
        )));
    }
    let mut out: Vec<Snapshot> = Vec::new();
    let mut at = Some(s);
    while let Some(s) = at.take() {
        // Children other than the one removed just before (it goes with this plan).
        let removed_child = out.last().map(|c| c.id.clone()).unwrap_or_default();
        let children: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM snapshots WHERE parent_id = $1 AND id <> $2")
                .bind(s.id.clone())
                .bind(removed_child)
                .fetch_one(&state.db.pool)
                .await?;
        if children > 0 {
            sqlx::query("UPDATE snapshots SET state = $1 WHERE id = $2")
                .bind(state::DESTROYED)
                .bind(s.id.clone())
                .execute(&state.db.pool)
                .await?;
            break;
        }
        // Removed from the table once its image is gone (`forget`); the parent may go too if
        // it was deleted already and this was the last one building on it.
        let parent = match &s.parent_id {
            Some(p) => get(state, p).await.ok(),
            None => None,
        };
        let parent_goes = match &parent {
            Some(p) if p.state == state::DESTROYED => {
                let others: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM snapshots WHERE parent_id = $1 AND id <> $2")
                        .bind(p.id.clone())
                        .bind(s.id.clone())
                        .fetch_one(&state.db.pool)
                        .await?;
                others == 0
            }
            _ => false,
        };
        out.push(s);
        if parent_goes {
            at = parent;
        }
    }
    Ok(out)
}

/// Removes a snapshot's row (its image is gone); the children's parent is cleared.
pub async fn forget(state: &State, id: &str) -> DomainResult<()> {
    sqlx::query("DELETE FROM snapshots WHERE id = $1")
        .bind(id.to_owned())
        .execute(&state.db.pool)
        .await?;
    Ok(())
}

/// A policy's snapshots beyond its `maxsnaps`, oldest first.
pub async fn beyond_retention(state: &State, policy_id: &str) -> DomainResult<Vec<String>> {
    let Some(max) = sqlx::query_scalar::<_, i64>("SELECT max_snaps FROM snapshot_policies WHERE id = $1")
        .bind(policy_id.to_owned())
        .fetch_optional(&state.db.pool)
        .await?
    else {
        return Ok(Vec::new());
    };
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM snapshots WHERE policy_id = $1 AND state = $2 ORDER BY created_ms DESC, id DESC",
    )
    .bind(policy_id.to_owned())
    .bind(state::BACKED_UP)
    .fetch_all(&state.db.pool)
    .await?;
    let keep = usize::try_from(max.max(0)).unwrap_or(0);
    Ok(ids.into_iter().skip(keep).rev().collect())
}

/// Whether a volume of a running guest may be snapshotted (`kvm.snapshot.enabled`) and backups
/// may be incremental (`kvm.incremental.snapshot`), and the longest chain (`snapshot.delta.max`).
pub async fn guest_policy(state: &State, vol: &Volume) -> (bool, bool, u64) {
    (
        is_true(state, &vol.zone_id, &settings::KVM_SNAPSHOT_ENABLED).await,
        is_true(state, &vol.zone_id, &settings::KVM_INCREMENTAL_SNAPSHOT).await,
        settings::uint(state, &settings::SNAPSHOT_DELTA_MAX).await,
    )
}

// === policies ===

/// A parsed schedule: minute, hour, day (day of week 1 = Sunday for WEEKLY, day of month for
/// MONTHLY), as CloudStack's `DateUtil.getNextRunTime` reads `MM[:HH[:DD]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    interval: usize,
    minute: i8,
    hour: i8,
    day: i8,
}

impl Schedule {
    /// Parses `schedule` for `interval` (one of [`INTERVALS`]).
    pub fn parse(interval: &str, schedule: &str) -> DomainResult<Self> {
        let bad = || {
            DomainError::Invalid(format!(
                "Invalid schedule [{schedule}] for interval type [{interval}]"
            ))
        };
        let interval = INTERVALS
            .iter()
            .position(|i| i.eq_ignore_ascii_case(interval))
            .ok_or_else(|| DomainError::Invalid(format!("Unsupported interval type {interval}")))?;
        let parts: Vec<i8> = schedule
            .split(':')
            .map(|p| p.trim().parse::<i8>().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        let need = [1, 2, 3, 3][interval];
        if parts.len() < need {
            return Err(bad());
        }
        let minute = parts[0];
        let hour = parts.get(1).copied().unwrap_or(0);
        let day = parts.get(2).copied().unwrap_or(1);
        if !(0..60).contains(&minute) || !(0..24).contains(&hour) {
            return Err(bad());
        }
        match interval {
            2 if !(1..=7).contains(&day) => return Err(bad()),
            3 if !(1..=28).contains(&day) => {
                return Err(DomainError::Invalid(
                    "Day cannot be greater than 28 for monthly schedule".into(),
                ));
            }
            _ => {}
        }
        Ok(Schedule {
            interval,
            minute,
            hour,
            day,
        })
    }

    /// The first run strictly after `after` (ms since the epoch) in `tz`.
    pub fn next_run(&self, tz: &TimeZone, after: i64) -> DomainResult<i64> {
        let err = |e: jiff::Error| DomainError::Internal(e.to_string());
        let now = jiff::Timestamp::from_millisecond(after)
            .map_err(err)?
            .to_zoned(tz.clone());
        let dt = now.datetime();
        let at = |d: jiff::civil::Date, h: i8, m: i8| {
            DateTime::from_parts(d, jiff::civil::Time::constant(h, m, 0, 0))
        };
        let mut candidate = match self.interval {
            0 => at(dt.date(), dt.hour(), self.minute),
            1 => at(dt.date(), self.hour, self.minute),
            2 => {
                // jiff: Monday = 1 … Sunday = 7; CloudStack: Sunday = 1 … Saturday = 7.
                let want = if self.day == 1 { 7 } else { self.day - 1 };
                let back = i64::from(dt.weekday().to_monday_one_offset() - want);
                at(
                    dt.date().checked_sub(jiff::Span::new().days(back)).map_err(err)?,
                    self.hour,
                    self.minute,
                )
            }
            _ => at(
                dt.date()
                    .first_of_month()
                    .checked_add(jiff::Span::new().days(i64::from(self.day - 1)))
                    .map_err(err)?,
                self.hour,
                self.minute,
            ),
        };
        for _ in 0..3 {
            let ts = candidate.to_zoned(tz.clone()).map_err(err)?.timestamp();
            if ts.as_millisecond() > after {
                return Ok(ts.as_millisecond());
            }
            let step = match self.interval {
                0 => jiff::Span::new().hours(1),
                1 => jiff::Span::new().days(1),
                2 => jiff::Span::new().weeks(1),
                _ => jiff::Span::new().months(1),
            };
            candidate = candidate.checked_add(step).map_err(err)?;
        }
        Err(DomainError::Internal("no next run found".into()))
    }
}

/// The time zone named `name` (IANA names; CloudStack's UI sends them).
pub fn time_zone(name: &str) -> DomainResult<TimeZone> {
    TimeZone::get(name).map_err(|_| DomainError::Invalid(format!("Unknown time zone {name:?}")))
}

/// A policy to create or update.
#[derive(Debug, Clone)]
pub struct NewPolicy<'a> {
    /// The volume.
    pub volume_id: &'a str,
    /// HOURLY, DAILY, WEEKLY or MONTHLY.
    pub interval: &'a str,
    /// `MM[:HH[:DD]]`.
    pub schedule: &'a str,
    /// IANA time zone.
    pub timezone: &'a str,
    /// Snapshots kept.
    pub max_snaps: i64,
    /// Shown to users.
    pub for_display: bool,
}

/// Most snapshots a policy of each interval keeps (CloudStack's `snapshot.max.*` defaults).
pub const MAX_SNAPS: i64 = 8;

/// Creates a policy, or updates the volume's policy of that interval; returns its id.
pub async fn create_policy(state: &State, caller: &Caller, p: &NewPolicy<'_>) -> DomainResult<String> {
    let vol = crate::model::volumes::get(state, p.volume_id).await?;
    crate::model::templates::ensure_manages(state, caller, &vol.account_id, "volume", p.volume_id).await?;
    let schedule = Schedule::parse(p.interval, p.schedule)?;
    let interval = INTERVALS[schedule.interval];
    let tz = time_zone(p.timezone)?;
    if p.max_snaps <= 0 {
        return Err(DomainError::Invalid(format!(
            "maxSnaps [{}] for volume {} should be greater than 0.",
            p.max_snaps, vol.name
        )));
    }
    if p.max_snaps > MAX_SNAPS {
        return Err(DomainError::Invalid(format!(
            "maxSnaps [{}] for volume {} exceeds limit [{MAX_SNAPS}] for interval type [{interval}].",
            p.max_snaps, vol.name
        )));
    }
    let next = schedule.next_run(&tz, now_ms())?;
    let existing: Option<String> =
        sqlx::query_scalar("SELECT id FROM snapshot_policies WHERE volume_id = $1 AND interval_type = $2")
            .bind(p.volume_id.to_owned())
            .bind(interval)
            .fetch_optional(&state.db.pool)
            .await?;
    let id = match existing {
        Some(id) => {
            sqlx::query("UPDATE snapshot_policies SET schedule = $1, timezone = $2, max_snaps = $3, for_display = $4, next_run_ms = $5 WHERE id = $6")
                .bind(p.schedule.to_owned())
                .bind(p.timezone.to_owned())
                .bind(p.max_snaps)
                .bind(i64::from(p.for_display))
                .bind(next)
                .bind(id.clone())
                .execute(&state.db.pool)
                .await?;
            id
        }
        None => {
            let id = new_uuid().map_err(|e| DomainError::Internal(e.to_string()))?;
            sqlx::query("INSERT INTO snapshot_policies (id, volume_id, interval_type, schedule, timezone, max_snaps, for_display, next_run_ms, created) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
                .bind(id.clone())
                .bind(p.volume_id.to_owned())
                .bind(interval)
                .bind(p.schedule.to_owned())
                .bind(p.timezone.to_owned())
                .bind(p.max_snaps)
                .bind(i64::from(p.for_display))
                .bind(next)
                .bind(now_cs())
                .execute(&state.db.pool)
                .await?;
            id
        }
    };
    tracing::info!(%id, volume = p.volume_id, interval, next_run_ms = next, "Snapshot policy set");
    Ok(id)
}

/// The owner of policy `id` (through its volume), for permission checks.
pub async fn policy_owner(state: &State, id: &str) -> DomainResult<String> {
    sqlx::query_scalar(
        "SELECT v.account_id FROM snapshot_policies p JOIN volumes v ON v.id = p.volume_id WHERE p.id = $1",
    )
    .bind(id.to_owned())
    .fetch_optional(&state.db.pool)
    .await?
    .ok_or_else(|| DomainError::Invalid(format!("Policy id given: {id} does not exist")))
}

/// Sets whether a policy is shown.
pub async fn update_policy(
    state: &State,
    caller: &Caller,
    id: &str,
    for_display: Option<bool>,
) -> DomainResult<()> {
    let owner = policy_owner(state, id).await?;
    crate::model::templates::ensure_manages(state, caller, &owner, "snapshot policy", id).await?;
    if let Some(d) = for_display {
        sqlx::query("UPDATE snapshot_policies SET for_display = $1 WHERE id = $2")
            .bind(i64::from(d))
            .bind(id.to_owned())
            .execute(&state.db.pool)
            .await?;
    }
    Ok(())
}

/// Deletes policies (all or none: every id must exist and be the caller's to manage). Their
/// snapshots stay.
pub async fn delete_policies(state: &State, caller: &Caller, ids: &[&str]) -> DomainResult<()> {
    if ids.is_empty() {
        return Err(DomainError::Invalid(
            "No policy id (or list of ids) specified.".into(),
        ));
    }
    for id in ids {
        let owner = policy_owner(state, id).await?;
        crate::model::templates::ensure_manages(state, caller, &owner, "snapshot policy", id).await?;
    }
    for id in ids {
        sqlx::query("DELETE FROM snapshot_policies WHERE id = $1")
            .bind((*id).to_owned())
            .execute(&state.db.pool)
            .await?;
    }
    Ok(())
}

/// Policies whose next run has come: (policy id, volume id, interval), each moved to its next
/// run.
pub async fn take_due_policies(state: &State, now: i64) -> DomainResult<Vec<(String, String, String)>> {
    let rows = sqlx::query(
        "SELECT id, volume_id, interval_type, schedule, timezone, next_run_ms FROM snapshot_policies WHERE next_run_ms <= $1",
    )
    .bind(now)
    .fetch_all(&state.db.pool)
    .await?;
    let mut due = Vec::new();
    for r in rows {
        let id: String = r.try_get("id")?;
        let interval: String = r.try_get("interval_type")?;
        let schedule: String = r.try_get("schedule")?;
        let tz: String = r.try_get("timezone")?;
        let was: i64 = r.try_get("next_run_ms")?;
        let next = Schedule::parse(&interval, &schedule)
            .and_then(|s| s.next_run(&time_zone(&tz)?, now))
            .unwrap_or(now + 3_600_000);
        // A conditional move: only one taker per run.
        let moved =
            sqlx::query("UPDATE snapshot_policies SET next_run_ms = $1 WHERE id = $2 AND next_run_ms = $3")
                .bind(next)
                .bind(id.clone())
                .bind(was)
                .execute(&state.db.pool)
                .await?;
        if moved.rows_affected() == 1 {
            due.push((id, r.try_get("volume_id")?, interval));
        }
    }
    Ok(due)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn schedules_are_parsed_as_cloudstack_reads_them() {
        assert!(Schedule::parse("HOURLY", "30").is_ok());
        assert!(Schedule::parse("daily", "30:02").is_ok());
        assert!(Schedule::parse("WEEKLY", "0:3:1").is_ok());
        for (i, s) in [
            ("DAILY", "30"),
            ("WEEKLY", "0:3"),
            ("WEEKLY", "0:3:8"),
            ("HOURLY", "61"),
            ("MONTHLY", "0:0:29"),
            ("YEARLY", "1"),
            ("HOURLY", "x"),
        ] {
            assert!(Schedule::parse(i, s).is_err(), "{i} {s}");
        }
    }

    #[test]
    fn next_runs_follow_the_time_zone() {
        let utc = time_zone("UTC").unwrap();
        let seoul = time_zone("Asia/Seoul").unwrap();
        let now = ms("2026-12-02T10:40:00Z"); // a Wednesday
        let hourly = Schedule::parse("HOURLY", "30").unwrap();
        assert_eq!(hourly.next_run(&utc, now).unwrap(), ms("2026-12-02T11:30:00Z"));
        let daily = Schedule::parse("DAILY", "00:09").unwrap();
        assert_eq!(daily.next_run(&utc, now).unwrap(), ms("2026-12-03T09:00:00Z"));
        // 09:00 in Seoul is 00:00 UTC.
        assert_eq!(daily.next_run(&seoul, now).unwrap(), ms("2026-12-03T00:00:00Z"));
        // 1 = Sunday.
        let weekly = Schedule::parse("WEEKLY", "0:12:1").unwrap();
        assert_eq!(weekly.next_run(&utc, now).unwrap(), ms("2026-12-06T12:00:00Z"));
        let monthly = Schedule::parse("MONTHLY", "15:06:2").unwrap();
        assert_eq!(monthly.next_run(&utc, now).unwrap(), ms("2027-01-02T06:15:00Z"));
        assert_eq!(
            monthly.next_run(&utc, ms("2026-12-01T00:00:00Z")).unwrap(),
            ms("2026-12-02T06:15:00Z")
        );
        assert!(time_zone("Mars/Olympus").is_err());
    }
}
