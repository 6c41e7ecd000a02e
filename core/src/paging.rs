//! `page`/`pagesize` rules of CloudStack list commands.
//!
//! Invariants: `page` and `pagesize` come together or not at all (431 otherwise); `pagesize=-1`
//! means unlimited and then `page` is an error; page sizes above the `default.page.size` setting are
//! refused; the default page is the first one of `default.page.size` items.

use crate::error::ApiError;
use crate::params::Params;

/// The window a list command answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Rows to skip.
    pub offset: i64,
    /// Rows to return at most; `None` = unlimited.
    pub limit: Option<i64>,
}

impl Page {
    /// Reads `page` and `pagesize` from `p` with `max` = `default.page.size`.
    pub fn from_params(p: &Params, max: i64) -> Result<Self, ApiError> {
        let num = |name: &str| -> Result<Option<i64>, ApiError> {
            p.non_empty(name)
                .map(|v| {
                    v.parse::<i64>().map_err(|_| {
                        ApiError::param(format!("Unable to parse {name} value {v:?} as an integer"))
                    })
                })
                .transpose()
        };
        let (page, size) = (num("page")?, num("pagesize")?);
        match (page, size) {
            (None, None) => Ok(Self {
                offset: 0,
                limit: Some(max),
            }),
            (Some(_), Some(-1)) => Err(ApiError::param(
                "Can't specify page parameter when pagesize is -1 (Unlimited)",
            )),
            (None, Some(-1)) => Ok(Self {
                offset: 0,
                limit: None,
            }),
            (Some(page), Some(size)) => {
                if page < 1 {
                    return Err(ApiError::param("Page must be a positive number"));
                }
                if size < 1 {
                    return Err(ApiError::param("Page size must be a positive number or -1"));
                }
                if size > max {
                    return Err(ApiError::param(format!(
                        "Page size can't exceed max allowed page size value: {max}"
                    )));
                }
                Ok(Self {
                    offset: (page - 1).saturating_mul(size),
                    limit: Some(size),
                })
            }
            (Some(_), None) | (None, Some(_)) => Err(ApiError::param(
                "Both page and pagesize must be specified, or neither",
            )),
        }
    }

    /// This page of an in-memory list.
    pub fn slice<T>(&self, items: Vec<T>) -> Vec<T> {
        let skip = usize::try_from(self.offset).unwrap_or(usize::MAX);
        let take = self
            .limit
            .map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
        items.into_iter().skip(skip).take(take).collect()
    }

    /// ` LIMIT n OFFSET m` for SQL (numbers only, validated above).
    pub fn sql(&self) -> String {
        match self.limit {
            Some(l) => format!(" LIMIT {l} OFFSET {}", self.offset),
            // Unlimited only comes with offset 0 (`page` is refused with `pagesize=-1`).
            None => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(q: &str) -> Result<Page, ApiError> {
        let mut p = Params::default();
        p.extend_urlencoded(q).unwrap();
        Page::from_params(&p, 500)
    }

    #[test]
    fn rules() {
        assert_eq!(
            page("").unwrap(),
            Page {
                offset: 0,
                limit: Some(500)
            }
        );
        assert_eq!(
            page("page=3&pagesize=7").unwrap(),
            Page {
                offset: 14,
                limit: Some(7)
            }
        );
        assert_eq!(
            page("pagesize=-1").unwrap(),
            Page {
                offset: 0,
                limit: None
            }
        );
        for bad in [
            "page=1",
            "pagesize=5",
            "page=1&pagesize=-1",
            "page=0&pagesize=5",
            "page=1&pagesize=0",
            "page=1&pagesize=501",
            "page=x&pagesize=1",
        ] {
            assert_eq!(page(bad).unwrap_err().code, 431, "{bad}");
        }
    }

    #[test]
    fn sql_window() {
        assert_eq!(page("page=2&pagesize=10").unwrap().sql(), " LIMIT 10 OFFSET 10");
        assert_eq!(page("pagesize=-1").unwrap().sql(), "");
    }
}
