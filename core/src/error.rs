//! The one error type of the query API and its CloudStack wire shape.
//!
//! Invariants: the HTTP status always equals `errorcode`; a 5xx error never carries internal text
//! to the client (internal causes are logged and replaced by a fixed sentence); 401 bodies omit
//! `cserrorcode`, as CloudStack does.

use serde_json::{Value, json};

/// CloudStack `ApiErrorCode` values this service answers with.
pub mod code {
    /// Bad credentials or signature.
    pub const UNAUTHORIZED: u16 = 401;
    /// Wrong HTTP method (login over GET).
    pub const METHOD_NOT_ALLOWED: u16 = 405;
    /// The request body did not arrive in time.
    pub const REQUEST_TIMEOUT: u16 = 408;
    /// Undecodable parameter encoding.
    pub const MALFORMED_PARAMETER: u16 = 430;
    /// Missing or invalid parameter.
    pub const PARAM_ERROR: u16 = 431;
    /// Unknown command.
    pub const UNSUPPORTED_ACTION: u16 = 432;
    /// Internal error.
    pub const INTERNAL_ERROR: u16 = 530;
    /// Permission denied.
    pub const ACCOUNT_ERROR: u16 = 531;
    /// Resource still in use.
    pub const RESOURCE_IN_USE: u16 = 536;
}

/// CloudStack exception-class codes (`cserrorcode`).
pub mod cs {
    /// `InvalidParameterValueException`.
    pub const INVALID_PARAMETER_VALUE: u32 = 4350;
    /// `PermissionDeniedException`.
    pub const PERMISSION_DENIED: u32 = 4365;
    /// `ServerApiException` and anything generic.
    pub const SERVER_API: u32 = 9999;
}

/// A failed API call: what the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("api error {code}: {text}")]
pub struct ApiError {
    /// `errorcode` and HTTP status.
    pub code: u16,
    /// `cserrorcode`.
    pub cs_code: u32,
    /// `errortext`.
    pub text: String,
}

impl ApiError {
    /// An error with explicit codes.
    pub fn new(code: u16, cs_code: u32, text: impl Into<String>) -> Self {
        Self {
            code,
            cs_code,
            text: text.into(),
        }
    }

    /// 401 with CloudStack's fixed sentence.
    pub fn unauthorized() -> Self {
        Self::new(
            code::UNAUTHORIZED,
            cs::SERVER_API,
            "unable to verify user credentials and/or request signature",
        )
    }

    /// 431, invalid parameter value.
    pub fn param(text: impl Into<String>) -> Self {
        Self::new(code::PARAM_ERROR, cs::INVALID_PARAMETER_VALUE, text)
    }

    /// 430, malformed parameter encoding.
    pub fn malformed(text: impl Into<String>) -> Self {
        Self::new(code::MALFORMED_PARAMETER, cs::SERVER_API, text)
    }

    /// 430 or 431 for a parameter list [`crate::params`] refused.
    pub fn from_params(e: crate::params::ParamError) -> Self {
        match e {
            crate::params::ParamError::Malformed(_) => Self::malformed(e.to_string()),
            crate::params::ParamError::TooMany => Self::param(e.to_string()),
        }
    }

    /// 531, permission denied.
    pub fn denied(text: impl Into<String>) -> Self {
        Self::new(code::ACCOUNT_ERROR, cs::PERMISSION_DENIED, text)
    }

    /// 530 for an internal failure: `cause` is logged, never sent.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "Internal error while serving an API call");
        Self::new(
            code::INTERNAL_ERROR,
            cs::SERVER_API,
            "internal error executing the command",
        )
    }

    /// The inner object of the error body (also the `jobresult` of a failed job).
    pub fn body(&self) -> Value {
        let mut v = json!({
            "uuidList": [],
            "errorcode": self.code,
            "errortext": self.text,
        });
        if self.code != code::UNAUTHORIZED {
            v["cserrorcode"] = json!(self.cs_code);
        }
        v
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::internal(&e)
    }
}

/// The edge between the domain layer and the API: each domain error becomes CloudStack's code
/// for it; database and internal causes are logged and hidden.
impl From<crate::model::DomainError> for ApiError {
    fn from(e: crate::model::DomainError) -> Self {
        use crate::model::DomainError as D;
        match e {
            D::Invalid(t) | D::NotFound(t) => Self::param(t),
            D::Denied(t) => Self::denied(t),
            D::InUse(t) => Self::new(code::RESOURCE_IN_USE, cs::SERVER_API, t),
            D::Unavailable(t) => Self::new(code::INTERNAL_ERROR, cs::SERVER_API, t),
            D::Db(e) => Self::internal(&e),
            D::Internal(t) => Self::internal(&t),
        }
    }
}

/// Fleet errors at the API edge: what the operator can act on is said; driver and database
/// causes stay in the log and `listEvents`.
impl From<crate::fleet::FleetError> for ApiError {
    fn from(e: crate::fleet::FleetError) -> Self {
        use crate::fleet::FleetError as F;
        match e {
            F::NotFound(id) => Self::param(format!("Unable to find system VM by id {id}")),
            F::Register(d) => d.into(),
            F::Db(e) => Self::internal(&e),
            F::Random => Self::internal(&"random generator failed"),
            e @ (F::StartFailed { .. } | F::StopFailed { .. }) => {
                // The driver's text (paths, commands) is logged here and recorded as an event.
                tracing::warn!(error = %e, cause = ?std::error::Error::source(&e).map(ToString::to_string), "System VM operation failed");
                Self::new(code::INTERNAL_ERROR, cs::SERVER_API, e.to_string())
            }
            e @ (F::NoDriver(_) | F::NoStore(_) | F::DriverGone(_) | F::WentToError(_) | F::NotUp { .. }) => {
                Self::new(code::INTERNAL_ERROR, cs::SERVER_API, e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthorized_has_no_cserrorcode() {
        let b = ApiError::unauthorized().body();
        assert_eq!(b["errorcode"], 401);
        assert!(b.get("cserrorcode").is_none());
        assert_eq!(b["uuidList"], json!([]));
    }

    #[test]
    fn domain_errors_map_to_cloudstack_codes() {
        use crate::model::DomainError as D;
        assert_eq!(ApiError::from(D::Invalid("x".into())).code, 431);
        assert_eq!(ApiError::from(D::NotFound("x".into())).code, 431);
        assert_eq!(ApiError::from(D::Denied("x".into())).code, 531);
        assert_eq!(ApiError::from(D::InUse("x".into())).code, 536);
        let hidden = ApiError::from(D::Internal("secret detail".into()));
        assert_eq!(hidden.code, 530);
        assert!(!hidden.text.contains("secret"));
        let db = ApiError::from(D::Db(sqlx::Error::PoolTimedOut));
        assert_eq!(db.text, "internal error executing the command");
    }

    #[test]
    fn internal_hides_the_cause() {
        let e = ApiError::internal(&"password=hunter2 in /secret/path");
        assert_eq!(e.code, 530);
        assert!(!e.text.contains("hunter2"));
        assert_eq!(e.body()["cserrorcode"], 9999);
    }
}
