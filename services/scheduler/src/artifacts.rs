//! Artifact bytes on disk: one file per uploaded agent binary, named by its SHA-256, in the
//! artifact directory (`SCHEDULER_ARTIFACT_DIR`, default `artifacts` beside the database).
//! Their records live in the store (`store::upgrades`).
//!
//! A file is written to a temp name in the same directory, fsynced, renamed to its hash
//! and the directory fsynced, so a crash leaves a whole artifact or none; content
//! addressing makes a second upload of the same bytes a no-op. The scheduler does not
//! re-hash on download: the agent checks size and SHA-256 against the signed manifest,
//! and is the one that must not trust the disk, the network or this service.

use std::io::Write;
use std::path::{Path, PathBuf};

use messages::fleet;
use sha2::Digest;

/// Why an artifact could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ArtifactError {
    /// The file system refused.
    #[error("artifact store {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a SHA-256 name (the download path is checked before it reaches the disk).
    #[error("{0:?} is not a sha256")]
    Name(String),
}

/// The artifact directory.
#[derive(Debug, Clone)]
pub(crate) struct Artifacts {
    dir: PathBuf,
}

impl Artifacts {
    /// Artifacts in `dir` (created on first write).
    pub(crate) fn new(dir: impl Into<PathBuf>) -> Self {
        Artifacts { dir: dir.into() }
    }

    /// The directory.
    #[cfg(test)]
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where artifact `sha256` lives.
    pub(crate) fn path(&self, sha256: &str) -> Result<PathBuf, ArtifactError> {
        if !fleet::is_sha256_hex(sha256) {
            return Err(ArtifactError::Name(sha256.to_owned()));
        }
        Ok(self.dir.join(sha256))
    }

    /// Stores `bytes` under their SHA-256; returns it. Blocking (fsync).
    pub(crate) fn put(&self, bytes: &[u8]) -> Result<String, ArtifactError> {
        let io = |path: &Path, source| ArtifactError::Io {
            path: path.to_path_buf(),
            source,
        };
        let sha256: String = sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let dest = self.path(&sha256)?;
        // The same bytes again are a no-op, unless the file on disk was damaged or changed:
        // then the upload repairs it.
        if hash_file(&dest).is_ok_and(|on_disk| on_disk == sha256) {
            return Ok(sha256);
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        let tmp = self.dir.join(format!(
            ".upload-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &dest)?;
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(&dest, e));
        }
        Ok(sha256)
    }

    /// The bytes of artifact `sha256` (`None` when its file is missing). Blocking.
    pub(crate) fn read(&self, sha256: &str) -> Result<Option<Vec<u8>>, ArtifactError> {
        let path = self.path(sha256)?;
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ArtifactError::Io { path, source }),
        }
    }
}

/// SHA-256 of a file, hex. Blocking.
fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_are_content_addressed_and_names_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Artifacts::new(dir.path().join("a"));
        let sha = store.put(b"binary").unwrap();
        assert_eq!(sha, fleet::config_sha256(b"binary"));
        assert_eq!(store.put(b"binary").unwrap(), sha);
        assert_eq!(store.read(&sha).unwrap().unwrap(), b"binary");
        assert_eq!(store.read(&fleet::config_sha256(b"x")).unwrap(), None);
        assert!(matches!(
            store.read("../../etc/passwd"),
            Err(ArtifactError::Name(_))
        ));
        // Only the artifact is left in the directory: no temp files.
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 1);
        // A damaged file is repaired by uploading the bytes again.
        std::fs::write(store.path(&sha).unwrap(), b"binarY").unwrap();
        assert_eq!(store.put(b"binary").unwrap(), sha);
        assert_eq!(store.read(&sha).unwrap().unwrap(), b"binary");
    }
}
