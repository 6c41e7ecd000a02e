//! `createTemplate`: a template made from a snapshot (its chain, flattened) or from a volume
//! no running guest has attached, written by a storage VM into the image store as a
//! self-contained qcow2 with its `template.properties`.
//!
//! Invariants: the template is recorded (`CREATING`, not ready) before its image is written, and
//! goes again when the writing fails, so no template looks ready without a complete image; a
//! volume whose guest runs is refused (CloudStack: the VM must be stopped); from a snapshot, the
//! template lands on the snapshot's own store (the storage VM that reads the chain writes it).

use serde_json::{Value, json};
use systemvm_proto::agent::{ImageRef, TemplateInstall};

use crate::api::templates::{TEMPLATE_SELECT, answers, flag};
use crate::command::{Command, ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::model::templates::{self, NewTemplate};
use crate::model::{snapshots, volumes};
use crate::params::Params;
use crate::roles::Access;
use crate::state::{Caller, State};

const CREATE: &[ParamSpec] = &[
    req("name", Ty::String, "The template's name"),
    req("ostypeid", Ty::Uuid, "OS type id (listOsTypes)"),
    opt("displaytext", Ty::String, "Display text (default: the name)"),
    opt(
        "snapshotid",
        Ty::Uuid,
        "The snapshot to make it from (either this or volumeid)",
    ),
    opt(
        "volumeid",
        Ty::Uuid,
        "The volume to make it from, its guest stopped (either this or snapshotid)",
    ),
    opt("ispublic", Ty::Boolean, "Visible to every account"),
    opt("isfeatured", Ty::Boolean, "Featured (root admins)"),
    opt("passwordenabled", Ty::Boolean, "Supports password reset"),
    opt("sshkeyenabled", Ty::Boolean, "Supports SSH key reset"),
    opt("requireshvm", Ty::Boolean, "Requires HVM"),
    opt("isdynamicallyscalable", Ty::Boolean, "Supports live scaling"),
    opt("bits", Ty::Integer, "Accepted for compatibility"),
    opt("details", Ty::Map, "Accepted for compatibility"),
    opt("templatetag", Ty::String, "Accepted for compatibility"),
    opt(
        "zoneid",
        Ty::Uuid,
        "Zone (the snapshot's or the volume's; another is refused)",
    ),
    opt("virtualmachineid", Ty::Uuid, "Accepted for compatibility"),
    opt("url", Ty::String, "Accepted for compatibility (bare metal only)"),
    opt("projectid", Ty::Uuid, "Accepted for compatibility"),
    opt("domainid", Ty::Uuid, "Accepted for compatibility"),
    opt("account", Ty::String, "Accepted for compatibility"),
    opt("arch", Ty::String, "Accepted for compatibility (x86_64)"),
];

/// The command table of this module.
pub static COMMANDS: &[Command] = &[Command::new(
    "createTemplate",
    "Creates a template from a snapshot or from a stopped volume",
    Access::ALL,
    CREATE,
    crate::handler!(create_template),
)
.asynchronous()
.on_leader()
.returns(crate::api::fields::TEMPLATE)];

/// Where the image comes from: the source image, the store a storage VM of which writes it, and
/// the zone.
struct Source {
    from: ImageRef,
    store_url: String,
    zone_id: String,
}

async fn source(state: &State, caller: &Caller, p: &Params) -> Result<Source, ApiError> {
    match (p.non_empty("snapshotid"), p.non_empty("volumeid")) {
        (Some(sid), None) => {
            let snap = snapshots::get_managed(state, caller, sid).await?;
            let file = snap
                .file
                .clone()
                .filter(|_| snap.state == snapshots::state::BACKED_UP)
                .ok_or_else(|| {
                    ApiError::param(format!("Snapshot {sid} is not backed up (it is {})", snap.state))
                })?;
            Ok(Source {
                from: ImageRef {
                    store_url: snap.store_url.clone(),
                    path: file,
                    format: "QCOW2".into(),
                },
                store_url: snap.store_url,
                zone_id: snap.zone_id,
            })
        }
        (None, Some(vid)) => {
            let vol = volumes::get(state, vid).await?;
            templates::ensure_manages(state, caller, &vol.account_id, "volume", vid).await?;
            if crate::backup::guest_running(state, &vol).await? {
                return Err(ApiError::param(format!(
                    "The VM volume {} is attached to must be stopped to create a template from it",
                    vol.name
                )));
            }
            let Some(from) = vol.file() else {
                return Err(ApiError::param(format!(
                    "Volume {} is on no primary storage pool the storage VM reaches (or not uploaded yet): snapshot it and create the template from the snapshot",
                    vol.name
                )));
            };
            let store_url = crate::model::stores::first_url_of_zone(&state.db.pool, &vol.zone_id)
                .await?
                .ok_or_else(|| ApiError::param(format!("Zone {} has no image store", vol.zone_id)))?;
            Ok(Source {
                from,
                store_url,
                zone_id: vol.zone_id,
            })
        }
        _ => Err(ApiError::param(
            "Either snapshotid or volumeid must be given, not both",
        )),
    }
}

/// `createTemplate`.
pub async fn create_template(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let src = source(&state, &caller, &p).await?;
    if let Some(zone) = p.non_empty("zoneid")
        && zone != src.zone_id
    {
        return Err(ApiError::param(format!(
            "The source is in zone {}, not {zone}",
            src.zone_id
        )));
    }
    let store_id: Option<String> =
        sqlx::query_scalar("SELECT id FROM image_stores WHERE url = $1 AND zone_id = $2")
            .bind(src.store_url.clone())
            .bind(src.zone_id.clone())
            .fetch_optional(&state.db.pool)
            .await?;
    let name = p.non_empty("name").unwrap_or_default();
    let t = NewTemplate {
        name,
        display_text: p.non_empty("displaytext").unwrap_or(name),
        iso: false,
        format: "QCOW2",
        hypervisor: "KVM",
        url: "",
        checksum: None,
        zone_id: Some(&src.zone_id),
        store_id: store_id.as_deref(),
        public: flag(&p, "ispublic", false),
        featured: flag(&p, "isfeatured", false),
        extractable: true,
        bootable: true,
        os_type_id: p.non_empty("ostypeid"),
        flags: crate::model::template_properties::Flags {
            password_enabled: flag(&p, "passwordenabled", false),
            sshkey_enabled: flag(&p, "sshkeyenabled", false),
            dynamically_scalable: flag(&p, "isdynamicallyscalable", false),
            requires_hvm: flag(&p, "requireshvm", true),
        },
        upload: false,
    };
    let creating = templates::begin_created(&state, &caller, &t).await?;
    let written = crate::backup::copy(
        &state,
        (&creating.zone_id, &creating.store_url),
        src.from,
        ImageRef {
            store_url: creating.store_url.clone(),
            path: creating.file.clone(),
            format: "QCOW2".into(),
        },
        Some(TemplateInstall {
            id: creating.id.clone(),
            description: t.display_text.to_owned(),
            public: t.public,
        }),
    )
    .await;
    let written = match written {
        Ok(w) => w,
        Err(e) => {
            templates::creation_failed(&state, &creating).await?;
            return Err(e.into());
        }
    };
    templates::created(
        &state,
        &creating,
        &templates::Created {
            virtual_size: written.virtual_size,
            physical_size: written.physical_size,
            sha256: &written.sha256,
        },
    )
    .await?;
    let rows = sqlx::query(&format!("{TEMPLATE_SELECT} WHERE t.id = $1"))
        .bind(creating.id.clone())
        .fetch_all(&state.db.pool)
        .await?;
    let items = answers(&state, &rows).await?;
    Ok(json!({ "template": items.into_iter().next().unwrap_or(Value::Null) }))
}
