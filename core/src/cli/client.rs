//! A signed CloudStack query API client: builds the request the way [`crate::signing`] verifies
//! it (signature version 3, `expires` five minutes ahead), sends it with reqwest, and unwraps the
//! `<command>response` object or turns the error shape into [`ClientError::Api`].
//!
//! Invariants: the secret key is only used to sign, never printed or logged (the client has no
//! `Debug`); https is only spoken with roots from an explicit CA bundle (no system or built-in
//! roots); an API error always carries the server's code and text.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::Credentials;
use crate::signing::{Encoding, encode_value, sign, string_to_sign};

/// How long a signed request stays valid (`expires` = now + this).
pub const SIGNATURE_LIFETIME: Duration = Duration::from_secs(300);
/// Time allowed for one API request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval between two polls of an async job.
pub const JOB_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// A failed client operation.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with its error shape (or a failed async job).
    #[error("error {code}: {text}")]
    Api {
        /// `errorcode` (the HTTP status).
        code: i64,
        /// `errortext`.
        text: String,
    },
    /// The request could not be sent or its answer not read.
    #[error("failed to reach {url}")]
    Http {
        /// The API URL.
        url: String,
        /// What reqwest reported.
        #[source]
        source: reqwest::Error,
    },
    /// A 200 answer that is not the expected JSON shape.
    #[error("unexpected answer to {command}: {detail}")]
    BadAnswer {
        /// The API command.
        command: String,
        /// What was wrong.
        detail: String,
    },
    /// The API URL is unusable.
    #[error("invalid API URL {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// Why it is refused.
        reason: String,
    },
    /// The CA bundle could not be read or holds no usable certificate.
    #[error("failed to load CA bundle {path}: {reason}")]
    CaBundle {
        /// The bundle's path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// No credentials were given, or the credentials file is unreadable.
    #[error("{0}")]
    Credentials(String),
    /// The HTTP client could not be built.
    #[error("failed to build the HTTP client")]
    Build(#[source] reqwest::Error),
}

/// Reads `DATA_DIR/credentials.json` (`{"apikey": …, "secretkey": …}`).
pub fn read_credentials(data_dir: &Path) -> Result<Credentials, ClientError> {
    let path = data_dir.join("credentials.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ClientError::Credentials(format!("failed to read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| ClientError::Credentials(format!("failed to parse {}: {e}", path.display())))
}

/// `expires` for a request signed at `unix_now`: `yyyy-MM-ddTHH:mm:ssZ`, [`SIGNATURE_LIFETIME`]
/// ahead.
pub fn expires_at(unix_now: i64) -> String {
    let lifetime = i64::try_from(SIGNATURE_LIFETIME.as_secs()).unwrap_or(300);
    let t = time::OffsetDateTime::from_unix_timestamp(unix_now.saturating_add(lifetime))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The signed query string for `command` with `params`: `command`, `response=json`, `apikey`,
/// `signatureversion=3`, `expires`, the parameters, then `signature`. Values are encoded as Java's
/// URLEncoder does (what the signature is computed over), so the wire form is the signed form.
pub fn signed_query(
    command: &str,
    params: &[(String, String)],
    creds: &Credentials,
    expires: &str,
) -> String {
    let mut all: Vec<(String, String)> = vec![
        ("command".to_owned(), command.to_owned()),
        ("response".to_owned(), "json".to_owned()),
        ("apikey".to_owned(), creds.apikey.clone()),
        ("signatureversion".to_owned(), "3".to_owned()),
        ("expires".to_owned(), expires.to_owned()),
    ];
    all.extend(params.iter().cloned());
    let signature = sign(&creds.secretkey, &string_to_sign(&all, Encoding::Java));
    all.push(("signature".to_owned(), signature));
    all.iter()
        .map(|(n, v)| {
            format!(
                "{}={}",
                encode_value(n, Encoding::Java),
                encode_value(v, Encoding::Java)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The error an API error body describes: the first (only) top-level object's `errorcode` and
/// `errortext`, falling back to the HTTP status and the raw body.
pub fn api_error(status: u16, body: &str) -> ClientError {
    let inner = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.as_object().and_then(|m| m.values().next().cloned()));
    let code = inner
        .as_ref()
        .and_then(|i| i.get("errorcode"))
        .and_then(Value::as_i64)
        .unwrap_or_else(|| i64::from(status));
    let text = inner
        .as_ref()
        .and_then(|i| i.get("errortext"))
        .and_then(Value::as_str)
        .map_or_else(|| body.trim().to_owned(), str::to_owned);
    ClientError::Api { code, text }
}

/// A signed client of one core's `/client/api`.
pub struct ApiClient {
    http: reqwest::Client,
    url: reqwest::Url,
    creds: Credentials,
}

impl ApiClient {
    /// A client of `api_url`. https requires `ca_bundle` (PEM): no other roots are trusted.
    pub fn new(api_url: &str, creds: Credentials, ca_bundle: Option<&Path>) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::Url {
            url: api_url.to_owned(),
            reason: reason.to_owned(),
        };
        let url = reqwest::Url::parse(api_url).map_err(|e| bad(&e.to_string()))?;
        match url.scheme() {
            "http" => {}
            "https" if ca_bundle.is_none() => {
                return Err(bad(
                    "https needs --ca-bundle PEM (the CA that signed the API's certificate); no other roots are trusted",
                ));
            }
            "https" => {}
            _ => return Err(bad("use http:// or https://")),
        }
        let tls = tls_config(ca_bundle)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(REQUEST_TIMEOUT)
            .no_proxy()
            .user_agent(concat!("systemvm-core/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ClientError::Build)?;
        Ok(Self { http, url, creds })
    }

    /// Runs `command` and returns the inner `<command>response` object.
    pub async fn call(&self, command: &str, params: &[(&str, &str)]) -> Result<Value, ClientError> {
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        self.call_owned(command, &params).await
    }

    /// [`ApiClient::call`] with owned parameters.
    pub async fn call_owned(&self, command: &str, params: &[(String, String)]) -> Result<Value, ClientError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut url = self.url.clone();
        url.set_query(Some(&signed_query(
            command,
            params,
            &self.creds,
            &expires_at(now),
        )));
        // Without the URL: its query carries the API key and the signature.
        let http_err = |source: reqwest::Error| ClientError::Http {
            url: self.url.to_string(),
            source: source.without_url(),
        };
        let resp = self.http.get(url).send().await.map_err(http_err)?;
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(http_err)?;
        if status != 200 {
            return Err(api_error(status, &body));
        }
        let bad = |detail: String| ClientError::BadAnswer {
            command: command.to_owned(),
            detail,
        };
        let mut v: Value = serde_json::from_str(&body).map_err(|e| bad(format!("not JSON: {e}")))?;
        let key = format!("{}response", command.to_ascii_lowercase());
        match v.get_mut(&key).map(Value::take) {
            Some(inner) => Ok(inner),
            None => Err(bad(format!("no {key:?} in the answer"))),
        }
    }

    /// Waits for async job `job_id` to finish; returns its `jobresult` on success, the job's
    /// error as [`ClientError::Api`] on failure.
    pub async fn wait_job(&self, job_id: &str) -> Result<Value, ClientError> {
        loop {
            let mut r = self.call("queryAsyncJobResult", &[("jobid", job_id)]).await?;
            match r.get("jobstatus").and_then(Value::as_i64) {
                Some(0) => tokio::time::sleep(JOB_POLL_INTERVAL).await,
                Some(1) => return Ok(r.get_mut("jobresult").map(Value::take).unwrap_or(Value::Null)),
                _ => {
                    let result = r.get("jobresult");
                    let code = result
                        .and_then(|j| j.get("errorcode"))
                        .or_else(|| r.get("jobresultcode"))
                        .and_then(Value::as_i64)
                        .unwrap_or(530);
                    let text = result
                        .and_then(|j| j.get("errortext"))
                        .and_then(Value::as_str)
                        .unwrap_or("async job failed")
                        .to_owned();
                    return Err(ClientError::Api { code, text });
                }
            }
        }
    }

    /// Runs async `command`, then waits for its job (see [`ApiClient::wait_job`]).
    pub async fn call_async(&self, command: &str, params: &[(&str, &str)]) -> Result<Value, ClientError> {
        let answer = self.call(command, params).await?;
        let job_id = answer
            .get("jobid")
            .and_then(Value::as_str)
            .ok_or_else(|| ClientError::BadAnswer {
                command: command.to_owned(),
                detail: "no jobid".to_owned(),
            })?;
        self.wait_job(job_id).await
    }
}

/// rustls with the ring provider, trusting only the certificates of `ca_bundle` (none when
/// absent: plain http needs none).
pub(crate) fn tls_config(ca_bundle: Option<&Path>) -> Result<rustls::ClientConfig, ClientError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_bundle {
        let err = |reason: String| ClientError::CaBundle {
            path: path.to_owned(),
            reason,
        };
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| err(e.to_string()))? {
            let cert = cert.map_err(|e| err(e.to_string()))?;
            // Bundles carry the odd certificate rustls cannot use; skip those, keep the rest.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(err("no usable certificate".to_owned()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::CaBundle {
            path: ca_bundle.map(Path::to_owned).unwrap_or_default(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Params;
    use crate::signing;

    fn creds() -> Credentials {
        Credentials {
            apikey: "Key-With~Odd Chars".to_owned(),
            secretkey: "s3cret/+=".to_owned(),
            username: None,
            password: None,
        }
    }

    #[test]
    fn signed_query_is_accepted_by_the_verifier() {
        let expires = expires_at(1_795_482_054);
        let params = vec![
            ("name".to_owned(), "a b*c~d/é+&=".to_owned()),
            ("Zed".to_owned(), "x".to_owned()),
        ];
        let q = signed_query("listZones", &params, &creds(), &expires);
        // Decode it the way the server does, then verify it the way the server does.
        let mut p = Params::default();
        p.extend_urlencoded(&q).unwrap();
        assert_eq!(p.get("name"), Some("a b*c~d/é+&="));
        assert_eq!(p.get("command"), Some("listZones"));
        assert_eq!(p.get("response"), Some("json"));
        assert_eq!(p.get("apikey"), Some("Key-With~Odd Chars"));
        assert_eq!(p.get("signatureversion"), Some("3"));
        let sig = p.get("signature").unwrap().to_owned();
        assert!(signing::verify(&p.list, "s3cret/+=", &sig));
        assert!(!signing::verify(&p.list, "other", &sig));
        // Any change to a signed value breaks it.
        let mut tampered = p.list.clone();
        tampered[0].1.push('x');
        assert!(!signing::verify(&tampered, "s3cret/+=", &sig));
    }

    /// The same vector as `signing::tests::known_vector`, produced from the client side.
    #[test]
    fn known_signature_vector() {
        let all = vec![
            ("command".to_owned(), "listZones".to_owned()),
            ("apiKey".to_owned(), "KEY".to_owned()),
            ("response".to_owned(), "json".to_owned()),
        ];
        let s = string_to_sign(&all, Encoding::Java);
        assert_eq!(
            sign("secret", &s),
            include_str!("../../../crates/systemvm-api-request/testdata/known_signature.txt")
        );
    }

    #[test]
    fn expires_is_five_minutes_ahead_and_parseable() {
        let now = 1_795_482_054; // 2026-11-24T01:00:54Z
        let e = expires_at(now);
        assert_eq!(e, "2026-11-24T01:05:54Z");
        assert_eq!(signing::parse_expires(&e), Ok(now + 300));
    }

    #[test]
    fn api_error_reads_the_cloudstack_shape() {
        let e = api_error(
            431,
            r#"{"listzonesresponse":{"uuidList":[],"errorcode":431,"cserrorcode":9999,"errortext":"bad id"}}"#,
        );
        assert_eq!(e.to_string(), "error 431: bad id");
        let e = api_error(502, "Bad Gateway\n");
        assert_eq!(e.to_string(), "error 502: Bad Gateway");
    }

    #[test]
    fn https_without_ca_bundle_is_refused() {
        let e = ApiClient::new("https://127.0.0.1:8443/client/api", creds(), None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("--ca-bundle"), "{e}");
        let e = ApiClient::new("ftp://x/client/api", creds(), None).err().unwrap();
        assert!(e.to_string().contains("use http"), "{e}");
        assert!(ApiClient::new("http://127.0.0.1:8080/client/api", creds(), None).is_ok());
    }

    #[test]
    fn ca_bundle_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("empty.pem");
        std::fs::write(&pem, "not a certificate\n").unwrap();
        let e = ApiClient::new("https://127.0.0.1:8443/client/api", creds(), Some(&pem))
            .err()
            .unwrap();
        assert!(e.to_string().contains("no usable certificate"), "{e}");
    }
}
