//! The embedded log's journal: where a group commit becomes durable.
//!
//! Each group commit's records, positions already assigned, go to the current journal file as
//! one checksummed frame, synced before any appender hears of it. That writes the records'
//! bytes once, where committing them into redb's B-tree at once rewrote and synced every page
//! the group touched, about twelve times as many bytes, and took three times as long. The
//! flusher later moves a closed journal file's records into redb in one large transaction.
//!
//! A file is named for the number of its first group; groups are numbered one after another
//! across files. A flushed file is used again for later groups, written over from the start
//! ([`JournalFile::reuse`]). A frame is its payload's length and CRC-32 (little-endian `u32`s),
//! then the payload: a postcard-encoded [`JournalGroup`]. Reading stops at the first frame that is
//! short, fails its checksum or does not follow the one before it: a tail torn by a crash was
//! never acknowledged.

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One append as committed: where it went and the stored record's bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct JournaledAppend<'a> {
    #[serde(borrow)]
    pub topic: Cow<'a, str>,
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    /// The record as the `records` table stores it.
    #[serde(borrow, with = "serde_bytes")]
    pub record: Cow<'a, [u8]>,
    /// The idempotency key the append took, with its request's fingerprint.
    #[serde(borrow)]
    pub idempotency: Option<(Cow<'a, str>, [u8; 32])>,
}

/// The appends of one group commit.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct JournalGroup<'a> {
    pub sequence: u64,
    #[serde(borrow)]
    pub appends: Vec<JournaledAppend<'a>>,
}

const FRAME_HEADER: usize = 8;

/// The journal file group commits are written to now.
pub(super) struct JournalFile {
    file: File,
    path: PathBuf,
    /// Where the next frame goes.
    len: u64,
    /// Reused for every frame, so a group commit allocates nothing here.
    frame: Vec<u8>,
}

impl JournalFile {
    /// Creates the file for groups from `first_group` on, next to the log file `log`, and
    /// syncs the directory so the file is found after a crash.
    pub fn create(log: &Path, first_group: u64) -> io::Result<Self> {
        let path = file_name(log, first_group);
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(Self { file, path, len: 0, frame: Vec::new() })
    }

    /// Takes a flushed journal file, `spare`, as the file for groups from `first_group` on:
    /// frames are written over its old ones, so a sync does not have to record a longer file
    /// (about a third less time per sync on this machine's disk). What is left of the old
    /// frames after the new ones is never read: their numbers do not follow.
    pub fn reuse(spare: &Path, log: &Path, first_group: u64) -> io::Result<Self> {
        let path = file_name(log, first_group);
        std::fs::rename(spare, &path)?;
        // Should a crash lose the rename, the file is still found by its old name; groups are
        // applied by number, not by file name.
        let file = File::options().read(true).write(true).open(&path)?;
        Ok(Self { file, path, len: 0, frame: Vec::new() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Appends `group` as one frame and waits until it is on disk.
    pub fn append(&mut self, group: &JournalGroup<'_>) -> io::Result<()> {
        let mut frame = std::mem::take(&mut self.frame);
        frame.clear();
        frame.extend_from_slice(&[0; FRAME_HEADER]);
        let mut frame = postcard::to_extend(group, frame).map_err(io::Error::other)?;
        let payload_len = u32::try_from(frame.len() - FRAME_HEADER).map_err(io::Error::other)?;
        let checksum = crc32fast::hash(&frame[FRAME_HEADER..]);
        frame[..4].copy_from_slice(&payload_len.to_le_bytes());
        frame[4..FRAME_HEADER].copy_from_slice(&checksum.to_le_bytes());
        let written = self.file.write_all_at(&frame, self.len).and_then(|()| self.file.sync_data());
        if written.is_ok() {
            self.len += frame.len() as u64;
        }
        self.frame = frame;
        written
    }

    /// Forgets everything after `len`: a frame whose group did not commit after all must not
    /// be applied after a restart either.
    pub fn rewind(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_data()?;
        self.len = len;
        Ok(())
    }
}

fn file_name(log: &Path, first_group: u64) -> PathBuf {
    let name = log.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    log.with_file_name(format!("{name}-journal-{first_group:020}"))
}

/// The journal files next to the log file `log`, oldest first.
pub(super) fn existing(log: &Path) -> io::Result<Vec<PathBuf>> {
    let name = log.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let prefix = format!("{name}-journal-");
    let dir = match log.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut files: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if let Some(first) = file_name.strip_prefix(&prefix).and_then(|n| n.parse::<u64>().ok()) {
            files.push((first, entry.path()));
        }
    }
    files.sort();
    Ok(files.into_iter().map(|(_, path)| path).collect())
}

/// The groups in `contents`, in order, up to the first frame that is torn, corrupt or out of
/// sequence.
pub(super) fn groups(contents: &[u8]) -> Vec<JournalGroup<'_>> {
    let mut groups: Vec<JournalGroup<'_>> = Vec::new();
    let mut rest = contents;
    while rest.len() >= FRAME_HEADER {
        let len = u32::from_le_bytes(rest[..4].try_into().expect("four bytes")) as usize;
        let checksum = u32::from_le_bytes(rest[4..FRAME_HEADER].try_into().expect("four bytes"));
        let Some(payload) = rest.get(FRAME_HEADER..FRAME_HEADER + len) else { break };
        if crc32fast::hash(payload) != checksum {
            break;
        }
        let Ok(group) = postcard::from_bytes::<JournalGroup<'_>>(payload) else { break };
        if groups.last().is_some_and(|last| group.sequence != last.sequence + 1) {
            break;
        }
        groups.push(group);
        rest = &rest[FRAME_HEADER + len..];
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(sequence: u64, offset: u64) -> JournalGroup<'static> {
        JournalGroup {
            sequence,
            appends: vec![JournaledAppend {
                topic: "persons".into(),
                partition: 3,
                offset,
                timestamp_ms: 1_700_000_000_000 + offset as i64,
                record: Cow::Owned(vec![offset as u8; 40]),
                idempotency: Some(("key".into(), [7; 32])),
            }],
        }
    }

    #[test]
    fn groups_read_back_in_order_and_stop_at_a_torn_or_corrupt_frame() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.redb");
        let mut journal = JournalFile::create(&log, 1).unwrap();
        for sequence in 1..=3 {
            journal.append(&group(sequence, sequence * 10)).unwrap();
        }
        let whole = std::fs::read(journal.path()).unwrap();
        let read = groups(&whole);
        assert_eq!(read.iter().map(|g| g.sequence).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(read[1].appends[0].offset, 20);
        assert_eq!(read[2].appends[0].record.as_ref(), &[30; 40]);
        assert_eq!(read[2].appends[0].idempotency.as_ref().unwrap().0, "key");

        // A crash mid-write leaves part of the last frame: the groups before it stand.
        assert_eq!(groups(&whole[..whole.len() - 5]).len(), 2);
        // A flipped byte fails the checksum.
        let mut corrupt = whole.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        assert_eq!(groups(&corrupt).len(), 2);
        // A frame that does not follow the one before it ends the journal.
        let mut out_of_order = JournalFile::create(&log, 7).unwrap();
        out_of_order.append(&group(7, 1)).unwrap();
        out_of_order.append(&group(9, 2)).unwrap();
        assert_eq!(groups(&std::fs::read(out_of_order.path()).unwrap()).len(), 1);
    }

    #[test]
    fn a_rewound_frame_is_gone_and_files_list_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.redb");
        let mut journal = JournalFile::create(&log, 12).unwrap();
        journal.append(&group(12, 1)).unwrap();
        let before = journal.len();
        journal.append(&group(13, 2)).unwrap();
        journal.rewind(before).unwrap();
        journal.append(&group(13, 5)).unwrap();
        let read = std::fs::read(journal.path()).unwrap();
        let read = groups(&read);
        assert_eq!(read.iter().map(|g| (g.sequence, g.appends[0].offset)).collect::<Vec<_>>(), [(12, 1), (13, 5)]);

        // Used again for later groups: the old frames left past the new one are not read.
        let mut reused = JournalFile::reuse(journal.path(), &log, 40).unwrap();
        reused.append(&group(40, 9)).unwrap();
        let read = std::fs::read(reused.path()).unwrap();
        let read = groups(&read);
        assert_eq!(read.iter().map(|g| g.sequence).collect::<Vec<_>>(), [40]);
        assert!(!journal.path().exists(), "renamed");

        JournalFile::create(&log, 3).unwrap();
        std::fs::write(dir.path().join("other.redb-journal-00000000000000000001"), b"").unwrap();
        let files = existing(&log).unwrap();
        let names: Vec<_> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["log.redb-journal-00000000000000000003", "log.redb-journal-00000000000000000040"]);
    }
}
