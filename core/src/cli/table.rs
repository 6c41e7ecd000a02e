//! Plain-text output for the CLI: aligned columns under a header row, and human-readable bytes.
//!
//! Invariants: every row has as many cells as the header (missing cells render as `-`); no line
//! ends in padding; a cell never breaks a line (newlines and tabs become spaces); a column with a
//! width limit ([`Column::cut`]) never shows more characters than that, a cut cell ending in `…`
//! (`--json` keeps the full text).

use serde_json::Value;

/// How a column shows its JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// As text (strings unquoted, numbers and booleans as JSON prints them).
    Text,
    /// A byte count, as [`format_bytes`] prints it.
    Bytes,
    /// A percentage (`12.34` → `12.34%`).
    Percent,
}

/// One column of a list: header text, JSON key of the item, display kind.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// Header text.
    pub header: &'static str,
    /// Key in each item.
    pub key: &'static str,
    /// How the value is shown.
    pub kind: Kind,
    /// Most characters shown (longer cells are cut, ending in `…`); `0`: no limit.
    pub max_width: usize,
}

impl Column {
    /// This column, its cells cut to `max_width` characters.
    pub const fn cut(self, max_width: usize) -> Column {
        Column { max_width, ..self }
    }
}

/// A [`Kind::Text`] column.
pub const fn text(header: &'static str, key: &'static str) -> Column {
    Column {
        header,
        key,
        kind: Kind::Text,
        max_width: 0,
    }
}

/// A [`Kind::Bytes`] column.
pub const fn bytes(header: &'static str, key: &'static str) -> Column {
    Column {
        header,
        key,
        kind: Kind::Bytes,
        max_width: 0,
    }
}

/// A [`Kind::Percent`] column.
pub const fn percent(header: &'static str, key: &'static str) -> Column {
    Column {
        header,
        key,
        kind: Kind::Percent,
        max_width: 0,
    }
}

/// `n` bytes in binary units with one decimal: `512 B`, `1.5 KiB`, `12.3 GiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    // Round first, so 1023.97 KiB shows as 1.0 MiB rather than 1024.0 KiB.
    while (v * 10.0).round() / 10.0 >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// The text of one JSON value in a `kind` column; `-` when absent, null or empty.
pub fn cell(v: Option<&Value>, kind: Kind) -> String {
    let raw = match v {
        None | Some(Value::Null) => return "-".to_owned(),
        Some(Value::String(s)) if s.is_empty() => return "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let shown = match kind {
        Kind::Text => raw,
        Kind::Bytes => raw.trim().parse::<u64>().map_or(raw, format_bytes),
        Kind::Percent => format!("{raw}%"),
    };
    shown.replace(['\n', '\r', '\t'], " ")
}

/// `s` cut to at most `max` characters, the last of them `…` when anything was cut; `max == 0`
/// leaves it whole.
pub fn cut(s: &str, max: usize) -> String {
    if max == 0 || s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.truncate(out.trim_end().len());
    out.push('…');
    out
}

/// The items of a CloudStack list answer (`{"count": N, "<object>": […]}`; `{}` when empty).
pub fn items<'a>(list: &'a Value, object: &str) -> &'a [Value] {
    list.get(object)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// A table of `items` with `columns`.
pub fn list_table(items: &[Value], columns: &[Column]) -> Table {
    let mut t = Table::new(columns.iter().map(|c| c.header));
    for item in items {
        t.push(
            columns
                .iter()
                .map(|c| cut(&cell(item.get(c.key), c.kind), c.max_width)),
        );
    }
    t
}

/// Rows of text under a header, printed with aligned columns.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with this header row.
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Self {
        Self {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are `-`, extra ones are dropped.
    pub fn push<S: Into<String>>(&mut self, row: impl IntoIterator<Item = S>) {
        let mut row: Vec<String> = row.into_iter().map(Into::into).take(self.header.len()).collect();
        row.resize(self.header.len(), "-".to_owned());
        self.rows.push(row);
    }

    /// Number of rows below the header.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are no rows below the header.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text: columns two spaces apart, every line ending in `\n`.
    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.header.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(c));
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(c);
                line.extend(std::iter::repeat_n(' ', w - width(c)));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bytes_in_binary_units() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1.0 KiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(13_207_024_435), "12.3 GiB");
        assert_eq!(format_bytes(1024 * 1024 - 1), "1.0 MiB");
        assert_eq!(format_bytes(5 * 1024_u64.pow(4)), "5.0 TiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn cells_by_kind() {
        let v = json!({"s": "a\tb\nc", "n": 42, "b": true, "big": 1_073_741_824_u64, "sbig": "2048", "p": "12.34", "null": null});
        assert_eq!(cell(v.get("s"), Kind::Text), "a b c");
        assert_eq!(cell(v.get("n"), Kind::Text), "42");
        assert_eq!(cell(v.get("b"), Kind::Text), "true");
        assert_eq!(cell(v.get("big"), Kind::Bytes), "1.0 GiB");
        assert_eq!(cell(v.get("sbig"), Kind::Bytes), "2.0 KiB");
        assert_eq!(cell(v.get("s"), Kind::Bytes), "a b c");
        assert_eq!(cell(v.get("p"), Kind::Percent), "12.34%");
        assert_eq!(cell(v.get("null"), Kind::Text), "-");
        assert_eq!(cell(Some(&json!("")), Kind::Text), "-");
        assert_eq!(cell(v.get("missing"), Kind::Bytes), "-");
    }

    #[test]
    fn aligned_columns_without_trailing_spaces() {
        let mut t = Table::new(["ID", "NAME", "STATE"]);
        t.push(["1", "zone-one", "Enabled"]);
        t.push(["22", "z", ""]);
        t.push(["333"]);
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.render(),
            "ID   NAME      STATE\n\
             1    zone-one  Enabled\n\
             22   z\n\
             333  -         -\n"
        );
    }

    #[test]
    fn list_answers_to_tables() {
        let cols = [text("ID", "id"), bytes("SIZE", "size")];
        let list = json!({"count": 2, "template": [{"id": "a", "size": 2048}, {"id": "é"}]});
        let t = list_table(items(&list, "template"), &cols);
        assert_eq!(t.to_string(), "ID  SIZE\na   2.0 KiB\né   -\n");
        // CloudStack answers an empty list with `{}`: a header and no rows.
        let empty = list_table(items(&json!({}), "template"), &cols);
        assert!(empty.is_empty());
        assert_eq!(empty.render(), "ID  SIZE\n");
    }

    #[test]
    fn cut_cells_end_in_an_ellipsis() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("exactly10!", 10), "exactly10!");
        assert_eq!(cut("eleven chars", 10), "eleven ch…");
        // No space left before the ellipsis; characters, not bytes, are counted.
        assert_eq!(cut("abcd efgh", 6), "abcd…");
        assert_eq!(cut("ééééééé", 4), "ééé…");
        assert_eq!(cut("x", 1), "x");
        assert_eq!(cut("xy", 1), "…");
        assert_eq!(cut("no limit at all", 0), "no limit at all");
    }

    #[test]
    fn long_status_is_cut_to_the_column_width() {
        let reason = "Failed: refusing to download from internal address 10.1.2.3 (private); allow it with secstorage.allowed.internal.sites";
        let cols = [
            text("ID", "id"),
            text("STATUS", "status").cut(24),
            text("READY", "isready"),
        ];
        let list = json!({"template": [{"id": "t1", "status": reason, "isready": false},
            {"id": "t2", "status": "Download Complete", "isready": true}]});
        let out = list_table(items(&list, "template"), &cols).render();
        assert_eq!(
            out,
            "ID  STATUS                    READY\n\
             t1  Failed: refusing to dow…  false\n\
             t2  Download Complete         true\n"
        );
        assert!(
            out.lines().all(|l| l.chars().count() <= 2 + 2 + 24 + 2 + 5),
            "{out}"
        );
    }
}
