//! CloudStack request signing (`ApiServer.verifyRequest`), as the reference §1 describes it.
//!
//! The string to sign takes every parameter but `signature` (name matched case-insensitively),
//! sorts the names as received (case-sensitive code-unit order), joins `name=` + Java-URLEncoder
//! value with `&`, and lower-cases the whole. The signature is base64(HMAC-SHA1(secret, string)).
//!
//! Invariants: signatures are compared in constant time; the secret never leaves this module in
//! a log or an error; a v3 request without a parseable `expires` never verifies.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha1::Sha1;
use subtle::ConstantTimeEq as _;

/// How values are percent-encoded in the string to sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Java `URLEncoder` with `+` → `%20`: only `A-Za-z0-9.-*_` kept. What CloudStack computes.
    Java,
    /// Same, but `~` kept (Python `quote`, Go `url.QueryEscape`): accepted leniently.
    Rfc3986Tilde,
}

/// Percent-encodes `value` the way the signature algorithm wants (before lower-casing).
pub fn encode_value(value: &str, enc: Encoding) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'.' | b'-' | b'*' | b'_')
            || (enc == Encoding::Rfc3986Tilde && b == b'~');
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The lower-cased string to sign for `params` (name, value as decoded).
pub fn string_to_sign(params: &[(String, String)], enc: Encoding) -> String {
    let mut items: Vec<&(String, String)> = params
        .iter()
        .filter(|(n, _)| !n.eq_ignore_ascii_case("signature"))
        .collect();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let joined = items
        .iter()
        .map(|(n, v)| format!("{n}={}", encode_value(v, enc)))
        .collect::<Vec<_>>()
        .join("&");
    joined.to_lowercase()
}

/// base64(HMAC-SHA1(secret, msg)).
pub fn sign(secret: &str, msg: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha1>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(msg.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

/// Whether `signature` signs `params` with `secret`, Java encoding first, then the `~` variant.
pub fn verify(params: &[(String, String)], secret: &str, signature: &str) -> bool {
    [Encoding::Java, Encoding::Rfc3986Tilde].iter().any(|enc| {
        let expected = sign(secret, &string_to_sign(params, *enc));
        !expected.is_empty() && bool::from(expected.as_bytes().ct_eq(signature.as_bytes()))
    })
}

/// An `expires` value that matches none of the accepted formats.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unparseable expires value")]
pub struct ExpiresError;

/// Parses `expires` to a Unix time in seconds. Accepted: `yyyy-MM-ddTHH:mm:ss`, optional
/// fraction (any number of digits), then `Z`, `±HHMM`, `±HH:MM`, `±HH` or `Z+0000` (legacy).
pub fn parse_expires(s: &str) -> Result<i64, ExpiresError> {
    let b = s.trim().as_bytes();
    let num = |r: std::ops::Range<usize>| -> Result<i64, ExpiresError> {
        let part = b.get(r).ok_or(ExpiresError)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return Err(ExpiresError);
        }
        std::str::from_utf8(part)
            .map_err(|_| ExpiresError)?
            .parse()
            .map_err(|_| ExpiresError)
    };
    let sep = |i: usize, c: u8| -> Result<(), ExpiresError> {
        if b.get(i) == Some(&c) {
            Ok(())
        } else {
            Err(ExpiresError)
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    sep(4, b'-')?;
    sep(7, b'-')?;
    sep(10, b'T')?;
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    sep(13, b':')?;
    sep(16, b':')?;
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return Err(ExpiresError);
        }
    }
    let rest = &b[i..];
    let offset_secs = match rest {
        b"" | b"Z" | b"Z+0000" | b"Z+00:00" => 0,
        [sign @ (b'+' | b'-'), tail @ ..] => {
            let digits: Vec<u8> = tail.iter().copied().filter(|c| *c != b':').collect();
            let colon_ok = match tail.len() {
                2 | 4 => !tail.contains(&b':'),
                5 => tail[2] == b':',
                _ => false,
            };
            if !colon_ok || !digits.iter().all(u8::is_ascii_digit) {
                return Err(ExpiresError);
            }
            let d = |k: usize| i64::from(digits.get(k).map_or(0, |c| c - b'0'));
            let (h, m) = (d(0) * 10 + d(1), d(2) * 10 + d(3));
            if h > 18 || m > 59 {
                return Err(ExpiresError);
            }
            let s = (h * 60 + m) * 60;
            if *sign == b'-' { -s } else { s }
        }
        _ => return Err(ExpiresError),
    };
    let month =
        time::Month::try_from(u8::try_from(month).map_err(|_| ExpiresError)?).map_err(|_| ExpiresError)?;
    let date = time::Date::from_calendar_date(
        i32::try_from(year).map_err(|_| ExpiresError)?,
        month,
        u8::try_from(day).map_err(|_| ExpiresError)?,
    )
    .map_err(|_| ExpiresError)?;
    let t = time::Time::from_hms(
        u8::try_from(hour).map_err(|_| ExpiresError)?,
        u8::try_from(minute).map_err(|_| ExpiresError)?,
        u8::try_from(second).map_err(|_| ExpiresError)?,
    )
    .map_err(|_| ExpiresError)?;
    let local = time::PrimitiveDateTime::new(date, t)
        .assume_utc()
        .unix_timestamp();
    Ok(local - offset_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn java_encoding() {
        assert_eq!(encode_value("a b*c~d/é", Encoding::Java), "a%20b*c%7Ed%2F%C3%A9");
        assert_eq!(
            encode_value("a b*c~d/é", Encoding::Rfc3986Tilde),
            "a%20b*c~d%2F%C3%A9"
        );
    }

    #[test]
    fn string_to_sign_sorts_case_sensitively_and_lowercases() {
        let params = p(&[
            ("command", "listZones"),
            ("apiKey", "KEY"),
            ("response", "json"),
            ("signature", "ignored"),
            ("Zed", "X Y"),
        ]);
        // 'Z' (0x5A) sorts before 'a' (0x61): case-sensitive order, then the whole is lower-cased.
        assert_eq!(
            string_to_sign(&params, Encoding::Java),
            "zed=x%20y&apikey=key&command=listzones&response=json"
        );
    }

    /// Vector computed independently with Python: base64(hmac.new(b"secret",
    /// b"apikey=key&command=listzones&response=json", hashlib.sha1).digest()).
    #[test]
    fn known_vector() {
        let params = p(&[("command", "listZones"), ("apiKey", "KEY"), ("response", "json")]);
        let s = string_to_sign(&params, Encoding::Java);
        assert_eq!(s, "apikey=key&command=listzones&response=json");
        assert_eq!(sign("secret", &s), KNOWN_SIG);
        assert!(verify(&params, "secret", KNOWN_SIG));
        assert!(!verify(&params, "other", KNOWN_SIG));
        assert!(!verify(&params, "secret", ""));
    }

    const KNOWN_SIG: &str = include_str!("../testdata/known_signature.txt");

    #[test]
    fn tilde_accepted_leniently() {
        let params = p(&[("command", "listZones"), ("name", "a~b")]);
        let rfc = sign("s", &string_to_sign(&params, Encoding::Rfc3986Tilde));
        let java = sign("s", &string_to_sign(&params, Encoding::Java));
        assert_ne!(rfc, java);
        assert!(verify(&params, "s", &rfc));
        assert!(verify(&params, "s", &java));
    }

    #[test]
    fn expires_formats() {
        let base = 1_795_482_054; // 2026-11-24T01:00:54Z
        for s in [
            "2026-11-24T01:00:54+0000",
            "2026-11-24T01:00:54Z",
            "2026-11-24T01:00:54+00:00",
            "2026-11-24T01:00:54.123456Z",
            "2026-11-24T01:00:54.5+0000",
            "2026-11-23T18:00:54-0700",
            "2026-11-23T18:00:54-07:00",
            "2026-11-24T03:00:54+02",
            "2026-11-24T01:00:54Z+0000",
        ] {
            assert_eq!(parse_expires(s), Ok(base), "{s}");
        }
        for s in [
            "",
            "tomorrow",
            "2026-11-24 01:00:54Z",
            "2026-13-24T01:00:54Z",
            "2026-11-24T01:00:54+25:00",
            "2026-11-24T01:00:54.Z",
            "2026-11-24T01:00:54+0",
            "2026-11-24T01:00:54Zjunk",
        ] {
            assert_eq!(parse_expires(s), Err(ExpiresError), "{s}");
        }
    }
}
