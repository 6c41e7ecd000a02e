//! The `libvirt` driver: system VMs as libvirt domains (`<domain type='qemu'>`, TCG) on a host
//! reached by a libvirt URI, driven through `virsh -c URI`; and, for any domain on that host, its VNC
//! coordinates from the domain's `<graphics>` element, so `createConsoleEndpoint` opens consoles of
//! guest VMs core does not deploy.
//!
//! Invariants: a domain's name is the system VM's name and its uuid the VM's id (libvirt keeps the
//! domain; core keeps nothing else); boot parameters go in the NoCloud seed ([`super::seed`]), never
//! the kernel command line or the domain XML (readable to libvirt clients); every `virsh` failure
//! becomes a [`DriverError`] with virsh's own words; odd `dumpxml` output yields no console, never a
//! panic.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use systemvm_proto::Secret;

use super::driver::{Driver, DriverError, DriverFuture, Placement, VmSpec, VmState, VncEndpoint};
use super::qemu::Boot;

/// Time a domain gets to shut down before it is destroyed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs system VMs as libvirt domains, and reads guest domains' consoles.
#[derive(Debug, Clone)]
pub struct LibvirtDriver {
    /// The libvirt URI (`qemu:///system`, `qemu+ssh://host/system`, …).
    pub uri: String,
    /// Parent of the per-VM directories (seed, serial log) on this host.
    pub vm_root: PathBuf,
    /// What system VM domains boot.
    pub boot: Boot,
    /// Memory per VM, MiB.
    pub memory_mib: u32,
}

/// Escapes text for an XML attribute or element.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

impl LibvirtDriver {
    /// A driver that only reads guest VMs' consoles on `uri` (it starts no system VM).
    pub fn guests_only(uri: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            vm_root: PathBuf::new(),
            boot: Boot::Disk {
                image: PathBuf::new(),
            },
            memory_mib: 0,
        }
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.vm_root.join(id)
    }

    /// The domain XML of a system VM.
    pub fn domain_xml(&self, spec: &VmSpec, seed: &std::path::Path) -> String {
        let e = xml_escape;
        let dir = self.vm_dir(&spec.id);
        let mut x = String::new();
        let _ = writeln!(x, "<domain type='qemu'>");
        let _ = writeln!(x, "  <name>{}</name>", e(&spec.name));
        let _ = writeln!(x, "  <uuid>{}</uuid>", e(&spec.id));
        let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", self.memory_mib);
        let _ = writeln!(x, "  <vcpu>1</vcpu>");
        let _ = writeln!(x, "  <os>");
        let _ = writeln!(x, "    <type arch='x86_64' machine='pc'>hvm</type>");
        match &self.boot {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                let _ = writeln!(x, "    <kernel>{}</kernel>", e(&kernel.display().to_string()));
                let _ = writeln!(x, "    <initrd>{}</initrd>", e(&initrd.display().to_string()));
                let cmdline = format!("{cmdline} systemvm.seed=cidata");
                let _ = writeln!(x, "    <cmdline>{}</cmdline>", e(cmdline.trim()));
            }
            Boot::Disk { .. } => {
                let _ = writeln!(x, "    <boot dev='hd'/>");
            }
        }
        let _ = writeln!(x, "  </os>");
        // Without <acpi/> libvirt passes -no-acpi, which QEMU 9+ no longer accepts.
        let _ = writeln!(x, "  <features><acpi/></features>");
        let _ = writeln!(x, "  <on_reboot>destroy</on_reboot>");
        let _ = writeln!(x, "  <devices>");
        if let Boot::Disk { image } = &self.boot {
            let _ = writeln!(
                x,
                "    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/><transient/></disk>",
                e(&image.display().to_string())
            );
        }
        let _ = writeln!(
            x,
            "    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{}'/><target dev='hdc' bus='ide'/><readonly/></disk>",
            e(&seed.display().to_string())
        );
        let _ = writeln!(
            x,
            "    <serial type='file'><source path='{}'/><target port='0'/></serial>",
            e(&dir.join("console.log").display().to_string())
        );
        let _ = writeln!(x, "    <graphics type='vnc' autoport='yes' listen='127.0.0.1'/>");
        let _ = writeln!(x, "    <video><model type='vga'/></video>");
        let _ = writeln!(x, "  </devices>");
        let _ = writeln!(x, "</domain>");
        x
    }

    /// Runs `virsh -c URI ARGS…`; stdout on success, virsh's stderr in the error otherwise.
    pub async fn virsh(&self, args: &[&str]) -> Result<String, DriverError> {
        let out = tokio::process::Command::new("virsh")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|source| DriverError::Io {
                what: "failed to run virsh (package libvirt-clients)".into(),
                source,
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(DriverError::Unavailable(format!(
                "virsh {}: {}",
                args.first().copied().unwrap_or_default(),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    async fn domstate(&self, id: &str) -> Result<String, DriverError> {
        Ok(self.virsh(&["domstate", id]).await?.trim().to_owned())
    }
}

fn not_found(e: &DriverError) -> bool {
    let t = e.to_string();
    t.contains("failed to get domain") || t.contains("Domain not found") || t.contains("no domain with")
}

/// The value of attribute `name` in the tag text `tag` (`<graphics type='vnc' port='5900' …>`).
fn attr(tag: &str, name: &str) -> Option<String> {
    let mut rest = tag;
    while let Some(i) = rest.find(name) {
        let before = rest[..i].chars().last();
        let after = &rest[i + name.len()..];
        let after = after.trim_start();
        if before.is_some_and(char::is_whitespace)
            && let Some(v) = after.strip_prefix('=')
        {
            let v = v.trim_start();
            let quote = v.chars().next()?;
            if quote == '\'' || quote == '"' {
                let body = &v[1..];
                let end = body.find(quote)?;
                return Some(
                    body[..end]
                        .replace("&apos;", "'")
                        .replace("&quot;", "\"")
                        .replace("&lt;", "<")
                        .replace("&gt;", ">")
                        .replace("&amp;", "&"),
                );
            }
            return None;
        }
        rest = &rest[i + name.len()..];
    }
    None
}

/// The VNC endpoint in a domain's XML (`virsh dumpxml --security-info`), if it has a live one.
pub fn vnc_from_domain_xml(xml: &str) -> Option<VncEndpoint> {
    let mut rest = xml;
    while let Some(i) = rest.find("<graphics") {
        let tail = &rest[i..];
        let end = tail.find('>')?;
        let tag = &tail[..end];
        rest = &tail[end..];
        if attr(tag, "type").as_deref() != Some("vnc") {
            continue;
        }
        let port: i64 = attr(tag, "port")?.parse().ok()?;
        let port = u16::try_from(port).ok().filter(|p| *p > 0)?;
        let host = match attr(tag, "listen").as_deref() {
            None | Some("" | "0.0.0.0" | "::" | "[::]") => "127.0.0.1".to_owned(),
            Some(h) => h.to_owned(),
        };
        let password = attr(tag, "passwd").filter(|p| !p.is_empty()).map(Secret);
        return Some(VncEndpoint { host, port, password });
    }
    None
}

impl Driver for LibvirtDriver {
    fn name(&self) -> &'static str {
        "libvirt"
    }

    fn start<'a>(&'a self, spec: &'a VmSpec) -> DriverFuture<'a, Result<Placement, DriverError>> {
        Box::pin(async move {
            if matches!(&self.boot, Boot::Disk { image } if image.as_os_str().is_empty()) {
                return Err(DriverError::Unavailable(format!(
                    "libvirt host {} is configured for guest consoles only: no system VM image",
                    self.uri
                )));
            }
            let dir = self.vm_dir(&spec.id);
            std::fs::create_dir_all(&dir).map_err(|source| DriverError::Io {
                what: "failed to create the VM directory".into(),
                source,
            })?;
            let seed = super::seed::write_seed_iso(&dir, spec, None).await?;
            let xml_path = dir.join("domain.xml");
            std::fs::write(&xml_path, self.domain_xml(spec, &seed)).map_err(|source| DriverError::Io {
                what: "failed to write the domain XML".into(),
                source,
            })?;
            // A domain left from an earlier start is replaced.
            let _ = self.virsh(&["destroy", &spec.id]).await;
            let _ = self.virsh(&["undefine", &spec.id]).await;
            self.virsh(&["define", &xml_path.display().to_string()]).await?;
            self.virsh(&["start", &spec.id]).await?;
            tracing::info!(vm.id = %spec.id, uri = %self.uri, "Started a system VM domain");
            Ok(Placement::default())
        })
    }

    fn stop<'a>(
        &'a self,
        id: &'a str,
        _placement: &'a Placement,
        force: bool,
    ) -> DriverFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            match self.domstate(id).await {
                Ok(s) if s != "running" && s != "paused" && s != "in shutdown" => return Ok(()),
                Err(e) if not_found(&e) => return Ok(()),
                _ => {}
            }
            if !force && self.virsh(&["shutdown", id]).await.is_ok() {
                let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
                while tokio::time::Instant::now() < deadline {
                    if self.domstate(id).await.map_or(true, |s| s == "shut off") {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            match self.virsh(&["destroy", id]).await {
                Ok(_) => Ok(()),
                Err(e) if not_found(&e) || e.to_string().contains("not running") => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    fn state<'a>(&'a self, id: &'a str, _placement: &'a Placement) -> DriverFuture<'a, VmState> {
        Box::pin(async move {
            match self.domstate(id).await {
                Ok(s) if s == "running" => VmState::Running,
                Ok(s) => VmState::Stopped(format!("domain is {s}")),
                Err(e) => VmState::Stopped(e.to_string()),
            }
        })
    }

    fn destroy<'a>(&'a self, id: &'a str) -> DriverFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let _ = self.virsh(&["destroy", id]).await;
            match self.virsh(&["undefine", id]).await {
                Ok(_) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e),
            }
            super::process::remove_vm_dir(&self.vm_dir(id))
        })
    }

    fn console_of<'a>(
        &'a self,
        guest: &'a str,
    ) -> DriverFuture<'a, Result<Option<VncEndpoint>, DriverError>> {
        Box::pin(async move {
            match self.virsh(&["dumpxml", "--security-info", guest]).await {
                Ok(xml) => Ok(vnc_from_domain_xml(&xml)),
                Err(e) if not_found(&e) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use systemvm_proto::agent::AgentRole;

    #[test]
    fn graphics_parsing() {
        let live = "<domain><devices><graphics type='vnc' port='5901' autoport='yes' listen='127.0.0.1' passwd='p&amp;w'>\n<listen type='address' address='127.0.0.1'/></graphics></devices></domain>";
        let v = vnc_from_domain_xml(live).unwrap();
        assert_eq!((v.host.as_str(), v.port), ("127.0.0.1", 5901));
        assert_eq!(v.password.unwrap().expose(), "p&w");
        // Not started (autoport -1), no graphics, SPICE only, odd text: no console.
        assert!(vnc_from_domain_xml("<graphics type='vnc' port='-1' autoport='yes'/>").is_none());
        assert!(vnc_from_domain_xml("<domain><devices/></domain>").is_none());
        assert!(vnc_from_domain_xml("<graphics type='spice' port='5930'/>").is_none());
        assert!(vnc_from_domain_xml("<graphics type='vnc' port=").is_none());
        assert!(vnc_from_domain_xml("<graphics type=\"vnc\" port=\"70000\"/>").is_none());
        // Any-address listeners are reached on loopback; double quotes work; no password.
        let any = vnc_from_domain_xml(
            "<graphics type=\"spice\" port=\"1\"/><graphics type=\"vnc\" port=\"5902\" listen=\"0.0.0.0\"/>",
        )
        .unwrap();
        assert_eq!(
            (any.host.as_str(), any.port, any.password.is_none()),
            ("127.0.0.1", 5902, true)
        );
        let remote = vnc_from_domain_xml("<graphics type='vnc' port='5903' listen='10.0.0.7'/>").unwrap();
        assert_eq!(remote.host, "10.0.0.7");
        // A `port` inside another attribute's name is not the port.
        assert!(vnc_from_domain_xml("<graphics type='vnc' autoport='5904'/>").is_none());
    }

    #[test]
    fn domain_xml_escapes_and_keeps_secrets_out() {
        let d = LibvirtDriver {
            uri: "qemu:///system".into(),
            vm_root: "/var/lib/core/vms".into(),
            boot: Boot::Kernel {
                kernel: "/k/vmlinuz".into(),
                initrd: "/k/init<rd".into(),
                cmdline: "console=ttyS0".into(),
            },
            memory_mib: 256,
        };
        let spec = VmSpec {
            id: "0b1e4c4c-3a5e-4a8e-9f4a-3c1d2e3f4a5b".into(),
            name: "v-0b1e4c4c-VM".into(),
            role: AgentRole::ConsoleProxy,
            zone_id: "z".into(),
            secret: Secret::from("top-secret-value"),
            core_urls: vec!["wss://core:8250/agent".into()],
            ca: "/ca.pem".into(),
            store_url: None,
            allow_internal: vec![],
            max_sessions: 5,
        };
        let x = d.domain_xml(&spec, std::path::Path::new("/vms/x/seed.iso"));
        assert!(x.starts_with("<domain type='qemu'>"), "{x}");
        assert!(x.contains("<uuid>0b1e4c4c-3a5e-4a8e-9f4a-3c1d2e3f4a5b</uuid>"));
        assert!(x.contains("<initrd>/k/init&lt;rd</initrd>"));
        assert!(x.contains("<cmdline>console=ttyS0 systemvm.seed=cidata</cmdline>"));
        assert!(x.contains("<source file='/vms/x/seed.iso'/>"));
        assert!(x.contains("<graphics type='vnc' autoport='yes' listen='127.0.0.1'/>"));
        assert!(!x.contains("top-secret-value") && !x.contains("wss://"));
    }
}
