//! Browser uploads and download links: `getUploadParamsForTemplate`, `getUploadParamsForIso`,
//! `extractTemplate`, `extractIso`, `rotateTransferKeys` (the HTTP side of
//! [`crate::model::transfers`] and the transfer key ring).
//!
//! Invariants: the upload commands take `registerTemplate`'s (`registerIso`'s) parameters
//! without `url` and answer as CloudStack does (`postuploadtemplateresponse.getuploadparams`,
//! `postuploadisoresponse.getuploadparams`); extraction is asynchronous and supports
//! `HTTP_DOWNLOAD` only.

use serde_json::{Value, json};

use crate::api::templates::{REGISTER_ISO, REGISTER_TEMPLATE, format_of, new_template};
use crate::command::{Command, ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::model::transfers;
use crate::params::Params;
use crate::roles::Access;
use crate::state::{Caller, State};
use crate::util::now_cs;

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// A registration's parameters for an upload: without `url`, with `zoneid` required (as
/// CloudStack's upload commands have them).
const fn without_url<const N: usize>(all: &[ParamSpec]) -> [ParamSpec; N] {
    let mut out = [all[0]; N];
    let (mut i, mut j) = (0, 0);
    while i < all.len() {
        let p = all[i];
        if !same(p.name, "url") {
            out[j] = if same(p.name, "zoneid") {
                req("zoneid", Ty::String, "Zone id (-1 is taken as the default zone)")
            } else {
                p
            };
            j += 1;
        }
        i += 1;
    }
    out
}

/// `getUploadParamsForTemplate` parameters: `registerTemplate`'s without `url`.
pub const UPLOAD_TEMPLATE: &[ParamSpec] = &without_url::<{ REGISTER_TEMPLATE.len() - 1 }>(REGISTER_TEMPLATE);
/// `getUploadParamsForIso` parameters: `registerIso`'s without `url`.
pub const UPLOAD_ISO: &[ParamSpec] = &without_url::<{ REGISTER_ISO.len() - 1 }>(REGISTER_ISO);
/// `extractTemplate` / `extractIso` parameters.
pub const EXTRACT: &[ParamSpec] = &[
    req("id", Ty::Uuid, "Template or ISO id"),
    req("mode", Ty::String, "HTTP_DOWNLOAD (FTP_UPLOAD is not supported)"),
    opt(
        "zoneid",
        Ty::Uuid,
        "Zone to extract from (default: the template's first zone)",
    ),
    opt("url", Ty::String, "FTP_UPLOAD only: not supported"),
];

/// `getUploadParamsForVolume` parameters.
pub const UPLOAD_VOLUME: &[ParamSpec] = &[
    req("name", Ty::String, "The volume's name"),
    req("zoneid", Ty::Uuid, "The zone the volume goes to"),
    req("format", Ty::String, "QCOW2 or RAW"),
    opt(
        "checksum",
        Ty::String,
        "Checksum of the uploaded bytes ({ALGO}hex; MD5 without a prefix)",
    ),
    opt(
        "imagestoreuuid",
        Ty::Uuid,
        "Image store (default: the zone's first)",
    ),
    opt("diskofferingid", Ty::Uuid, "Accepted for compatibility"),
    opt("account", Ty::String, "Accepted for compatibility"),
    opt("domainid", Ty::Uuid, "Accepted for compatibility"),
    opt("projectid", Ty::Uuid, "Accepted for compatibility"),
];

/// `extractVolume` parameters.
pub const EXTRACT_VOLUME: &[ParamSpec] = &[
    req("id", Ty::Uuid, "Volume id"),
    req("zoneid", Ty::Uuid, "The volume's zone"),
    req("mode", Ty::String, "HTTP_DOWNLOAD (FTP_UPLOAD is not supported)"),
    opt("url", Ty::String, "FTP_UPLOAD only: not supported"),
];

/// The response fields of the upload commands.
pub const UPLOAD_FIELDS: crate::api::fields::Fields = &[
    ("id", "the template/volume ID"),
    ("postURL", "POST url to upload the file to"),
    ("metadata", "encrypted data to be sent in the POST request."),
    ("expires", "the timestamp after which the signature expires"),
    ("signature", "signature to be sent in the POST request."),
];
/// The response fields of the extract commands.
pub const EXTRACT_FIELDS: crate::api::fields::Fields = &[
    ("id", "the id of extracted object"),
    ("name", "the name of the extracted object"),
    ("extractId", "the upload id of extracted object"),
    (
        "accountid",
        "the account id to which the extracted object belongs",
    ),
    ("state", "the state of the extracted object"),
    ("status", "the status of the extraction"),
    (
        "uploadpercentage",
        "the percentage of the entity uploaded to the specified location",
    ),
    (
        "url",
        "if mode = upload then url of the uploaded entity. if mode = download the url from which the entity can be downloaded",
    ),
    ("zoneid", "zone ID the object was extracted from"),
    ("zonename", "zone name the object was extracted from"),
    ("extractMode", "the mode of extraction - upload or download"),
    ("created", "the time and date the object was created"),
];

/// The response fields of `rotateTransferKeys`.
pub const TRANSFER_KEYS_FIELDS: crate::api::fields::Fields = &[
    ("primary", "the id of the new primary key"),
    ("keys", "the ids of the keys now in the set"),
    (
        "storagevmsupdated",
        "how many connected storage VMs got the new set",
    ),
];

/// This module's commands.
pub static COMMANDS: &[Command] = &[
    Command::new(
        "getUploadParamsForTemplate",
        "Records a template to upload from a browser and returns the signed parameters of the POST to a storage VM",
        Access::ALL,
        UPLOAD_TEMPLATE,
        crate::handler!(upload_template),
    )
    .answers_as("postuploadtemplateresponse")
    .returns(UPLOAD_FIELDS),
    Command::new(
        "getUploadParamsForIso",
        "Records an ISO to upload from a browser and returns the signed parameters of the POST to a storage VM",
        Access::ALL,
        UPLOAD_ISO,
        crate::handler!(upload_iso),
    )
    .answers_as("postuploadisoresponse")
    .returns(UPLOAD_FIELDS),
    Command::new(
        "extractTemplate",
        "Makes a signed, expiring download link of a template on its storage VM",
        Access::ALL,
        EXTRACT,
        crate::handler!(extract_template),
    )
    .asynchronous()
    .returns(EXTRACT_FIELDS),
    Command::new(
        "extractIso",
        "Makes a signed, expiring download link of an ISO on its storage VM",
        Access::ALL,
        EXTRACT,
        crate::handler!(extract_iso),
    )
    .asynchronous()
    .returns(EXTRACT_FIELDS),
    Command::new(
        "getUploadParamsForVolume",
        "Records a volume to upload from a browser and returns the signed parameters of the POST to a storage VM",
        Access::ALL,
        UPLOAD_VOLUME,
        crate::handler!(upload_volume),
    )
    .answers_as("postuploadvolumeresponse")
    .returns(UPLOAD_FIELDS),
    Command::new(
        "extractVolume",
        "Copies a volume (its guest stopped) to secondary storage as a self-contained qcow2 and makes a signed, expiring download link of it",
        Access::ALL,
        EXTRACT_VOLUME,
        crate::handler!(extract_volume),
    )
    .asynchronous()
    .on_leader()
    .returns(EXTRACT_FIELDS),
    Command::new(
        "rotateTransferKeys",
        "Adds a new transfer key (upload parameters, download links), makes it primary, retires keys older than the previous one, and pushes the set to every connected storage VM",
        Access::ADMIN,
        &[],
        crate::handler!(rotate_transfer_keys),
    )
    .returns(TRANSFER_KEYS_FIELDS),
];

/// `rotateTransferKeys` (ours): what `rotateConsoleKeys` does, for the transfer keys.
pub async fn rotate_transfer_keys(state: State, _caller: Caller, _p: Params) -> Result<Value, ApiError> {
    let r = crate::model::keyrings::rotate(&state, crate::model::keyrings::Ring::Transfer).await?;
    let mut v = json!({ "primary": r.primary, "keys": r.keys });
    if let Some(n) = r.pushed {
        v["storagevmsupdated"] = json!(n);
    }
    Ok(json!({ "transferkeys": v }))
}

/// CloudStack's `getuploadparams` object.
fn upload_answer(u: &transfers::IssuedUpload) -> Value {
    json!({
        "getuploadparams": {
            "id": u.id,
            "postURL": u.post_url,
            "metadata": u.metadata,
            "expires": u.expires,
            "signature": u.signature,
        }
    })
}

async fn upload(state: State, caller: Caller, p: Params, iso: bool) -> Result<Value, ApiError> {
    let format = format_of(&p, iso);
    let t = new_template(&p, iso, &format, true);
    let u = transfers::begin_upload(&state, &caller, &t).await?;
    Ok(upload_answer(&u))
}

/// `getUploadParamsForTemplate`.
pub async fn upload_template(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    upload(state, caller, p, false).await
}

/// `getUploadParamsForIso`.
pub async fn upload_iso(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    upload(state, caller, p, true).await
}

fn http_download_only(p: &Params) -> Result<(), ApiError> {
    let mode = p.non_empty("mode").unwrap_or_default();
    if !mode.eq_ignore_ascii_case("HTTP_DOWNLOAD") {
        return Err(ApiError::param(format!(
            "Extraction mode {mode:?} is not supported: use HTTP_DOWNLOAD"
        )));
    }
    Ok(())
}

async fn extract(state: State, caller: Caller, p: Params, iso: bool) -> Result<Value, ApiError> {
    http_download_only(&p)?;
    let id = p.non_empty("id").unwrap_or_default();
    let e = transfers::extract(&state, &caller, id, iso, p.non_empty("zoneid")).await?;
    let key = if iso { "iso" } else { "template" };
    Ok(json!({
        key: {
            "id": id,
            "name": e.name,
            "extractId": id,
            "accountid": e.account_id,
            "state": "DOWNLOAD_URL_CREATED",
            "status": "DOWNLOAD URL CREATED",
            "uploadpercentage": 100,
            "url": e.url,
            "zoneid": e.zone.0,
            "zonename": e.zone.1,
            "extractMode": "HTTP_DOWNLOAD",
            "created": now_cs(),
        }
    }))
}

/// `extractTemplate`.
pub async fn extract_template(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    extract(state, caller, p, false).await
}

/// `extractIso`.
pub async fn extract_iso(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    extract(state, caller, p, true).await
}

/// `getUploadParamsForVolume`: the volume is recorded `NotUploaded` on the zone's image store.
pub async fn upload_volume(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let u = crate::model::volume_uploads::begin(
        &state,
        &caller,
        &crate::model::volume_uploads::NewUpload {
            name: p.non_empty("name").unwrap_or_default(),
            zone_id: p.non_empty("zoneid").unwrap_or_default(),
            format: p.non_empty("format").unwrap_or_default(),
            checksum: p.non_empty("checksum"),
            store_id: p.non_empty("imagestoreuuid"),
        },
    )
    .await?;
    Ok(upload_answer(&u))
}

/// `extractVolume`: the volume's file, read by a storage VM from its pool through NFS (its
/// data clusters through its backing chain), written to `volumes/<account>/<volume>/` on the
/// zone's image store, then a download link of that copy.
pub async fn extract_volume(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    use crate::model::{stores, templates, volumes};
    http_download_only(&p)?;
    let id = p.non_empty("id").unwrap_or_default();
    let vol = volumes::get(&state, id).await?;
    templates::ensure_manages(&state, &caller, &vol.account_id, "volume", id).await?;
    if p.non_empty("zoneid") != Some(vol.zone_id.as_str()) {
        return Err(ApiError::param(format!(
            "Volume {id} is not in zone {}",
            p.non_empty("zoneid").unwrap_or_default()
        )));
    }
    if crate::backup::guest_running(&state, &vol).await? {
        return Err(ApiError::param(format!(
            "Invalid state of the volume with ID: {id}. It should be either detached or the VM should be in stopped state."
        )));
    }
    let Some(from) = vol.file() else {
        return Err(ApiError::param(format!(
            "Volume {id} is on no primary storage pool the storage VM reaches (or not uploaded yet): snapshot it and create a volume from the snapshot first"
        )));
    };
    let store_url = stores::first_url_of_zone(&state.db.pool, &vol.zone_id)
        .await?
        .ok_or_else(|| ApiError::param(format!("Zone {} has no image store", vol.zone_id)))?;
    let (store_name, zone_name): (String, String) = sqlx::query_as(
        "SELECT s.name, z.name FROM image_stores s JOIN zones z ON z.id = s.zone_id WHERE s.url = $1 AND s.zone_id = $2",
    )
    .bind(store_url.clone())
    .bind(vol.zone_id.clone())
    .fetch_one(&state.db.pool)
    .await?;
    let file = format!("volumes/{}/{}/{}.qcow2", vol.account_id, vol.id, vol.id);
    let written = crate::backup::copy(
        &state,
        (&vol.zone_id, &store_url),
        from,
        systemvm_proto::agent::ImageRef {
            store_url: store_url.clone(),
            path: file.clone(),
            format: "QCOW2".into(),
        },
        None,
    )
    .await?;
    let url = transfers::seal_link(
        &state,
        &transfers::LinkTo {
            id,
            zone: &vol.zone_id,
            store: (&store_url, &store_name),
            file: &file,
            format: "QCOW2",
            sha256: Some(written.sha256.clone()),
        },
    )
    .await?;
    tracing::info!(volume = %id, %file, "Volume extracted; download link issued");
    Ok(json!({
        "volume": {
            "id": id,
            "name": vol.name,
            "extractId": id,
            "accountid": vol.account_id,
            "state": "DOWNLOAD_URL_CREATED",
            "status": "DOWNLOAD URL CREATED",
            "uploadpercentage": 100,
            "url": url,
            "zoneid": vol.zone_id,
            "zonename": zone_name,
            "extractMode": "HTTP_DOWNLOAD",
            "created": now_cs(),
        }
    }))
}
