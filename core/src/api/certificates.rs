//! `uploadCustomCertificate`: the operator's certificate for the console proxies' and storage
//! VMs' browser-facing servers (the HTTP side of [`crate::model::certificates`]).
//!
//! Invariant: the answer never carries the key; a bad certificate or key is refused (431) and
//! the installed certificate stays.

use serde_json::{Value, json};

use crate::command::{Command, ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::model::certificates::{self, Upload};
use crate::params::Params;
use crate::roles::Access;
use crate::state::{Caller, State};

/// `uploadCustomCertificate` parameters (CloudStack's).
pub const UPLOAD_CUSTOM_CERTIFICATE: &[ParamSpec] = &[
    req(
        "certificate",
        Ty::String,
        "The certificate (PEM); a server certificate may carry its chain after it",
    ),
    req(
        "domainsuffix",
        Ty::String,
        "DNS domain suffix the certificate is for (example.org or *.example.org)",
    ),
    opt(
        "id",
        Ty::Integer,
        "1 (or none): the server certificate, with privatekey; 2, 3, …: chain certificates, uploaded first",
    ),
    opt("name", Ty::String, "A chain certificate's alias"),
    opt(
        "privatekey",
        Ty::String,
        "The server certificate's private key (PEM)",
    ),
];

/// The response fields.
pub const CUSTOM_CERTIFICATE_FIELDS: crate::api::fields::Fields =
    &[("message", "message of the certificate upload operation")];

/// This module's commands.
pub static COMMANDS: &[Command] = &[Command::new(
    "uploadCustomCertificate",
    "Installs a certificate (and its chain) into every console proxy and storage VM; they serve HTTPS with it without dropping live sessions",
    Access::ADMIN,
    UPLOAD_CUSTOM_CERTIFICATE,
    crate::handler!(upload_custom_certificate),
)
.asynchronous()
.returns(CUSTOM_CERTIFICATE_FIELDS)];

/// `uploadCustomCertificate`.
pub async fn upload_custom_certificate(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let id = match p.non_empty("id") {
        Some(v) => Some(v.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
            ApiError::param(format!(
                "Invalid id {v:?}: 1 for the server certificate, 2… for the chain"
            ))
        })?),
        None => None,
    };
    let message = certificates::upload(
        &state,
        &Upload {
            certificate: p.non_empty("certificate").unwrap_or_default(),
            private_key: p.non_empty("privatekey"),
            domain_suffix: p.non_empty("domainsuffix").unwrap_or_default(),
            id,
            name: p.non_empty("name"),
        },
    )
    .await?;
    Ok(json!({ "customcertificate": { "message": message } }))
}
