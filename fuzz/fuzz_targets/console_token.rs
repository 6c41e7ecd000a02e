//! Opening untrusted tokens: no panics, and nothing opens without the key.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use systemvm_proto::console::KeySet;

fuzz_target!(|data: &str| {
    static KEYS: OnceLock<KeySet> = OnceLock::new();
    let keys = KEYS.get_or_init(|| KeySet::generate().expect("keys"));
    assert!(keys.open(data).is_err());
});
