//! The domain layer: what core knows and decides about system VMs, settings, image stores,
//! templates and ISOs, consoles, events, login sessions and zone deletion, and the only code
//! that writes their tables.
//!
//! ```text
//!   HTTP handlers (api/, server, jobs)      background parts (agent endpoint, fleet, dispatch)
//!                  \                          /
//!                   └────────> model <───────┘
//! ```
//!
//! Invariants:
//! * the domain layer knows nothing of HTTP: no request parameters, no status codes, no
//!   CloudStack error shapes; its errors are [`DomainError`], which the API edge maps to
//!   CloudStack's codes (`crate::error`);
//! * it never imports the handlers nor the background parts (checked by the `core_layers` test
//!   in `tests/e2e/layout.rs`);
//! * text in a [`DomainError`] other than `Db` is written for the operator; `Db` never reaches a
//!   client.

pub mod certificates;
pub mod consoles;
pub mod copies;
pub mod directory;
pub mod events;
pub mod guest_os;
pub mod keyrings;
pub mod object_stores;
pub mod rebuild;
pub mod replicas;
pub mod sessions;
pub mod settings;
pub mod snapshots;
pub mod staging;
pub mod stores;
pub mod systemvms;
pub mod tags;
pub mod template_properties;
pub mod templates;
pub mod transfers;
pub mod volume_uploads;
pub mod volumes;
pub mod zones;

/// Why a domain operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// The request is invalid (a value, a combination, a missing choice).
    #[error("{0}")]
    Invalid(String),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The caller may not do this.
    #[error("{0}")]
    Denied(String),
    /// The resource is in use.
    #[error("{0}")]
    InUse(String),
    /// A system VM or agent needed for it is not there or failed; the text says which and why.
    #[error("{0}")]
    Unavailable(String),
    /// The database failed (never shown to a client).
    #[error("database error")]
    Db(#[from] sqlx::Error),
    /// Something that should not happen (never shown to a client).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result of a domain operation.
pub type DomainResult<T> = Result<T, DomainError>;

/// `s` with `%`, `_` and backslash escaped for a `LIKE … ESCAPE '\\'` pattern.
pub fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

/// A `WHERE` clause built from bound text values (list queries of every resource).
#[derive(Debug, Default)]
pub struct Filter {
    clauses: Vec<String>,
    /// Values to bind, in placeholder order.
    pub binds: Vec<String>,
}

impl Filter {
    /// Adds `col = $n`.
    pub fn eq(&mut self, col: &str, value: &str) {
        self.binds.push(value.to_owned());
        self.clauses.push(format!("{col} = ${}", self.binds.len()));
    }

    /// Adds `col <> $n`.
    pub fn ne(&mut self, col: &str, value: &str) {
        self.binds.push(value.to_owned());
        self.clauses.push(format!("{col} <> ${}", self.binds.len()));
    }

    /// Adds `col = 0|1` for a 0/1 flag column (a literal: the value is not caller input).
    pub fn flag(&mut self, col: &str, value: bool) {
        self.clauses.push(format!("{col} = {}", i64::from(value)));
    }

    /// Adds `col IS NULL`.
    pub fn is_null(&mut self, col: &str) {
        self.clauses.push(format!("{col} IS NULL"));
    }

    /// Adds "owned by `account_id`, public, or shared with it" (templates).
    pub fn own_or_public(&mut self, account_id: &str) {
        self.binds.push(account_id.to_owned());
        let n = self.binds.len();
        self.clauses.push(format!(
            "(t.account_id = ${n} OR t.is_public = 1 OR t.id IN (SELECT template_id FROM template_shares WHERE account_id = ${n}))"
        ));
    }

    /// Adds "owned by an account of the subtree at `path` (the query joins the owner's domain as
    /// `d`), public, or shared with `account_id`" (templates, for Domain and Resource Admins).
    pub fn subtree_public_or_shared(&mut self, path: &str, account_id: &str) {
        self.binds.push(format!("{}%", escape_like(path)));
        let p = self.binds.len();
        self.binds.push(account_id.to_owned());
        let a = self.binds.len();
        self.clauses.push(format!(
            "(d.path LIKE ${p} ESCAPE '\\' OR t.is_public = 1 OR t.id IN (SELECT template_id FROM template_shares WHERE account_id = ${a}))"
        ));
    }

    /// Adds "shared with `account_id`" (templates of other accounts).
    pub fn shared_with(&mut self, account_id: &str) {
        self.binds.push(account_id.to_owned());
        self.clauses.push(format!(
            "t.id IN (SELECT template_id FROM template_shares WHERE account_id = ${})",
            self.binds.len()
        ));
    }

    /// Adds `col IN (…)` over `values` (nothing matches when `values` is empty).
    pub fn any_of(&mut self, col: &str, values: &[&str]) {
        if values.is_empty() {
            self.clauses.push("1 = 0".to_owned());
            return;
        }
        let mut marks = Vec::with_capacity(values.len());
        for v in values {
            self.binds.push((*v).to_owned());
            marks.push(format!("${}", self.binds.len()));
        }
        self.clauses.push(format!("{col} IN ({})", marks.join(", ")));
    }

    /// Adds "`col` starts with `prefix`" (case-sensitive; `%`, `_` and backslash in the prefix
    /// match themselves): a domain subtree by path.
    pub fn prefix(&mut self, col: &str, prefix: &str) {
        self.binds.push(format!("{}%", escape_like(prefix)));
        self.clauses
            .push(format!("{col} LIKE ${} ESCAPE '\\'", self.binds.len()));
    }

    /// Adds a case-insensitive substring match of `keyword` on any of `cols` (`%`, `_` and backslash
    /// in the keyword match themselves).
    pub fn keyword(&mut self, cols: &[&str], keyword: &str) {
        self.binds
            .push(format!("%{}%", escape_like(&keyword.to_lowercase())));
        let n = self.binds.len();
        let any: Vec<String> = cols
            .iter()
            .map(|c| format!("LOWER({c}) LIKE ${n} ESCAPE '\\'"))
            .collect();
        self.clauses.push(format!("({})", any.join(" OR ")));
    }

    /// ` WHERE …` or the empty string.
    pub fn sql(&self) -> String {
        if self.clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", self.clauses.join(" AND "))
        }
    }

    /// Runs `SELECT COUNT(*) FROM <from><where>`.
    pub async fn count(&self, db: &sqlx::AnyPool, from: &str) -> Result<i64, sqlx::Error> {
        let sql = format!("SELECT COUNT(*) FROM {from}{}", self.sql());
        let mut q = sqlx::query_scalar::<_, i64>(&sql);
        for b in &self.binds {
            q = q.bind(b.clone());
        }
        q.fetch_one(db).await
    }

    /// Runs `<select><where><tail>` and returns the rows.
    pub async fn rows(
        &self,
        db: &sqlx::AnyPool,
        select: &str,
        tail: &str,
    ) -> Result<Vec<sqlx::any::AnyRow>, sqlx::Error> {
        let sql = format!("{select}{}{tail}", self.sql());
        let mut q = sqlx::query(&sql);
        for b in &self.binds {
            q = q.bind(b.clone());
        }
        q.fetch_all(db).await
    }
}

/// The zone `zone_id` names (or the oldest zone for `None` and CloudStack's `-1`).
pub async fn resolve_zone(pool: &sqlx::AnyPool, zone_id: Option<&str>) -> DomainResult<String> {
    match zone_id.filter(|z| *z != "-1") {
        Some(z) => {
            if !crate::util::is_uuid(z) {
                return Err(DomainError::Invalid(format!("Invalid zone id {z:?}")));
            }
            sqlx::query_scalar("SELECT id FROM zones WHERE id = $1")
                .bind(z.to_owned())
                .fetch_optional(pool)
                .await?
                .ok_or_else(|| DomainError::NotFound(format!("Unable to find zone by id {z}")))
        }
        None => sqlx::query_scalar("SELECT id FROM zones ORDER BY created, name LIMIT 1")
            .fetch_optional(pool)
            .await?
            .ok_or_else(|| DomainError::Invalid("No zone exists: create one first".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_numbers_placeholders() {
        let mut f = Filter::default();
        f.eq("id", "x");
        f.keyword(&["name", "dns1"], "A_b%C");
        assert_eq!(
            f.sql(),
            " WHERE id = $1 AND (LOWER(name) LIKE $2 ESCAPE '\\' OR LOWER(dns1) LIKE $2 ESCAPE '\\')"
        );
        assert_eq!(f.binds, vec!["x".to_owned(), "%a\\_b\\%c%".to_owned()]);
    }
}
