//! Store URLs: `file:///PATH` (a local directory) and `nfs://HOST[:PORT]/EXPORT[?mountport=N]`.
//!
//! Invariants:
//! - Parsing then displaying then parsing again gives the same [`StoreUrl`] (round trip).
//! - A local path is absolute; an NFS export starts with `/` and has no trailing `/` (except `/` itself).
//! - The NFS host is stored without IPv6 brackets; [`Display`](std::fmt::Display) adds them back.
//! - The only query parameter is `mountport`; anything else is refused, so typos do not pass silently.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::StoreError;

/// The NFS port a URL without `:PORT` means.
pub const DEFAULT_NFS_PORT: u16 = 2049;

/// Where a store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A directory on this machine: `file:///PATH`.
    Local(PathBuf),
    /// An NFSv3 export, reached by the userspace client: `nfs://HOST[:PORT]/EXPORT[?mountport=N]`.
    Nfs {
        /// Host name or IP address (IPv6 without brackets).
        host: String,
        /// The NFS service port (2049 unless the URL says otherwise).
        port: u16,
        /// The exported path to mount, starting with `/`.
        export: String,
        /// The MOUNT service port; when absent the portmapper on port 111 is asked.
        mount_port: Option<u16>,
    },
}

impl StoreUrl {
    /// Whether this is an NFS store.
    pub fn is_nfs(&self) -> bool {
        matches!(self, StoreUrl::Nfs { .. })
    }
}

fn invalid(url: &str, reason: impl Into<String>) -> StoreError {
    StoreError::InvalidUrl {
        url: url.to_owned(),
        reason: reason.into(),
    }
}

/// Splits `scheme://rest`, with the scheme lowercased.
fn scheme(url: &str) -> Option<(String, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    Some((scheme.to_ascii_lowercase(), rest))
}

fn parse_port(url: &str, text: &str, what: &str) -> Result<u16, StoreError> {
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(invalid(
            url,
            format!("{what} must be a number from 1 to 65535, not {text:?}"),
        )),
        Ok(port) => Ok(port),
    }
}

fn parse_local(url: &str, rest: &str) -> Result<StoreUrl, StoreError> {
    let Some(path) = rest.strip_prefix('/') else {
        return Err(invalid(
            url,
            "a file url has no host: write file:///absolute/path",
        ));
    };
    if rest.contains(['?', '#']) {
        return Err(invalid(url, "a file url takes no query or fragment"));
    }
    if rest.contains('\0') {
        return Err(invalid(url, "the path contains a nul byte"));
    }
    let trimmed = path.trim_end_matches('/');
    Ok(StoreUrl::Local(PathBuf::from(format!("/{trimmed}"))))
}

fn parse_host(url: &str, authority: &str) -> Result<(String, u16), StoreError> {
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err(invalid(url, "unclosed '[' in the host"));
        };
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(invalid(
                url,
                format!("{host:?} in brackets is not an IPv6 address"),
            ));
        }
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return Err(invalid(url, "unexpected text after ']' in the host")),
            },
        };
        (host, port)
    } else {
        match authority.split_once(':') {
            Some((_, port)) if port.contains(':') => {
                return Err(invalid(
                    url,
                    "an IPv6 address must be written in brackets: nfs://[::1]/export",
                ));
            }
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(invalid(url, "the host is missing"));
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'))
    {
        return Err(invalid(url, format!("{host:?} is not a host name or IP address")));
    }
    let port = match port {
        Some(port) => parse_port(url, port, "the NFS port")?,
        None => DEFAULT_NFS_PORT,
    };
    Ok((host.to_owned(), port))
}

fn parse_nfs(url: &str, rest: &str) -> Result<StoreUrl, StoreError> {
    if rest.contains('#') {
        return Err(invalid(url, "an nfs url takes no fragment"));
    }
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    let Some(slash) = rest.find('/') else {
        return Err(invalid(
            url,
            "the export path is missing: nfs://HOST[:PORT]/EXPORT",
        ));
    };
    let (authority, export) = rest.split_at(slash);
    let (host, port) = parse_host(url, authority)?;
    if export.chars().any(char::is_control) {
        return Err(invalid(url, "the export path contains a control character"));
    }
    let trimmed = export.trim_end_matches('/');
    let export = if trimmed.is_empty() { "/" } else { trimmed };
    let mut mount_port = None;
    for pair in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("mountport", value)) if mount_port.is_none() => {
                mount_port = Some(parse_port(url, value, "mountport")?);
            }
            Some(("mountport", _)) => return Err(invalid(url, "mountport is given twice")),
            _ => {
                return Err(invalid(
                    url,
                    format!("unknown query parameter {pair:?} (only mountport=N)"),
                ));
            }
        }
    }
    Ok(StoreUrl::Nfs {
        host,
        port,
        export: export.to_owned(),
        mount_port,
    })
}

impl FromStr for StoreUrl {
    type Err = StoreError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        match scheme(url) {
            Some((s, rest)) if s == "file" => parse_local(url, rest),
            Some((s, rest)) if s == "nfs" => parse_nfs(url, rest),
            Some((s, _)) => Err(invalid(url, format!("unsupported scheme {s:?} (file or nfs)"))),
            None => Err(invalid(url, "expected file:///PATH or nfs://HOST[:PORT]/EXPORT")),
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Local(path) => write!(f, "file://{}", path.display()),
            StoreUrl::Nfs {
                host,
                port,
                export,
                mount_port,
            } => {
                if host.contains(':') {
                    write!(f, "nfs://[{host}]")?;
                } else {
                    write!(f, "nfs://{host}")?;
                }
                if *port != DEFAULT_NFS_PORT {
                    write!(f, ":{port}")?;
                }
                f.write_str(export)?;
                if let Some(mount_port) = mount_port {
                    write!(f, "?mountport={mount_port}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nfs(host: &str, port: u16, export: &str, mount_port: Option<u16>) -> StoreUrl {
        StoreUrl::Nfs {
            host: host.into(),
            port,
            export: export.into(),
            mount_port,
        }
    }

    #[test]
    fn parses_nfs_urls() {
        let cases = [
            (
                "nfs://10.0.0.5/export/secondary",
                nfs("10.0.0.5", 2049, "/export/secondary", None),
            ),
            (
                "nfs://nfs.example.org:2050/sec/",
                nfs("nfs.example.org", 2050, "/sec", None),
            ),
            (
                "nfs://127.0.0.1:32049/export?mountport=32048",
                nfs("127.0.0.1", 32049, "/export", Some(32048)),
            ),
            (
                "NFS://[fd00::1]:2049/x?mountport=20048",
                nfs("fd00::1", 2049, "/x", Some(20048)),
            ),
            ("nfs://[::1]/", nfs("::1", 2049, "/", None)),
        ];
        for (text, want) in cases {
            let got: StoreUrl = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(got, want, "{text}");
            assert!(got.is_nfs());
        }
    }

    #[test]
    fn parses_file_urls() {
        let got: StoreUrl = "file:///var/lib/ssvm/store/".parse().unwrap();
        assert_eq!(got, StoreUrl::Local("/var/lib/ssvm/store".into()));
        assert!(!got.is_nfs());
        assert_eq!(got.to_string(), "file:///var/lib/ssvm/store");
        assert_eq!(
            "file:///".parse::<StoreUrl>().unwrap(),
            StoreUrl::Local("/".into())
        );
    }

    #[test]
    fn refuses_bad_urls_with_a_reason() {
        let cases = [
            ("nfs://host", "export path is missing"),
            ("nfs:///export", "host is missing"),
            ("nfs://fd00::1/export", "brackets"),
            ("nfs://[nothost]/export", "not an IPv6"),
            ("nfs://host:0/export", "from 1 to 65535"),
            ("nfs://host:99999/export", "from 1 to 65535"),
            ("nfs://host/export?mountport=x", "mountport must be"),
            ("nfs://host/export?mountport=1&mountport=2", "twice"),
            ("nfs://host/export?mountprot=1", "unknown query parameter"),
            ("nfs://ho st/export", "not a host name"),
            ("nfs://host/export#frag", "fragment"),
            ("file://host/path", "no host"),
            ("file:///a?b", "no query"),
            ("smb://host/share", "unsupported scheme"),
            ("/just/a/path", "expected file:///PATH"),
        ];
        for (text, reason) in cases {
            match text.parse::<StoreUrl>() {
                Err(StoreError::InvalidUrl { url, reason: got }) => {
                    assert_eq!(url, text);
                    assert!(got.contains(reason), "{text}: {got}");
                }
                other => panic!("{text}: expected InvalidUrl, got {other:?}"),
            }
        }
        let message = "nfs://host".parse::<StoreUrl>().unwrap_err().to_string();
        assert!(
            message.starts_with("invalid store url \"nfs://host\": "),
            "{message}"
        );
    }

    #[test]
    fn display_round_trips() {
        let urls = [
            nfs("10.0.0.5", 2049, "/export", None),
            nfs("10.0.0.5", 2050, "/export/a", Some(20048)),
            nfs("fd00::1", 2049, "/", Some(1)),
            nfs("nfs-1.example.org", 65535, "/x/y", None),
            StoreUrl::Local("/srv/store".into()),
        ];
        for url in urls {
            let text = url.to_string();
            assert_eq!(text.parse::<StoreUrl>().unwrap(), url, "{text}");
        }
        assert_eq!(
            nfs("10.0.0.5", 2049, "/export", None).to_string(),
            "nfs://10.0.0.5/export"
        );
        assert_eq!(
            nfs("::1", 32049, "/export", Some(32048)).to_string(),
            "nfs://[::1]:32049/export?mountport=32048"
        );
    }
}
