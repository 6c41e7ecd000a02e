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
pub mod consoles;
pub mod events;
pub mod jobs;
pub mod systemvms;
pub mod templates;
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
        name: "addImageStore",
        description: "Adds a secondary storage (image) store: NFS",
        is_async: false,
        access: Access::Admin,
        params: templates::ADD_IMAGE_STORE,
        handler: handler!(templates::add_image_store),
    },
    Command {
        name: "listImageStores",
        description: "Lists image stores with the capacity their storage VMs report",
        is_async: false,
        access: Access::Admin,
        params: templates::LIST_IMAGE_STORES,
        handler: handler!(templates::list_image_stores),
    },
    Command {
        name: "deleteImageStore",
        description: "Deletes an image store that holds no templates",
        is_async: false,
        access: Access::Admin,
        params: templates::DELETE_IMAGE_STORE,
        handler: handler!(templates::delete_image_store),
    },
    Command {
        name: "registerTemplate",
        description: "Registers a template from a URL: a storage VM downloads it into the zone's image store",
        is_async: false,
        access: Access::Any,
        params: templates::REGISTER_TEMPLATE,
        handler: handler!(templates::register_template),
    },
    Command {
        name: "registerIso",
        description: "Registers an ISO from a URL: a storage VM downloads it into the zone's image store",
        is_async: false,
        access: Access::Any,
        params: templates::REGISTER_ISO,
        handler: handler!(templates::register_iso),
    },
    Command {
        name: "listTemplates",
        description: "Lists templates with their download status",
        is_async: false,
        access: Access::Any,
        params: templates::LIST_TEMPLATES,
        handler: handler!(templates::list_templates),
    },
    Command {
        name: "listIsos",
        description: "Lists ISOs with their download status",
        is_async: false,
        access: Access::Any,
        params: templates::LIST_ISOS,
        handler: handler!(templates::list_isos),
    },
    Command {
        name: "deleteTemplate",
        description: "Deletes a template and its files on the image store",
        is_async: true,
        access: Access::Any,
        params: templates::DELETE_TEMPLATE,
        handler: handler!(templates::delete_template),
    },
    Command {
        name: "deleteIso",
        description: "Deletes an ISO and its files on the image store",
        is_async: true,
        access: Access::Any,
        params: templates::DELETE_TEMPLATE,
        handler: handler!(templates::delete_iso),
    },
    Command {
        name: "listCapacity",
        description: "Lists capacity: secondary storage (type 6) per zone, as the storage VMs report it",
        is_async: false,
        access: Access::Admin,
        params: templates::LIST_CAPACITY,
        handler: handler!(templates::list_capacity),
    },
    Command {
        name: "addConsoleTarget",
        description: "Adds a VM console core does not deploy (a VNC endpoint) so createConsoleEndpoint can open it",
        is_async: false,
        access: Access::Admin,
        params: consoles::ADD_CONSOLE_TARGET,
        handler: handler!(consoles::add_console_target),
    },
    Command {
        name: "listConsoleTargets",
        description: "Lists the VM consoles core knows (a non-admin caller sees its own only); passwords are never shown",
        is_async: false,
        access: Access::Any,
        params: consoles::LIST_CONSOLE_TARGETS,
        handler: handler!(consoles::list_console_targets),
    },
    Command {
        name: "deleteConsoleTarget",
        description: "Removes a VM console",
        is_async: false,
        access: Access::Admin,
        params: consoles::DELETE_CONSOLE_TARGET,
        handler: handler!(consoles::delete_console_target),
    },
    Command {
        name: "createConsoleEndpoint",
        description: "Creates a one-time console link for a VM through a console proxy",
        is_async: false,
        access: Access::Any,
        params: consoles::CREATE_CONSOLE_ENDPOINT,
        handler: handler!(consoles::create_console_endpoint),
    },
    Command {
        name: "rotateConsoleKeys",
        description: "Adds a new console-token key, makes it primary, retires keys older than the previous one, and pushes the set to every connected console proxy",
        is_async: false,
        access: Access::Admin,
        params: &[],
        handler: handler!(consoles::rotate_console_keys),
    },
    Command {
        name: "startSystemVm",
        description: "Starts a system VM core manages",
        is_async: true,
        access: Access::Admin,
        params: systemvms::LIFECYCLE,
        handler: handler!(systemvms::start_system_vm),
    },
    Command {
        name: "stopSystemVm",
        description: "Stops a system VM core manages (core keeps it stopped)",
        is_async: true,
        access: Access::Admin,
        params: systemvms::LIFECYCLE,
        handler: handler!(systemvms::stop_system_vm),
    },
    Command {
        name: "rebootSystemVm",
        description: "Restarts a system VM core manages",
        is_async: true,
        access: Access::Admin,
        params: systemvms::LIFECYCLE,
        handler: handler!(systemvms::reboot_system_vm),
    },
    Command {
        name: "destroySystemVm",
        description: "Destroys a system VM core manages (the fleet policy may start a new one)",
        is_async: true,
        access: Access::Admin,
        params: systemvms::LIFECYCLE,
        handler: handler!(systemvms::destroy_system_vm),
    },
    Command {
        name: "listEvents",
        description: "Lists fleet events: system VM starts, restarts and scaling decisions, newest first",
        is_async: false,
        access: Access::Admin,
        params: events::LIST_EVENTS,
        handler: handler!(events::list_events),
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

    /// Adds "owned by `account_id`, or public" (templates).
    pub fn own_or_public(&mut self, account_id: &str) {
        self.binds.push(account_id.to_owned());
        self.clauses.push(format!(
            "(t.account_id = ${} OR t.is_public = 1)",
            self.binds.len()
        ));
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
