//! Inventory of an existing store: the templates and ISOs under `template/tmpl/<account>/<id>/`,
//! read back from their `template.properties`.
//!
//! Invariant: an incomplete install (no properties, or properties without `uniquename`, `virtualsize`
//! or a valid format entry) is reported as incomplete with the reason; it is never deleted here.
//! Fence markers (`.ssvm-epoch.N`, see [`crate::fence`]) are ignored: they never make an install
//! look complete, and journals on the store (`.ssvm-journal/`) are outside the template tree.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::properties::{TemplateProperties, parse_java_properties};
use crate::store::{Store, StoreError};

/// Where templates and ISOs live in a CloudStack secondary store.
pub const TEMPLATE_ROOT: &str = "template/tmpl";

/// Largest `template.properties` read.
const MAX_PROPERTIES: usize = 1 << 20;

/// One install directory as found.
#[derive(Debug, Serialize)]
pub struct Entry {
    /// Directory in the store, e.g. `template/tmpl/2/201`.
    pub path: String,
    /// Whether the install is complete (properties valid and the file present with its size).
    pub complete: bool,
    /// Why it is not, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Every key of `template.properties`, as written.
    pub properties: BTreeMap<String, String>,
}

/// Lists every install directory under [`TEMPLATE_ROOT`].
pub async fn scan(store: &Store) -> Result<Vec<Entry>, StoreError> {
    let mut out = Vec::new();
    let accounts = match store.list_dir(TEMPLATE_ROOT).await {
        Ok(a) => a,
        Err(StoreError::NotFound { .. }) => return Ok(out),
        Err(e) => return Err(e),
    };
    for account in accounts.into_iter().filter(|e| e.is_dir) {
        let account_dir = format!("{TEMPLATE_ROOT}/{}", account.name);
        for template in store
            .list_dir(&account_dir)
            .await?
            .into_iter()
            .filter(|e| e.is_dir)
        {
            let dir = format!("{account_dir}/{}", template.name);
            out.push(inspect_dir(store, &dir).await?);
        }
    }
    Ok(out)
}

async fn inspect_dir(store: &Store, dir: &str) -> Result<Entry, StoreError> {
    let incomplete = |problem: String, properties| Entry {
        path: dir.to_owned(),
        complete: false,
        problem: Some(problem),
        properties,
    };
    let text = match store
        .read_file(&format!("{dir}/template.properties"), MAX_PROPERTIES)
        .await
    {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(StoreError::NotFound { .. }) => {
            // Fence markers (crate::fence) are bookkeeping, not part of an install.
            let files: Vec<String> = store
                .list_dir(dir)
                .await?
                .into_iter()
                .map(|e| e.name)
                .filter(|n| !crate::fence::is_fence_file(n))
                .collect();
            return Ok(incomplete(
                format!("no template.properties (files: {})", files.join(", ")),
                BTreeMap::new(),
            ));
        }
        Err(e) => return Err(e),
    };
    let map = match parse_java_properties(&text) {
        Ok(m) => m,
        Err(e) => {
            return Ok(incomplete(
                format!("template.properties unreadable: {e}"),
                BTreeMap::new(),
            ));
        }
    };
    let props = match TemplateProperties::from_map(&map) {
        Ok(p) => p,
        Err(e) => return Ok(incomplete(e.to_string(), map)),
    };
    match store.metadata(&format!("{dir}/{}", props.filename)).await? {
        Some(m) if !m.is_dir && m.size == props.size => Ok(Entry {
            path: dir.to_owned(),
            complete: true,
            problem: None,
            properties: map,
        }),
        Some(m) => Ok(incomplete(
            format!(
                "{} is {} bytes, properties say {}",
                props.filename, m.size, props.size
            ),
            map,
        )),
        None => Ok(incomplete(format!("{} is missing", props.filename), map)),
    }
}
