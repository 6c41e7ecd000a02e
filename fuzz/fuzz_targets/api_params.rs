//! API request parameters and their signature on untrusted text: decoding never panics and fails
//! only with 430/431; lookups find the first occurrence of a name in any case; what decodes
//! re-encodes to the same list; a signature made for a list verifies for it (also with a
//! `signature` parameter in the list), never with another secret; an arbitrary signature or
//! `expires` value is checked without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use systemvm_core::params::{MAX_PARAMS, Params};
use systemvm_core::signing::{Encoding, encode_value, parse_expires, sign, string_to_sign, verify};

const SECRET: &str = "fuzz-secret";

fuzz_target!(|data: &str| {
    // The raw text is also tried as a signature (and an expiry) for the list it decodes to.
    let (query, claimed) = data.split_once('\n').unwrap_or((data, data));
    let mut p = Params::default();
    if let Err(e) = p.extend_urlencoded(query) {
        assert!(e.code == 430 || e.code == 431, "unexpected error code {}", e.code);
        return;
    }
    assert!(p.list.len() <= MAX_PARAMS);
    for (name, _) in &p.list {
        let first = p
            .list
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str());
        assert_eq!(p.get(name), first);
        assert_eq!(p.get(&name.to_ascii_uppercase()), first);
        assert!(p.non_empty(name).is_none_or(|v| !v.is_empty()));
    }
    let _ = p.get("apiKey");
    let _ = p.non_empty("signatureversion");

    let again: String = p
        .list
        .iter()
        .map(|(n, v)| {
            format!(
                "{}={}",
                encode_value(n, Encoding::Java),
                encode_value(v, Encoding::Java)
            )
        })
        .collect::<Vec<_>>()
        .join("&");
    let mut q = Params::default();
    q.extend_urlencoded(&again).expect("re-encoded parameters decode");
    assert_eq!(q.list, p.list);

    for enc in [Encoding::Java, Encoding::Rfc3986Tilde] {
        let sig = sign(SECRET, &string_to_sign(&p.list, enc));
        assert!(verify(&p.list, SECRET, &sig));
        assert!(!verify(&p.list, "another-secret", &sig));
        let mut signed = p.list.clone();
        signed.push(("Signature".into(), sig.clone()));
        assert!(verify(&signed, SECRET, &sig));
    }
    let _ = verify(&p.list, SECRET, claimed);
    let _ = parse_expires(claimed);
    if let Some(expires) = p.get("expires") {
        let _ = parse_expires(expires);
    }
});
