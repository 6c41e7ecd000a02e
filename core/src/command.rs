//! What a command is: its parameters, access rule, async and leader flags, and the checks they
//! drive (the table of every command is `crate::api::COMMANDS`). The same table drives dispatch,
//! parameter validation, permission checks and `listApis`.
//!
//! Invariants: a handler only runs after its required parameters are present and every declared
//! parameter that is present has the declared type; a caller reaches a command only when its
//! role permits it (`crate::roles`: the role's rules, then the command's [`Access`]).

use std::future::Future;
use std::pin::Pin;

use serde_json::Value;

use crate::error::ApiError;
use crate::params::Params;
use crate::state::{Caller, Role, State};
use crate::util::is_uuid;

/// A parameter's type, as `listApis` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    /// Any string.
    String,
    /// A UUID.
    Uuid,
    /// 32-bit integer.
    Integer,
    /// 64-bit integer.
    Long,
    /// 16-bit integer.
    Short,
    /// `true` or `false`.
    Boolean,
    /// A map sent as `name[i].key=K&name[i].value=V` (present when it has an entry).
    Map,
}

impl Ty {
    /// `listApis` type name.
    pub fn name(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Uuid => "uuid",
            Self::Integer => "integer",
            Self::Long => "long",
            Self::Short => "short",
            Self::Boolean => "boolean",
            Self::Map => "map",
        }
    }

    /// Whether `v` is a valid value of this type.
    pub fn accepts(self, v: &str) -> bool {
        match self {
            Self::String | Self::Map => true,
            Self::Uuid => is_uuid(v),
            Self::Integer => v.parse::<i32>().is_ok(),
            Self::Long => v.parse::<i64>().is_ok(),
            Self::Short => v.parse::<i16>().is_ok(),
            Self::Boolean => v.eq_ignore_ascii_case("true") || v.eq_ignore_ascii_case("false"),
        }
    }
}

/// One declared parameter.
#[derive(Debug, Clone, Copy)]
pub struct ParamSpec {
    /// Name (lowercase).
    pub name: &'static str,
    /// Type.
    pub ty: Ty,
    /// Whether the command fails without it.
    pub required: bool,
    /// Description for `listApis`.
    pub description: &'static str,
}

/// Shorthand for an optional parameter.
pub const fn opt(name: &'static str, ty: Ty, description: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        ty,
        required: false,
        description,
    }
}

/// Shorthand for a required parameter.
pub const fn req(name: &'static str, ty: Ty, description: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        ty,
        required: true,
        description,
    }
}

pub use crate::roles::Access;

/// A boxed handler future.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, ApiError>> + Send>>;

/// A command handler: returns the inner response object (a sync answer, or an async job's result).
pub type Handler = fn(State, Caller, Params) -> HandlerFuture;

/// One API command.
#[derive(Debug, Clone, Copy)]
pub struct Command {
    /// Name as called (`listZones`).
    pub name: &'static str,
    /// Description for `listApis`.
    pub description: &'static str,
    /// Whether it answers with a `jobid` and runs as an async job.
    pub is_async: bool,
    /// Whether only the core holding the leader lease may carry it out (it acts on system VMs or
    /// needs their connections): either core accepts it and records the job, the lease holder
    /// runs it (async commands only).
    pub leader: bool,
    /// Who may call it.
    pub access: Access,
    /// Declared parameters.
    pub params: &'static [ParamSpec],
    /// The handler.
    pub handler: Handler,
    /// The top-level response key when it is not `<name>response` (CloudStack's
    /// `getCommandName()` quirks, e.g. `ldapconfigurationresponse`).
    pub response: Option<&'static str>,
    /// Whether it also answers without authentication (the login page's calls; the handler
    /// then gets [`Caller::anonymous`] and must not depend on who calls).
    pub before_login: bool,
    /// The fields of the object it answers, for `listApis` (`crate::api::fields`).
    pub returns: crate::api::fields::Fields,
}

impl Command {
    /// A synchronous command that any core runs; see [`Command::asynchronous`] and
    /// [`Command::on_leader`].
    pub const fn new(
        name: &'static str,
        description: &'static str,
        access: Access,
        params: &'static [ParamSpec],
        handler: Handler,
    ) -> Self {
        Self {
            name,
            description,
            is_async: false,
            leader: false,
            access,
            params,
            handler,
            response: None,
            before_login: false,
            returns: &[],
        }
    }

    /// The same command, answering objects with these fields.
    pub const fn returns(mut self, fields: crate::api::fields::Fields) -> Self {
        self.returns = fields;
        self
    }

    /// The same command, also answered without authentication.
    pub const fn before_login(mut self) -> Self {
        self.before_login = true;
        self
    }

    /// The same command, answered under `key` instead of `<name>response`.
    pub const fn answers_as(mut self, key: &'static str) -> Self {
        self.response = Some(key);
        self
    }

    /// The same command, answered with a `jobid` and run as an async job.
    pub const fn asynchronous(mut self) -> Self {
        self.is_async = true;
        self
    }

    /// The same command, carried out by the lease holder (implies async).
    pub const fn on_leader(mut self) -> Self {
        self.is_async = true;
        self.leader = true;
        self
    }

    /// The top-level response key: `<name lowercased>response`.
    pub fn response_key(&self) -> String {
        match self.response {
            Some(k) => k.to_owned(),
            None => format!("{}response", self.name.to_ascii_lowercase()),
        }
    }

    /// Whether `role` may call this command (its rules, then this command's [`Access`]).
    pub fn allowed(&self, role: Role) -> bool {
        role.permits(self.name, self.access)
    }

    /// Checks required parameters and declared types (431 on failure).
    pub fn validate(&self, p: &Params) -> Result<(), ApiError> {
        let cmd = self.name.to_ascii_lowercase();
        for spec in self.params {
            if spec.ty == Ty::Map {
                if spec.required && p.map(spec.name).is_empty() {
                    return Err(ApiError::param(format!(
                        "Unable to execute API command {cmd} due to missing parameter {}",
                        spec.name
                    )));
                }
                continue;
            }
            match p.non_empty(spec.name) {
                None if spec.required => {
                    return Err(ApiError::param(format!(
                        "Unable to execute API command {cmd} due to missing parameter {}",
                        spec.name
                    )));
                }
                Some(v) if !spec.ty.accepts(v) => {
                    return Err(ApiError::param(format!(
                        "Unable to execute API command {cmd} due to invalid value {v:?} for parameter {} (expected {})",
                        spec.name,
                        spec.ty.name()
                    )));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Wraps an `async fn(State, Caller, Params) -> Result<Value, ApiError>` as a [`Handler`].
#[macro_export]
macro_rules! handler {
    ($f:path) => {
        |s, c, p| -> $crate::command::HandlerFuture { Box::pin($f(s, c, p)) }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types() {
        assert!(Ty::Uuid.accepts("0b1e4c4c-3a5e-4a8e-9f4a-3c1d2e3f4a5b"));
        assert!(!Ty::Uuid.accepts("x"));
        assert!(Ty::Integer.accepts("-5") && !Ty::Integer.accepts("99999999999"));
        assert!(Ty::Boolean.accepts("TRUE") && !Ty::Boolean.accepts("yes"));
    }
}
