//! Networking inside a system VM: static from the seed, or DHCP through busybox `udhcpc`, whose
//! event script is this same binary ([`dhcp_event`]). DNS goes to `/run/resolv.conf`, which the
//! image's read-only `/etc/resolv.conf` links to.
//!
//! Invariants: the loopback is always up; an interface is configured by one owner (the static
//! path or udhcpc's script), never both.

use std::net::Ipv4Addr;
use std::process::Command;

use systemvm_proto::seed::StaticNet;

/// Where DNS servers go.
pub const RESOLV: &str = "/run/resolv.conf";
/// Written by the DHCP script once a lease is applied.
pub const BOUND_MARK: &str = "/run/systemvm/dhcp.bound";
/// The init's own path, given to udhcpc as its script.
pub const SELF: &str = "/sbin/systemvm-init";

/// The first network interface other than the loopback.
pub fn interface() -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.into_iter().next()
}

/// `ip` (busybox) with `args`; the error says what failed.
pub fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    match Command::new(program).args(args).status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("{program} {} failed: {s}", args.join(" "))),
        Err(e) => Err(format!("{program} {} failed: {e}", args.join(" "))),
    }
}

/// The resolv.conf text for `dns`.
pub fn resolv_conf(dns: &[Ipv4Addr]) -> String {
    dns.iter().map(|d| format!("nameserver {d}\n")).collect()
}

/// Configures `ifname` statically.
pub fn apply_static(ifname: &str, n: &StaticNet) -> Result<(), String> {
    ip(&["link", "set", ifname, "up"])?;
    ip(&[
        "addr",
        "add",
        &format!("{}/{}", n.address, n.prefix),
        "dev",
        ifname,
    ])?;
    if let Some(gw) = n.gateway {
        ip(&["route", "add", "default", "via", &gw.to_string(), "dev", ifname])?;
    }
    std::fs::write(RESOLV, resolv_conf(&n.dns)).map_err(|e| format!("failed to write {RESOLV}: {e}"))
}

/// Netmask → prefix length (udhcpc passes a dotted mask).
pub fn mask_prefix(mask: &str) -> Option<u8> {
    let m: Ipv4Addr = mask.parse().ok()?;
    let bits = u32::from(m);
    // A mask is ones then zeros.
    (bits.leading_ones() + bits.trailing_zeros() == 32).then_some(bits.leading_ones() as u8)
}

/// udhcpc's script (`argv[1]` = the event; `interface`, `ip`, `subnet`, `router`, `dns` in the
/// environment). Returns the process's exit code.
pub fn dhcp_event(event: &str) -> i32 {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let ifname = env("interface");
    let outcome = match event {
        "deconfig" => {
            ip(&["addr", "flush", "dev", &ifname]).and_then(|()| ip(&["link", "set", &ifname, "up"]))
        }
        "bound" | "renew" => {
            let prefix = mask_prefix(&env("subnet")).unwrap_or(24);
            let addr = format!("{}/{prefix}", env("ip"));
            ip(&["addr", "flush", "dev", &ifname])
                .and_then(|()| ip(&["addr", "add", &addr, "dev", &ifname]))
                .and_then(|()| match env("router").split_whitespace().next() {
                    Some(gw) => ip(&["route", "replace", "default", "via", gw, "dev", &ifname]),
                    None => Ok(()),
                })
                .and_then(|()| {
                    let dns: Vec<Ipv4Addr> = env("dns")
                        .split_whitespace()
                        .filter_map(|d| d.parse().ok())
                        .collect();
                    std::fs::write(RESOLV, resolv_conf(&dns)).map_err(|e| e.to_string())
                })
                .and_then(|()| std::fs::write(BOUND_MARK, &addr).map_err(|e| e.to_string()))
                .map(|()| eprintln!("systemvm-init: {ifname} {addr} by DHCP"))
        }
        _ => Ok(()),
    };
    match outcome {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("systemvm-init: DHCP {event}: {e}");
            1
        }
    }
}

/// Starts udhcpc on `ifname` in the foreground (the init supervises it); returns its pid.
pub fn start_dhcp(ifname: &str) -> Result<u32, String> {
    ip(&["link", "set", ifname, "up"])?;
    Command::new("udhcpc")
        .args(["-f", "-i", ifname, "-s", SELF, "-t", "20", "-T", "1", "-A", "3"])
        .spawn()
        .map(|c| c.id())
        .map_err(|e| format!("failed to start udhcpc: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(mask_prefix("255.255.255.0"), Some(24));
        assert_eq!(mask_prefix("255.255.255.255"), Some(32));
        assert_eq!(mask_prefix("0.0.0.0"), Some(0));
        assert_eq!(mask_prefix("255.0.255.0"), None);
        assert_eq!(mask_prefix("x"), None);
    }

    #[test]
    fn resolv() {
        assert_eq!(
            resolv_conf(&["10.0.2.3".parse().unwrap(), "1.1.1.1".parse().unwrap()]),
            "nameserver 10.0.2.3\nnameserver 1.1.1.1\n"
        );
    }
}
