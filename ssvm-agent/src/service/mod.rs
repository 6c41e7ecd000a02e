//! `ssvm-agent serve`: download jobs run in the background, resumed at start, driven by a small
//! local JSON API and by core's commands (`crate::core_link`).
//!
//! - `runner`: [`Agent`], the job runner: job tasks, slots, cancellation, the download policy
//!   core's settings change, the store's load and installs.
//! - `api`: the local JSON HTTP API over an [`Agent`] ([`serve`], [`bind`]).

mod api;
mod runner;

pub use api::{bind, serve};
pub use runner::{Agent, Submit};
