//! API request parameters and their signature on untrusted text: decoding never panics and fails
//! only with 430/431; lookups find the first occurrence of a name in any case; what decodes
//! re-encodes to the same list; a signature made for a list verifies for it (also with a
//! `signature` parameter in the list), never with another secret; an arbitrary signature or
//! `expires` value is checked without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use systemvm_api_request::params::{MAX_PARAMS, Params};
use systemvm_api_request::signing::{Encoding, encode_value, parse_expires, sign, string_to_sign, verify};

const SECRET: &str = "fuzz-secret";
/// How many names of a decoded list are looked up.
const LOOKUPS: usize = 16;

fuzz_target!(|data: &str| {
    // The raw text is also tried as a signature (and an expiry) for the list it decodes to.
    let (query, claimed) = data.split_once('\n').unwrap_or((data, data));
    let mut p = Params::default();
    if let Err(e) = p.extend_urlencoded(query) {
        assert!(
            matches!(e.code(), 430 | 431),
            "unexpected error code {}",
            e.code()
        );
        return;
    }
    assert!(p.list.len() <= MAX_PARAMS);
    // Lookups are linear in the list: checking every name of a 2,048-parameter input would make
    // each execution quadratic, so the first names stand for all (decoding covers the rest).
    for (name, _) in p.list.iter().take(LOOKUPS) {
        let first = p
            .list
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str());
        assert_eq!(p.get(name), first);
        assert_eq!(p.get(&name.to_ascii_uppercase()), first);
        assert!(p.non_empty(name).is_none_or(|v| !v.is_empty()));
    }
    // Map parameters (`tags[0].key=…`): every entry has a key, and comes from the list.
    for (k, v) in p.map("tags") {
        assert!(!k.is_empty());
        assert!(p.list.iter().any(|(_, x)| x == k) && (v.is_empty() || p.list.iter().any(|(_, x)| x == v)));
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

    // Each check costs a string to sign and an HMAC per encoding tried, so each property is
    // checked once: the Java signature verifies, the `~` variant verifies with a `signature`
    // parameter in the list (which the string to sign leaves out), another secret never does.
    let java = sign(SECRET, &string_to_sign(&p.list, Encoding::Java));
    assert!(verify(&p.list, SECRET, &java));
    let tilde = sign(SECRET, &string_to_sign(&p.list, Encoding::Rfc3986Tilde));
    let mut signed = p.list.clone();
    signed.push(("Signature".into(), tilde.clone()));
    assert!(verify(&signed, SECRET, &tilde));
    assert!(!verify(&p.list, "another-secret", &java));
    let _ = verify(&p.list, SECRET, claimed);
    let _ = parse_expires(claimed);
    if let Some(expires) = p.get("expires") {
        let _ = parse_expires(expires);
    }
});
