//! Core's upload page (`/client/upload`): for operators without the Mold UI, a page that logs in,
//! calls `getUploadParamsForTemplate`/`getUploadParamsForIso` and sends the file to the storage
//! VM with the tus protocol (`tus-js-client` from npm, `core/web/node_modules`), with a progress
//! bar, speed and ETA. The page and its script are compiled in; `tus.min.js` is read from the web
//! root ([`web_root`]).
//!
//! Invariants: only the three paths below are served (no directory is listed, no other file of
//! the web root is reachable); the page's Content-Security-Policy allows scripts from core only
//! and connections to any origin (storage VMs are other origins).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

/// The page's path.
pub const PATH: &str = "/client/upload";

const HTML: &str = include_str!("../../web/upload.html");
const JS: &str = include_str!("../../web/upload.js");
const TUS: &str = "node_modules/tus-js-client/dist/tus.min.js";
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src *; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// Where `tus.min.js` is looked for: `<prefix>/share/systemvm-core/web` beside an installed
/// binary, else the source tree's `core/web`.
pub fn web_root() -> PathBuf {
    if let Ok(exe) = std::env::current_exe()
        && let Some(prefix) = exe.parent().and_then(Path::parent)
    {
        let installed = prefix.join("share/systemvm-core/web");
        if installed.join(TUS).is_file() {
            return installed;
        }
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/web"))
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// The answer for `path`, when it is one of the page's.
pub async fn serve(path: &str) -> Option<Response<Full<Bytes>>> {
    match path.trim_end_matches('/') {
        PATH => Some(reply(StatusCode::OK, "text/html; charset=utf-8", HTML)),
        "/client/upload/upload.js" => Some(reply(StatusCode::OK, "text/javascript; charset=utf-8", JS)),
        "/client/upload/tus.min.js" => Some(match tokio::fs::read(web_root().join(TUS)).await {
            Ok(js) => reply(StatusCode::OK, "text/javascript; charset=utf-8", js),
            // Without tus-js-client the page falls back to the one-shot POST.
            Err(_) => reply(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "tus-js-client is not installed (scripts/deps.sh run: npm ci in core/web)",
            ),
        }),
        _ => None,
    }
}
