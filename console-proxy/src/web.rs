//! The console page, its assets and noVNC, served from the web root.
//!
//! Layout of the web root (`console-proxy/web` in the source tree):
//! - `console.html`: the page, served at `/console?token=…`;
//! - `static/*`: its script and style, served at `/static/<file>` (flat);
//! - `node_modules/@novnc/novnc/`: stock noVNC from npm, served at `/novnc/core/…` and `/novnc/vendor/…`.
//!
//! Invariant: only these paths are served, each path segment is a plain file name (no `..`, no hidden
//! files), and the page's token never leaves it in a `Referer`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Relative path of noVNC inside the web root.
pub const NOVNC_DIR: &str = "node_modules/@novnc/novnc";

/// Content-Security-Policy of the console page.
pub const PAGE_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self' ws: wss:; frame-ancestors 'self'; base-uri 'none'; form-action 'none'";

/// Checks that the web root has the page and noVNC, with a hint when it does not.
pub fn check_root(root: &Path) -> anyhow::Result<()> {
    let page = root.join("console.html");
    anyhow::ensure!(
        page.is_file(),
        "console page not found at {} (set --web to the web root)",
        page.display()
    );
    let rfb = root.join(NOVNC_DIR).join("core/rfb.js");
    anyhow::ensure!(
        rfb.is_file(),
        "noVNC not found at {}: run `npm ci` in {} (scripts/deps.sh does this)",
        rfb.display(),
        root.display()
    );
    Ok(())
}

/// A file the web root may serve for a request path, with its content type and cache policy.
#[derive(Debug, PartialEq, Eq)]
pub struct Asset {
    /// File to read.
    pub path: PathBuf,
    /// `Content-Type` header.
    pub content_type: &'static str,
    /// Whether the file may be cached by the browser (versioned assets) or not (the page).
    pub cacheable: bool,
}

/// Maps a request path to an asset, or `None` when nothing is served there.
pub fn resolve(root: &Path, request_path: &str) -> Option<Asset> {
    if request_path == "/console" || request_path == "/console/" {
        return Some(Asset {
            path: root.join("console.html"),
            content_type: HTML,
            cacheable: false,
        });
    }
    let (base, rest) = if let Some(rest) = request_path.strip_prefix("/static/") {
        (root.join("static"), rest)
    } else if let Some(rest) = request_path.strip_prefix("/novnc/") {
        if !(rest.starts_with("core/") || rest.starts_with("vendor/")) {
            return None;
        }
        (root.join(NOVNC_DIR), rest)
    } else {
        return None;
    };
    let mut path = base;
    for segment in rest.split('/') {
        let plain = !segment.is_empty()
            && !segment.starts_with('.')
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !plain {
            return None;
        }
        path.push(segment);
    }
    let content_type = content_type(&path)?;
    Some(Asset {
        path,
        content_type,
        cacheable: true,
    })
}

const HTML: &str = "text/html; charset=utf-8";

fn content_type(path: &Path) -> Option<&'static str> {
    Some(match path.extension()?.to_str()? {
        "html" => HTML,
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" => "application/json",
        "wasm" => "application/wasm",
        _ => return None,
    })
}

/// Reads an asset's bytes.
pub async fn read(asset: &Asset) -> anyhow::Result<Vec<u8>> {
    tokio::fs::read(&asset.path)
        .await
        .with_context(|| format!("failed to read {}", asset.path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_only_plain_paths() {
        let root = Path::new("/w");
        assert_eq!(
            resolve(root, "/console").unwrap().path,
            Path::new("/w/console.html")
        );
        assert!(!resolve(root, "/console").unwrap().cacheable);
        assert_eq!(
            resolve(root, "/static/console.js").unwrap().path,
            Path::new("/w/static/console.js")
        );
        assert_eq!(
            resolve(root, "/novnc/core/rfb.js").unwrap().path,
            Path::new("/w/node_modules/@novnc/novnc/core/rfb.js")
        );
        for bad in [
            "/static/../console.html",
            "/static/.hidden.js",
            "/novnc/core/../../../etc/passwd.js",
            "/novnc/package.json",
            "/novnc/core//rfb.js",
            "/static/a%2f..js",
            "/static/noext",
            "/static/x.sh",
            "/etc/passwd",
            "/",
        ] {
            assert_eq!(resolve(root, bad), None, "{bad}");
        }
    }
}
