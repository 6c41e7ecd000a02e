//! What the clients read to know the cloud: `listOsTypes`, `listOsCategories`,
//! `listHypervisors`, `listStorageProviders`, `listCapabilities`, and the login page's and
//! start-up's feature probes (`listLdapConfigurations`, `listGuiThemes`, `listIdps`,
//! `listOauthProvider`, `listResourceIcon`, `cloudianIsEnabled`), which answer empty: this
//! suite has no LDAP, SAML, OAuth, themes or icons.
//!
//! Invariants: response keys are CloudStack's, including its quirks (`ldapconfigurationresponse`
//! with `LdapConfiguration`, `dataStoreProvider`, `guiThemes`); the guest OS catalogue is
//! `model::guest_os`, the one place it is defined.

use serde_json::{Value, json};

use crate::api::list_response;
use crate::command::{Access, Command, ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::handler;
use crate::model::guest_os::{self, CATEGORIES, OS_TYPES};
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, State};

const LIST_OS_TYPES: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "OS type id"),
    opt("oscategoryid", Ty::Uuid, "OS types of this category"),
    opt("description", Ty::String, "Substring of the name"),
    opt("keyword", Ty::String, "Substring of the name"),
    opt("fordisplay", Ty::Boolean, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
const LIST_OS_CATEGORIES: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Category id"),
    opt("name", Ty::String, "Category name"),
    opt("keyword", Ty::String, "Substring of the name"),
    opt(
        "isfeatured",
        Ty::Boolean,
        "Accepted for compatibility (all are featured)",
    ),
    opt("showicon", Ty::Boolean, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
const LIST_HYPERVISORS: &[ParamSpec] = &[opt("zoneid", Ty::Uuid, "Hypervisors of this zone")];
const LIST_STORAGE_PROVIDERS: &[ParamSpec] = &[
    req("type", Ty::String, "image or primary"),
    opt("keyword", Ty::String, "Substring of the name"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
const NONE: &[ParamSpec] = &[];
const LIST_LDAP: &[ParamSpec] = &[
    opt("hostname", Ty::String, "LDAP host"),
    opt("port", Ty::Integer, "LDAP port"),
    opt("domainid", Ty::Uuid, "Domain"),
    opt("listall", Ty::Boolean, "Accepted for compatibility"),
    opt("keyword", Ty::String, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
const LIST_THEMES: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Theme id"),
    opt("name", Ty::String, "Theme name"),
    opt("commonname", Ty::String, "Theme for this host name"),
    opt("domainid", Ty::Uuid, "Accepted for compatibility"),
    opt("accountid", Ty::Uuid, "Accepted for compatibility"),
    opt("listall", Ty::Boolean, "Accepted for compatibility"),
    opt("listonlydefaulttheme", Ty::Boolean, "Accepted for compatibility"),
    opt("showpublic", Ty::Boolean, "Accepted for compatibility"),
    opt("showremoved", Ty::Boolean, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
const LIST_OAUTH: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Provider id"),
    opt("provider", Ty::String, "Provider name"),
    opt("keyword", Ty::String, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
const LIST_ICONS: &[ParamSpec] = &[
    req("resourceids", Ty::String, "Comma-separated resource ids"),
    req("resourcetype", Ty::String, "Resource type"),
];

/// The catalogue commands.
pub static COMMANDS: &[Command] = &[
    Command::new(
        "listOsTypes",
        "Lists the guest OS types",
        Access::ALL,
        LIST_OS_TYPES,
        handler!(list_os_types),
    )
    .returns(crate::api::fields::OS_TYPE),
    Command::new(
        "listOsCategories",
        "Lists the guest OS categories",
        Access::ALL,
        LIST_OS_CATEGORIES,
        handler!(list_os_categories),
    )
    .returns(crate::api::fields::OS_CATEGORY),
    Command::new(
        "listHypervisors",
        "Lists the hypervisors the cloud runs",
        Access::ALL,
        LIST_HYPERVISORS,
        handler!(list_hypervisors),
    )
    .returns(crate::api::fields::HYPERVISOR),
    Command::new(
        "listStorageProviders",
        "Lists the storage providers",
        Access::INFRA,
        LIST_STORAGE_PROVIDERS,
        handler!(list_storage_providers),
    )
    .returns(crate::api::fields::STORAGE_PROVIDER),
    Command::new(
        "listCapabilities",
        "What the cloud offers and how the UI should page",
        Access::ALL,
        NONE,
        handler!(list_capabilities),
    )
    .returns(crate::api::fields::CAPABILITY),
    Command::new(
        "listLdapConfigurations",
        "Lists LDAP configurations (none: no LDAP)",
        Access::ALL,
        LIST_LDAP,
        handler!(empty),
    )
    .answers_as("ldapconfigurationresponse"),
    Command::new(
        "listGuiThemes",
        "Lists GUI themes (none: the UI's default)",
        Access::ALL,
        LIST_THEMES,
        handler!(empty),
    )
    .before_login(),
    Command::new(
        "listIdps",
        "Lists SAML identity providers (none)",
        Access::ALL,
        NONE,
        handler!(empty),
    )
    .before_login(),
    Command::new(
        "listOauthProvider",
        "Lists OAuth providers (none)",
        Access::ALL,
        LIST_OAUTH,
        handler!(empty),
    )
    .before_login(),
    Command::new(
        "listResourceIcon",
        "Lists resource icons (none)",
        Access::ALL,
        LIST_ICONS,
        handler!(empty),
    ),
    Command::new(
        "cloudianIsEnabled",
        "Whether the Cloudian connector is on (never)",
        Access::ALL,
        NONE,
        handler!(cloudian),
    )
    .returns(crate::api::fields::CLOUDIAN),
];

fn os_type_json(o: &guest_os::OsType) -> Value {
    let (cid, cname) = o.category().map(|c| (c.id(), c.name)).unwrap_or_default();
    json!({
        "id": o.id(),
        "name": o.name,
        "description": o.name,
        "oscategoryid": cid,
        "oscategoryname": cname,
        "isuserdefined": "false",
        "fordisplay": true,
    })
}

/// `listOsTypes`: `description` and `keyword` are substrings (CloudStack's LIKE), ordered by name.
async fn list_os_types(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let has = |field: &str, name: &str| {
        p.non_empty(field)
            .is_none_or(|v| name.to_lowercase().contains(&v.to_lowercase()))
    };
    let category = match p.non_empty("oscategoryid") {
        Some(id) => Some(
            guest_os::category_by_id(id)
                .ok_or_else(|| ApiError::param(format!("Unable to find OS category by id {id}")))?
                .n,
        ),
        None => None,
    };
    let mut all: Vec<&guest_os::OsType> = OS_TYPES
        .iter()
        .filter(|o| p.non_empty("id").is_none_or(|id| o.id().eq_ignore_ascii_case(id)))
        .filter(|o| category.is_none_or(|c| o.category == c))
        .filter(|o| has("description", o.name) && has("keyword", o.name))
        .collect();
    all.sort_by_key(|o| o.name.to_lowercase());
    let total = i64::try_from(all.len()).unwrap_or(i64::MAX);
    let items = page.slice(all).into_iter().map(os_type_json).collect();
    Ok(list_response("ostype", total, items))
}

/// `listOsCategories`.
async fn list_os_categories(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let keyword = p.non_empty("keyword").map(str::to_lowercase);
    let all: Vec<Value> = CATEGORIES
        .iter()
        .filter(|c| p.non_empty("id").is_none_or(|id| c.id().eq_ignore_ascii_case(id)))
        .filter(|c| p.non_empty("name").is_none_or(|n| n.eq_ignore_ascii_case(c.name)))
        .filter(|c| {
            keyword
                .as_deref()
                .is_none_or(|k| c.name.to_lowercase().contains(k))
        })
        .map(|c| json!({ "id": c.id(), "name": c.name, "isfeatured": true }))
        .collect();
    let total = i64::try_from(all.len()).unwrap_or(i64::MAX);
    Ok(list_response("oscategory", total, page.slice(all)))
}

/// `listHypervisors`: system VMs and guests run on KVM (QEMU).
async fn list_hypervisors(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    if let Some(z) = p.non_empty("zoneid") {
        crate::model::resolve_zone(&state.db.pool, Some(z)).await?;
    }
    Ok(list_response("hypervisor", 1, vec![json!({ "name": "KVM" })]))
}

/// `listStorageProviders type=image|primary`.
async fn list_storage_providers(_state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let ty = p.non_empty("type").unwrap_or_default().to_ascii_lowercase();
    let items: Vec<Value> = match ty.as_str() {
        "image" => vec![json!({ "name": "NFS", "type": "IMAGE" })],
        "primary" => vec![json!({ "name": "DefaultPrimary", "type": "PRIMARY" })],
        other => {
            return Err(ApiError::param(format!(
                "Invalid storage provider type {other:?}: use image or primary"
            )));
        }
    };
    let total = i64::try_from(items.len()).unwrap_or(i64::MAX);
    Ok(list_response("dataStoreProvider", total, items))
}

/// `listCapabilities`: every field of CloudStack's `CapabilitiesResponse`.
async fn list_capabilities(state: State, _caller: Caller, _p: Params) -> Result<Value, ApiError> {
    let page_size = crate::model::settings::page_size(&state).await;
    Ok(json!({ "capability": {
        "securitygroupsenabled": false,
        "dynamicrolesenabled": true,
        "cloudstackversion": crate::CLOUDSTACK_VERSION,
        "userpublictemplateenabled": true,
        "supportELB": "false",
        "projectinviterequired": false,
        "allowusercreateprojects": false,
        "customdiskofferingminsize": 1,
        "customdiskofferingmaxsize": 1024,
        "regionsecondaryenabled": false,
        "kvmsnapshotenabled": true,
        "allowuserviewdestroyedvm": false,
        "allowuserexpungerecovervm": false,
        "allowuserexpungerecovervolume": false,
        "allowuserviewalldomainaccounts": false,
        "kubernetesserviceenabled": false,
        "kubernetesclusterexperimentalfeaturesenabled": false,
        "customhypervisordisplayname": "",
        "defaultuipagesize": page_size.min(20),
        "instancesstatsretentiontime": 0,
        "instancesstatsuseronly": false,
        "instancesdisksstatsretentionenabled": false,
        "instancesdisksstatsretentiontime": 0,
        "sharedfsvmmincpucount": 0,
        "sharedfsvmminramsize": 0,
        "dynamicscalingenabled": false,
        "extensionspath": "",
        "instanceleaseenabled": false,
    }}))
}

/// The answer of a list this suite has nothing for.
async fn empty(_state: State, _caller: Caller, _p: Params) -> Result<Value, ApiError> {
    Ok(json!({}))
}

/// `cloudianIsEnabled`.
async fn cloudian(_state: State, _caller: Caller, _p: Params) -> Result<Value, ApiError> {
    Ok(json!({ "cloudian": { "enabled": false } }))
}
