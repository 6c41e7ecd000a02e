//! API commands, one file per resource, and the helpers list commands share.
//!
//! Invariants: list answers follow CloudStack's shape — `{"count":N,"<object>":[…]}` with `count`
//! the total number of matches, and `{}` when nothing matches; SQL filters bind their values.

use serde_json::{Map, Value, json};

use crate::command::{Access, Command};
use crate::handler;

pub mod accounts;
pub mod apis;
pub mod configs;
pub mod jobs;
pub mod systemvms;
pub mod zones;

/// Every command (see [`crate::command`]).
pub static COMMANDS: &[Command] = &[
    Command {
        name: "createAccount",
        description: "Creates an account with one user",
        is_async: false,
        access: Access::Admin,
        params: accounts::CREATE_ACCOUNT,
        handler: handler!(accounts::create_account),
    },
    Command {
        name: "listAccounts",
        description: "Lists accounts (a non-admin caller sees its own only)",
        is_async: false,
        access: Access::Any,
        params: accounts::LIST_ACCOUNTS,
        handler: handler!(accounts::list_accounts),
    },
    Command {
        name: "deleteAccount",
        description: "Deletes an account and its users",
        is_async: true,
        access: Access::Admin,
        params: accounts::DELETE_ACCOUNT,
        handler: handler!(accounts::delete_account),
    },
    Command {
        name: "listUsers",
        description: "Lists users (a non-admin caller sees its own account's only)",
        is_async: false,
        access: Access::Any,
        params: accounts::LIST_USERS,
        handler: handler!(accounts::list_users),
    },
    Command {
        name: "registerUserKeys",
        description: "Generates a new API key and secret key for a user",
        is_async: false,
        access: Access::Any,
        params: accounts::REGISTER_USER_KEYS,
        handler: handler!(accounts::register_user_keys),
    },
    Command {
        name: "createZone",
        description: "Creates a zone",
        is_async: false,
        access: Access::Admin,
        params: zones::CREATE_ZONE,
        handler: handler!(zones::create_zone),
    },
    Command {
        name: "listZones",
        description: "Lists zones",
        is_async: false,
        access: Access::Any,
        params: zones::LIST_ZONES,
        handler: handler!(zones::list_zones),
    },
    Command {
        name: "deleteZone",
        description: "Deletes a zone",
        is_async: false,
        access: Access::Admin,
        params: zones::DELETE_ZONE,
        handler: handler!(zones::delete_zone),
    },
    Command {
        name: "registerSystemVm",
        description: "Registers a system VM whose agent is started by hand; answers its id and its secret (shown once)",
        is_async: false,
        access: Access::Admin,
        params: systemvms::REGISTER_SYSTEM_VM,
        handler: handler!(systemvms::register_system_vm),
    },
    Command {
        name: "listSystemVms",
        description: "Lists system VMs with their agent state",
        is_async: false,
        access: Access::Admin,
        params: systemvms::LIST_SYSTEM_VMS,
        handler: handler!(systemvms::list_system_vms),
    },
    Command {
        name: "listConfigurations",
        description: "Lists the global settings this service knows",
        is_async: false,
        access: Access::Admin,
        params: configs::LIST_CONFIGURATIONS,
        handler: handler!(configs::list_configurations),
    },
    Command {
        name: "updateConfiguration",
        description: "Updates a global setting",
        is_async: false,
        access: Access::Admin,
        params: configs::UPDATE_CONFIGURATION,
        handler: handler!(configs::update_configuration),
    },
    Command {
        name: "queryAsyncJobResult",
        description: "Retrieves the current status of an asynchronous job",
        is_async: false,
        access: Access::Any,
        params: jobs::QUERY_ASYNC_JOB_RESULT,
        handler: handler!(jobs::query_async_job_result),
    },
    Command {
        name: "listAsyncJobs",
        description: "Lists asynchronous jobs (a non-admin caller sees its own only)",
        is_async: false,
        access: Access::Any,
        params: jobs::LIST_ASYNC_JOBS,
        handler: handler!(jobs::list_async_jobs),
    },
    Command {
        name: "listApis",
        description: "Lists the APIs available to the caller",
        is_async: false,
        access: Access::Any,
        params: apis::LIST_APIS,
        handler: handler!(apis::list_apis),
    },
];

/// A list answer as CloudStack serializes it: `count` only when non-zero, the array only when
/// non-empty — so `{}` for no match and `{"count": N}` for a page past the end.
pub fn list_response(key: &str, total: i64, items: Vec<Value>) -> Value {
    let mut m = Map::new();
    if total != 0 {
        m.insert("count".into(), json!(total));
    }
    if !items.is_empty() {
        m.insert(key.into(), Value::Array(items));
    }
    Value::Object(m)
}

/// `{"success": true}`.
pub fn success() -> Value {
    json!({ "success": true })
}

/// A `WHERE` clause built from bound text values.
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

    /// Adds a case-insensitive substring match of `keyword` on any of `cols` (`%`, `_` and backslash
    /// in the keyword match themselves).
    pub fn keyword(&mut self, cols: &[&str], keyword: &str) {
        let escaped = keyword
            .to_lowercase()
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        self.binds.push(format!("%{escaped}%"));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_list_is_an_empty_object() {
        assert_eq!(list_response("zone", 0, vec![]), json!({}));
        assert_eq!(list_response("zone", 4, vec![]), json!({"count": 4}));
        assert_eq!(
            list_response("zone", 3, vec![json!({"id":"a"})]),
            json!({"count":3,"zone":[{"id":"a"}]})
        );
    }

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
