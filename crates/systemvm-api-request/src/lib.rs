//! CloudStack API requests as they arrive: the parameter list decoded strictly from the query
//! string and form body ([`params`]), and the request signature over it ([`signing`]).
//!
//! Both take untrusted text and never panic on it; this crate has no I/O and no dependency on
//! core, so its decoders are fuzzed and property-tested on their own (`fuzz/`).
#![forbid(unsafe_code)]

pub mod params;
pub mod signing;
