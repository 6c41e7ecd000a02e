//! Boot parameters of image-based system VMs (`qemu`, `libvirt` drivers): a NoCloud config drive,
//! an ISO 9660 volume labelled `cidata` with `meta-data` and `user-data`, which the system VM image
//! reads at boot (shared/reference/systemvm-image.md §4).
//!
//! `user-data` is `#cloud-config` followed by one JSON object (JSON is YAML, and serde escapes
//! every value): `{"systemvm": {"role", "vm_id", "name", "zone_id", "core": [URL…], "secret",
//! "ca" (PEM), "store_url"?, "allow_internal": […], "max_sessions", "public_url"?,
//! "transfer_url"?}}`; the image's side: `systemvm-image/src/seed.rs`.
//!
//! Invariants: the secret and the CA travel only in the config drive (mode 0600 on the host), never on
//! a kernel or QEMU command line, which every local user can read in `/proc`; the drive is written
//! to a temporary name and renamed, so a VM never boots half a seed.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::driver::{DriverError, VmSpec};

/// The URLs browsers reach a system VM at, when its driver forwards a port.
#[derive(Debug, Clone, Copy, Default)]
pub struct Urls<'a> {
    /// A console proxy's base URL.
    pub public_url: Option<&'a str>,
    /// A storage VM's transfer server.
    pub transfer_url: Option<&'a str>,
    /// The store's URL as core knows it, when the VM is given another (`store_url` rewritten
    /// for the guest's network).
    pub store_as: Option<&'a str>,
}

/// The `systemvm` map of the user-data.
pub fn user_data(spec: &VmSpec, ca_pem: &str, urls: Urls<'_>) -> String {
    let mut m = json!({
        "role": spec.role.as_str(),
        "vm_id": spec.id,
        "name": spec.name,
        "zone_id": spec.zone_id,
        "core": spec.core_urls,
        "secret": spec.secret.expose(),
        "ca": ca_pem,
        "allow_internal": spec.allow_internal,
        "max_sessions": spec.max_sessions,
    });
    if let Some(s) = &spec.store_url {
        m["store_url"] = json!(s);
    }
    if let Some(u) = urls.public_url {
        m["public_url"] = json!(u);
    }
    if let Some(u) = urls.transfer_url {
        m["transfer_url"] = json!(u);
    }
    if let Some(u) = urls.store_as {
        m["store_as"] = json!(u);
    }
    format!("#cloud-config\n{}\n", json!({ "systemvm": m }))
}

/// The meta-data (instance id and host name).
pub fn meta_data(spec: &VmSpec) -> String {
    format!("instance-id: {}\nlocal-hostname: {}\n", spec.id, spec.name)
}

/// Writes `dir/seed.iso` (0600) for `spec`; returns its path.
pub async fn write_seed_iso(dir: &Path, spec: &VmSpec, urls: Urls<'_>) -> Result<PathBuf, DriverError> {
    use std::os::unix::fs::PermissionsExt as _;
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| DriverError::Io { what, source }
    };
    let ca_pem = std::fs::read_to_string(&spec.ca).map_err(io("failed to read core's CA"))?;
    let src = dir.join("seed");
    std::fs::create_dir_all(&src).map_err(io("failed to create the seed directory"))?;
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o700))
        .map_err(io("failed to protect the seed directory"))?;
    let write = |name: &str, text: &str| -> Result<(), DriverError> {
        let path = src.join(name);
        std::fs::write(&path, text).map_err(io("failed to write the seed"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("failed to protect the seed"))
    };
    write("user-data", &user_data(spec, &ca_pem, urls))?;
    write("meta-data", &meta_data(spec))?;
    let tmp = dir.join("seed.iso.tmp");
    let out = tokio::process::Command::new("genisoimage")
        .arg("-quiet")
        .arg("-output")
        .arg(&tmp)
        .args(["-volid", "cidata", "-joliet", "-rock"])
        .arg(src.join("user-data"))
        .arg(src.join("meta-data"))
        .output()
        .await
        .map_err(io("failed to run genisoimage (package genisoimage)"))?;
    // The plain copies are not needed once the ISO exists (or failed).
    let _ = std::fs::remove_dir_all(&src);
    if !out.status.success() {
        return Err(DriverError::Unavailable(format!(
            "genisoimage failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(io("failed to protect the seed"))?;
    let iso = dir.join("seed.iso");
    std::fs::rename(&tmp, &iso).map_err(io("failed to install the seed"))?;
    Ok(iso)
}

#[cfg(test)]
mod tests {
    use super::*;
    use systemvm_proto::Secret;
    use systemvm_proto::agent::AgentRole;

    fn spec() -> VmSpec {
        VmSpec {
            id: "0b1e4c4c-3a5e-4a8e-9f4a-3c1d2e3f4a5b".into(),
            name: "s-0b1e4c4c-VM".into(),
            role: AgentRole::SecStorage,
            zone_id: "z".into(),
            secret: Secret::from("s3cr\"et\n"),
            core_urls: vec!["wss://10.0.2.2:8250/agent".into()],
            ca: PathBuf::from("/nonexistent"),
            store_url: Some("nfs://10.0.0.9/export".into()),
            allow_internal: vec!["10.0.0.0/8".into()],
            max_sessions: 50,
        }
    }

    #[test]
    fn user_data_is_cloud_config_with_every_value_escaped() {
        let text = user_data(
            &spec(),
            "-----BEGIN CERTIFICATE-----\nAA==\n",
            Urls {
                public_url: Some("http://127.0.0.1:9"),
                transfer_url: Some("http://127.0.0.1:10"),
                store_as: None,
            },
        );
        // The image's parser reads it (the contract's other side).
        let parsed = systemvm_proto::seed::parse(text.as_bytes(), "").expect("the image parses core's seed");
        assert_eq!(parsed.secret, "s3cr\"et\n");
        assert_eq!(parsed.transfer_url.as_deref(), Some("http://127.0.0.1:10"));
        let (head, body) = text.split_once('\n').unwrap();
        assert_eq!(head, "#cloud-config");
        let v: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
        let s = &v["systemvm"];
        assert_eq!(s["secret"], "s3cr\"et\n");
        assert_eq!(s["role"], "secstorage");
        assert_eq!(s["store_url"], "nfs://10.0.0.9/export");
        assert_eq!(s["transfer_url"], "http://127.0.0.1:10");
        assert_eq!(s["core"][0], "wss://10.0.2.2:8250/agent");
        assert!(
            s["ca"]
                .as_str()
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        assert!(meta_data(&spec()).contains("instance-id: 0b1e4c4c"));
    }

    #[tokio::test]
    async fn seed_iso_is_private_and_labelled_cidata() {
        use std::os::unix::fs::PermissionsExt as _;
        if std::process::Command::new("genisoimage")
            .arg("--version")
            .output()
            .is_err()
        {
            panic!("genisoimage missing: run scripts/deps.sh test");
        }
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let mut s = spec();
        s.ca = ca;
        let iso = write_seed_iso(dir.path(), &s, Urls::default()).await.unwrap();
        let mode = std::fs::metadata(&iso).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let bytes = std::fs::read(&iso).unwrap();
        // The volume label sits in the primary volume descriptor (sector 16, offset 40).
        assert_eq!(&bytes[16 * 2048 + 40..16 * 2048 + 46], b"cidata");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("#cloud-config") && text.contains(&s.id));
        assert!(!dir.path().join("seed").exists(), "plain copies left behind");
    }
}
