//! Mold's predefined roles and how a role decides whether it may call a command.
//!
//! A role has a type (CloudStack's `RoleType`: Admin, ResourceAdmin, DomainAdmin, User) and an
//! ordered list of rules (`name` patterns with `*` wildcards, allow or deny). The decision is
//! CloudStack's `DynamicRoleBasedAPIAccessChecker`: the Root Admin may call everything; otherwise
//! the first rule whose pattern matches the command decides; when none matches, the command's
//! own list of authorized role types decides (CloudStack's `@APICommand(authorized = …)`, here
//! [`Access`] in the command table).
//!
//! Invariants: the eight roles and their ids are fixed (ids are stable across installs, so
//! scripts may name them); the read-only and support roles end with a deny-all rule, so no
//! command reaches them through the fallback; a role's account type follows its role type.

/// CloudStack's role type: what a role is at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleType {
    /// The whole cloud.
    Admin,
    /// Infrastructure inside a domain tree.
    ResourceAdmin,
    /// Accounts and resources inside a domain tree.
    DomainAdmin,
    /// One account's own resources.
    User,
}

impl RoleType {
    /// The name `listRoles` and `listAccounts` answer (`roletype`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "Admin",
            Self::ResourceAdmin => "ResourceAdmin",
            Self::DomainAdmin => "DomainAdmin",
            Self::User => "User",
        }
    }

    /// Parses a role type name (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Admin, Self::ResourceAdmin, Self::DomainAdmin, Self::User]
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
    }

    /// CloudStack's `accounttype`: 0 user, 1 admin, 2 domain admin, 3 resource admin.
    pub fn account_type(self) -> i64 {
        match self {
            Self::User => 0,
            Self::Admin => 1,
            Self::DomainAdmin => 2,
            Self::ResourceAdmin => 3,
        }
    }

    /// The role type of an `accounttype` (0–3).
    pub fn from_account_type(t: i64) -> Option<Self> {
        match t {
            0 => Some(Self::User),
            1 => Some(Self::Admin),
            2 => Some(Self::DomainAdmin),
            3 => Some(Self::ResourceAdmin),
            _ => None,
        }
    }

    fn bit(self) -> u8 {
        match self {
            Self::Admin => 1,
            Self::ResourceAdmin => 2,
            Self::DomainAdmin => 4,
            Self::User => 8,
        }
    }
}

/// The role types a command authorizes when no rule of the caller's role matches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access(u8);

impl Access {
    /// Admin role types only (the whole cloud: zones, settings, image stores).
    pub const ADMIN: Access = Access(1);
    /// Admins and resource admins (infrastructure: system VMs, hosts, capacity).
    pub const INFRA: Access = Access(1 | 2);
    /// Admins and domain admins (domains).
    pub const DOMAIN: Access = Access(1 | 4);
    /// Every admin role type (accounts and users of a domain tree).
    pub const ADMINS: Access = Access(1 | 2 | 4);
    /// Every role type.
    pub const ALL: Access = Access(1 | 2 | 4 | 8);

    /// Whether `t` is authorized.
    pub fn includes(self, t: RoleType) -> bool {
        self.0 & t.bit() != 0
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// The command may be called.
    Allow,
    /// It may not.
    Deny,
}

impl Permission {
    /// `listRolePermissions`' `permission` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// One rule: a command name pattern (`*` matches any run of characters) and its permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// The pattern, e.g. `list*`.
    pub rule: &'static str,
    /// What a match means.
    pub permission: Permission,
    /// What it is for.
    pub description: &'static str,
}

const fn allow(rule: &'static str, description: &'static str) -> Rule {
    Rule {
        rule,
        permission: Permission::Allow,
        description,
    }
}

const fn deny(rule: &'static str, description: &'static str) -> Rule {
    Rule {
        rule,
        permission: Permission::Deny,
        description,
    }
}

/// Whether `pattern` (with `*` wildcards) matches all of `name`, ignoring ASCII case as
/// CloudStack's `Rule` does.
pub fn matches(pattern: &str, name: &str) -> bool {
    let (pattern, name) = (pattern.to_ascii_lowercase(), name.to_ascii_lowercase());
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.as_str().strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the whole name.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Read-Only Admin's and Read-Only User's rules (CloudStack 4.15's seed): lists and reads, no
/// upload links, then nothing else.
const READ_ONLY: &[Rule] = &[
    allow("list*", "Lists"),
    deny("getUploadParamsFor*", "No uploads"),
    allow("get*", "Reads"),
    allow("cloudianIsEnabled", "Read by the UI at start"),
    allow("queryAsyncJobResult", "Async job results"),
    deny("*", "Nothing else"),
];

/// Support Admin: read-only, plus operating VMs and ISOs and registering templates and ISOs
/// (CloudStack's seed), plus starting, stopping and rebooting system VMs (ours).
const SUPPORT_ADMIN: &[Rule] = &[
    allow("list*", "Lists"),
    allow("get*", "Reads"),
    allow("cloudianIsEnabled", "Read by the UI at start"),
    allow("queryAsyncJobResult", "Async job results"),
    allow("startVirtualMachine", "Start VMs"),
    allow("stopVirtualMachine", "Stop VMs"),
    allow("rebootVirtualMachine", "Reboot VMs"),
    allow("attachIso", "Attach ISOs"),
    allow("detachIso", "Detach ISOs"),
    allow("registerTemplate", "Register templates"),
    allow("registerIso", "Register ISOs"),
    allow("startSystemVm", "Start system VMs"),
    allow("stopSystemVm", "Stop system VMs"),
    allow("rebootSystemVm", "Reboot system VMs"),
    allow("createConsoleEndpoint", "Open consoles"),
    deny("*", "Nothing else: no other create, update or delete"),
];

/// Support User: read-only on its account, plus operating its VMs and ISOs, registering and
/// uploading templates and ISOs (CloudStack's seed).
const SUPPORT_USER: &[Rule] = &[
    allow("list*", "Lists"),
    allow("get*", "Reads"),
    allow("cloudianIsEnabled", "Read by the UI at start"),
    allow("queryAsyncJobResult", "Async job results"),
    allow("startVirtualMachine", "Start VMs"),
    allow("stopVirtualMachine", "Stop VMs"),
    allow("rebootVirtualMachine", "Reboot VMs"),
    allow("attachIso", "Attach ISOs"),
    allow("detachIso", "Detach ISOs"),
    allow("registerTemplate", "Register templates"),
    allow("registerIso", "Register ISOs"),
    allow("createConsoleEndpoint", "Open consoles"),
    deny("*", "Nothing else: no other create, update or delete"),
];

/// One of Mold's predefined roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    RootAdmin,
    /// Infrastructure, read and operate.
    ResourceAdmin,
    /// Accounts and resources of a domain tree.
    DomainAdmin,
    /// One account's resources.
    User,
    /// Reads everything, changes nothing.
    ReadOnlyAdmin,
    /// Reads its own account, changes nothing.
    ReadOnlyUser,
    /// Reads everything; starts, stops and reboots.
    SupportAdmin,
    /// Reads its own account; starts, stops and reboots its VMs.
    SupportUser,
}

impl Role {
    /// Every predefined role, in `listRoles` order.
    pub const ALL: [Role; 8] = [
        Self::RootAdmin,
        Self::ResourceAdmin,
        Self::DomainAdmin,
        Self::User,
        Self::ReadOnlyAdmin,
        Self::ReadOnlyUser,
        Self::SupportAdmin,
        Self::SupportUser,
    ];

    /// The stable id.
    pub fn id(self) -> &'static str {
        match self {
            Self::RootAdmin => "00000000-0000-4000-8100-000000000001",
            Self::ResourceAdmin => "00000000-0000-4000-8100-000000000002",
            Self::DomainAdmin => "00000000-0000-4000-8100-000000000003",
            Self::User => "00000000-0000-4000-8100-000000000004",
            Self::ReadOnlyAdmin => "00000000-0000-4000-8100-000000000005",
            Self::ReadOnlyUser => "00000000-0000-4000-8100-000000000006",
            Self::SupportAdmin => "00000000-0000-4000-8100-000000000007",
            Self::SupportUser => "00000000-0000-4000-8100-000000000008",
        }
    }

    /// The name CloudStack gives it.
    pub fn name(self) -> &'static str {
        match self {
            Self::RootAdmin => "Root Admin",
            Self::ResourceAdmin => "Resource Admin",
            Self::DomainAdmin => "Domain Admin",
            Self::User => "User",
            Self::ReadOnlyAdmin => "Read-Only Admin - Default",
            Self::ReadOnlyUser => "Read-Only User - Default",
            Self::SupportAdmin => "Support Admin - Default",
            Self::SupportUser => "Support User - Default",
        }
    }

    /// What it is for (`listRoles` `description`).
    pub fn description(self) -> &'static str {
        match self {
            Self::RootAdmin => "Default root admin role",
            Self::ResourceAdmin => "Default resource admin role",
            Self::DomainAdmin => "Default domain admin role",
            Self::User => "Default user role",
            Self::ReadOnlyAdmin => "Default read-only admin role",
            Self::ReadOnlyUser => "Default read-only user role",
            Self::SupportAdmin => "Default support admin role",
            Self::SupportUser => "Default support user role",
        }
    }

    /// Its role type.
    pub fn role_type(self) -> RoleType {
        match self {
            Self::RootAdmin | Self::ReadOnlyAdmin | Self::SupportAdmin => RoleType::Admin,
            Self::ResourceAdmin => RoleType::ResourceAdmin,
            Self::DomainAdmin => RoleType::DomainAdmin,
            Self::User | Self::ReadOnlyUser | Self::SupportUser => RoleType::User,
        }
    }

    /// CloudStack's `accounttype` of an account with this role.
    pub fn account_type(self) -> i64 {
        self.role_type().account_type()
    }

    /// Its rules, in the order they are tried.
    pub fn rules(self) -> &'static [Rule] {
        const ROOT: &[Rule] = &[allow("*", "Everything")];
        match self {
            Self::RootAdmin => ROOT,
            // CloudStack seeds these three with per-command allow lists; here the commands'
            // own `Access` is that list (see `permits`).
            Self::ResourceAdmin | Self::DomainAdmin | Self::User => &[],
            Self::ReadOnlyAdmin | Self::ReadOnlyUser => READ_ONLY,
            Self::SupportAdmin => SUPPORT_ADMIN,
            Self::SupportUser => SUPPORT_USER,
        }
    }

    /// The ids of the roles whose `accounttype` is `t` (as given: `listAccounts accounttype=`).
    pub fn ids_with_account_type(t: &str) -> Vec<&'static str> {
        Self::ALL
            .iter()
            .filter(|r| r.account_type().to_string() == t)
            .map(|r| r.id())
            .collect()
    }

    /// The role with this id.
    pub fn by_id(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.id() == id)
    }

    /// The role named `name` (case-insensitive).
    pub fn by_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|r| r.name().eq_ignore_ascii_case(name))
    }

    /// The default role of a role type (`createAccount accounttype=` without `roleid`).
    pub fn default_of(t: RoleType) -> Self {
        match t {
            RoleType::Admin => Self::RootAdmin,
            RoleType::ResourceAdmin => Self::ResourceAdmin,
            RoleType::DomainAdmin => Self::DomainAdmin,
            RoleType::User => Self::User,
        }
    }

    /// Whether this role may call `command`, which authorizes `access` (see the module doc).
    pub fn permits(self, command: &str, access: Access) -> bool {
        if self == Self::RootAdmin {
            return true;
        }
        match self.rules().iter().find(|r| matches(r.rule, command)) {
            Some(r) => r.permission == Permission::Allow,
            None => access.includes(self.role_type()),
        }
    }

    /// Whether it acts on the whole cloud (Admin role type): it sees every domain.
    pub fn is_admin(self) -> bool {
        self.role_type() == RoleType::Admin
    }

    /// Whether it may read accounts other than its own (admin role types).
    pub fn sees_other_accounts(self) -> bool {
        self.role_type() != RoleType::User
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(matches("*", "listZones") && matches("*", ""));
        assert!(matches("list*", "listZones") && !matches("list*", "deleteZone"));
        assert!(matches("*Zone", "deleteZone") && !matches("*Zone", "listZones"));
        assert!(matches("l*t*s", "listZones") && !matches("l*x*s", "listZones"));
        assert!(matches("login", "login") && !matches("login", "logout"));
        assert!(matches("list*", "LISTZONES"), "case-insensitive");
        assert!(!matches("a*a", "a"), "the parts may not overlap");
    }

    #[test]
    fn decisions() {
        use Role::*;
        for r in Role::ALL {
            assert!(r.permits("listZones", Access::ALL), "{r:?}");
        }
        assert!(RootAdmin.permits("updateConfiguration", Access::ADMIN));
        assert!(!DomainAdmin.permits("updateConfiguration", Access::ADMIN));
        assert!(DomainAdmin.permits("createAccount", Access::ADMINS));
        assert!(!DomainAdmin.permits("listSystemVms", Access::INFRA));
        assert!(!User.permits("createAccount", Access::ADMINS));
        assert!(User.permits("registerTemplate", Access::ALL));
        for ro in [ReadOnlyAdmin, ReadOnlyUser] {
            assert!(!ro.permits("registerTemplate", Access::ALL));
            assert!(!ro.permits("stopSystemVm", Access::INFRA));
            assert!(!ro.permits("getUploadParamsForTemplate", Access::ALL));
            assert!(ro.permits("getUserKeys", Access::ALL));
            assert!(ro.permits("queryAsyncJobResult", Access::ALL));
        }
        assert!(SupportAdmin.permits("stopSystemVm", Access::INFRA));
        assert!(SupportAdmin.permits("registerIso", Access::ALL));
        assert!(!SupportAdmin.permits("destroySystemVm", Access::INFRA));
        assert!(!SupportAdmin.permits("createAccount", Access::ADMINS));
        assert!(!SupportAdmin.permits("deleteTemplate", Access::ALL));
        assert!(!SupportUser.permits("stopSystemVm", Access::INFRA));
        assert!(!SupportUser.permits("deleteTemplate", Access::ALL));
        assert!(ResourceAdmin.permits("stopSystemVm", Access::INFRA));
        assert!(!ResourceAdmin.permits("deleteZone", Access::ADMIN));
        assert!(!ResourceAdmin.permits("createDomain", Access::DOMAIN));
        assert!(ResourceAdmin.permits("createAccount", Access::ADMINS));
    }

    #[test]
    fn ids_and_names_are_unique_and_types_match_account_types() {
        for r in Role::ALL {
            assert_eq!(Role::by_id(r.id()), Some(r));
            assert_eq!(Role::by_name(r.name()), Some(r));
            assert_eq!(RoleType::from_account_type(r.account_type()), Some(r.role_type()));
        }
    }
}
