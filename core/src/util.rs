//! Small helpers: random identifiers and keys, CloudStack's date format.
//!
//! Invariant: every random value comes from the OS generator (`getrandom`); a failure of that
//! generator is an error, never a weaker fallback.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The OS random generator failed.
#[derive(Debug, thiserror::Error)]
#[error("random generator failed: {0}")]
pub struct RandomError(String);

fn random_bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| RandomError(e.to_string()))?;
    Ok(b)
}

/// Unix milliseconds now (this core's clock: for local timing; comparisons between cores use
/// the database's clock, `Db::now_ms_sql`).
pub fn now_ms() -> i64 {
    let t = time::OffsetDateTime::now_utc();
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// SHA-256 of a secret, lowercase hex: how core stores secrets that are random tokens (system VM
/// secrets, login session ids and keys). They are random, so a fast hash is enough (no dictionary
/// to guess from).
pub fn hash_secret(secret: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A random (version 4) UUID in its lowercase text form.
pub fn new_uuid() -> Result<String, RandomError> {
    let mut b: [u8; 16] = random_bytes()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// URL-safe base64 (no padding) of `N` random bytes: API keys (64), secrets (64), session keys (20).
pub fn random_token<const N: usize>() -> Result<String, RandomError> {
    Ok(URL_SAFE_NO_PAD.encode(random_bytes::<N>()?))
}

/// Whether `s` is a UUID in text form (any case).
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Now in CloudStack's date format, `yyyy-MM-dd'T'HH:mm:ssZ` in UTC: `2021-10-04T08:41:23+0000`.
pub fn now_cs() -> String {
    format_cs(time::OffsetDateTime::now_utc())
}

/// `t` in CloudStack's date format, in UTC.
pub fn format_cs(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}+0000",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_shape() {
        let u = new_uuid().unwrap();
        assert!(is_uuid(&u), "{u}");
        assert_eq!(&u[14..15], "4");
        assert!(!is_uuid("not-a-uuid"));
    }

    #[test]
    fn tokens_have_the_expected_length() {
        assert_eq!(random_token::<64>().unwrap().len(), 86);
        assert_eq!(random_token::<20>().unwrap().len(), 27);
    }

    #[test]
    fn date_format() {
        let t = time::OffsetDateTime::from_unix_timestamp(1_633_337_283).unwrap();
        assert_eq!(format_cs(t), "2021-10-04T08:48:03+0000");
    }
}
