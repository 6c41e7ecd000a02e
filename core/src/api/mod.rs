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
pub mod configs;
pub mod consoles;
pub mod domains;
pub mod events;
pub mod image_stores;
pub mod infrastructure;
pub mod job_runner;
pub mod jobs;
pub mod systemvms;
pub mod tags;
pub mod template_properties;
pub mod templates;
pub mod users;
pub mod virtual_machines;
pub mod zones;

pub use crate::model::Filter;

/// The commands whose table is not in their resource's module yet.
static COMMANDS: &[Command] = &[
    Command {
        name: "createZone",
        description: "Creates a zone",
        is_async: false,
        leader: false,
        access: Access::ADMIN,
        params: zones::CREATE_ZONE,
        handler: handler!(zones::create_zone),
        response: None,
        before_login: false,
    },
    Command {
        name: "listZones",
        description: "Lists zones",
        is_async: false,
        leader: false,
        access: Access::ALL,
        params: zones::LIST_ZONES,
        handler: handler!(zones::list_zones),
        response: None,
        before_login: false,
    },
    Command::new(
        "updateZone",
        "Updates a zone: name, DNS servers, network domain, guest CIDR, allocation state",
        Access::ADMIN,
        zones::UPDATE_ZONE,
        handler!(zones::update_zone),
    ),
    Command {
        name: "deleteZone",
        description: "Deletes a zone",
        is_async: false,
        leader: false,
        access: Access::ADMIN,
        params: zones::DELETE_ZONE,
        handler: handler!(zones::delete_zone),
        response: None,
        before_login: false,
    },
    Command {
        name: "registerSystemVm",
        description: "Registers a system VM whose agent is started by hand; answers its id and its secret (shown once)",
        is_async: false,
        leader: false,
        access: Access::ADMIN,
        params: systemvms::REGISTER_SYSTEM_VM,
        handler: handler!(systemvms::register_system_vm),
        response: None,
        before_login: false,
    },
    Command {
        name: "listSystemVms",
        description: "Lists system VMs with their agent state",
        is_async: false,
        leader: false,
        access: Access::INFRA,
        params: systemvms::LIST_SYSTEM_VMS,
        handler: handler!(systemvms::list_system_vms),
        response: None,
        before_login: false,
    },
    Command {
        name: "addImageStore",
        description: "Adds a secondary storage (image) store: NFS",
        is_async: false,
        leader: false,
        access: Access::ADMIN,
        params: image_stores::ADD_IMAGE_STORE,
        handler: handler!(image_stores::add_image_store),
        response: None,
        before_login: false,
    },
    Command {
        name: "listImageStores",
        description: "Lists image stores with the capacity their storage VMs report",
        is_async: false,
        leader: false,
        access: Access::ADMIN,
        params: image_stores::LIST_IMAGE_STORES,
        handler: handler!(image_stores::list_image_stores),
        response: None,
        before_login: false,
    },
    Command {
        name: "deleteImageStore",
        description: "Deletes an image store that holds no templates",
        is_async: false,
        leader: false,
        access: Access::ADMIN,
        params: image_stores::DELETE_IMAGE_STORE,
        handler: handler!(image_stores::delete_image_store),
        response: None,
        before_login: false,
    },
    Command {
        name: "registerTemplate",
        description: "Registers a template from a URL: a storage VM downloads it into the zone's image store",
        is_async: false,
        leader: false,
        access: Access::ALL,
        params: templates::REGISTER_TEMPLATE,
        handler: handler!(templates::register_template),
        response: None,
        before_login: false,
    },
    Command {
        name: "registerIso",
        description: "Registers an ISO from a URL: a storage VM downloads it into the zone's image store",
        is_async: false,
        leader: false,
        access: Access::ALL,
        params: templates::REGISTER_ISO,
        handler: handler!(templates::register_iso),
        response: None,
        before_login: false,
    },
    Command {
        name: "listTemplates",
        description: "Lists templates with their download status",
        is_async: false,
        leader: false,
        access: Access::ALL,
        params: templates::LIST_TEMPLATES,
        handler: handler!(templates::list_templates),
        response: None,
        before_login: false,
    },
    Command {
        name: "listIsos",
        description: "Lists ISOs with their download status",
        is_async: false,
        leader: false,
        access: Access::ALL,
        params: templates::LIST_ISOS,
        handler: handler!(templates::list_isos),
        response: None,
        before_login: false,
    },
    Command {
        name: "deleteTemplate",
        description: "Deletes a template and its files on the image store",
        is_async: true,
        leader: true,
        access: Access::ALL,
        params: templates::DELETE_TEMPLATE,
        handler: handler!(templates::delete_template),
        response: None,
        before_login: false,
    },
    Command {
        name: "deleteIso",
        description: "Deletes an ISO and its files on the image store",
        is_async: true,
        leader: true,
        access: Access::ALL,
        params: templates::DELETE_TEMPLATE,
        handler: handler!(templates::delete_iso),
        response: None,
        before_login: false,
    },
    Command {
        name: "listCapacity",
        description: "Lists capacity: secondary storage (type 6) per zone, as the storage VMs report it",
        is_async: false,
        leader: false,
        access: Access::INFRA,
        params: capacity::LIST_CAPACITY,
        handler: handler!(capacity::list_capacity),
        response: None,
        before_login: false,
    },
    Command {
        name: "addConsoleTarget",
        description: "Adds a VM console core does not deploy (a VNC endpoint) so createConsoleEndpoint can open it",
        is_async: false,
        leader: false,
        access: Access::ADMIN,
        params: consoles::ADD_CONSOLE_TARGET,
        handler: handler!(consoles::add_console_target),
        response: None,
        before_login: false,
    },
    Command {
        name: "listConsoleTargets",
        description: "Lists the VM consoles core knows (a non-admin caller sees its own only); passwords are never shown",
        is_async: false,
        leader: false,
        access: Access::ALL,
        params: consoles::LIST_CONSOLE_TARGETS,
        handler: handler!(consoles::list_console_targets),
        response: None,
        before_login: false,
    },
    Command {
        name: "deleteConsoleTarget",
        description: "Removes a VM console",
        is_async: false,
        leader: false,
        access: Access::ADMIN,
        params: consoles::DELETE_CONSOLE_TARGET,
        handler: handler!(consoles::delete_console_target),
        response: None,
        before_login: false,
    },
    Command {
        name: "createConsoleEndpoint",
        description: "Creates a one-time console link for a VM through a console proxy",
        is_async: false,
        leader: false,
        access: Access::ALL,
        params: consoles::CREATE_CONSOLE_ENDPOINT,
        handler: handler!(consoles::create_console_endpoint),
        response: None,
        before_login: false,
    },
    Command {
        name: "rotateConsoleKeys",
        description: "Adds a new console-token key, makes it primary, retires keys older than the previous one, and pushes the set to every connected console proxy",
        is_async: false,
        leader: false,
        access: Access::ADMIN,
        params: &[],
        handler: handler!(consoles::rotate_console_keys),
        response: None,
        before_login: false,
    },
    Command {
        name: "startSystemVm",
        description: "Starts a system VM core manages",
        is_async: true,
        leader: true,
        access: Access::INFRA,
        params: systemvms::LIFECYCLE,
        handler: handler!(systemvms::start_system_vm),
        response: None,
        before_login: false,
    },
    Command {
        name: "stopSystemVm",
        description: "Stops a system VM core manages (core keeps it stopped)",
        is_async: true,
        leader: true,
        access: Access::INFRA,
        params: systemvms::LIFECYCLE,
        handler: handler!(systemvms::stop_system_vm),
        response: None,
        before_login: false,
    },
    Command {
        name: "rebootSystemVm",
        description: "Restarts a system VM core manages",
        is_async: true,
        leader: true,
        access: Access::INFRA,
        params: systemvms::LIFECYCLE,
        handler: handler!(systemvms::reboot_system_vm),
        response: None,
        before_login: false,
    },
    Command {
        name: "destroySystemVm",
        description: "Destroys a system VM core manages (the fleet policy may start a new one)",
        is_async: true,
        leader: true,
        access: Access::ADMIN,
        params: systemvms::LIFECYCLE,
        handler: handler!(systemvms::destroy_system_vm),
        response: None,
        before_login: false,
    },
    Command {
        name: "listEvents",
        description: "Lists fleet events: system VM starts, restarts and scaling decisions, newest first",
        is_async: false,
        leader: false,
        access: Access::ADMIN,
        params: events::LIST_EVENTS,
        handler: handler!(events::list_events),
        response: None,
        before_login: false,
    },
    Command {
        name: "listConfigurations",
        description: "Lists the global settings this service knows",
        is_async: false,
        leader: false,
        access: Access::ADMIN,
        params: configs::LIST_CONFIGURATIONS,
        handler: handler!(configs::list_configurations),
        response: None,
        before_login: false,
    },
    Command {
        name: "updateConfiguration",
        description: "Updates a global setting",
        is_async: false,
        leader: false,
        access: Access::ADMIN,
        params: configs::UPDATE_CONFIGURATION,
        handler: handler!(configs::update_configuration),
        response: None,
        before_login: false,
    },
    Command {
        name: "queryAsyncJobResult",
        description: "Retrieves the current status of an asynchronous job",
        is_async: false,
        leader: false,
        access: Access::ALL,
        params: jobs::QUERY_ASYNC_JOB_RESULT,
        handler: handler!(jobs::query_async_job_result),
        response: None,
        before_login: false,
    },
    Command {
        name: "listAsyncJobs",
        description: "Lists asynchronous jobs (a non-admin caller sees its own only)",
        is_async: false,
        leader: false,
        access: Access::ALL,
        params: jobs::LIST_ASYNC_JOBS,
        handler: handler!(jobs::list_async_jobs),
        response: None,
        before_login: false,
    },
    Command {
        name: "listApis",
        description: "Lists the APIs available to the caller",
        is_async: false,
        leader: false,
        access: Access::ALL,
        params: apis::LIST_APIS,
        handler: handler!(apis::list_apis),
        response: None,
        before_login: false,
    },
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
