//! The HTTP side of the query API at `/client/api`: limits, parameter merge, authentication
//! (signature, session, or none on the integration port), permission and parameter checks,
//! dispatch to sync handlers or the job executor, and CloudStack's response shapes.
//!
//! Invariants: every answer is JSON (`application/json; charset=UTF-8`) with exactly one top-level
//! key, and its HTTP status equals the `errorcode` inside on failure; bodies over [`MAX_BODY`] and
//! more than [`crate::params::MAX_PARAMS`] parameters are refused with 431 before any command runs;
//! no command runs unauthenticated except `login` and everything on the integration listener
//! (which only ever binds loopback); `login` is POST only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::api::job_runner as jobs;
use crate::error::{ApiError, code};
use crate::model::directory::{self, auth as directory_auth, users as directory_users};
use crate::model::sessions::{self, SESSION_TIMEOUT};
use crate::params::Params;
use crate::signing;
use crate::state::{Caller, State};
use crate::util::random_token;

/// Largest request body accepted.
pub const MAX_BODY: usize = 1024 * 1024;
/// Limits of the API listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Most API connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// Most API connections from one client address; more are closed at accept, so one client
    /// cannot take the slots of the others.
    pub max_connections_per_client: usize,
    /// Time a client gets to send a request's body, once its headers are in.
    pub body_timeout: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_client: 64,
            body_timeout: Duration::from_secs(30),
        }
    }
}
/// Time a client gets to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
pub use crate::model::directory::login::MAX_PASSWORD_CHECKS;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The public API: signed or session requests.
    Public,
    /// The integration port: unauthenticated, loopback only, acts as the root admin.
    Integration,
}

/// Accepts connections until `stop` flips; then accepts no more, lets every open connection
/// finish the request it is serving (HTTP/1 graceful shutdown: idle connections close at once)
/// and returns when they are all done (the service's shutdown deadline bounds the wait).
pub async fn serve(
    listener: TcpListener,
    state: State,
    kind: Listener,
    limits: ApiLimits,
    mut stop: watch::Receiver<bool>,
) {
    let limiter = crate::limits::ConnLimiter::new(limits.max_connections, limits.max_connections_per_client);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let permit = match limiter.try_acquire(peer.ip()) {
                        Ok(p) => p,
                        Err(why) => {
                            tracing::debug!(%peer, ?why, "Too many API connections, refusing one");
                            continue;
                        }
                    };
                    let state = state.clone();
                    let mut stop = stop.clone();
                    conns.spawn(async move {
                        let _permit = permit;
                        let svc = service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(handle(state, kind, peer, limits.body_timeout, req).await) }
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_TIMEOUT)
                            .serve_connection(TokioIo::new(tcp), svc);
                        tokio::pin!(conn);
                        let r = tokio::select! {
                            r = conn.as_mut() => r,
                            _ = stop.changed() => {
                                conn.as_mut().graceful_shutdown();
                                conn.await
                            }
                        };
                        if let Err(error) = r {
                            tracing::debug!(%error, "API connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "Failed to accept an API connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// Drops `null` members from objects, recursively: CloudStack (Gson) omits unset fields.
fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

fn json_response(status: u16, body: &Value) -> Response<Full<Bytes>> {
    let mut body = body.clone();
    strip_nulls(&mut body);
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    r
}

fn error_response(key: &str, e: &ApiError) -> Response<Full<Bytes>> {
    json_response(e.code, &json!({ key: e.body() }))
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"').to_owned())
}

async fn handle(
    state: State,
    kind: Listener,
    peer: SocketAddr,
    body_timeout: Duration,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() == Method::GET
        && let Some(page) = crate::api::upload_page::serve(req.uri().path()).await
    {
        return page;
    }
    if req.uri().path() != "/client/api" && req.uri().path() != "/client/api/" {
        let mut r = json_response(
            404,
            &json!({"errorresponse": {"uuidList": [], "errorcode": 404, "errortext": "not found"}}),
        );
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    let (parts, body) = req.into_parts();
    let mut params = Params::default();
    if let Err(e) = params.extend_urlencoded(parts.uri.query().unwrap_or("")) {
        return error_response("errorresponse", &ApiError::from_params(e));
    }
    if parts.method == Method::POST {
        let read = tokio::time::timeout(body_timeout, Limited::new(body, MAX_BODY).collect()).await;
        let Ok(read) = read else {
            let e = ApiError::new(
                code::REQUEST_TIMEOUT,
                crate::error::cs::SERVER_API,
                format!("request body not received within {}s", body_timeout.as_secs()),
            );
            let mut r = error_response("errorresponse", &e);
            r.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        };
        let bytes = match read {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                let e = ApiError::param(format!("request body larger than {MAX_BODY} bytes"));
                return error_response("errorresponse", &e);
            }
        };
        let text = match std::str::from_utf8(&bytes) {
            Ok(t) => t,
            Err(_) => {
                return error_response(
                    "errorresponse",
                    &ApiError::malformed("request body is not valid UTF-8"),
                );
            }
        };
        if let Err(e) = params.extend_urlencoded(text) {
            return error_response("errorresponse", &ApiError::from_params(e));
        }
    } else if parts.method != Method::GET {
        let e = ApiError::new(
            code::METHOD_NOT_ALLOWED,
            crate::error::cs::SERVER_API,
            "use GET or POST",
        );
        return error_response("errorresponse", &e);
    }
    let name = params.get("command").unwrap_or_default().to_owned();
    match name.as_str() {
        "login" => return login(&state, &parts.method, &params, forwarded_https(&parts.headers)).await,
        "logout" => return logout(&state, &parts.headers).await,
        _ => {}
    }
    let Some(cmd) = crate::api::find(&name) else {
        let e = ApiError::new(
            code::UNSUPPORTED_ACTION,
            crate::error::cs::SERVER_API,
            "The given command does not exist or it is not available for the user",
        );
        return error_response("errorresponse", &e);
    };
    let key = cmd.response_key();
    let caller = match kind {
        Listener::Integration => match integration_caller(&state).await {
            Ok(c) => c,
            Err(e) => return error_response(&key, &e),
        },
        Listener::Public => match authenticate(&state, &parts.headers, &params).await {
            Ok(c) => c,
            // The login page's own calls (themes, identity providers) answer without a login.
            Err(_) if cmd.before_login && !has_credentials(&parts.headers, &params) => Caller::anonymous(),
            Err(e) => {
                tracing::debug!(%peer, command = %name, "Refused an unauthenticated API request");
                return error_response(&key, &e);
            }
        },
    };
    if !cmd.allowed(caller.role) {
        // CloudStack answers a command the role may not call like one that does not exist.
        let e = ApiError::new(
            code::UNSUPPORTED_ACTION,
            crate::error::cs::SERVER_API,
            format!(
                "The API [{name}] does not exist or is not available for the account {} (role {})",
                caller.account_name,
                caller.role.name()
            ),
        );
        return error_response(&key, &e);
    }
    if let Err(e) = cmd.validate(&params) {
        return error_response(&key, &e);
    }
    let result = if cmd.is_async {
        jobs::submit(&state, &caller, cmd, params)
            .await
            .map(|id| json!({ "jobid": id }))
    } else {
        (cmd.handler)(state.clone(), caller, params).await
    };
    match result {
        Ok(v) => json_response(200, &json!({ key: v })),
        Err(e) => error_response(&key, &e),
    }
}

/// The root admin, for the integration listener.
async fn integration_caller(state: &State) -> Result<Caller, ApiError> {
    directory_auth::root_admin(state)
        .await?
        .map(|u| u.caller)
        .ok_or_else(|| ApiError::internal(&"no root admin account"))
}

async fn authenticate(state: &State, headers: &HeaderMap, params: &Params) -> Result<Caller, ApiError> {
    if let Some(api_key) = params.get("apikey") {
        let signature = params.get("signature").ok_or_else(ApiError::unauthorized)?;
        if params.get("signatureversion") == Some("3") {
            let expires = params
                .get("expires")
                .and_then(|e| signing::parse_expires(e).ok())
                .ok_or_else(ApiError::unauthorized)?;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if expires < now {
                return Err(ApiError::unauthorized());
            }
        }
        let user = directory_auth::by_api_key(state, api_key)
            .await?
            .ok_or_else(ApiError::unauthorized)?;
        let secret = user.secret_key.ok_or_else(ApiError::unauthorized)?;
        if !signing::verify(&params.list, &secret, signature) {
            return Err(ApiError::unauthorized());
        }
        return Ok(user.caller);
    }
    // Session: JSESSIONID cookie, and the session key both as cookie and as parameter.
    let jsession = cookie(headers, "JSESSIONID").ok_or_else(ApiError::unauthorized)?;
    let cookie_key = cookie(headers, "sessionkey").ok_or_else(ApiError::unauthorized)?;
    let param_key = params.get("sessionkey").ok_or_else(ApiError::unauthorized)?;
    let user_id = sessions::check(&state.db.pool, &jsession, &cookie_key, param_key)
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    let user = directory_auth::by_id(state, &user_id)
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    Ok(user.caller)
}

/// Whether the request carries an API key or a session (a failed check of either is refused,
/// also for commands that answer before login).
fn has_credentials(headers: &HeaderMap, params: &Params) -> bool {
    params.get("apikey").is_some() || cookie(headers, "JSESSIONID").is_some()
}

/// Whether a TLS front end says the client came over HTTPS (`X-Forwarded-Proto: https` or
/// `Forwarded: proto=https`): core's own listener is plain HTTP.
fn forwarded_https(headers: &HeaderMap) -> bool {
    let has = |name: &str, want: &dyn Fn(&str) -> bool| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| want(&v.to_ascii_lowercase()))
    };
    has("x-forwarded-proto", &|v| v.trim() == "https")
        || has("forwarded", &|v| {
            v.split([';', ',']).any(|p| p.trim() == "proto=https")
        })
}

async fn login(state: &State, method: &Method, params: &Params, https: bool) -> Response<Full<Bytes>> {
    use directory::login::{self, Login, LoginError, Proof};
    let key = "loginresponse";
    if method != Method::POST {
        let e = ApiError::new(
            code::METHOD_NOT_ALLOWED,
            crate::error::cs::SERVER_API,
            "Please use HTTP POST to authenticate using this API",
        );
        return error_response(key, &e);
    }
    // No password: CloudStack's single sign-on with the pre-shared key.
    let proof = match params.get("password").filter(|p| !p.is_empty()) {
        Some(p) => Proof::Password(p),
        None => Proof::SingleSignOn(&params.list),
    };
    let request = Login {
        username: params.get("username").unwrap_or_default(),
        domain_id: params.non_empty("domainid"),
        domain_path: params.non_empty("domain"),
        proof,
    };
    let user = match login::check(state, &request).await {
        Ok(u) => u,
        Err(LoginError::Db(e)) => return error_response(key, &ApiError::internal(&e)),
        Err(e) => {
            let e = ApiError::new(code::ACCOUNT_ERROR, crate::error::cs::SERVER_API, e.to_string());
            return error_response(key, &e);
        }
    };
    let (jsession, session_key) = match (random_token::<24>(), random_token::<20>()) {
        (Ok(j), Ok(k)) => (j, k),
        (Err(e), _) | (_, Err(e)) => return error_response(key, &ApiError::internal(&e)),
    };
    let c = user.caller.clone();
    if let Err(e) = sessions::create(&state.db.pool, &jsession, &session_key, &c.user_id).await {
        return error_response(key, &ApiError::from(e));
    }
    let profile = match directory_users::profile(state, &c.user_id).await {
        Ok(p) => p,
        Err(e) => return error_response(key, &ApiError::from(e)),
    };
    tracing::info!(user = %c.username, "User logged in");
    let mut body = json!({
        "username": c.username,
        "userid": c.user_id,
        "domainid": c.domain_id,
        "timeout": SESSION_TIMEOUT.as_secs(),
        "account": c.account_name,
        "firstname": profile.firstname,
        "lastname": profile.lastname,
        "type": c.role.account_type().to_string(),
        "registered": "false",
        "sessionkey": session_key,
        "is2faenabled": "false",
        "is2faverified": "true",
        "issuerfor2fa": "CloudStack",
        "providerfor2fa": "",
    });
    if let Some(tz) = profile.timezone {
        body["timezone"] = json!(tz);
        body["timezoneoffset"] = json!("0.0");
    }
    if c.role.is_admin() {
        body["managementserverid"] = json!(state.instance_id);
    }
    let mut r = json_response(200, &json!({ key: body }));
    // `Secure` when the UI reached core over HTTPS (through a TLS front end that says so).
    let secure = if https { "; Secure" } else { "" };
    for c in [
        format!("JSESSIONID={jsession}; Path=/client; HttpOnly; SameSite=Lax{secure}"),
        format!("sessionkey={session_key}; Path=/client; HttpOnly; SameSite=Lax{secure}"),
    ] {
        if let Ok(v) = HeaderValue::from_str(&c) {
            r.headers_mut().append(SET_COOKIE, v);
        }
    }
    r
}

async fn logout(state: &State, headers: &HeaderMap) -> Response<Full<Bytes>> {
    if let Some(j) = cookie(headers, "JSESSIONID")
        && let Err(error) = sessions::end(&state.db.pool, &j).await
    {
        tracing::warn!(%error, "Could not end a login session");
    }
    json_response(200, &json!({ "logoutresponse": { "description": "success" } }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_is_known_from_the_front_end_headers() {
        let mut h = HeaderMap::new();
        assert!(!forwarded_https(&h));
        h.insert("x-forwarded-proto", HeaderValue::from_static("HTTPS"));
        assert!(forwarded_https(&h));
        let mut h = HeaderMap::new();
        h.insert(
            "forwarded",
            HeaderValue::from_static("for=192.0.2.7;proto=https;by=x"),
        );
        assert!(forwarded_https(&h));
        h.insert("forwarded", HeaderValue::from_static("proto=http"));
        assert!(!forwarded_https(&h));
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_static("a=1; JSESSIONID=abc; sessionkey=\"k\""),
        );
        assert_eq!(cookie(&h, "JSESSIONID").as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "sessionkey").as_deref(), Some("k"));
        assert_eq!(cookie(&h, "missing"), None);
    }

    #[test]
    fn nulls_are_omitted() {
        let mut v = json!({"a": null, "b": [{"c": null, "d": 1}]});
        strip_nulls(&mut v);
        assert_eq!(v, json!({"b": [{"d": 1}]}));
    }

    #[test]
    fn error_status_equals_errorcode() {
        let r = error_response("xresponse", &ApiError::param("bad"));
        assert_eq!(r.status().as_u16(), 431);
        assert_eq!(
            r.headers().get(CONTENT_TYPE).unwrap(),
            "application/json; charset=UTF-8"
        );
    }
}
