//! Core's settings for this agent (`Welcome.config`, `ConfigUpdate`): which of them the storage
//! agent applies, and how their text becomes the values downloads use. No I/O.
//!
//! | key | value | replaces |
//! |---|---|---|
//! | `secstorage.allowed.internal.sites` | comma-separated CIDRs (a bare address is one host) | `--allow-internal` |
//! | `max.template.iso.size` | GiB, integer ≥ 1 | `--max-size` |
//!
//! Invariants:
//! * every map is the agent's full settings: [`resolve`] starts from the command-line values each
//!   time, so a key core no longer sends brings its command-line value back;
//! * a present `secstorage.allowed.internal.sites` replaces the command-line list, even when blank
//!   (blank = no internal range); an entry that is not a CIDR, a `/0` (which would allow every
//!   internal address) or a range starting at `0.0.0.0`/`::` (which reach this host) is skipped with
//!   a warning and never widens the list;
//! * a `max.template.iso.size` that is not an integer ≥ 1 (or overflows) is ignored with a warning:
//!   the command-line cap stays;
//! * keys this agent does not know are ignored.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use systemvm_proto::agent::config_keys;

/// One GiB, the unit of `max.template.iso.size`.
pub const GIB: u64 = 1 << 30;

/// The values downloads started from now on use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownloadPolicy {
    /// Internal ranges a download may reach anyway.
    pub allow_internal: Vec<IpNet>,
    /// Largest download and largest installed file, bytes.
    pub max_size: u64,
}

/// A setting core sent that the agent could not use (logged; the value is not secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    /// An entry of the internal sites is not a CIDR or an address.
    #[error("{key}: {entry:?} is not a CIDR; skipped")]
    BadCidr {
        /// The setting.
        key: &'static str,
        /// The entry.
        entry: String,
    },
    /// An entry of the internal sites is a CIDR no download may be allowed to reach.
    #[error("{key}: {entry:?} {why}; skipped")]
    Unsafe {
        /// The setting.
        key: &'static str,
        /// The entry.
        entry: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// The size cap is not a whole number of GiB ≥ 1.
    #[error("{key}: {value:?} is not a size in GiB (integer >= 1); the command-line cap stays")]
    BadSize {
        /// The setting.
        key: &'static str,
        /// The value.
        value: String,
    },
}

/// Parses the internal sites: the ranges kept and the entries skipped.
pub fn parse_sites(value: &str) -> (Vec<IpNet>, Vec<SettingError>) {
    let key = config_keys::ALLOWED_INTERNAL_SITES;
    let mut nets = Vec::new();
    let mut errors = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let net = entry
            .parse::<IpNet>()
            .ok()
            .or_else(|| entry.parse::<IpAddr>().ok().map(IpNet::from));
        match net {
            Some(net) if net.prefix_len() == 0 => errors.push(SettingError::Unsafe {
                key,
                entry: entry.to_owned(),
                why: "would allow every internal address",
            }),
            // 0.0.0.0 and :: connect to this host itself (CloudStack: "0.0.0.0 is not a valid site").
            Some(net) if net.network().is_unspecified() => errors.push(SettingError::Unsafe {
                key,
                entry: entry.to_owned(),
                why: "covers the unspecified address, which reaches this host",
            }),
            Some(net) => {
                if !nets.contains(&net) {
                    nets.push(net);
                }
            }
            None => errors.push(SettingError::BadCidr {
                key,
                entry: entry.to_owned(),
            }),
        }
    }
    (nets, errors)
}

/// Parses the size cap (GiB) into bytes.
pub fn parse_max_size(value: &str) -> Result<u64, SettingError> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|gib| *gib >= 1)
        .and_then(|gib| gib.checked_mul(GIB))
        .ok_or_else(|| SettingError::BadSize {
            key: config_keys::MAX_TEMPLATE_SIZE_GB,
            value: value.to_owned(),
        })
}

/// The policy for `config` (core's full settings map) over the command-line `base`, with the
/// settings that could not be used.
pub fn resolve(
    base: &DownloadPolicy,
    config: &BTreeMap<String, String>,
) -> (DownloadPolicy, Vec<SettingError>) {
    let mut policy = base.clone();
    let mut errors = Vec::new();
    if let Some(sites) = config.get(config_keys::ALLOWED_INTERNAL_SITES) {
        let (nets, bad) = parse_sites(sites);
        policy.allow_internal = nets;
        errors.extend(bad);
    }
    if let Some(size) = config.get(config_keys::MAX_TEMPLATE_SIZE_GB) {
        match parse_max_size(size) {
            Ok(bytes) => policy.max_size = bytes,
            Err(e) => errors.push(e),
        }
    }
    (policy, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> DownloadPolicy {
        DownloadPolicy {
            allow_internal: vec!["10.0.0.0/8".parse().unwrap()],
            max_size: 50 * GIB,
        }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn sites_parse_cidrs_and_bare_addresses() {
        let (nets, errors) = parse_sites(" 127.0.0.0/8, 192.168.5.7 ,fd00::/8,,127.0.0.0/8");
        assert_eq!(
            nets,
            vec![
                "127.0.0.0/8".parse::<IpNet>().unwrap(),
                "192.168.5.7/32".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ]
        );
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn bad_sites_are_skipped_and_reported() {
        let (nets, errors) = parse_sites("10.1.0.0/16,not-a-cidr,10.0.0.0/33,0.0.0.0/0,::/0,0.0.0.0");
        assert_eq!(nets, vec!["10.1.0.0/16".parse::<IpNet>().unwrap()]);
        assert_eq!(errors.len(), 5, "{errors:?}");
        assert!(matches!(&errors[0], SettingError::BadCidr { entry, .. } if entry == "not-a-cidr"));
        assert!(matches!(&errors[1], SettingError::BadCidr { entry, .. } if entry == "10.0.0.0/33"));
        assert!(matches!(&errors[2], SettingError::Unsafe { entry, .. } if entry == "0.0.0.0/0"));
        assert!(errors[3].to_string().contains("every internal address"));
        assert!(errors[4].to_string().contains("unspecified"), "{}", errors[4]);
    }

    #[test]
    fn sizes_are_whole_gib() {
        assert_eq!(parse_max_size("5"), Ok(5 * GIB));
        assert_eq!(parse_max_size(" 1 "), Ok(GIB));
        for bad in ["0", "-1", "1.5", "", "lots", "18446744073709551615"] {
            assert!(parse_max_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn absent_keys_keep_the_command_line() {
        let (p, errors) = resolve(&base(), &map(&[("consoleproxy.session.timeout", "1000")]));
        assert_eq!(p, base());
        assert!(errors.is_empty());
    }

    #[test]
    fn present_keys_replace_the_command_line() {
        let (p, errors) = resolve(
            &base(),
            &map(&[
                (config_keys::ALLOWED_INTERNAL_SITES, "127.0.0.0/8"),
                (config_keys::MAX_TEMPLATE_SIZE_GB, "2"),
            ]),
        );
        assert_eq!(p.allow_internal, vec!["127.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert_eq!(p.max_size, 2 * GIB);
        assert!(errors.is_empty());
        // Blank sites: no internal range at all, not the command line's.
        let (p, _) = resolve(&base(), &map(&[(config_keys::ALLOWED_INTERNAL_SITES, " ")]));
        assert!(p.allow_internal.is_empty());
    }

    #[test]
    fn a_bad_size_keeps_the_command_line_cap() {
        let (p, errors) = resolve(
            &base(),
            &map(&[
                (config_keys::MAX_TEMPLATE_SIZE_GB, "big"),
                (config_keys::ALLOWED_INTERNAL_SITES, "bad"),
            ]),
        );
        assert_eq!(p.max_size, base().max_size);
        assert!(p.allow_internal.is_empty());
        assert_eq!(errors.len(), 2);
    }
}
