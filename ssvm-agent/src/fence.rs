//! Install fencing: the epoch a download runs under, recorded beside the install, so that a stale
//! run (an older dispatch of the same download, on this agent or another one on the same store)
//! stops before it can overwrite or bring back what a newer run or a delete did.
//!
//! Core raises an install's epoch each time it sends the download to a connection and when it
//! deletes the install (`DownloadCommand::epoch`, `AgentCommand::DeleteInstall::epoch`). An epoch is
//! recorded as an empty-named marker file `.ssvm-epoch.<N>` in the install directory, written
//! atomically; the install's epoch is the highest such `N`. Each writer adds its own file (and then
//! prunes lower ones), so two agents recording at once cannot overwrite each other's epoch: the
//! highest always wins.
//!
//! Invariants:
//! - a run records its epoch before it writes any data, and re-reads the install's epoch before
//!   each checkpoint and before the final rename and `template.properties`; it stops (fenced) when
//!   the recorded epoch is higher than its own, or when the record is gone after it made one (the
//!   install was deleted): it never creates the directory again;
//! - a marker never makes an install look complete: inventory ignores marker files;
//! - epoch 0 (a core that does not fence) records and checks nothing.

use crate::store::{Store, StoreError};

/// Marker files are `.ssvm-epoch.<N>` in the install directory.
pub const FENCE_PREFIX: &str = ".ssvm-epoch.";

/// The reason of a fenced job.
pub const FENCED: &str = "fenced: a newer run or a delete took over this install";

/// Whether a file name is a fence marker (or the temporary file of one being written).
pub fn is_fence_file(name: &str) -> bool {
    name.trim_start_matches('.').starts_with(&FENCE_PREFIX[1..])
}

/// The epoch a marker file name records.
fn epoch_of(name: &str) -> Option<u64> {
    name.strip_prefix(FENCE_PREFIX)?.parse().ok()
}

/// What the install directory says about its epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// There is no install directory.
    NoDirectory,
    /// The highest recorded epoch (0: the directory has no marker).
    Epoch(u64),
}

/// The install's recorded epoch.
pub async fn read(store: &Store, dir: &str) -> Result<Recorded, StoreError> {
    match store.list_dir(dir).await {
        Ok(entries) => Ok(Recorded::Epoch(
            entries
                .iter()
                .filter(|e| !e.is_dir)
                .filter_map(|e| epoch_of(&e.name))
                .max()
                .unwrap_or(0),
        )),
        Err(StoreError::NotFound { .. }) => Ok(Recorded::NoDirectory),
        Err(e) => Err(e),
    }
}

/// Records `epoch` in the (existing) install directory, then removes the markers of lower epochs.
/// Never creates the directory: a deleted install fails with [`StoreError::NotFound`].
pub async fn record(store: &Store, dir: &str, epoch: u64) -> Result<(), StoreError> {
    store
        .write_file_atomic(
            &format!("{dir}/{FENCE_PREFIX}{epoch}"),
            format!("{epoch}\n").as_bytes(),
        )
        .await?;
    for entry in store.list_dir(dir).await? {
        if epoch_of(&entry.name).is_some_and(|e| e < epoch) {
            match store.remove_file(&format!("{dir}/{}", entry.name)).await {
                Ok(()) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Removes the marker of `epoch` (a run that failed or was cancelled leaves nothing behind).
/// A marker of a higher epoch stays; a lower run that recorded one then finds none and stops.
pub async fn forget(store: &Store, dir: &str, epoch: u64) -> Result<(), StoreError> {
    match store.remove_file(&format!("{dir}/{FENCE_PREFIX}{epoch}")).await {
        Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether a run under `own` may go on writing the install: the recorded epoch is not higher
/// than its own, and (once the run recorded one) the record is still there. Raises the record
/// to `own` when the run adopted a higher epoch.
pub async fn check(store: &Store, dir: &str, own: u64, recorded_by_us: bool) -> Result<bool, StoreError> {
    if own == 0 {
        return Ok(true);
    }
    match read(store, dir).await? {
        Recorded::NoDirectory => Ok(!recorded_by_us),
        Recorded::Epoch(0) if recorded_by_us => Ok(false),
        Recorded::Epoch(e) if e > own => Ok(false),
        Recorded::Epoch(e) if e < own && recorded_by_us => {
            record(store, dir, own).await?;
            // Someone may have recorded a higher one meanwhile.
            Ok(matches!(read(store, dir).await?, Recorded::Epoch(e) if e <= own))
        }
        Recorded::Epoch(_) => Ok(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{StoreOptions, StoreUrl};

    async fn store(dir: &tempfile::TempDir) -> Store {
        let url: StoreUrl = format!("file://{}/store", dir.path().display()).parse().unwrap();
        Store::open(&url, StoreOptions::default()).await.unwrap()
    }

    #[test]
    fn marker_names() {
        assert!(is_fence_file(".ssvm-epoch.3"));
        assert!(is_fence_file("..ssvm-epoch.3.tmp-12-0"));
        assert!(!is_fence_file("template.properties"));
        assert!(!is_fence_file("a.qcow2.part"));
        assert_eq!(epoch_of(".ssvm-epoch.17"), Some(17));
        assert_eq!(epoch_of("..ssvm-epoch.17.tmp-1-2"), None);
    }

    #[tokio::test]
    async fn the_highest_epoch_wins_and_lower_runs_are_fenced() {
        let tmp = tempfile::tempdir().unwrap();
        let store = store(&tmp).await;
        let dir = "template/tmpl/2/201";
        assert_eq!(read(&store, dir).await.unwrap(), Recorded::NoDirectory);
        assert!(
            record(&store, dir, 1).await.unwrap_err().is_not_found(),
            "never creates the directory"
        );
        store.create_dir_all(dir).await.unwrap();
        assert_eq!(read(&store, dir).await.unwrap(), Recorded::Epoch(0));
        // Two runs record at once: the higher one wins whatever the order.
        record(&store, dir, 2).await.unwrap();
        record(&store, dir, 1).await.unwrap();
        assert_eq!(read(&store, dir).await.unwrap(), Recorded::Epoch(2));
        assert!(check(&store, dir, 2, true).await.unwrap());
        assert!(!check(&store, dir, 1, true).await.unwrap());
        // A run that adopted a higher epoch raises the record.
        assert!(check(&store, dir, 5, true).await.unwrap());
        assert_eq!(read(&store, dir).await.unwrap(), Recorded::Epoch(5));
        let names: Vec<String> = store
            .list_dir(dir)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, [".ssvm-epoch.5"], "lower markers are pruned");
        // Epoch 0 is not fenced.
        assert!(check(&store, dir, 0, true).await.unwrap());
        // The install deleted under a run that recorded its epoch: fenced.
        store.remove_file(&format!("{dir}/.ssvm-epoch.5")).await.unwrap();
        assert!(!check(&store, dir, 5, true).await.unwrap());
        store.remove_dir(dir).await.unwrap();
        assert!(!check(&store, dir, 5, true).await.unwrap());
        assert!(
            check(&store, dir, 5, false).await.unwrap(),
            "not recorded yet: nothing to lose"
        );
    }
}
