//! The response fields `listApis` shows for each command (CloudMonkey completes `filter=` from
//! them), one list per object kind, next to nothing else.
//!
//! Invariant: every field an answer of a command carries is in its list (the `api_shapes`
//! scenario of `tests/e2e/directory.rs` compares real answers with these lists).

/// `(name, description)` of response fields.
pub type Fields = &'static [(&'static str, &'static str)];

/// `fields` followed by the resource limits answered as CloudStack's (always `Unlimited` here).
macro_rules! with_limits {
    ($($field:expr),* $(,)?) => {
        [
            $($field,)*
            ("vmlimit", "the total number of VMs that can be deployed"),
            ("vmtotal", "the total number of VMs deployed"),
            ("vmavailable", "the total number of VMs available to be created"),
            ("templatelimit", "the total number of templates that can be created"),
            ("templateavailable", "the total number of templates available to be created"),
            ("secondarystoragelimit", "the total secondary storage space (in GiB) that can be used"),
            ("secondarystorageavailable", "the total secondary storage space (in GiB) available"),
        ]
    };
}

/// A user.
pub const USER: Fields = &[
    ("id", "the user ID"),
    ("username", "the user name"),
    ("firstname", "the user firstname"),
    ("lastname", "the user lastname"),
    ("email", "the user email address"),
    ("created", "the date and time the user account was created"),
    ("state", "the user state: enabled, disabled or locked"),
    ("account", "the account name of the user"),
    ("accountid", "the account ID of the user"),
    ("accounttype", "the account type of the user"),
    ("roleid", "the ID of the role"),
    ("roletype", "the type of the role"),
    ("rolename", "the name of the role"),
    ("domain", "the domain name of the user"),
    ("domainid", "the domain ID of the user"),
    ("domainpath", "the path of the domain"),
    ("timezone", "the timezone user was created in"),
    (
        "iscallerchilddomain",
        "the boolean value representing if the updating target is in caller's child domain",
    ),
    ("isdefault", "true if user is default, false otherwise"),
    ("usersource", "the source type of the user: native"),
    (
        "is2faenabled",
        "true if user has two factor authentication enabled",
    ),
    ("apikey", "the api key of the user"),
];

/// An account.
pub const ACCOUNT: Fields = &with_limits!(
    ("id", "the id of the account"),
    ("name", "the name of the account"),
    ("accounttype", "account type (admin, domain-admin, user)"),
    ("roleid", "the ID of the role"),
    (
        "roletype",
        "the type of the role (Admin, ResourceAdmin, DomainAdmin, User)",
    ),
    ("rolename", "the name of the role"),
    ("state", "the state of the account"),
    ("created", "the date when this account was created"),
    ("domain", "name of the Domain the account belongs to"),
    ("domainid", "id of the Domain the account belongs to"),
    ("domainpath", "path of the Domain the account belongs to"),
    ("networkdomain", "the network domain"),
    ("isdefault", "true if account is default, false otherwise"),
    ("iscleanuprequired", "true if the account requires cleanup"),
    ("user", "the list of users associated with account"),
    (
        "secondarystoragetotal",
        "the total secondary storage space (in GiB) owned by account"
    ),
);

/// A domain.
pub const DOMAIN: Fields = &with_limits!(
    ("id", "the ID of the domain"),
    ("name", "the name of the domain"),
    ("level", "the level of the domain"),
    ("parentdomainid", "the domain ID of the parent domain"),
    ("parentdomainname", "the domain name of the parent domain"),
    ("haschild", "whether the domain has one or more sub-domains"),
    ("path", "the path of the domain"),
    ("networkdomain", "the network domain"),
    ("state", "the state of the domain"),
    ("created", "the date when this domain was created"),
);

/// A role.
pub const ROLE: Fields = &[
    ("id", "the ID of the role"),
    ("name", "the name of the role"),
    ("type", "the type of the role"),
    ("description", "the description of the role"),
    ("isdefault", "true if role is default, false otherwise"),
    (
        "ispublic",
        "Indicates whether the role will be visible to all users (public) or only to root admins (private)",
    ),
    ("state", "the state of the role"),
];

/// A rule of a role.
pub const ROLE_PERMISSION: Fields = &[
    ("id", "the ID of the role permission"),
    (
        "roleid",
        "the ID of the role to which the role permission belongs",
    ),
    (
        "rolename",
        "the name of the role to which the role permission belongs",
    ),
    ("rule", "the api name or wildcard rule"),
    (
        "permission",
        "the permission type of the api name or wildcard rule, allow/deny",
    ),
    ("description", "the description of the role permission"),
];

/// A key pair.
pub const USER_KEYS: Fields = &[
    ("apikey", "the api key of the registered user"),
    ("secretkey", "the secret key of the registered user"),
];

/// `{"success": true}`.
pub const SUCCESS: Fields = &[
    ("success", "true if operation is executed successfully"),
    ("displaytext", "any text associated with the success or failure"),
];

/// An async job's id (async commands answer it first).
pub const JOB_ID: Fields = &[("jobid", "the ID of the asynchronous job")];

/// A zone.
pub const ZONE: Fields = &[
    ("id", "Zone id"),
    ("name", "Zone name"),
    (
        "networktype",
        "the network type of the zone; can be Basic or Advanced",
    ),
    ("allocationstate", "the allocation state of the zone"),
    ("dns1", "the first DNS for the Zone"),
    ("dns2", "the second DNS for the Zone"),
    ("internaldns1", "the first internal DNS for the Zone"),
    ("internaldns2", "the second internal DNS for the Zone"),
    ("ip6dns1", "the first IPv6 DNS for the Zone"),
    ("ip6dns2", "the second IPv6 DNS for the Zone"),
    ("domain", "Network domain name for the networks in the zone"),
    ("guestcidraddress", "the guest CIDR address for the Zone"),
    (
        "securitygroupsenabled",
        "true if security groups support is enabled, false otherwise",
    ),
    (
        "localstorageenabled",
        "true if local storage offering enabled, false otherwise",
    ),
    ("dhcpprovider", "the dhcp Provider for the Zone"),
    ("type", "The type of the zone; can be Core or Edge"),
    ("tags", "the list of resource tags associated with zone."),
    ("hasannotations", "true if the entity/resource has annotations"),
    ("created", "the date this zone was created"),
    (
        "systemvmdriver",
        "how core deploys the zone's system VMs (ours; root admins only)",
    ),
];

/// A zone with its metrics (`listZonesMetrics`).
pub const ZONE_METRICS: Fields = &[
    ("id", "Zone id"),
    ("name", "Zone name"),
    ("networktype", "the network type of the zone"),
    ("allocationstate", "the allocation state of the zone"),
    ("dns1", "the first DNS for the Zone"),
    ("dns2", "the second DNS for the Zone"),
    ("internaldns1", "the first internal DNS for the Zone"),
    ("internaldns2", "the second internal DNS for the Zone"),
    ("ip6dns1", "the first IPv6 DNS for the Zone"),
    ("ip6dns2", "the second IPv6 DNS for the Zone"),
    ("domain", "Network domain name for the networks in the zone"),
    ("guestcidraddress", "the guest CIDR address for the Zone"),
    (
        "securitygroupsenabled",
        "true if security groups support is enabled",
    ),
    ("localstorageenabled", "true if local storage offering enabled"),
    ("dhcpprovider", "the dhcp Provider for the Zone"),
    ("type", "The type of the zone"),
    ("tags", "the list of resource tags associated with zone."),
    ("hasannotations", "true if the entity/resource has annotations"),
    ("created", "the date this zone was created"),
    (
        "systemvmdriver",
        "how core deploys the zone's system VMs (ours; root admins only)",
    ),
    ("state", "state of the cluster"),
    ("clusters", "healthy / total clusters in the zone"),
    ("cputotal", "the total cpu capacity in Ghz"),
    ("cpuused", "the total cpu used in Ghz"),
    ("cpuallocated", "the total cpu allocated in Ghz"),
    ("cpumaxdeviation", "the maximum cpu deviation"),
    ("memorytotal", "the total memory capacity in GiB"),
    ("memoryused", "the total memory used in GiB"),
    ("memoryallocated", "the total memory allocated in GiB"),
    ("memorymaxdeviation", "the maximum memory deviation"),
    ("cputhreshold", "cpu usage notification threshold exceeded"),
    ("cpudisablethreshold", "cpu usage disable threshold exceeded"),
    (
        "cpuallocatedthreshold",
        "cpu allocated notification threshold exceeded",
    ),
    (
        "cpuallocateddisablethreshold",
        "cpu allocated disable threshold exceeded",
    ),
    ("memorythreshold", "memory usage notification threshold exceeded"),
    (
        "memorydisablethreshold",
        "memory usage disable threshold exceeded",
    ),
    (
        "memoryallocatedthreshold",
        "memory allocated notification threshold exceeded",
    ),
    (
        "memoryallocateddisablethreshold",
        "memory allocated disable threshold exceeded",
    ),
];

/// A template or ISO.
pub const TEMPLATE: Fields = &[
    ("id", "the template ID"),
    ("name", "the template name"),
    ("displaytext", "the template display text"),
    (
        "ispublic",
        "true if this template is a public template, false otherwise",
    ),
    (
        "isfeatured",
        "true if this template is a featured template, false otherwise",
    ),
    (
        "isextractable",
        "true if the template is extractable, false otherwise",
    ),
    (
        "isready",
        "true if the template is ready to be deployed from, false otherwise",
    ),
    ("status", "the status of the template"),
    ("format", "the format of the template"),
    ("hypervisor", "the hypervisor on which the template runs"),
    ("zoneid", "the ID of the zone for this template"),
    ("zonename", "the name of the zone for this template"),
    ("templatetype", "the type of the template"),
    ("url", "the URL which the template/iso is registered from"),
    ("created", "the date this template was created"),
    ("accountid", "the account id to which the template belongs"),
    ("account", "the account name to which the template belongs"),
    ("domain", "the name of the domain to which the template belongs"),
    ("domainid", "the ID of the domain to which the template belongs"),
    ("bootable", "true if the ISO is bootable, false otherwise"),
    (
        "crossZones",
        "true if the template is managed across all Zones, false otherwise",
    ),
    (
        "directdownload",
        "KVM Only: true if template is directly downloaded to Primary Storage bypassing Secondary Storage",
    ),
    (
        "deployasis",
        "VMware only: true if template is deployed without orchestrating disks and networks",
    ),
    (
        "passwordenabled",
        "true if the reset password feature is enabled, false otherwise",
    ),
    (
        "sshkeyenabled",
        "true if template is sshkey enabled, false otherwise",
    ),
    (
        "isdynamicallyscalable",
        "true if template contains XS/VMWare tools inorder to support dynamic scaling of VM cpu/memory",
    ),
    (
        "requireshvm",
        "true if template requires HVM enabled, false otherwise",
    ),
    ("details", "additional key/value details tied with template"),
    ("tags", "the list of resource tags associated"),
    (
        "downloaddetails",
        "Lists the download progress of a template across all secondary storages",
    ),
    ("hasannotations", "true if the entity/resource has annotations"),
    ("checksum", "checksum of the template"),
    ("ostypeid", "the ID of the OS type for this template."),
    ("ostypename", "the name of the OS type for this template."),
    ("size", "the size of the template"),
    ("physicalsize", "the physical size of the template"),
    ("removed", "the date this template was removed"),
];

/// A template's or ISO's permissions.
pub const TEMPLATE_PERMISSION: Fields = &[
    ("id", "the template ID"),
    (
        "ispublic",
        "true if this template is a public template, false otherwise",
    ),
    ("domainid", "the ID of the domain to which the template belongs"),
    ("account", "the list of accounts the template is available for"),
];

/// A tag.
pub const TAG: Fields = &[
    ("key", "tag key name"),
    ("value", "tag value"),
    ("resourcetype", "resource type"),
    ("resourceid", "id of the resource"),
    ("account", "the account associated with the tag"),
    ("domainid", "the ID of the domain associated with the tag"),
    ("domain", "the domain associated with the tag"),
    ("domainpath", "path of the Domain associated with the tag"),
    ("customer", "customer associated with the tag"),
];

/// A system VM.
pub const SYSTEM_VM: Fields = &[
    ("id", "the ID of the system VM"),
    ("name", "the name of the system VM"),
    ("systemvmtype", "the system VM type"),
    ("zoneid", "the Zone ID for the system VM"),
    ("zonename", "the Zone name for the system VM"),
    ("state", "the state of the system VM"),
    ("agentstate", "the agent state of the system VM"),
    ("version", "the systemvm agent version"),
    ("created", "the date and time the system VM was created"),
    ("hasannotations", "true if the entity/resource has annotations"),
    ("managed", "whether core deploys and watches it (ours)"),
    ("hypervisor", "the hypervisor on which the template runs"),
    ("publicurl", "a console proxy's endpoint (ours)"),
    ("disconnected", "the last disconnected date of host"),
    (
        "activeviewersessions",
        "the number of active console sessions for the console proxy system vm",
    ),
    (
        "storagejobsrunning",
        "storage jobs running on a storage VM (ours)",
    ),
    ("storagejobsqueued", "storage jobs queued on a storage VM (ours)"),
    ("storagehealth", "the health of a storage VM's store (ours)"),
];

/// An image store.
pub const IMAGE_STORE: Fields = &[
    ("id", "the ID of the image store"),
    ("name", "the name of the image store"),
    ("url", "the url of the image store"),
    ("protocol", "the protocol of the image store"),
    ("providername", "the provider name of the image store"),
    ("scope", "the scope of the image store"),
    ("zoneid", "the Zone ID of the image store"),
    ("zonename", "the Zone name of the image store"),
    ("readonly", "defines if store is read-only"),
    ("hasannotations", "true if the entity/resource has annotations"),
    ("disksizetotal", "the total disk size of the host"),
    ("disksizeused", "the host's currently used disk size"),
    (
        "health",
        "object stores: Up, Down or Unknown, from the last probe or replica (ours)",
    ),
    ("healthdetail", "object stores: why the store is Down (ours)"),
    ("healthchecked", "object stores: when health was last set (ours)"),
];

/// What `rebuildImageStore` did (ours).
pub const REBUILD: Fields = &[
    ("imagestoreid", "the staging store rebuilt"),
    ("objectstoreid", "the object store read"),
    ("restored", "artefacts restored and verified"),
    ("bytes", "their bytes"),
    ("companions", "template.properties files restored beside them"),
];

/// A replica of an artefact in an object store (ours).
pub const REPLICA: Fields = &[
    ("imagestoreid", "the object store"),
    ("imagestorename", "the object store's name"),
    ("resourcetype", "template, copy or snapshot"),
    ("resourceid", "the template, ISO, copy or snapshot id"),
    ("zoneid", "the zone"),
    ("key", "the object's key"),
    ("size", "the object's size once replicated"),
    ("parts", "parts of its upload"),
    ("state", "Pending, Replicating, Replicated, Failed or Deleting"),
    ("attempts", "attempts so far"),
    ("error", "why the last attempt failed, or what it waits for"),
    ("updated", "the last change"),
];

/// A setting.
pub const CONFIGURATION: Fields = &[
    ("name", "the name of the configuration"),
    ("value", "the value of the configuration"),
    ("category", "the category of the configuration"),
    ("description", "the description of the configuration"),
    ("isdynamic", "true if the configuration is dynamic"),
    (
        "scope",
        "scope(zone/cluster/pool/account) of the parameter that needs to be updated",
    ),
    ("defaultvalue", "the default value of the configuration"),
    ("type", "the type of the configuration value"),
    ("component", "the component of the configuration"),
    ("displaytext", "the display text of the configuration"),
    ("zoneid", "the zone of a zone-scoped value"),
];

/// An event.
pub const EVENT: Fields = &[
    ("id", "the ID of the event"),
    ("type", "the type of the event"),
    ("level", "the event level (INFO, WARN, ERROR)"),
    ("description", "a brief description of the event"),
    ("state", "the state of the event"),
    ("username", "the name of the user who performed the action"),
    (
        "account",
        "the account name for the account that owns the object being acted on in the event",
    ),
    ("domain", "the name of the account's domain"),
    ("domainid", "the id of the account's domain"),
    ("created", "the date the event was created"),
    ("resourceid", "the id of the resource"),
    ("resourcetype", "the type of the resource"),
];

/// A capacity.
pub const CAPACITY: Fields = &[
    ("type", "the capacity type"),
    ("name", "the capacity name"),
    ("capacitytotal", "the total capacity available"),
    ("capacityused", "the capacity currently in use"),
    ("capacityallocated", "the capacity currently in allocated"),
    ("percentused", "the percentage of capacity currently in use"),
    ("zoneid", "the Zone ID"),
    ("zonename", "the Zone name"),
];

/// A console target.
pub const CONSOLE_TARGET: Fields = &[
    ("id", "the console target (VM) ID"),
    ("name", "its name"),
    ("host", "the VNC host (admins)"),
    ("port", "the VNC port (admins)"),
    ("haspassword", "whether a VNC password is set"),
    ("zoneid", "the Zone ID"),
    ("zonename", "the Zone name"),
    ("accountid", "the owner's account ID"),
    ("account", "the owner's account name"),
    ("created", "the date it was added"),
    ("hypervisorvm", "the domain name on a libvirt host"),
];

/// A console link.
pub const CONSOLE_ENDPOINT: Fields = &[
    ("success", "true if the console endpoint is generated properly"),
    ("details", "details in case of an error"),
    ("url", "the console url"),
    ("websocket", "the console websocket options"),
];

/// An async job.
pub const ASYNC_JOB: Fields = &[
    ("jobid", "extra field for the initial async job"),
    ("accountid", "the account id that executed the async command"),
    ("userid", "the user that executed the async command"),
    ("cmd", "the async command executed"),
    ("jobstatus", "the current job status-should be 0 for PENDING"),
    ("jobprocstatus", "the progress information of the PENDING job"),
    ("jobresultcode", "the result code for the job"),
    ("jobresulttype", "the result type"),
    ("jobresult", "the result reason"),
    ("jobinstancetype", "the instance/entity object related to the job"),
    (
        "jobinstanceid",
        "the unique ID of the instance/entity object related to the job",
    ),
    ("created", "the created date of the job"),
    ("completed", "the completed date of the job"),
];

/// An API.
pub const API: Fields = &[
    ("name", "the name of the api command"),
    ("description", "description of the api"),
    ("isasync", "true if api is asynchronous"),
    ("since", "version of CloudStack the api was introduced in"),
    ("related", "comma separated related apis"),
    ("params", "the list params the api accepts"),
    ("response", "api response fields"),
];

/// An OS type.
pub const OS_TYPE: Fields = &[
    ("id", "the ID of the OS type"),
    ("name", "the name of the OS type"),
    ("description", "the name/description of the OS type"),
    ("oscategoryid", "the ID of the OS category"),
    ("oscategoryname", "the name of the OS category"),
    ("isuserdefined", "is the guest OS user defined"),
    ("fordisplay", "is the guest OS visible for the users"),
];

/// An OS category.
pub const OS_CATEGORY: Fields = &[
    ("id", "the ID of the OS category"),
    ("name", "the name of the OS category"),
    ("isfeatured", "Whether the OS category is featured"),
];

/// A name (hypervisors).
pub const HYPERVISOR: Fields = &[("name", "Hypervisor name")];

/// A storage provider.
pub const STORAGE_PROVIDER: Fields = &[
    ("name", "the name of the storage provider"),
    (
        "type",
        "the type of the storage provider: primary or image provider",
    ),
];

/// An alert.
pub const ALERT: Fields = &[
    ("id", "the id of the alert"),
    ("type", "One of the alert types"),
    ("name", "the name of the alert"),
    ("description", "description of the alert"),
    ("sent", "the date and time the alert was sent"),
];

/// A VM.
pub const VIRTUAL_MACHINE: Fields = &[
    ("id", "the ID of the virtual machine"),
    ("name", "the name of the virtual machine"),
    (
        "displayname",
        "user generated name. The name of the virtual machine is returned if no displayname exists.",
    ),
    ("instancename", "instance name of the user vm"),
    ("state", "the state of the virtual machine"),
    (
        "zoneid",
        "the ID of the availability zone for the virtual machine",
    ),
    (
        "zonename",
        "the name of the availability zone for the virtual machine",
    ),
    ("accountid", "the account id associated with the virtual machine"),
    ("account", "the account associated with the virtual machine"),
    (
        "domainid",
        "the ID of the domain in which the virtual machine exists",
    ),
    (
        "domain",
        "the name of the domain in which the virtual machine exists",
    ),
    ("hypervisor", "the hypervisor on which the template runs"),
    ("created", "the date when this virtual machine was created"),
    (
        "haenable",
        "true if high-availability is enabled, false otherwise",
    ),
    (
        "isdynamicallyscalable",
        "true if vm contains XS/VMWare tools inorder to support dynamic scaling of VM cpu/memory.",
    ),
    (
        "passwordenabled",
        "true if the password rest feature is enabled, false otherwise",
    ),
    (
        "hostcontrolstate",
        "the control state of the host for the virtual machine",
    ),
    ("nic", "the list of nics associated with vm"),
    (
        "securitygroup",
        "list of security groups associated with the virtual machine",
    ),
    (
        "affinitygroup",
        "list of affinity groups associated with the virtual machine",
    ),
    ("tags", "the list of resource tags associated"),
    ("details", "Vm details in key/value pairs."),
];

/// The counts of `listInfrastructure`.
pub const INFRASTRUCTURE: Fields = &[
    ("zones", "Number of zones"),
    ("pods", "Number of pods"),
    ("clusters", "Number of clusters"),
    ("hosts", "Number of hypervisor hosts"),
    ("storagepools", "Number of storage pools"),
    ("imagestores", "Number of images stores"),
    ("objectstores", "Number of object stores"),
    ("systemvms", "Number of systemvms"),
    ("routers", "Number of routers"),
    ("ilbvms", "Number of internal LBs"),
    ("cpusockets", "Number of cpu sockets"),
    ("managementservers", "Number of management servers"),
    ("alerts", "Number of Alerts"),
    ("backuprepositories", "Number of backup repositories"),
];

/// `listCapabilities`.
pub const CAPABILITY: Fields = &[
    (
        "securitygroupsenabled",
        "true if security groups support is enabled, false otherwise",
    ),
    (
        "dynamicrolesenabled",
        "true if dynamic role-based api checker is enabled, false otherwise",
    ),
    ("cloudstackversion", "version of the cloud stack"),
    (
        "userpublictemplateenabled",
        "true if user and domain admins can set templates to be shared, false otherwise",
    ),
    (
        "supportELB",
        "true if region supports elastic load balancer on basic zones",
    ),
    (
        "projectinviterequired",
        "If invitation confirmation is required when add account to project",
    ),
    (
        "allowusercreateprojects",
        "true if regular user is allowed to create projects",
    ),
    (
        "customdiskofferingminsize",
        "minimum size that can be specified when create disk from disk offering with custom size",
    ),
    (
        "customdiskofferingmaxsize",
        "maximum size that can be specified when create disk from disk offering with custom size",
    ),
    (
        "regionsecondaryenabled",
        "true if region wide secondary is enabled, false otherwise",
    ),
    (
        "kvmsnapshotenabled",
        "true if snapshot is supported for KVM host, false otherwise",
    ),
    (
        "allowuserviewdestroyedvm",
        "true if the user is allowed to view destroyed virtualmachines, false otherwise",
    ),
    (
        "allowuserexpungerecovervm",
        "true if the user can recover and expunge virtualmachines, false otherwise",
    ),
    (
        "allowuserexpungerecovervolume",
        "true if the user can recover and expunge volumes, false otherwise",
    ),
    (
        "allowuserviewalldomainaccounts",
        "true if users can see all accounts within the same domain, false otherwise",
    ),
    (
        "kubernetesserviceenabled",
        "true if Kubernetes Service plugin is enabled, false otherwise",
    ),
    (
        "kubernetesclusterexperimentalfeaturesenabled",
        "true if experimental features for Kubernetes cluster such as Docker private registry are enabled, false otherwise",
    ),
    (
        "customhypervisordisplayname",
        "Display name for custom hypervisor",
    ),
    (
        "defaultuipagesize",
        "default page size in the UI for various views, value set in the configurations",
    ),
    (
        "instancesstatsretentiontime",
        "the retention time for Instances stats",
    ),
    (
        "instancesstatsuseronly",
        "true if stats are collected only for user instances, false if system instance stats are also collected",
    ),
    (
        "instancesdisksstatsretentionenabled",
        "true if stats are retained for instance disks otherwise false",
    ),
    (
        "instancesdisksstatsretentiontime",
        "the retention time for Instances disks stats",
    ),
    (
        "sharedfsvmmincpucount",
        "the min CPU count for the service offering used by the shared filesystem instance",
    ),
    (
        "sharedfsvmminramsize",
        "the min Ram size for the service offering used by the shared filesystem instance",
    ),
    (
        "dynamicscalingenabled",
        "true if dynamically scaling for instances is enabled",
    ),
    ("extensionspath", "The path of the extensions directory"),
    (
        "instanceleaseenabled",
        "true if instance lease feature is enabled",
    ),
];

/// `cloudianIsEnabled`.
pub const CLOUDIAN: Fields = &[("enabled", "the Cloudian connector enabled state")];

/// `rotateConsoleKeys` (ours).
pub const CONSOLE_KEYS: Fields = &[
    ("primary", "the id of the new primary key"),
    ("keys", "the ids of the keys now in the set"),
    (
        "proxiesupdated",
        "how many connected console proxies got the new set",
    ),
];

/// `registerSystemVm` (ours).
pub const REGISTERED_SYSTEM_VM: Fields = &[
    ("id", "the ID of the system VM"),
    ("name", "the name of the system VM"),
    ("systemvmtype", "the system VM type"),
    ("zoneid", "the Zone ID"),
    ("secret", "the secret the agent logs in with (shown once)"),
];
