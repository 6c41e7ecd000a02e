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
pub(super) fn xml_escape(s: &str) -> String {
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

pub(super) fn not_found(e: &DriverError) -> bool {
    let t = e.to_string();
    t.contains("failed to get domain") || t.contains("Domain not found") || t.contains("no domain with")
}

/// The value of attribute `name` in the tag text `tag` (`<graphics type='vnc' port='5900' …>`).
pub(super) fn attr(tag: &str, name: &str) -> Option<String> {
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

/// The host part of a libvirt URI (`qemu+ssh://user@kvm1:22/system` → `kvm1`, `[fd00::1]` →
/// `fd00::1`); `None` for a URI of this host (`qemu:///system`, or a loopback host).
pub fn uri_host(uri: &str) -> Option<String> {
    let (_, rest) = uri.split_once("://")?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        match host_port.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host_port,
        }
    };
    (!host.is_empty() && !is_loopback(host)).then(|| host.to_owned())
}

/// `localhost`, 127.0.0.0/8 or `::1`.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The first `<graphics type='vnc'>` element of a domain's XML with a live port: its listen
/// address (the `listen` attribute, else its `<listen address=…>` child), port and password.
fn vnc_graphics(xml: &str) -> Option<(Option<String>, u16, Option<Secret>)> {
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
        let password = attr(tag, "passwd").filter(|p| !p.is_empty()).map(Secret);
        let mut listen = attr(tag, "listen").filter(|l| !l.is_empty());
        if listen.is_none() && !tag.ends_with('/') {
            let body = &rest[1..rest.find("</graphics>").unwrap_or(rest.len())];
            let mut children = body;
            while let Some(j) = children.find("<listen") {
                let child = &children[j..];
                let close = child.find('>').unwrap_or(child.len());
                if let Some(a) = attr(&child[..close], "address").filter(|a| !a.is_empty()) {
                    listen = Some(a);
                    break;
                }
                children = &child[close..];
            }
        }
        return Some((listen, port, password));
    }
    None
}

/// Where the console proxy reaches the VNC console of domain `domain` on the host of `uri`,
/// from its XML (`virsh dumpxml --security-info`); `Ok(None)` when it has no live VNC console.
///
/// A listener on every address (`0.0.0.0`, `::`, or none given) is reached at the libvirt host's
/// address (the host of the URI), loopback for a URI of this host. A loopback-only listener on a
/// remote host is unreachable from a console proxy (its 127.0.0.1 is its own): refused, with
/// what to change.
pub fn vnc_from_domain_xml(xml: &str, uri: &str, domain: &str) -> Result<Option<VncEndpoint>, DriverError> {
    let Some((listen, port, password)) = vnc_graphics(xml) else {
        return Ok(None);
    };
    let remote = uri_host(uri);
    let host = match (listen.as_deref(), &remote) {
        (None | Some("0.0.0.0" | "::" | "[::]"), Some(h)) => h.clone(),
        (None | Some("0.0.0.0" | "::" | "[::]"), None) => "127.0.0.1".to_owned(),
        (Some(l), Some(h)) if is_loopback(l) => {
            return Err(DriverError::Unavailable(format!(
                "libvirt domain {domain} on {h} listens for VNC on {l} only, which no console proxy \
                 can reach: set the domain's VNC listen address (<graphics type='vnc' listen='…'>) \
                 to an address of {h} that the console proxies reach, or 0.0.0.0"
            )));
        }
        (Some(l), _) => l.trim_start_matches('[').trim_end_matches(']').to_owned(),
    };
    Ok(Some(VncEndpoint { host, port, password }))
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
            let seed = super::seed::write_seed_iso(&dir, spec, super::seed::Urls::default()).await?;
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

    fn guest_disks<'a>(
        &'a self,
        guest: &'a str,
    ) -> DriverFuture<'a, Result<super::driver::GuestDisks, DriverError>> {
        Box::pin(self.disks_of(guest))
    }

    fn backup_begin<'a>(
        &'a self,
        req: &'a super::BackupRequest<'a>,
    ) -> DriverFuture<'a, Result<super::NbdExport, DriverError>> {
        Box::pin(self.begin_backup(req))
    }

    fn backup_end<'a>(&'a self, guest: &'a str) -> DriverFuture<'a, Result<(), DriverError>> {
        Box::pin(self.end_backup(guest))
    }

    fn checkpoints<'a>(&'a self, guest: &'a str) -> DriverFuture<'a, Result<Vec<String>, DriverError>> {
        Box::pin(self.checkpoint_names(guest))
    }

    fn delete_checkpoint<'a>(
        &'a self,
        guest: &'a str,
        name: &'a str,
    ) -> DriverFuture<'a, Result<(), DriverError>> {
        Box::pin(async move { self.virsh(&["checkpoint-delete", guest, name]).await.map(|_| ()) })
    }

    fn console_of<'a>(
        &'a self,
        guest: &'a str,
    ) -> DriverFuture<'a, Result<Option<VncEndpoint>, DriverError>> {
        Box::pin(async move {
            match self.virsh(&["dumpxml", "--security-info", guest]).await {
                Ok(xml) => vnc_from_domain_xml(&xml, &self.uri, guest),
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

    const LOCAL: &str = "qemu:///system";
    const REMOTE: &str = "qemu+ssh://kvm1/system";

    fn vnc(xml: &str) -> Option<VncEndpoint> {
        vnc_from_domain_xml(xml, LOCAL, "g").unwrap()
    }

    #[test]
    fn graphics_parsing() {
        let live = "<domain><devices><graphics type='vnc' port='5901' autoport='yes' listen='127.0.0.1' passwd='p&amp;w'>\n<listen type='address' address='127.0.0.1'/></graphics></devices></domain>";
        let v = vnc(live).unwrap();
        assert_eq!((v.host.as_str(), v.port), ("127.0.0.1", 5901));
        assert_eq!(v.password.unwrap().expose(), "p&w");
        // Not started (autoport -1), no graphics, SPICE only, odd text: no console.
        assert!(vnc("<graphics type='vnc' port='-1' autoport='yes'/>").is_none());
        assert!(vnc("<domain><devices/></domain>").is_none());
        assert!(vnc("<graphics type='spice' port='5930'/>").is_none());
        assert!(vnc("<graphics type='vnc' port=").is_none());
        assert!(vnc("<graphics type=\"vnc\" port=\"70000\"/>").is_none());
        // Any-address listeners on this host are reached on loopback; double quotes work; no password.
        let any = vnc(
            "<graphics type=\"spice\" port=\"1\"/><graphics type=\"vnc\" port=\"5902\" listen=\"0.0.0.0\"/>",
        )
        .unwrap();
        assert_eq!(
            (any.host.as_str(), any.port, any.password.is_none()),
            ("127.0.0.1", 5902, true)
        );
        let remote = vnc("<graphics type='vnc' port='5903' listen='10.0.0.7'/>").unwrap();
        assert_eq!(remote.host, "10.0.0.7");
        // A `port` inside another attribute's name is not the port.
        assert!(vnc("<graphics type='vnc' autoport='5904'/>").is_none());
    }

    #[test]
    fn uri_hosts() {
        for (uri, host) in [
            ("qemu+ssh://kvm1/system", Some("kvm1")),
            (
                "qemu+ssh://root@kvm1.example.com:2222/system?keyfile=/k",
                Some("kvm1.example.com"),
            ),
            ("qemu+tcp://10.0.0.9/system", Some("10.0.0.9")),
            ("qemu+ssh://[fd00::9]:22/system", Some("fd00::9")),
            ("qemu+tls://kvm2?no_verify=1", Some("kvm2")),
            ("qemu:///system", None),
            ("qemu+unix:///system", None),
            ("qemu+tcp://localhost/system", None),
            ("qemu+tcp://127.0.0.1:16509/system", None),
            ("qemu+ssh://[::1]/system", None),
            ("test:///default", None),
            ("not a uri", None),
        ] {
            assert_eq!(uri_host(uri).as_deref(), host, "{uri}");
        }
    }

    #[test]
    fn any_address_listeners_on_a_remote_host_resolve_to_that_host() {
        for listen in [" listen='0.0.0.0'", " listen='::'", " listen='[::]'", ""] {
            let xml =
                format!("<domain><devices><graphics type='vnc' port='5905'{listen}/></devices></domain>");
            let v = vnc_from_domain_xml(&xml, REMOTE, "guest-1").unwrap().unwrap();
            assert_eq!((v.host.as_str(), v.port), ("kvm1", 5905), "{listen:?}");
            // The same domain on this host: loopback.
            let v = vnc_from_domain_xml(&xml, LOCAL, "guest-1").unwrap().unwrap();
            assert_eq!(v.host, "127.0.0.1", "{listen:?}");
        }
        // The address in a <listen> child counts when the attribute is absent.
        let child =
            "<graphics type='vnc' port='5906'><listen type='address' address='192.0.2.5'/></graphics>";
        assert_eq!(
            vnc_from_domain_xml(child, REMOTE, "g").unwrap().unwrap().host,
            "192.0.2.5"
        );
        let any_child =
            "<graphics type='vnc' port='5906'><listen type='address' address='0.0.0.0'/></graphics>";
        assert_eq!(
            vnc_from_domain_xml(any_child, REMOTE, "g").unwrap().unwrap().host,
            "kvm1"
        );
        // An explicit address is kept (brackets dropped).
        let v6 = "<graphics type='vnc' port='5907' listen='[fd00::7]'/>";
        assert_eq!(
            vnc_from_domain_xml(v6, REMOTE, "g").unwrap().unwrap().host,
            "fd00::7"
        );
        // An IPv6 libvirt host.
        let any = "<graphics type='vnc' port='5907' listen='0.0.0.0'/>";
        let v = vnc_from_domain_xml(any, "qemu+ssh://root@[fd00::9]/system", "g")
            .unwrap()
            .unwrap();
        assert_eq!(v.host, "fd00::9");
    }

    #[test]
    fn loopback_listeners_on_a_remote_host_are_refused() {
        for listen in ["127.0.0.1", "::1", "[::1]", "localhost", "127.0.1.1"] {
            let xml = format!("<graphics type='vnc' port='5908' listen='{listen}'/>");
            let e = vnc_from_domain_xml(&xml, REMOTE, "guest-7")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("guest-7")
                    && e.contains("kvm1")
                    && e.contains("set the domain's VNC listen address"),
                "{listen}: {e}"
            );
            // On this host, loopback is where the VNC server is.
            let v = vnc_from_domain_xml(&xml, LOCAL, "guest-7").unwrap().unwrap();
            assert_eq!(v.host, listen.trim_start_matches('[').trim_end_matches(']'));
        }
        let child =
            "<graphics type='vnc' port='5909'><listen type='address' address='127.0.0.1'/></graphics>";
        assert!(vnc_from_domain_xml(child, REMOTE, "g").is_err());
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
