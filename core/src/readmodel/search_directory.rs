//! The search index's directory: tantivy's `MmapDirectory`, except that document stores are read
//! with `pread`.
//!
//! A segment's document store (`*.store`: the stored person documents and note texts) is its
//! largest file, and it is read in two ways: a few blocks at a time when a hit or a person is
//! fetched, and from end to end when segments are merged. Through `mmap`, every page a merge reads
//! stays resident in the process until the merged segments' files are deleted, so a rebuild's
//! peak RSS carried the stores of whatever was being merged (90–120 MiB of a 1M-event rebuild).
//! Read with `pread`, a block is in memory only while it is used, and the page cache keeps what
//! is read often. Every other file (term dictionaries, postings, fast fields) is small, read in
//! place and at random, and stays mapped.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tantivy::HasLen;
use tantivy::directory::error::{DeleteError, OpenReadError, OpenWriteError};
use tantivy::directory::{
    Directory, DirectoryLock, FileHandle, Lock, MmapDirectory, OwnedBytes, WatchCallback, WatchHandle, WritePtr,
};

#[derive(Debug, Clone)]
pub(super) struct SearchDirectory {
    root: PathBuf,
    mapped: MmapDirectory,
}

impl SearchDirectory {
    pub(super) fn open(root: &Path) -> Result<Self, tantivy::directory::error::OpenDirectoryError> {
        Ok(Self { root: root.to_path_buf(), mapped: MmapDirectory::open(root)? })
    }
}

fn is_document_store(path: &Path) -> bool {
    path.extension().is_some_and(|extension| extension == "store")
}

impl Directory for SearchDirectory {
    fn get_file_handle(&self, path: &Path) -> Result<Arc<dyn FileHandle>, OpenReadError> {
        if !is_document_store(path) {
            return self.mapped.get_file_handle(path);
        }
        let full = self.root.join(path);
        let file = File::open(&full).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => OpenReadError::FileDoesNotExist(path.to_path_buf()),
            _ => OpenReadError::wrap_io_error(e, path.to_path_buf()),
        })?;
        let len = file.metadata().map_err(|e| OpenReadError::wrap_io_error(e, path.to_path_buf()))?.len();
        Ok(Arc::new(ReadFile { file, len: len as usize }))
    }

    fn delete(&self, path: &Path) -> Result<(), DeleteError> {
        self.mapped.delete(path)
    }

    fn exists(&self, path: &Path) -> Result<bool, OpenReadError> {
        self.mapped.exists(path)
    }

    fn open_write(&self, path: &Path) -> Result<WritePtr, OpenWriteError> {
        self.mapped.open_write(path)
    }

    fn atomic_read(&self, path: &Path) -> Result<Vec<u8>, OpenReadError> {
        self.mapped.atomic_read(path)
    }

    fn atomic_write(&self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        self.mapped.atomic_write(path, data)
    }

    fn sync_directory(&self) -> std::io::Result<()> {
        self.mapped.sync_directory()
    }

    fn acquire_lock(&self, lock: &Lock) -> Result<DirectoryLock, tantivy::directory::error::LockError> {
        self.mapped.acquire_lock(lock)
    }

    fn watch(&self, callback: WatchCallback) -> tantivy::Result<WatchHandle> {
        self.mapped.watch(callback)
    }
}

/// A file read with `pread`; an unlinked file stays readable while its handle is open, as a
/// mapped one does.
#[derive(Debug)]
struct ReadFile {
    file: File,
    len: usize,
}

impl HasLen for ReadFile {
    fn len(&self) -> usize {
        self.len
    }
}

impl FileHandle for ReadFile {
    fn read_bytes(&self, range: Range<usize>) -> std::io::Result<OwnedBytes> {
        let mut bytes = vec![0; range.len()];
        self.file.read_exact_at(&mut bytes, range.start as u64)?;
        Ok(OwnedBytes::new(bytes))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use tantivy::directory::TerminatingWrite;

    use super::*;

    fn write(directory: &SearchDirectory, name: &str, bytes: &[u8]) {
        let mut file = directory.open_write(Path::new(name)).unwrap();
        file.write_all(bytes).unwrap();
        file.terminate().unwrap();
    }

    #[test]
    fn document_stores_are_read_from_the_file_and_stay_readable_once_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let directory = SearchDirectory::open(dir.path()).unwrap();
        let bytes: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        write(&directory, "segment.store", &bytes);
        write(&directory, "segment.term", &bytes);

        let store = directory.open_read(Path::new("segment.store")).unwrap();
        assert_eq!(store.len(), bytes.len());
        assert_eq!(store.slice(40_000..40_016).read_bytes().unwrap().as_slice(), &bytes[40_000..40_016]);
        let mapped = directory.open_read(Path::new("segment.term")).unwrap();
        assert_eq!(mapped.read_bytes().unwrap().as_slice(), bytes.as_slice(), "other files read as before");
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mapped_here = |name: &str| maps.lines().any(|l| l.ends_with(&*dir.path().join(name).to_string_lossy()));
        assert!(mapped_here("segment.term"), "the term file is mapped");
        assert!(!mapped_here("segment.store"), "the document store is not");

        // A merge deletes segments that searchers may still hold open.
        directory.delete(Path::new("segment.store")).unwrap();
        assert!(!directory.exists(Path::new("segment.store")).unwrap());
        assert_eq!(store.read_bytes().unwrap().as_slice(), bytes.as_slice());
        assert!(matches!(directory.open_read(Path::new("segment.store")), Err(OpenReadError::FileDoesNotExist(_))));
    }
}
