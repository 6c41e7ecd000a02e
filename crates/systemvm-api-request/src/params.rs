//! Request parameters: strict decoding of the query string and form body, limits, lookups.
//!
//! Invariants: the parameter list keeps names and values exactly as received (decoded), in order,
//! for the signature; the first occurrence of a name wins for lookups; more than [`MAX_PARAMS`]
//! parameters is [`ParamError::TooMany`] (CloudStack's 431); an undecodable `%` sequence or a
//! non-UTF-8 value is [`ParamError::Malformed`] (430).

/// Most parameters a request may carry (query string and body together).
pub const MAX_PARAMS: usize = 2048;

/// Why a parameter list was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// An undecodable `%` sequence or a value that is not UTF-8; the text says which.
    #[error("{0}")]
    Malformed(&'static str),
    /// More than [`MAX_PARAMS`] parameters.
    #[error("too many request parameters (at most {MAX_PARAMS})")]
    TooMany,
}

impl ParamError {
    /// CloudStack's error code: 430 (malformed parameter) or 431 (parameter error).
    pub fn code(self) -> u16 {
        match self {
            ParamError::Malformed(_) => 430,
            ParamError::TooMany => 431,
        }
    }
}

/// Decoded request parameters.
#[derive(Debug, Clone, Default)]
pub struct Params {
    /// `(name, value)` as received, decoded.
    pub list: Vec<(String, String)>,
}

fn decode(raw: &str) -> Result<String, ParamError> {
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(ParamError::Malformed("malformed percent-encoding in request"))?;
                out.push(hex);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ParamError::Malformed("request parameter is not valid UTF-8"))
}

impl Params {
    /// Appends the pairs of an `application/x-www-form-urlencoded` string.
    pub fn extend_urlencoded(&mut self, raw: &str) -> Result<(), ParamError> {
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            if self.list.len() >= MAX_PARAMS {
                return Err(ParamError::TooMany);
            }
            let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
            self.list.push((decode(n)?, decode(v)?));
        }
        Ok(())
    }

    /// The value of `name`, matched case-insensitively (the API's own names are lowercase; the
    /// signing names `apiKey`, `signatureVersion`, … arrive in any case).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.list
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The entries of a map parameter sent CloudStack's way, `name[i].key=K&name[i].value=V`
    /// (names matched ignoring ASCII case, any indices, in index order; an entry without a key
    /// is skipped, one without a value has the empty value; the first occurrence wins).
    pub fn map(&self, name: &str) -> Vec<(&str, &str)> {
        let mut entries: Vec<(u32, &str, Option<&str>)> = Vec::new();
        for (n, v) in &self.list {
            let Some(rest) = n
                .get(..name.len())
                .filter(|head| head.eq_ignore_ascii_case(name))
                .and_then(|_| n.get(name.len()..))
                .and_then(|r| r.strip_prefix('['))
            else {
                continue;
            };
            let Some((index, field)) = rest.split_once("].") else {
                continue;
            };
            let Ok(i) = index.parse::<u32>() else {
                continue;
            };
            let slot = match entries.iter().position(|(j, _, _)| *j == i) {
                Some(k) => k,
                None => {
                    entries.push((i, "", None));
                    entries.len() - 1
                }
            };
            if field.eq_ignore_ascii_case("key") && entries[slot].1.is_empty() {
                entries[slot].1 = v.as_str();
            } else if field.eq_ignore_ascii_case("value") && entries[slot].2.is_none() {
                entries[slot].2 = Some(v.as_str());
            }
        }
        entries.sort_by_key(|(i, _, _)| *i);
        entries
            .into_iter()
            .filter(|(_, k, _)| !k.is_empty())
            .map(|(_, k, v)| (k, v.unwrap_or("")))
            .collect()
    }

    /// Like [`Params::get`], but an empty value counts as absent.
    pub fn non_empty(&self, name: &str) -> Option<&str> {
        self.get(name).filter(|v| !v.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_keeps_order() {
        let mut p = Params::default();
        p.extend_urlencoded("b=x+y&a=%C3%A9%2F&c&apiKey=K").unwrap();
        assert_eq!(p.list[0], ("b".into(), "x y".into()));
        assert_eq!(p.get("a"), Some("é/"));
        assert_eq!(p.get("c"), Some(""));
        assert_eq!(p.get("APIKEY"), Some("K"));
    }

    #[test]
    fn map_parameters() {
        let mut p = Params::default();
        p.extend_urlencoded("tags%5B1%5D.value=b&TAGS[1].key=k2&tags[0].key=k1&tags[0].value=a&tags[x].key=no&tags[2].value=orphan&other[0].key=z")
            .unwrap();
        assert_eq!(p.map("tags"), vec![("k1", "a"), ("k2", "b")]);
        assert!(p.map("details").is_empty());
    }

    #[test]
    fn malformed_is_430() {
        let mut p = Params::default();
        assert_eq!(p.extend_urlencoded("a=%zz").unwrap_err().code(), 430);
        assert_eq!(p.extend_urlencoded("a=%C3").unwrap_err().code(), 430);
        assert_eq!(p.extend_urlencoded("a=%4").unwrap_err().code(), 430);
    }

    #[test]
    fn too_many_is_431() {
        let raw = (0..=MAX_PARAMS)
            .map(|i| format!("p{i}=1"))
            .collect::<Vec<_>>()
            .join("&");
        let mut p = Params::default();
        assert_eq!(p.extend_urlencoded(&raw).unwrap_err().code(), 431);
    }
}
