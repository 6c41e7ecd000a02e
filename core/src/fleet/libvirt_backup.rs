//! The `libvirt` driver's side of snapshot backups of guest disks: a domain's disks from its
//! XML, and libvirt's pull-mode backup (`virsh backup-begin` with a checkpoint: a point-in-time
//! NBD export of one disk, incremental from an earlier checkpoint through its dirty bitmap),
//! ended with `virsh domjobabort`; checkpoints listed and deleted.
//!
//! Invariants: the backup and checkpoint XML go through files private to this call (removed
//! afterwards), every value in them escaped; the export listens on the host's own address (the
//! URI's host, or 127.0.0.1 for this host) and is read-only; ending a backup waits until libvirt
//! reports no job, so the next backup can begin at once; odd XML yields no disk, never a panic.

use super::driver::{BackupRequest, DriverError, GuestDisk, NbdExport};
use super::libvirt::{LibvirtDriver, attr, not_found, uri_host, xml_escape};

/// The `<disk device='disk'>` elements of a domain's XML: target, source file, format (sizes
/// come from `domblkinfo`).
pub fn disks_from_domain_xml(xml: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<disk ") {
        rest = &rest[i..];
        let end = rest.find("</disk>").unwrap_or(rest.len());
        let body = &rest[..end];
        rest = &rest[end..];
        let open = &body[..body.find('>').unwrap_or(body.len())];
        if attr(open, "device").as_deref() != Some("disk") || attr(open, "type").as_deref() != Some("file") {
            continue;
        }
        let tag = |name: &str| {
            body.find(&format!("<{name} "))
                .map(|j| &body[j..j + body[j..].find('>').unwrap_or(body.len() - j)])
        };
        let (Some(source), Some(target)) = (tag("source"), tag("target")) else {
            continue;
        };
        let (Some(file), Some(dev)) = (attr(source, "file"), attr(target, "dev")) else {
            continue;
        };
        let format = tag("driver")
            .and_then(|d| attr(d, "type"))
            .unwrap_or_else(|| "raw".into())
            .to_ascii_uppercase();
        out.push((dev, file, format));
    }
    out
}

/// The backup XML of a pull-mode backup of one disk.
pub fn backup_xml(req: &BackupRequest<'_>, listen: &str) -> String {
    let e = xml_escape;
    let incremental = req
        .incremental_from
        .map(|c| format!("<incremental>{}</incremental>", e(c)))
        .unwrap_or_default();
    format!(
        "<domainbackup mode='pull'>{incremental}<server transport='tcp' name='{}' port='{}'/>\
         <disks><disk name='{}' backup='yes' type='file'><scratch file='{}'/></disk></disks></domainbackup>",
        e(listen),
        req.port,
        e(req.device),
        e(req.scratch)
    )
}

/// The checkpoint XML the backup creates.
pub fn checkpoint_xml(req: &BackupRequest<'_>) -> String {
    format!(
        "<domaincheckpoint><name>{}</name><disks><disk name='{}' checkpoint='bitmap'/></disks></domaincheckpoint>",
        xml_escape(req.checkpoint),
        xml_escape(req.device)
    )
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> DriverError + '_ {
    move |source| DriverError::Io {
        what: what.into(),
        source,
    }
}

impl LibvirtDriver {
    /// The host address the exports listen on.
    fn export_host(&self) -> String {
        uri_host(&self.uri).unwrap_or_else(|| "127.0.0.1".into())
    }

    pub(super) async fn disks_of(&self, guest: &str) -> Result<super::driver::GuestDisks, DriverError> {
        let xml = match self.virsh(&["dumpxml", guest]).await {
            Ok(x) => x,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let running = self.virsh(&["domstate", guest]).await?.trim() == "running";
        let mut out = Vec::new();
        for (device, path, format) in disks_from_domain_xml(&xml) {
            let info = self.virsh(&["domblkinfo", guest, &device]).await?;
            let size = info
                .lines()
                .find_map(|l| l.strip_prefix("Capacity:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            out.push(GuestDisk {
                device,
                path,
                format,
                size,
            });
        }
        Ok(Some((out, running)))
    }

    pub(super) async fn begin_backup(&self, req: &BackupRequest<'_>) -> Result<NbdExport, DriverError> {
        let host = self.export_host();
        let dir = std::env::temp_dir().join(format!(
            "systemvm-backup-{}-{}",
            std::process::id(),
            crate::util::random_token::<8>().map_err(|e| DriverError::Unavailable(e.to_string()))?
        ));
        std::fs::create_dir_all(&dir).map_err(io("failed to create a directory for the backup XML"))?;
        let backup = dir.join("backup.xml");
        let checkpoint = dir.join("checkpoint.xml");
        let written = std::fs::write(&backup, backup_xml(req, &host))
            .and_then(|()| std::fs::write(&checkpoint, checkpoint_xml(req)));
        let result = match written {
            Ok(()) => {
                self.virsh(&[
                    "backup-begin",
                    req.guest,
                    &backup.display().to_string(),
                    &checkpoint.display().to_string(),
                ])
                .await
            }
            Err(e) => Err(io("failed to write the backup XML")(e)),
        };
        let _ = std::fs::remove_dir_all(&dir);
        result?;
        let address = if host.contains(':') {
            format!("[{host}]:{}", req.port)
        } else {
            format!("{host}:{}", req.port)
        };
        Ok(NbdExport {
            address,
            export: req.device.to_owned(),
            dirty_context: req
                .incremental_from
                .map(|_| format!("qemu:dirty-bitmap:backup-{}", req.device)),
        })
    }

    pub(super) async fn end_backup(&self, guest: &str) -> Result<(), DriverError> {
        let _ = self.virsh(&["domjobabort", guest]).await;
        // Teardown is asynchronous for a moment: wait until no job is reported.
        for _ in 0..100 {
            match self.virsh(&["domjobinfo", guest]).await {
                Ok(info)
                    if info
                        .lines()
                        .any(|l| l.starts_with("Job type:") && l.contains("None")) =>
                {
                    return Ok(());
                }
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                Err(e) if not_found(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Err(DriverError::Unavailable(format!(
            "the backup job of {guest} did not end within 10 s"
        )))
    }

    pub(super) async fn checkpoint_names(&self, guest: &str) -> Result<Vec<String>, DriverError> {
        Ok(self
            .virsh(&["checkpoint-list", guest, "--name"])
            .await?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_come_from_the_domain_xml() {
        let xml = "<domain><devices>\
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/mnt/p1/v&amp;1.qcow2'/><target dev='vda' bus='virtio'/></disk>\
            <disk type='file' device='cdrom'><source file='/x.iso'/><target dev='hdc'/></disk>\
            <disk type='block' device='disk'><source dev='/dev/sdb'/><target dev='vdb'/></disk>\
            <disk type='file' device='disk'><source file='/d.img'/><target dev='vdc'/></disk>\
            <disk type='file' device='disk'><target dev='vdd'/>\
            </devices></domain>";
        assert_eq!(
            disks_from_domain_xml(xml),
            vec![
                ("vda".into(), "/mnt/p1/v&1.qcow2".into(), "QCOW2".into()),
                ("vdc".into(), "/d.img".into(), "RAW".into())
            ]
        );
        assert!(disks_from_domain_xml("<disk type='file' device='disk'").is_empty());
    }

    #[test]
    fn backup_xml_is_escaped() {
        let req = BackupRequest {
            guest: "g",
            device: "vda",
            scratch: "/var/tmp/s'1",
            port: 10809,
            checkpoint: "c<2>",
            incremental_from: Some("c1"),
        };
        let b = backup_xml(&req, "127.0.0.1");
        assert!(
            b.contains("<incremental>c1</incremental>") && b.contains("file='/var/tmp/s&apos;1'"),
            "{b}"
        );
        assert!(checkpoint_xml(&req).contains("<name>c&lt;2&gt;</name>"));
    }
}
