//! An in-memory [`Backend`] that can crash: after [`SimBackend::crash`], every file holds its
//! last synced content plus a prefix (chosen by a [`CrashMode`], possibly torn mid-write) of
//! what was written after, and every directory its last synced entries plus a prefix of the
//! later creations, removals and renames.
//!
//! Tests count the mutating operations of a workload ([`SimBackend::op_count`]), then rerun it
//! with [`SimBackend::fail_after`] so that it is cut at every write/sync boundary in turn.
//!
//! Simplifications (documented in the [`Backend`] contract): `create_dir_all` and
//! `remove_dir_all` are durable at once; `rename` only within one directory.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Backend, FileHandle, StorageFile};

/// What survives of unsynced data when [`SimBackend::crash`] is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Nothing unsynced survives (the most pessimistic outcome).
    LoseUnsynced,
    /// Everything written survives (as after a process kill without power loss).
    KeepAll,
    /// A pseudo-random prefix per file and directory, torn mid-write, derived from the seed.
    Random(u64),
}

/// A write or truncation not yet covered by a sync.
#[derive(Debug, Clone)]
enum FileOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

/// One file's data. Invariant: `current` == `synced` with every op of `pending` applied.
#[derive(Debug, Clone, Default)]
struct Inode {
    synced: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<FileOp>,
}

/// A directory-entry change not yet covered by a directory sync.
#[derive(Debug, Clone)]
enum DirOp {
    Link(String, u64),
    Unlink(String),
    Rename(String, String),
}

/// One directory. Invariant: `current` == `durable` with every op of `pending` applied.
#[derive(Debug, Clone, Default)]
struct Dir {
    durable: BTreeMap<String, u64>,
    current: BTreeMap<String, u64>,
    pending: Vec<DirOp>,
}

#[derive(Debug, Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    dirs: BTreeMap<PathBuf, Dir>,
    /// Mutating operations performed so far.
    ops: u64,
    /// When `ops` reaches this, the next mutating operation is applied (not durably) and
    /// fails, and the backend is crashed.
    fail_after: Option<u64>,
    /// Set by an injected failure or by `crash`: every later operation fails, so a store
    /// cannot keep going on a "dead machine".
    crashed: bool,
}

fn crashed_err() -> io::Error {
    io::Error::other("simulated crash")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", path.display()),
    )
}

fn apply_file_op(data: &mut Vec<u8>, op: &FileOp) {
    match op {
        FileOp::Write {
            offset,
            data: bytes,
        } => {
            let start = usize::try_from(*offset).unwrap_or(usize::MAX);
            let end = start.saturating_add(bytes.len());
            if data.len() < end {
                data.resize(end, 0);
            }
            data[start..end].copy_from_slice(bytes);
        }
        FileOp::SetLen(len) => data.resize(usize::try_from(*len).unwrap_or(usize::MAX), 0),
    }
}

fn apply_dir_op(map: &mut BTreeMap<String, u64>, op: &DirOp) {
    match op {
        DirOp::Link(name, ino) => {
            map.insert(name.clone(), *ino);
        }
        DirOp::Unlink(name) => {
            map.remove(name);
        }
        DirOp::Rename(from, to) => {
            if let Some(ino) = map.remove(from) {
                map.insert(to.clone(), ino);
            }
        }
    }
}

/// splitmix64: a tiny deterministic generator, so the library needs no `rand`.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..=max`.
    fn upto(&mut self, max: usize) -> usize {
        (self.next() % (max as u64 + 1)) as usize
    }
}

/// The simulated disk. Cloning gives another handle to the same disk.
#[derive(Debug, Clone)]
pub struct SimBackend {
    state: Arc<Mutex<State>>,
}

impl Default for SimBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl SimBackend {
    /// An empty disk holding only the root directory `/`.
    pub fn new() -> Self {
        let mut state = State::default();
        state.dirs.insert(PathBuf::from("/"), Dir::default());
        SimBackend {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// This disk as the `Arc<dyn Backend>` the stores take.
    pub fn shared(&self) -> Arc<dyn Backend> {
        Arc::new(self.clone())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock only happens in a failing test; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mutating operations (writes, truncations, syncs, directory changes) performed so far.
    pub fn op_count(&self) -> u64 {
        self.lock().ops
    }

    /// Lets `n` more mutating operations succeed; the one after is applied without
    /// durability, fails, and crashes the disk (every later call fails).
    pub fn fail_after(&self, n: u64) {
        let mut st = self.lock();
        st.fail_after = Some(st.ops + n);
    }

    /// Whether an injected failure has crashed this disk.
    pub fn is_crashed(&self) -> bool {
        self.lock().crashed
    }

    /// Simulates power loss: returns the disk as it would be found on reboot (a new
    /// `SimBackend`), and kills this one (every call on it or its open files fails from now on).
    pub fn crash(&self, mode: CrashMode) -> SimBackend {
        let mut st = self.lock();
        st.crashed = true;
        let mut rng = Rng(match mode {
            CrashMode::Random(seed) => seed ^ 0x5EED,
            _ => 0,
        });
        // How many pending ops to keep out of `n`, and whether to tear the next one.
        let mut choose = |n: usize| -> (usize, Option<u64>) {
            match mode {
                CrashMode::LoseUnsynced => (0, None),
                CrashMode::KeepAll => (n, None),
                CrashMode::Random(_) => {
                    let k = rng.upto(n);
                    if k < n && rng.next() & 1 == 0 {
                        (k, Some(rng.next()))
                    } else {
                        (k, None)
                    }
                }
            }
        };
        let mut new = State {
            next_ino: st.next_ino,
            ..State::default()
        };
        for (path, dir) in &st.dirs {
            let (keep, _) = choose(dir.pending.len());
            let mut entries = dir.durable.clone();
            for op in &dir.pending[..keep] {
                apply_dir_op(&mut entries, op);
            }
            for ino in entries.values() {
                if new.inodes.contains_key(ino) {
                    continue;
                }
                let Some(inode) = st.inodes.get(ino) else {
                    continue;
                };
                let (keep, tear) = choose(inode.pending.len());
                let mut data = inode.synced.clone();
                for op in &inode.pending[..keep] {
                    apply_file_op(&mut data, op);
                }
                if let (
                    Some(r),
                    Some(FileOp::Write {
                        offset,
                        data: bytes,
                    }),
                ) = (tear, inode.pending.get(keep))
                {
                    // A torn write: only a prefix of its bytes reached the disk.
                    let cut = (r % (bytes.len() as u64 + 1)) as usize;
                    apply_file_op(
                        &mut data,
                        &FileOp::Write {
                            offset: *offset,
                            data: bytes[..cut].to_vec(),
                        },
                    );
                }
                new.inodes.insert(
                    *ino,
                    Inode {
                        synced: data.clone(),
                        current: data,
                        pending: Vec::new(),
                    },
                );
            }
            new.dirs.insert(
                path.clone(),
                Dir {
                    durable: entries.clone(),
                    current: entries,
                    pending: Vec::new(),
                },
            );
        }
        SimBackend {
            state: Arc::new(Mutex::new(new)),
        }
    }

    /// Current (not necessarily durable) content of a file, for test assertions.
    pub fn file_contents(&self, path: &Path) -> Option<Vec<u8>> {
        let st = self.lock();
        let (dir, name) = split(path).ok()?;
        let ino = st.dirs.get(&dir)?.current.get(&name)?;
        st.inodes.get(ino).map(|i| i.current.clone())
    }

    /// Overwrites bytes of a file durably, bypassing the store: for corruption tests.
    pub fn corrupt(&self, path: &Path, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut st = self.lock();
        let (dir, name) = split(path)?;
        let ino = *st
            .dirs
            .get(&dir)
            .and_then(|d| d.current.get(&name))
            .ok_or_else(|| not_found(path))?;
        let inode = st.inodes.get_mut(&ino).ok_or_else(|| not_found(path))?;
        let op = FileOp::Write {
            offset,
            data: bytes.to_vec(),
        };
        apply_file_op(&mut inode.current, &op);
        apply_file_op(&mut inode.synced, &op);
        Ok(())
    }
}

/// Splits a path into (parent directory, file name).
fn split(path: &Path) -> io::Result<(PathBuf, String)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let parent = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    Ok((parent.to_path_buf(), name.to_string()))
}

impl State {
    /// Counts a mutating operation; `Ok(true)` means "apply it, then fail and crash".
    fn begin_op(&mut self) -> io::Result<bool> {
        if self.crashed {
            return Err(crashed_err());
        }
        if self.fail_after.is_some_and(|n| self.ops >= n) {
            self.crashed = true;
            return Ok(true);
        }
        self.ops += 1;
        Ok(false)
    }

    fn check_alive(&self) -> io::Result<()> {
        if self.crashed {
            Err(crashed_err())
        } else {
            Ok(())
        }
    }

    fn dir_op(&mut self, dir: &Path, op: DirOp) -> io::Result<()> {
        let d = self.dirs.get_mut(dir).ok_or_else(|| not_found(dir))?;
        apply_dir_op(&mut d.current, &op);
        d.pending.push(op);
        Ok(())
    }

    fn lookup(&self, path: &Path) -> io::Result<u64> {
        let (dir, name) = split(path)?;
        self.dirs
            .get(&dir)
            .and_then(|d| d.current.get(&name))
            .copied()
            .ok_or_else(|| not_found(path))
    }
}

impl Backend for SimBackend {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        let fail = st.begin_op()?;
        let mut cur = Some(path);
        while let Some(p) = cur {
            if p.as_os_str().is_empty() {
                break;
            }
            st.dirs.entry(p.to_path_buf()).or_default();
            cur = p.parent();
        }
        if fail {
            return Err(crashed_err());
        }
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        let fail = st.begin_op()?;
        st.dirs.retain(|p, _| !p.starts_with(path));
        if fail {
            return Err(crashed_err());
        }
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let st = self.lock();
        st.check_alive()?;
        let dir = st.dirs.get(path).ok_or_else(|| not_found(path))?;
        let mut names: Vec<String> = dir.current.keys().cloned().collect();
        for p in st.dirs.keys() {
            if p.parent() == Some(path) {
                if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                    names.push(n.to_string());
                }
            }
        }
        Ok(names)
    }

    fn create_file(&self, path: &Path) -> io::Result<FileHandle> {
        let mut st = self.lock();
        let fail = st.begin_op()?;
        let (dir, name) = split(path)?;
        if !st.dirs.contains_key(&dir) {
            return Err(not_found(&dir));
        }
        let ino = st.next_ino;
        st.next_ino += 1;
        st.inodes.insert(ino, Inode::default());
        st.dir_op(&dir, DirOp::Link(name, ino))?;
        if fail {
            return Err(crashed_err());
        }
        Ok(Arc::new(SimFile {
            state: Arc::clone(&self.state),
            target: Target::File(ino),
        }))
    }

    fn open_file(&self, path: &Path) -> io::Result<FileHandle> {
        let st = self.lock();
        st.check_alive()?;
        let ino = st.lookup(path)?;
        Ok(Arc::new(SimFile {
            state: Arc::clone(&self.state),
            target: Target::File(ino),
        }))
    }

    fn open_dir(&self, path: &Path) -> io::Result<FileHandle> {
        let st = self.lock();
        st.check_alive()?;
        if !st.dirs.contains_key(path) {
            return Err(not_found(path));
        }
        Ok(Arc::new(SimFile {
            state: Arc::clone(&self.state),
            target: Target::Dir(path.to_path_buf()),
        }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        let fail = st.begin_op()?;
        st.lookup(path)?;
        let (dir, name) = split(path)?;
        st.dir_op(&dir, DirOp::Unlink(name))?;
        if fail {
            return Err(crashed_err());
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.lock();
        let fail = st.begin_op()?;
        st.lookup(from)?;
        let (dir, from_name) = split(from)?;
        let (to_dir, to_name) = split(to)?;
        if dir != to_dir {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "simulated rename across directories",
            ));
        }
        st.dir_op(&dir, DirOp::Rename(from_name, to_name))?;
        if fail {
            return Err(crashed_err());
        }
        Ok(())
    }
}

#[derive(Debug)]
enum Target {
    File(u64),
    Dir(PathBuf),
}

/// An open simulated file or directory. Like a POSIX descriptor it keeps working after its
/// name is removed, and dies with the disk it belongs to.
#[derive(Debug)]
struct SimFile {
    state: Arc<Mutex<State>>,
    target: Target,
}

impl SimFile {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ino(&self) -> io::Result<u64> {
        match self.target {
            Target::File(ino) => Ok(ino),
            Target::Dir(_) => Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "directory handle",
            )),
        }
    }
}

impl StorageFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let st = self.lock();
        st.check_alive()?;
        let inode = st
            .inodes
            .get(&self.ino()?)
            .ok_or_else(|| io::Error::other("stale inode"))?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if start >= inode.current.len() {
            return Ok(0);
        }
        let n = buf.len().min(inode.current.len() - start);
        buf[..n].copy_from_slice(&inode.current[start..start + n]);
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let ino = self.ino()?;
        let mut st = self.lock();
        let fail = st.begin_op()?;
        let inode = st
            .inodes
            .get_mut(&ino)
            .ok_or_else(|| io::Error::other("stale inode"))?;
        let op = FileOp::Write {
            offset,
            data: buf.to_vec(),
        };
        apply_file_op(&mut inode.current, &op);
        inode.pending.push(op);
        if fail {
            return Err(crashed_err());
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        let st = self.lock();
        st.check_alive()?;
        let inode = st
            .inodes
            .get(&self.ino()?)
            .ok_or_else(|| io::Error::other("stale inode"))?;
        Ok(inode.current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let ino = self.ino()?;
        let mut st = self.lock();
        let fail = st.begin_op()?;
        let inode = st
            .inodes
            .get_mut(&ino)
            .ok_or_else(|| io::Error::other("stale inode"))?;
        let op = FileOp::SetLen(len);
        apply_file_op(&mut inode.current, &op);
        inode.pending.push(op);
        if fail {
            return Err(crashed_err());
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut st = self.lock();
        if st.begin_op()? {
            // A crash during fsync: nothing is promised durable.
            return Err(crashed_err());
        }
        match &self.target {
            Target::File(ino) => {
                if let Some(inode) = st.inodes.get_mut(ino) {
                    // Replaying the pending ops costs what was written, not the file size.
                    for op in std::mem::take(&mut inode.pending) {
                        apply_file_op(&mut inode.synced, &op);
                    }
                }
            }
            Target::Dir(path) => {
                if let Some(dir) = st.dirs.get_mut(path) {
                    dir.durable = dir.current.clone();
                    dir.pending.clear();
                }
            }
        }
        Ok(())
    }
}
