//! Opening a redb file and the errors of its transactions, shared by the agent's outbox
//! and the scheduler's store (the two durable files of the system).
//!
//! Both open the same way (the file's directory is created first; redb takes an exclusive
//! lock, so a second process gets [`DbError::Open`]) and write the same way (every write
//! transaction durable before it returns, because what they record was promised to a
//! peer). redb's error types are large, so they are boxed here: a service's own error enum
//! wraps [`DbError`] and [`redb_errors!`] gives it the `From` conversions that keep `?`
//! usable on redb calls.

use std::path::{Path, PathBuf};

use redb::{Database, Durability, WriteTransaction};

/// A redb file could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The directory for the file could not be created.
    #[error("{path}: cannot create its directory: {source}")]
    CreateDir {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file could not be opened or created (includes "already open by another
    /// process": redb takes an exclusive file lock).
    #[error("{path}: cannot open: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The redb error.
        #[source]
        source: Box<redb::DatabaseError>,
    },
    /// A transaction could not be started.
    #[error("cannot begin a transaction: {0}")]
    Transaction(#[from] Box<redb::TransactionError>),
    /// A table could not be opened.
    #[error("cannot open a table: {0}")]
    Table(#[from] Box<redb::TableError>),
    /// Reading or writing the file failed.
    #[error("storage error: {0}")]
    Storage(#[from] Box<redb::StorageError>),
    /// The durability level could not be set.
    #[error("cannot set durability: {0}")]
    Durability(#[from] Box<redb::SetDurabilityError>),
    /// The commit failed. redb then refuses further write transactions on the open
    /// database: the owner must be reopened.
    #[error("commit failed (reopen the file): {0}")]
    Commit(#[from] Box<redb::CommitError>),
}

/// Gives `$error` (an enum with a `From<DbError>` conversion) `From` conversions for each of
/// redb's error types, so `?` works on redb calls inside functions returning `$error`.
#[macro_export]
macro_rules! redb_errors {
    ($error:ty) => {
        $crate::redb_errors!(@each $error:
            ::redb::TransactionError,
            ::redb::TableError,
            ::redb::StorageError,
            ::redb::SetDurabilityError,
            ::redb::CommitError
        );
    };
    (@each $error:ty: $($t:ty),*) => {$(
        impl From<$t> for $error {
            fn from(e: $t) -> Self {
                $crate::durable::DbError::from(::std::boxed::Box::new(e)).into()
            }
        }
    )*};
}

/// Opens (or creates) the redb file at `path` with a page cache of `cache_bytes`, creating
/// its directory first.
pub fn open(path: &Path, cache_bytes: usize) -> Result<Database, DbError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| DbError::CreateDir {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|source| DbError::Open {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
}

/// A write transaction that is durable (fsynced) once its commit returns.
pub fn begin_durable_write(db: &Database) -> Result<WriteTransaction, DbError> {
    let mut txn = db.begin_write().map_err(Box::new)?;
    txn.set_durability(Durability::Immediate)
        .map_err(Box::new)?;
    Ok(txn)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_second_open_of_the_same_file_is_refused_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/file.redb");
        let db = open(&path, 1 << 20).unwrap();
        let txn = begin_durable_write(&db).unwrap();
        txn.commit().unwrap();
        let err = open(&path, 1 << 20).unwrap_err();
        assert!(matches!(err, DbError::Open { .. }), "{err}");
        assert!(err.to_string().contains("file.redb"), "{err}");
    }
}
