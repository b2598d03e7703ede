// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--state-file PATH`: the guest-visible state kept on disk while the daemon runs, so that a
//! daemon started again with the same path and configuration resumes it (an upgrade, a crash)
//! and the guest never learns the daemon was gone.
//!
//! Two files, both mode 0600:
//!
//! - `PATH`, a snapshot: a 64-byte header (magic `VIOMMUsf`, version, generation, where the
//!   request queue stood) and a device state in the format of [`crate::state`]. It is only
//!   ever replaced whole (written beside it, then renamed over it).
//! - `PATH.journal`, the requests applied since that snapshot, memory-mapped: every request
//!   that reached the model (ATTACH, DETACH, MAP, UNMAP) is a 64-byte record with its ring
//!   position and the status it got, and every pass over the request queue ends with a commit
//!   record (the pass's record count and CRC-32, where the queue stood) written before the
//!   pass's used entries are published. A config write of `bypass` and a reset are records of
//!   their own. A request that comes again and is answered from the journal is recorded
//!   again too (marked as a repeat, never applied again), so that the last committed pass
//!   always holds every request that may still be unanswered.
//!
//! The journal lives in the page cache, so everything the daemon wrote survives its death by
//! any signal; it is not synced to the disk, so it does not survive a crash of the host.
//!
//! After a crash the frontend rewinds the request queue to the used index (QEMU cannot ask a
//! dead backend where it stood), so the requests of the last pass, applied and committed but
//! maybe not yet answered, come again. They are answered with the status recorded for them
//! and not applied twice: every request is applied at most once. A pass that was not
//! committed was never answered and none of it was kept, so its requests are simply new.
//!
//! When the journal is full the daemon writes a new snapshot (generation + 1) and starts the
//! journal over; records of an older generation are ignored, so a crash between the two steps
//! loses nothing. A snapshot or journal that is damaged, from another daemon configuration or
//! out of step with each other is refused with an error that names the file; starting fresh
//! takes an explicit option.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use memmap2::MmapMut;
use thiserror::Error;
use virtio::{MapFlags, Request, RequestType, Status};

use crate::ring::RingKey;

const SNAPSHOT_MAGIC: [u8; 8] = *b"VIOMMUsf";
const JOURNAL_MAGIC: [u8; 8] = *b"VIOMMUjl";
const VERSION: u16 = 1;
const HEADER: usize = 64;
pub const RECORD: usize = 64;
/// Journal records when nothing else says: 4 MiB of journal.
pub const DEFAULT_RECORDS: usize = 65_536;

const KIND_REQUEST: u8 = 1;
const KIND_COMMIT: u8 = 2;
const KIND_BYPASS: u8 = 3;
const KIND_RESET: u8 = 4;

/// Why a state file could not be used. Nothing was changed on disk.
#[derive(Debug, Error)]
pub enum StateFileError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a vhost-device-iommu state file (bad magic)")]
    Magic { path: PathBuf },
    #[error("{path}: format version {version} is not supported (this daemon reads {VERSION})")]
    Version { path: PathBuf, version: u16 },
    #[error("{path}: damaged ({what})")]
    Damaged { path: PathBuf, what: String },
    #[error("{path}: {source}")]
    State {
        path: PathBuf,
        source: crate::state::StateError,
    },
    #[error(
        "{journal}: generation {journal_generation} is newer than the snapshot's \
         ({snapshot_generation}): the two files are out of step"
    )]
    OutOfStep {
        journal: PathBuf,
        journal_generation: u32,
        snapshot_generation: u32,
    },
    #[error("{path}: in use by another daemon")]
    InUse { path: PathBuf },
}

/// One operation of the journal, to replay in order on top of the snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A request at ring position `position` that got `status`.
    Request {
        position: u16,
        request: Request,
        status: Status,
    },
    /// A request of an earlier pass that came again and got its recorded status: applied
    /// once already, it is only kept so that the pass it came again in still covers it (that
    /// pass may be the one a crash leaves unanswered).
    Repeat {
        position: u16,
        request: Request,
        status: Status,
    },
    /// The config space's `bypass` was written.
    Bypass(bool),
    /// The device was reset.
    Reset,
}

/// Where the request queue stood at the end of a pass: its next available index and its
/// rings' guest addresses and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueuePosition {
    pub next_avail: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
}

impl QueuePosition {
    pub(crate) fn new(next_avail: u16, key: RingKey) -> Self {
        QueuePosition {
            next_avail,
            desc: key.desc,
            avail: key.avail,
            used: key.used,
            size: key.size,
        }
    }

    pub(crate) fn key(&self) -> RingKey {
        RingKey {
            desc: self.desc,
            avail: self.avail,
            used: self.used,
            size: self.size,
        }
    }
}

/// What a daemon finds in a state file it starts from.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The snapshot's device state (see [`crate::state`]); empty for a new file.
    pub snapshot: Vec<u8>,
    /// Committed operations since the snapshot, in order.
    pub entries: Vec<Entry>,
    /// Where the request queue stood after the last committed pass (or at the snapshot).
    pub position: Option<QueuePosition>,
    /// The requests of the last committed pass: answered with their recorded status if they
    /// come again (the frontend rewound to the used index), not applied twice.
    pub last_pass: Vec<Entry>,
    /// Whether the files were created now.
    pub created: bool,
}

/// The open state file of a running daemon.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    journal_path: PathBuf,
    journal_file: File,
    journal: MmapMut,
    capacity: usize,
    /// The next record slot.
    cursor: usize,
    /// Where the open pass's first record is.
    pass_start: usize,
    generation: u32,
    /// Where the request queue stood at the last commit.
    last: Option<QueuePosition>,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StateFileError + '_ {
    move |source| StateFileError::Io {
        path: path.to_owned(),
        source,
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// The journal's path beside a state file.
pub fn journal_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".journal");
    PathBuf::from(name)
}

/// A snapshot file's header: magic, version, generation, the queue position if known.
fn snapshot_header(generation: u32, position: Option<QueuePosition>) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&SNAPSHOT_MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&generation.to_le_bytes());
    if let Some(p) = position {
        h[10] = 1;
        h[16..18].copy_from_slice(&p.next_avail.to_le_bytes());
        h[18..20].copy_from_slice(&p.size.to_le_bytes());
        h[24..32].copy_from_slice(&p.desc.to_le_bytes());
        h[32..40].copy_from_slice(&p.avail.to_le_bytes());
        h[40..48].copy_from_slice(&p.used.to_le_bytes());
    }
    let crc = crc32fast::hash(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

fn parse_snapshot_header(
    path: &Path,
    h: &[u8],
) -> Result<(u32, Option<QueuePosition>), StateFileError> {
    let damaged = |what: &str| StateFileError::Damaged {
        path: path.to_owned(),
        what: what.into(),
    };
    if h.len() < HEADER {
        return Err(damaged("shorter than its header"));
    }
    if h[..8] != SNAPSHOT_MAGIC {
        return Err(StateFileError::Magic {
            path: path.to_owned(),
        });
    }
    let version = le16(h, 8);
    if version != VERSION {
        return Err(StateFileError::Version {
            path: path.to_owned(),
            version,
        });
    }
    if crc32fast::hash(&h[..60]) != le32(h, 60) {
        return Err(damaged("header checksum"));
    }
    let position = match h[10] {
        0 => None,
        1 => Some(QueuePosition {
            next_avail: le16(h, 16),
            size: le16(h, 18),
            desc: le64(h, 24),
            avail: le64(h, 32),
            used: le64(h, 40),
        }),
        _ => return Err(damaged("header flags")),
    };
    Ok((le32(h, 12), position))
}

fn journal_header(generation: u32, capacity: usize) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&JOURNAL_MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&generation.to_le_bytes());
    h[16..20].copy_from_slice(&(capacity as u32).to_le_bytes());
    let crc = crc32fast::hash(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A request record (see the module documentation); `repeat` for a request answered again
/// from the journal.
fn request_record(
    generation: u32,
    position: u16,
    request: &Request,
    status: Status,
    repeat: bool,
) -> [u8; 64] {
    let mut r = [0u8; RECORD];
    r[..4].copy_from_slice(&generation.to_le_bytes());
    r[4] = KIND_REQUEST;
    r[10] = u8::from(repeat);
    r[5] = status as u8;
    r[6..8].copy_from_slice(&position.to_le_bytes());
    r[8] = request.request_type() as u8;
    let (domain, endpoint, start, end, phys, flags) = match *request {
        Request::Attach {
            domain,
            endpoint,
            bypass,
        } => (domain, endpoint, 0, 0, 0, u8::from(bypass)),
        Request::Detach { domain, endpoint } => (domain, endpoint, 0, 0, 0, 0),
        Request::Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        } => (
            domain,
            0,
            virt_start,
            virt_end,
            phys_start,
            flags.bits() as u8,
        ),
        Request::Unmap {
            domain,
            virt_start,
            virt_end,
        } => (domain, 0, virt_start, virt_end, 0, 0),
        Request::Probe { endpoint } => (0, endpoint, 0, 0, 0, 0),
    };
    r[9] = flags;
    r[12..16].copy_from_slice(&domain.to_le_bytes());
    r[16..20].copy_from_slice(&endpoint.to_le_bytes());
    r[24..32].copy_from_slice(&start.to_le_bytes());
    r[32..40].copy_from_slice(&end.to_le_bytes());
    r[40..48].copy_from_slice(&phys.to_le_bytes());
    r
}

/// Decodes a request record's request and status; None for anything malformed.
fn decode_request(r: &[u8]) -> Option<(u16, Request, Status)> {
    let status = Status::try_from(r[5]).ok()?;
    let position = le16(r, 6);
    let flags = r[9];
    let (domain, endpoint) = (le32(r, 12), le32(r, 16));
    let (start, end, phys) = (le64(r, 24), le64(r, 32), le64(r, 40));
    let request = match RequestType::try_from(r[8]).ok()? {
        RequestType::Attach if flags <= 1 => Request::Attach {
            domain,
            endpoint,
            bypass: flags == 1,
        },
        RequestType::Detach => Request::Detach { domain, endpoint },
        RequestType::Map => Request::Map {
            domain,
            virt_start: start,
            virt_end: end,
            phys_start: phys,
            flags: MapFlags::from_bits(u32::from(flags))?,
        },
        RequestType::Unmap => Request::Unmap {
            domain,
            virt_start: start,
            virt_end: end,
        },
        _ => return None,
    };
    Some((position, request, status))
}

fn simple_record(generation: u32, kind: u8, value: u8) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..4].copy_from_slice(&generation.to_le_bytes());
    r[4] = kind;
    r[5] = value;
    r
}

fn commit_record(generation: u32, count: u32, crc: u32, at: Option<QueuePosition>) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..4].copy_from_slice(&generation.to_le_bytes());
    r[4] = KIND_COMMIT;
    r[20..24].copy_from_slice(&count.to_le_bytes());
    r[48..52].copy_from_slice(&crc.to_le_bytes());
    if let Some(at) = at {
        r[5] = 1;
        r[6..8].copy_from_slice(&at.next_avail.to_le_bytes());
        r[16..18].copy_from_slice(&at.size.to_le_bytes());
        r[24..32].copy_from_slice(&at.desc.to_le_bytes());
        r[32..40].copy_from_slice(&at.avail.to_le_bytes());
        r[40..48].copy_from_slice(&at.used.to_le_bytes());
    }
    r
}

impl StateFile {
    /// Opens the state file at `path`, creating it (empty state) when there is none, and
    /// returns what it holds. With `fresh`, whatever is there is replaced by an empty state.
    /// `records` is the journal's capacity when it is created.
    pub fn open(
        path: &Path,
        records: usize,
        fresh: bool,
    ) -> Result<(StateFile, Recovered), StateFileError> {
        let journal_path = journal_path(path);
        let exists = path.exists();
        if fresh || !exists {
            let file = StateFile::create(path, &journal_path, records, &[], None, 1)?;
            let recovered = Recovered {
                created: true,
                ..Recovered::default()
            };
            return Ok((file, recovered));
        }
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io_error(path))?;
        let (generation, position) = parse_snapshot_header(path, &bytes)?;
        let snapshot = bytes.split_off(HEADER);
        let journal_file = open_rw(&journal_path, false)?;
        lock(&journal_file, &journal_path)?;
        let len = journal_file
            .metadata()
            .map_err(io_error(&journal_path))?
            .len();
        // SAFETY: the journal is this daemon's own file (mode 0600, locked against a second
        // daemon); the mapping lives as long as the `StateFile`, and a shorter file than the
        // header says is refused below before any record is read.
        let journal =
            unsafe { MmapMut::map_mut(&journal_file) }.map_err(io_error(&journal_path))?;
        let mut file = StateFile {
            path: path.to_owned(),
            journal_path: journal_path.clone(),
            journal_file,
            journal,
            capacity: 0,
            cursor: 0,
            pass_start: 0,
            generation,
            last: None,
        };
        let mut recovered = Recovered {
            snapshot,
            position,
            ..Recovered::default()
        };
        file.read_journal(len, &mut recovered)?;
        file.last = recovered.position;
        Ok((file, recovered))
    }

    /// Writes a new pair of files: the snapshot `state` at `generation`, and an empty journal
    /// of `records` records.
    fn create(
        path: &Path,
        journal_path: &Path,
        records: usize,
        state: &[u8],
        position: Option<QueuePosition>,
        generation: u32,
    ) -> Result<StateFile, StateFileError> {
        let records = records.max(16);
        // Locked before anything is written: a daemon using these files keeps them.
        let journal_file = open_rw(journal_path, true)?;
        lock(&journal_file, journal_path)?;
        write_snapshot(path, generation, position, state)?;
        journal_file
            .set_len(0)
            .and_then(|_| journal_file.set_len((HEADER + records * RECORD) as u64))
            .map_err(io_error(journal_path))?;
        // SAFETY: as in `open`: our own 0600 file, locked, sized just above.
        let mut journal =
            unsafe { MmapMut::map_mut(&journal_file) }.map_err(io_error(journal_path))?;
        journal[..HEADER].copy_from_slice(&journal_header(generation, records));
        Ok(StateFile {
            path: path.to_owned(),
            journal_path: journal_path.to_owned(),
            journal_file,
            journal,
            capacity: records,
            cursor: 0,
            pass_start: 0,
            generation,
            last: position,
        })
    }

    /// Reads the journal's committed passes into `recovered` and puts the cursor after them.
    fn read_journal(&mut self, len: u64, recovered: &mut Recovered) -> Result<(), StateFileError> {
        let path = self.journal_path.clone();
        let damaged = |what: String| StateFileError::Damaged {
            path: path.clone(),
            what,
        };
        let h = self
            .journal
            .get(..HEADER)
            .ok_or_else(|| damaged("shorter than its header".into()))?;
        if h[..8] != JOURNAL_MAGIC {
            return Err(StateFileError::Magic { path: path.clone() });
        }
        let version = le16(h, 8);
        if version != VERSION {
            return Err(StateFileError::Version {
                path: path.clone(),
                version,
            });
        }
        if crc32fast::hash(&h[..60]) != le32(h, 60) {
            return Err(damaged("header checksum".into()));
        }
        let generation = le32(h, 12);
        let capacity = le32(h, 16) as usize;
        if (HEADER + capacity * RECORD) as u64 != len {
            return Err(damaged(format!(
                "{len} bytes for {capacity} records of {RECORD}"
            )));
        }
        self.capacity = capacity;
        if generation > self.generation {
            return Err(StateFileError::OutOfStep {
                journal: path.clone(),
                journal_generation: generation,
                snapshot_generation: self.generation,
            });
        }
        if generation < self.generation {
            // The snapshot was written after these records: it holds them all.
            self.journal[..HEADER].copy_from_slice(&journal_header(self.generation, capacity));
            return Ok(());
        }
        let mut pending = Vec::new();
        let mut at = 0;
        while at < capacity {
            let r = &self.journal[HEADER + at * RECORD..HEADER + (at + 1) * RECORD];
            if le32(r, 0) != generation {
                break;
            }
            at += 1;
            match r[4] {
                KIND_REQUEST => match (decode_request(r), r[10]) {
                    (Some((position, request, status)), 0) => pending.push(Entry::Request {
                        position,
                        request,
                        status,
                    }),
                    (Some((position, request, status)), 1) => pending.push(Entry::Repeat {
                        position,
                        request,
                        status,
                    }),
                    _ => return Err(damaged(format!("record {} is malformed", at - 1))),
                },
                KIND_BYPASS if r[5] <= 1 => pending.push(Entry::Bypass(r[5] == 1)),
                KIND_RESET => pending.push(Entry::Reset),
                KIND_COMMIT => {
                    let count = le32(r, 20) as usize;
                    let start = HEADER + (at - 1 - count.min(at - 1)) * RECORD;
                    let crc = crc32fast::hash(&self.journal[start..HEADER + (at - 1) * RECORD]);
                    if count != pending.len() || crc != le32(r, 48) {
                        // Not what this pass wrote: the tail of an interrupted write.
                        break;
                    }
                    recovered.position = match r[5] {
                        0 => None,
                        1 => Some(QueuePosition {
                            next_avail: le16(r, 6),
                            size: le16(r, 16),
                            desc: le64(r, 24),
                            avail: le64(r, 32),
                            used: le64(r, 40),
                        }),
                        _ => return Err(damaged(format!("record {} has bad flags", at - 1))),
                    };
                    recovered.last_pass = pending
                        .iter()
                        .copied()
                        .filter(|e| matches!(e, Entry::Request { .. } | Entry::Repeat { .. }))
                        .collect();
                    recovered.entries.append(&mut pending);
                    self.cursor = at;
                }
                other => return Err(damaged(format!("record {} has kind {other}", at - 1))),
            }
        }
        // Records after the last commit were never answered: forget them.
        self.pass_start = self.cursor;
        Ok(())
    }

    /// Records left before the journal is full.
    pub fn free_records(&self) -> usize {
        self.capacity - self.cursor
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn put(&mut self, record: &[u8; RECORD]) -> bool {
        if self.cursor == self.capacity {
            return false;
        }
        let at = HEADER + self.cursor * RECORD;
        self.journal[at..at + RECORD].copy_from_slice(record);
        self.cursor += 1;
        true
    }

    /// Records a request of the open pass; false when the journal is full (the caller makes
    /// room with [`StateFile::compact`] before a pass: a pass never holds more requests than
    /// the queue).
    pub fn request(&mut self, position: u16, request: &Request, status: Status) -> bool {
        let record = request_record(self.generation, position, request, status, false);
        self.put(&record)
    }

    /// Records a request of an earlier pass answered again with its recorded status.
    pub fn repeat(&mut self, position: u16, request: &Request, status: Status) -> bool {
        let record = request_record(self.generation, position, request, status, true);
        self.put(&record)
    }

    /// Records a write of `bypass` (part of the next commit).
    pub fn bypass(&mut self, bypass: bool) -> bool {
        let record = simple_record(self.generation, KIND_BYPASS, u8::from(bypass));
        self.put(&record)
    }

    /// Records a device reset (part of the next commit).
    pub fn reset(&mut self) -> bool {
        let record = simple_record(self.generation, KIND_RESET, 0);
        self.put(&record)
    }

    /// Ends the open pass, the request queue at `at`: its records count once this returns.
    /// Call before the pass's used entries are published.
    pub fn commit(&mut self, at: QueuePosition) -> bool {
        self.commit_at(Some(at))
    }

    /// Ends the open pass with the request queue where the last pass left it (for records
    /// written outside a pass: a config write, a reset).
    pub fn commit_here(&mut self) -> bool {
        self.commit_at(self.last)
    }

    fn commit_at(&mut self, at: Option<QueuePosition>) -> bool {
        let count = (self.cursor - self.pass_start) as u32;
        let crc = crc32fast::hash(
            &self.journal[HEADER + self.pass_start * RECORD..HEADER + self.cursor * RECORD],
        );
        let record = commit_record(self.generation, count, crc, at);
        let done = self.put(&record);
        if done {
            self.pass_start = self.cursor;
            self.last = at;
        }
        done
    }

    /// Where the request queue stood at the last commit.
    pub fn position(&self) -> Option<QueuePosition> {
        self.last
    }

    /// Writes `state` as the new snapshot and starts the journal over. Call between passes.
    /// The journal's size is kept unless `records` is larger.
    pub fn compact(
        &mut self,
        state: &[u8],
        position: Option<QueuePosition>,
        records: usize,
    ) -> Result<(), StateFileError> {
        let generation = self.generation.wrapping_add(1);
        write_snapshot(&self.path, generation, position, state)?;
        if records > self.capacity {
            let len = (HEADER + records * RECORD) as u64;
            self.journal_file
                .set_len(len)
                .map_err(io_error(&self.journal_path))?;
            // SAFETY: as in `open`: our own 0600 file, locked, just grown to `len`.
            self.journal = unsafe { MmapMut::map_mut(&self.journal_file) }
                .map_err(io_error(&self.journal_path))?;
            self.capacity = records;
        }
        self.journal[..HEADER].copy_from_slice(&journal_header(generation, self.capacity));
        self.generation = generation;
        self.cursor = 0;
        self.pass_start = 0;
        self.last = position;
        Ok(())
    }
}

/// Replaces the snapshot at `path` whole: written beside it, then renamed over it.
fn write_snapshot(
    path: &Path,
    generation: u32,
    position: Option<QueuePosition>,
    state: &[u8],
) -> Result<(), StateFileError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let mut file = open_rw(&tmp, true)?;
    file.write_all(&snapshot_header(generation, position))
        .and_then(|_| file.write_all(state))
        .map_err(io_error(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_error(path))
}

fn open_rw(path: &Path, create: bool) -> Result<File, StateFileError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io_error(path))
}

/// One daemon per state file.
fn lock(file: &File, path: &Path) -> Result<(), StateFileError> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(StateFileError::InUse {
            path: path.to_owned(),
        })
    } else {
        Err(io_error(path)(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> RingKey {
        RingKey {
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            size: 256,
        }
    }

    fn map(i: u64) -> Request {
        Request::Map {
            domain: 1,
            virt_start: i << 12,
            virt_end: (i << 12) | 0xfff,
            phys_start: 0x10_0000,
            flags: MapFlags::from_bits(3).unwrap(),
        }
    }

    fn at(next_avail: u16) -> QueuePosition {
        QueuePosition::new(next_avail, key())
    }

    #[test]
    fn committed_passes_come_back_and_the_open_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let (mut f, recovered) = StateFile::open(&path, 64, false).unwrap();
        assert!(recovered.created);
        let attach = Request::Attach {
            domain: 1,
            endpoint: 8,
            bypass: true,
        };
        assert!(f.request(0, &attach, Status::Ok));
        assert!(f.request(1, &map(1), Status::Inval));
        assert!(f.commit(at(2)));
        assert!(f.bypass(true));
        assert!(f.commit(at(2)));
        assert!(f.request(2, &map(2), Status::Ok));
        assert!(f.reset());
        assert!(f.commit(at(3)));
        // A pass cut short: never committed.
        assert!(f.request(3, &map(3), Status::Ok));
        drop(f);
        let mode = fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );

        let (f, r) = StateFile::open(&path, 64, false).unwrap();
        assert!(!r.created);
        assert_eq!(
            r.entries,
            vec![
                Entry::Request {
                    position: 0,
                    request: attach,
                    status: Status::Ok
                },
                Entry::Request {
                    position: 1,
                    request: map(1),
                    status: Status::Inval
                },
                Entry::Bypass(true),
                Entry::Request {
                    position: 2,
                    request: map(2),
                    status: Status::Ok
                },
                Entry::Reset,
            ]
        );
        assert_eq!(r.position, Some(at(3)));
        assert_eq!(
            r.last_pass,
            vec![Entry::Request {
                position: 2,
                request: map(2),
                status: Status::Ok
            }]
        );
        // The uncommitted record's slot is reused.
        assert_eq!(f.free_records(), 64 - 8);
    }

    #[test]
    fn compaction_starts_a_new_generation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let (mut f, _) = StateFile::open(&path, 16, false).unwrap();
        for i in 0..10 {
            assert!(f.request(i, &map(u64::from(i)), Status::Ok));
        }
        assert!(f.commit(at(10)));
        f.compact(b"snapshot", Some(at(10)), 0).unwrap();
        assert!(f.request(10, &map(10), Status::Ok));
        assert!(f.commit(at(11)));
        drop(f);
        let (_, r) = StateFile::open(&path, 16, false).unwrap();
        assert_eq!(r.snapshot, b"snapshot");
        assert_eq!(r.entries.len(), 1, "the old generation is in the snapshot");
        assert_eq!(r.position, Some(at(11)));
        // A bigger journal on the way.
        let (mut f, _) = StateFile::open(&path, 16, false).unwrap();
        f.compact(b"again", None, 100).unwrap();
        assert_eq!(f.capacity(), 100);
        assert!(f.commit(at(12)));
        drop(f);
        let (f, r) = StateFile::open(&path, 16, false).unwrap();
        assert_eq!((r.snapshot.as_slice(), f.capacity()), (&b"again"[..], 100));
        assert_eq!(r.position, Some(at(12)));
    }

    #[test]
    fn a_full_journal_refuses_records() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _) = StateFile::open(&dir.path().join("s"), 16, false).unwrap();
        for i in 0..16 {
            assert!(f.request(i, &map(u64::from(i)), Status::Ok));
        }
        assert!(!f.request(16, &map(16), Status::Ok));
        assert!(!f.commit(at(17)));
    }

    #[test]
    fn damage_is_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let journal = journal_path(&path);
        let (mut f, _) = StateFile::open(&path, 16, false).unwrap();
        assert!(f.request(0, &map(0), Status::Ok));
        assert!(f.commit(at(1)));
        drop(f);
        let snapshot = fs::read(&path).unwrap();
        let records = fs::read(&journal).unwrap();
        let refuse = |snap: &[u8], jour: &[u8]| {
            fs::write(&path, snap).unwrap();
            fs::write(&journal, jour).unwrap();
            let e = StateFile::open(&path, 16, false).unwrap_err().to_string();
            fs::write(&path, &snapshot).unwrap();
            fs::write(&journal, &records).unwrap();
            e
        };
        let mut bad = snapshot.clone();
        bad[0] = b'X';
        assert!(refuse(&bad, &records).contains("bad magic"));
        let mut bad = snapshot.clone();
        bad[13] ^= 1;
        assert!(refuse(&bad, &records).contains("header checksum"));
        assert!(refuse(&snapshot[..10], &records).contains("shorter than its header"));
        let mut bad = records.clone();
        bad[HEADER + 8] = 77;
        assert!(refuse(&snapshot, &bad).contains("malformed"));
        assert!(refuse(&snapshot, &records[..100]).contains("records of 64"));
        // A journal ahead of its snapshot.
        let mut ahead = records.clone();
        ahead[..HEADER].copy_from_slice(&journal_header(7, 16));
        let e = refuse(&snapshot, &ahead);
        assert!(e.contains("out of step") && e.contains("journal"), "{e}");
        // A commit whose checksum does not match ends the journal there (an interrupted
        // write), it does not fail it.
        let mut torn = records.clone();
        torn[HEADER + 24] ^= 1;
        fs::write(&journal, &torn).unwrap();
        let (_, r) = StateFile::open(&path, 16, false).unwrap();
        assert!(r.entries.is_empty());
        // And `fresh` starts over whatever is there.
        fs::write(&path, b"junk").unwrap();
        let (_, r) = StateFile::open(&path, 16, true).unwrap();
        assert!(r.created && r.entries.is_empty());
    }

    #[test]
    fn one_daemon_per_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let (_f, _) = StateFile::open(&path, 16, false).unwrap();
        let e = StateFile::open(&path, 16, false).unwrap_err();
        assert!(matches!(e, StateFileError::InUse { .. }), "{e}");
    }
}
