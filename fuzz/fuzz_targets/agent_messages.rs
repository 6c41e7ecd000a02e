//! Agent channel messages on untrusted text: `AgentMessage` (what core reads from agents),
//! `CoreMessage` (what agents read from core) and the typed command inside a `Command` never
//! panic; what parses serializes and parses back to the same message (compared when it holds no
//! floating-point number, which serde_json's default parser may round differently); a typed
//! command rebuilt into a `Command` reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use systemvm_proto::agent::{AgentMessage, Command, CoreMessage};

fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(a) => a.iter().any(has_float),
        Value::Object(o) => o.values().any(has_float),
        _ => false,
    }
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(m: &T) {
    let text = serde_json::to_string(m).expect("a parsed message serializes");
    let again: T = serde_json::from_str(&text).expect("a serialized message parses");
    let exact = serde_json::to_value(m).is_ok_and(|v| !has_float(&v));
    if exact {
        assert_eq!(&again, m, "{text}");
    }
}

fn command(c: &Command) {
    if let Some(t) = c.typed() {
        assert_eq!(Command::new(c.id.clone(), &t).typed().as_ref(), Some(&t));
    }
}

fuzz_target!(|data: &str| {
    if let Ok(m) = serde_json::from_str::<AgentMessage>(data) {
        round_trip(&m);
    }
    if let Ok(m) = serde_json::from_str::<CoreMessage>(data) {
        round_trip(&m);
        if let CoreMessage::Command(c) = &m {
            command(c);
        }
    }
    if let Ok(c) = serde_json::from_str::<Command>(data) {
        command(&c);
    }
});
