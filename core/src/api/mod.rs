//! API commands, one file per resource, and the helpers list commands share.
//!
//! Invariants: list answers follow CloudStack's shape — `{"count":N,"<object>":[…]}` with `count`
//! the total number of matches, and `{}` when nothing matches; SQL filters bind their values.

use serde_json::{Map, Value, json};

use crate::command::{Access, Command};
use crate::handler;

pub mod accounts;
pub mod apis;
pub mod capacity;
pub mod catalogue;
pub mod certificates;
pub mod configs;
pub mod consoles;
pub mod copies;
pub mod created_templates;
pub mod domains;
pub mod events;
pub mod fields;
pub mod image_stores;
pub mod infrastructure;
pub mod job_runner;
pub mod jobs;
pub mod snapshots;
pub mod systemvms;
pub mod tags;
pub mod template_properties;
pub mod templates;
pub mod transfers;
pub mod upload_page;
pub mod users;
pub mod virtual_machines;
pub mod volumes;
pub mod zones;

pub use crate::model::Filter;

/// The commands whose table is not in their resource's module yet.
static COMMANDS: &[Command] = &[
    Command::new("createZone", "Creates a zone", Access::ADMIN, zones::CREATE_ZONE, handler!(zones::create_zone)).returns(fields::ZONE),
    Command::new("listZones", "Lists zones", Access::ALL, zones::LIST_ZONES, handler!(zones::list_zones)).returns(fields::ZONE),
    Command::new(
        "updateZone",
        "Updates a zone: name, DNS servers, network domain, guest CIDR, allocation state",
        Access::ADMIN,
        zones::UPDATE_ZONE,
        handler!(zones::update_zone),
    ).returns(fields::ZONE),
    Command::new("deleteZone", "Deletes a zone", Access::ADMIN, zones::DELETE_ZONE, handler!(zones::delete_zone)).returns(fields::SUCCESS),
    Command::new("registerSystemVm", "Registers a system VM whose agent is started by hand; answers its id and its secret (shown once)", Access::ADMIN, systemvms::REGISTER_SYSTEM_VM, handler!(systemvms::register_system_vm)).returns(fields::REGISTERED_SYSTEM_VM),
    Command::new("listSystemVms", "Lists system VMs with their agent state", Access::INFRA, systemvms::LIST_SYSTEM_VMS, handler!(systemvms::list_system_vms)).returns(fields::SYSTEM_VM),
    Command::new("registerTemplate", "Registers a template from a URL: a storage VM downloads it into the zone's image store", Access::ALL, templates::REGISTER_TEMPLATE, handler!(templates::register_template)).returns(fields::TEMPLATE),
    Command::new("registerIso", "Registers an ISO from a URL: a storage VM downloads it into the zone's image store", Access::ALL, templates::REGISTER_ISO, handler!(templates::register_iso)).returns(fields::TEMPLATE),
    Command::new("listTemplates", "Lists templates with their download status", Access::ALL, templates::LIST_TEMPLATES, handler!(templates::list_templates)).returns(fields::TEMPLATE),
    Command::new("listIsos", "Lists ISOs with their download status", Access::ALL, templates::LIST_ISOS, handler!(templates::list_isos)).returns(fields::TEMPLATE),
    Command::new("deleteTemplate", "Deletes a template and its files on the image store", Access::ALL, templates::DELETE_TEMPLATE, handler!(templates::delete_template)).on_leader().returns(fields::SUCCESS),
    Command::new("deleteIso", "Deletes an ISO and its files on the image store", Access::ALL, templates::DELETE_TEMPLATE, handler!(templates::delete_iso)).on_leader().returns(fields::SUCCESS),
    Command::new("listCapacity", "Lists capacity: secondary storage (type 6) per zone, as the storage VMs report it", Access::INFRA, capacity::LIST_CAPACITY, handler!(capacity::list_capacity)).returns(fields::CAPACITY),
    Command::new("addConsoleTarget", "Adds a VM console core does not deploy (a VNC endpoint) so createConsoleEndpoint can open it", Access::ADMIN, consoles::ADD_CONSOLE_TARGET, handler!(consoles::add_console_target)).returns(fields::CONSOLE_TARGET),
    Command::new("listConsoleTargets", "Lists the VM consoles core knows (a non-admin caller sees its own only); passwords are never shown", Access::ALL, consoles::LIST_CONSOLE_TARGETS, handler!(consoles::list_console_targets)).returns(fields::CONSOLE_TARGET),
    Command::new("deleteConsoleTarget", "Removes a VM console", Access::ADMIN, consoles::DELETE_CONSOLE_TARGET, handler!(consoles::delete_console_target)).returns(fields::SUCCESS),
    Command::new("createConsoleEndpoint", "Creates a one-time console link for a VM through a console proxy", Access::ALL, consoles::CREATE_CONSOLE_ENDPOINT, handler!(consoles::create_console_endpoint)).returns(fields::CONSOLE_ENDPOINT),
    Command::new("rotateConsoleKeys", "Adds a new console-token key, makes it primary, retires keys older than the previous one, and pushes the set to every connected console proxy", Access::ADMIN, &[], handler!(consoles::rotate_console_keys)).returns(fields::CONSOLE_KEYS),
    Command::new("startSystemVm", "Starts a system VM core manages", Access::INFRA, systemvms::LIFECYCLE, handler!(systemvms::start_system_vm)).on_leader().returns(fields::SYSTEM_VM),
    Command::new("stopSystemVm", "Stops a system VM core manages (core keeps it stopped)", Access::INFRA, systemvms::LIFECYCLE, handler!(systemvms::stop_system_vm)).on_leader().returns(fields::SYSTEM_VM),
    Command::new("rebootSystemVm", "Restarts a system VM core manages", Access::INFRA, systemvms::LIFECYCLE, handler!(systemvms::reboot_system_vm)).on_leader().returns(fields::SYSTEM_VM),
    Command::new("destroySystemVm", "Destroys a system VM core manages (the fleet policy may start a new one)", Access::ADMIN, systemvms::LIFECYCLE, handler!(systemvms::destroy_system_vm)).on_leader().returns(fields::SYSTEM_VM),
    Command::new("listEvents", "Lists fleet events: system VM starts, restarts and scaling decisions, newest first", Access::ADMIN, events::LIST_EVENTS, handler!(events::list_events)).returns(fields::EVENT),
    Command::new("listConfigurations", "Lists the global settings this service knows", Access::ADMIN, configs::LIST_CONFIGURATIONS, handler!(configs::list_configurations)).returns(fields::CONFIGURATION),
    Command::new("updateConfiguration", "Updates a global setting", Access::ADMIN, configs::UPDATE_CONFIGURATION, handler!(configs::update_configuration)).returns(fields::CONFIGURATION),
    Command::new("queryAsyncJobResult", "Retrieves the current status of an asynchronous job", Access::ALL, jobs::QUERY_ASYNC_JOB_RESULT, handler!(jobs::query_async_job_result)).returns(fields::ASYNC_JOB),
    Command::new("listAsyncJobs", "Lists asynchronous jobs (a non-admin caller sees its own only)", Access::ALL, jobs::LIST_ASYNC_JOBS, handler!(jobs::list_async_jobs)).returns(fields::ASYNC_JOB),
    Command::new("listApis", "Lists the APIs available to the caller", Access::ALL, apis::LIST_APIS, handler!(apis::list_apis)).returns(fields::API),
];

/// The command tables, one per resource module.
static TABLES: &[&[Command]] = &[
    accounts::COMMANDS,
    users::COMMANDS,
    domains::COMMANDS,
    catalogue::COMMANDS,
    infrastructure::COMMANDS,
    template_properties::COMMANDS,
    virtual_machines::COMMANDS,
    tags::COMMANDS,
    transfers::COMMANDS,
    copies::COMMANDS,
    volumes::COMMANDS,
    snapshots::COMMANDS,
    created_templates::COMMANDS,
    certificates::COMMANDS,
    image_stores::COMMANDS,
    COMMANDS,
];

/// Every command (see [`crate::command`]), in `listApis` order.
pub fn table() -> &'static [Command] {
    static ALL: std::sync::LazyLock<Vec<Command>> =
        std::sync::LazyLock::new(|| TABLES.iter().flat_map(|t| t.iter().copied()).collect());
    &ALL
}

/// Looks a command up by its exact name.
pub fn find(name: &str) -> Option<&'static Command> {
    table().iter().find(|c| c.name == name)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Params;
    use crate::state::Role;

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
    fn table_is_consistent() {
        let mut names: Vec<&str> = table().iter().map(|c| c.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "duplicate command names");
        for c in table() {
            for p in c.params {
                assert_eq!(p.name, p.name.to_ascii_lowercase(), "{}: {}", c.name, p.name);
            }
        }
    }

    #[test]
    fn leader_commands_are_async() {
        for c in table().iter().filter(|c| c.leader) {
            assert!(c.is_async, "{} runs on the leader, so it must be async", c.name);
        }
        for name in [
            "startSystemVm",
            "stopSystemVm",
            "rebootSystemVm",
            "destroySystemVm",
            "deleteTemplate",
            "deleteIso",
        ] {
            assert!(find(name).unwrap().leader, "{name}");
        }
    }

    #[test]
    fn read_only_is_limited_by_name() {
        let list = find("listZones").unwrap();
        let create = find("createZone").unwrap();
        let keys = find("registerUserKeys").unwrap();
        assert!(list.allowed(Role::ReadOnlyUser) && list.allowed(Role::ReadOnlyAdmin));
        assert!(!create.allowed(Role::ReadOnlyAdmin) && !create.allowed(Role::User));
        assert!(keys.allowed(Role::User) && !keys.allowed(Role::ReadOnlyUser));
    }

    #[test]
    fn missing_parameter_message() {
        let e = find("createZone")
            .unwrap()
            .validate(&Params::default())
            .unwrap_err();
        assert_eq!(e.code, 431);
        assert!(
            e.text
                .starts_with("Unable to execute API command createzone due to missing parameter ")
        );
    }
}
