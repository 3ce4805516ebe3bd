//! The file-system seam: every byte the stores read or write goes through [`Backend`] and
//! [`StorageFile`], so tests can swap the real file system for [`sim::SimBackend`], which
//! loses unsynced data on a simulated crash.
//!
//! Contract (what the stores rely on, and what the simulator enforces):
//! - `write_all_at` lands in a volatile cache; only `sync` on the same file makes it durable.
//!   After a crash a file holds its last synced content plus an arbitrary prefix (possibly torn
//!   mid-write) of the writes and truncations that followed.
//! - Creating, removing or renaming a file changes the directory, which is durable only after
//!   `sync` on a handle from [`Backend::open_dir`] for that directory.
//! - `create_dir_all` and `remove_dir_all` are durable when they return (the file-system
//!   backend fsyncs the parents): they are rare (queue declare and delete) and callers should
//!   not have to think about them.

pub mod sim;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A cheap, cloneable, shareable handle to an open file (or a directory, for `sync` only).
pub type FileHandle = Arc<dyn StorageFile>;

/// A directory tree of files; object-safe so stores hold an `Arc<dyn Backend>`.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Creates `path` and any missing parents, durably.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Removes `path` and everything below it, durably; a missing `path` is not an error.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names (not paths) of the entries of a directory, in no particular order.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Creates (or truncates) a file for reading and writing.
    fn create_file(&self, path: &Path) -> io::Result<FileHandle>;
    /// Opens an existing file for reading and writing.
    fn open_file(&self, path: &Path) -> io::Result<FileHandle>;
    /// Opens a directory so that `sync` on the handle makes its entries durable.
    fn open_dir(&self, path: &Path) -> io::Result<FileHandle>;
    /// Removes a file; the removal is durable after the directory is synced.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Atomically replaces `to` by `from`; both must be in the same directory.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
}

/// An open file addressed by offset (`pread`/`pwrite`), so one handle can be shared by the
/// writer, readers and the sync thread without a seek position to fight over.
pub trait StorageFile: Send + Sync + fmt::Debug {
    /// Reads up to `buf.len()` bytes at `offset`; returns fewer only at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Current length in bytes (including unsynced writes).
    fn size(&self) -> io::Result<u64>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes everything written so far durable (`fdatasync`; `fsync` for a directory).
    fn sync(&self) -> io::Result<()>;

    /// Fills `buf` from `offset` or fails with `UnexpectedEof`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.read_at(buf, offset)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shorter than expected",
                ));
            }
            buf = &mut buf[n..];
            offset += n as u64;
        }
        Ok(())
    }
}

/// The real file system (`std::fs`, positional I/O, `fdatasync`).
#[derive(Debug, Default, Clone, Copy)]
pub struct FsBackend;

impl FsBackend {
    /// The file-system backend as the `Arc<dyn Backend>` the stores take.
    pub fn shared() -> Arc<dyn Backend> {
        Arc::new(FsBackend)
    }
}

/// fsyncs the parent directory of `path` so that its entry (creation, removal) is durable.
fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => File::open(parent)?.sync_all(),
        _ => Ok(()),
    }
}

impl Backend for FsBackend {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        // Remember which components are new: each needs its parent fsynced to survive a crash.
        let mut missing: Vec<PathBuf> = Vec::new();
        let mut cur = Some(path);
        while let Some(p) = cur {
            if p.as_os_str().is_empty() || p.exists() {
                break;
            }
            missing.push(p.to_path_buf());
            cur = p.parent();
        }
        std::fs::create_dir_all(path)?;
        for p in missing.iter().rev() {
            sync_parent(p)?;
        }
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_dir_all(path) {
            Ok(()) => sync_parent(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            // Names that are not UTF-8 are not ours; skipping them is safe.
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn create_file(&self, path: &Path) -> io::Result<FileHandle> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Arc::new(FsFile { file, dir: false }))
    }

    fn open_file(&self, path: &Path) -> io::Result<FileHandle> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Arc::new(FsFile { file, dir: false }))
    }

    fn open_dir(&self, path: &Path) -> io::Result<FileHandle> {
        let file = File::open(path)?;
        Ok(Arc::new(FsFile { file, dir: true }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
}

/// A `std::fs::File` used through positional I/O.
#[derive(Debug)]
struct FsFile {
    file: File,
    /// Directories are synced with `fsync` (their entries are metadata, which `fdatasync`
    /// does not promise to flush).
    dir: bool,
}

impl StorageFile for FsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        loop {
            match self.file.read_at(buf, offset) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        if self.dir {
            self.file.sync_all()
        } else {
            // fdatasync also flushes the file size, which appends change; it skips mtime.
            self.file.sync_data()
        }
    }
}

/// Bytes available to an unprivileged user on the file system holding `path`
/// (`statvfs`: `f_bavail * f_frsize`). The broker compares it with its disk-free limit.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(path).map_err(io::Error::from)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Raises this process's soft limit on open files to its hard limit and returns the new soft
/// limit (`None`: unlimited). Every segment and ack file of every queue holds a descriptor (plus
/// one per queue directory), so a broker with many queues or long backlogs needs more than the
/// usual soft limit of 1024; call this once at startup.
pub fn raise_open_files_limit() -> io::Result<Option<u64>> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        )
        .map_err(io::Error::from)?;
    }
    Ok(getrlimit(Resource::Nofile).current)
}
