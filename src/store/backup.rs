//! Online backup and restore. A backup is a RocksDB checkpoint of the live store, taken while
//! the writer goes on: a consistent copy (hard links to the immutable SST files where the
//! destination shares the data directory's filesystem), holding everything written before it
//! began, acknowledged scans included, with the change-log sequence and the Kafka source
//! offsets of that moment, which a restored instance resumes from.
//!
//! Invariants: a destination is only ever the finished backup or nothing: the checkpoint is
//! built beside it (`<destination>.partial`) and renamed into place once read back; a
//! destination that exists and is not an empty directory is refused before anything is written.

use std::fs;
use std::path::{Path, PathBuf};

use rocksdb::{Options, DB};

use super::{keys, Store, StoreError};
use crate::domain::Sequence;

/// What a backup holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupInfo {
    pub destination: PathBuf,
    pub last_sequence: Sequence,
    /// (topic, partition, next offset) of each Kafka source partition.
    pub source_offsets: Vec<(String, i32, i64)>,
    pub bytes: u64,
}

fn refused(path: &Path, why: impl std::fmt::Display) -> StoreError {
    StoreError::Backup(format!("{}: {why}", path.display()))
}

/// Fails unless `destination` can become a backup: absent or an empty directory (removed, as
/// RocksDB creates it), in an existing directory.
fn check_destination(destination: &Path) -> Result<(), StoreError> {
    match fs::read_dir(destination) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(refused(destination, "exists and is not empty"));
            }
            fs::remove_dir(destination).map_err(|e| refused(destination, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(refused(destination, e)),
    }
    let parent = destination
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(refused(parent, "is not a directory"));
    }
    Ok(())
}

fn partial(destination: &Path) -> PathBuf {
    let mut name = destination.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Moves a finished `partial` to `destination`, durably.
fn finish(partial: &Path, destination: &Path) -> Result<(), StoreError> {
    fs::rename(partial, destination).map_err(|e| refused(destination, e))?;
    if let Some(parent) = destination.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| refused(parent, e))?;
    }
    Ok(())
}

/// Runs `build` into `<destination>.partial` and renames it into place, or removes it.
fn build_then_rename(
    destination: &Path,
    build: impl FnOnce(&Path) -> Result<BackupInfo, StoreError>,
) -> Result<BackupInfo, StoreError> {
    check_destination(destination)?;
    let partial = partial(destination);
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(|e| refused(&partial, e))?;
    }
    let built = build(&partial).and_then(|info| {
        finish(&partial, destination)?;
        Ok(BackupInfo {
            destination: destination.to_owned(),
            ..info
        })
    });
    if built.is_err() {
        let _ = fs::remove_dir_all(&partial);
    }
    built
}

/// Reads what the store at `path` holds, read-only: its schema must be one this build opens.
pub fn describe(path: &Path) -> Result<BackupInfo, StoreError> {
    let db = DB::open_cf_for_read_only(&Options::default(), path, [keys::META], false)
        .map_err(|e| refused(path, format!("not a scand data directory ({e})")))?;
    let meta = db
        .cf_handle(keys::META)
        .ok_or_else(|| refused(path, "has no meta column family"))?;
    let schema = db
        .get_cf(meta, keys::META_SCHEMA_VERSION)?
        .and_then(|v| Some(u32::from_be_bytes(v.as_slice().try_into().ok()?)))
        .ok_or_else(|| refused(path, "has no schema version"))?;
    if schema > keys::SCHEMA_VERSION {
        return Err(StoreError::Schema {
            found: schema,
            expected: keys::SCHEMA_VERSION,
        });
    }
    let last_sequence = db
        .get_cf(meta, keys::META_LAST_SEQUENCE)?
        .and_then(|v| keys::decode_change_key(&v))
        .unwrap_or(Sequence(0));
    let mut source_offsets = Vec::new();
    let prefix = keys::SOURCE_OFFSET_PREFIX;
    for item in db.prefix_iterator_cf(meta, prefix) {
        let (key, value) = item?;
        if !key.starts_with(prefix) {
            break;
        }
        let (topic, partition) = keys::decode_source_offset_key(&key)
            .ok_or_else(|| refused(path, "holds an unreadable source offset key"))?;
        let next = i64::from_be_bytes(
            value
                .as_ref()
                .try_into()
                .map_err(|_| refused(path, "holds an unreadable source offset"))?,
        );
        source_offsets.push((topic, partition, next));
    }
    let mut bytes = 0;
    for entry in fs::read_dir(path).map_err(|e| refused(path, e))? {
        let entry = entry.map_err(|e| refused(path, e))?;
        bytes += entry.metadata().map_err(|e| refused(path, e))?.len();
    }
    Ok(BackupInfo {
        destination: path.to_owned(),
        last_sequence,
        source_offsets,
        bytes,
    })
}

impl Store {
    /// Checkpoints the live store into `destination` (see the module doc).
    pub fn backup(&self, destination: &Path) -> Result<BackupInfo, StoreError> {
        build_then_rename(destination, |partial| {
            rocksdb::checkpoint::Checkpoint::new(&self.db)?.create_checkpoint(partial)?;
            describe(partial)
        })
    }
}

/// Installs the backup at `from` as the data directory `data` (absent or empty), copying its
/// files: a restored directory shares nothing with the backup, which stays as it was.
pub fn restore(from: &Path, data: &Path) -> Result<BackupInfo, StoreError> {
    describe(from)?;
    build_then_rename(data, |partial| {
        fs::create_dir(partial).map_err(|e| refused(partial, e))?;
        for entry in fs::read_dir(from).map_err(|e| refused(from, e))? {
            let entry = entry.map_err(|e| refused(from, e))?;
            let target = partial.join(entry.file_name());
            fs::copy(entry.path(), &target).map_err(|e| refused(&target, e))?;
            fs::File::open(&target)
                .and_then(|f| f.sync_all())
                .map_err(|e| refused(&target, e))?;
        }
        fs::File::open(partial)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| refused(partial, e))?;
        describe(partial)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_that_is_not_empty_is_refused_and_left_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let busy = dir.path().join("busy");
        fs::create_dir(&busy).expect("mkdir");
        fs::write(busy.join("keep"), b"x").expect("write");
        let error = check_destination(&busy).expect_err("refused");
        assert!(
            error.to_string().contains("exists and is not empty"),
            "{error}"
        );
        assert_eq!(fs::read(busy.join("keep")).expect("kept"), b"x");
    }

    #[test]
    fn a_destination_in_a_missing_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let error = check_destination(&dir.path().join("no/such/backup")).expect_err("refused");
        assert!(error.to_string().contains("is not a directory"), "{error}");
    }

    #[test]
    fn a_failed_build_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let destination = dir.path().join("backup");
        let error = build_then_rename(&destination, |partial| {
            fs::create_dir(partial).expect("mkdir");
            Err(refused(partial, "disk full"))
        })
        .expect_err("fails");
        assert!(error.to_string().contains("disk full"), "{error}");
        assert!(!destination.exists());
        assert!(!partial(&destination).exists());
    }
}
