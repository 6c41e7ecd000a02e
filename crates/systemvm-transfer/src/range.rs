//! A download's `Range` header (RFC 9110 §14): one byte range, or the whole file.
//!
//! Invariant: a returned range lies inside the file (`start <= end < len`). Several ranges, or
//! a unit other than `bytes`, read as no range (the server may ignore `Range`); a range that
//! cannot be satisfied is [`Range::Unsatisfiable`] (HTTP 416).

/// What to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// The whole file (HTTP 200).
    Full,
    /// Bytes `start..=end` (HTTP 206).
    Part {
        /// First byte.
        start: u64,
        /// Last byte (inclusive).
        end: u64,
    },
    /// Outside the file (HTTP 416).
    Unsatisfiable,
}

/// Reads `Range` for a file of `len` bytes.
pub fn parse(header: Option<&str>, len: u64) -> Range {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Range::Full;
    };
    if spec.contains(',') {
        return Range::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Range::Full;
    };
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.len() <= 20 && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.trim().is_empty(), num(a), num(b)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || len == 0 {
                Range::Unsatisfiable
            } else {
                Range::Part {
                    start: len.saturating_sub(n),
                    end: len - 1,
                }
            }
        }
        (false, Some(start), end) if b.trim().is_empty() || end.is_some() => {
            if start >= len {
                return Range::Unsatisfiable;
            }
            let end = end.map_or(len - 1, |e| e.min(len - 1));
            if end < start {
                return Range::Full;
            }
            Range::Part { start, end }
        }
        _ => Range::Full,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn reads_single_ranges() {
        assert_eq!(parse(None, 10), Range::Full);
        assert_eq!(parse(Some("bytes=0-4"), 10), Range::Part { start: 0, end: 4 });
        assert_eq!(parse(Some("bytes=5-"), 10), Range::Part { start: 5, end: 9 });
        assert_eq!(parse(Some("bytes=-3"), 10), Range::Part { start: 7, end: 9 });
        assert_eq!(parse(Some("bytes=-30"), 10), Range::Part { start: 0, end: 9 });
        assert_eq!(parse(Some("bytes=8-100"), 10), Range::Part { start: 8, end: 9 });
        assert_eq!(parse(Some("bytes=10-"), 10), Range::Unsatisfiable);
        assert_eq!(parse(Some("bytes=-0"), 10), Range::Unsatisfiable);
        assert_eq!(parse(Some("bytes=0-1,3-4"), 10), Range::Full);
        assert_eq!(parse(Some("items=0-1"), 10), Range::Full);
        assert_eq!(parse(Some("bytes=5-2"), 10), Range::Full);
        assert_eq!(parse(Some("bytes=x-2"), 10), Range::Full);
    }

    proptest! {
        #[test]
        fn ranges_lie_inside_the_file(h in ".{0,40}", len in 0u64..1000) {
            if let Range::Part { start, end } = parse(Some(&h), len) {
                prop_assert!(start <= end && end < len);
            }
        }

        #[test]
        fn well_formed_ranges_are_read(len in 1u64..10_000, a in 0u64..10_000, n in 0u64..10_000) {
            let h = format!("bytes={a}-{}", a + n);
            match parse(Some(&h), len) {
                Range::Part { start, end } => { prop_assert_eq!(start, a); prop_assert_eq!(end, (a + n).min(len - 1)); }
                Range::Unsatisfiable => prop_assert!(a >= len),
                Range::Full => prop_assert!(false, "well-formed range ignored"),
            }
        }
    }
}
