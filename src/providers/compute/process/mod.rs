//! The `process` compute provider, the embedded default: a session is a child process in its
//! own process group, running the plan's command (no shell) in a workspace under the state
//! directory.
//!
//! Layout: `<state>/sessions/<name>/` holds `session.json` (the spec it was made from, its
//! ports, the pid and the pid's start time; written atomically), `workspace/` and `log`.
//! The directory is the ownership marker: everything in it is vessel's.
//!
//! A pid counts as the session only if it is alive, not a zombie, and started at the recorded
//! time (so a reused pid is never mistaken for it). Processes also carry
//! `VESSEL_SESSION_KEY` in their environment: a session whose pid was not recorded (vessel
//! killed between spawn and write) is found and adopted, never started twice.

mod config;

pub use config::ProcessConfig;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::model::observed::{ObservedSession, RuntimeSpec, SessionState};
use crate::model::plan::SessionAction;
use crate::model::{ComputeKind, Health};

use super::{
    BoxFut, ComputeProvider, CreateArgs, Intent, ProviderError, SessionSteps, Synced, no_symlinks,
};

const RECORD: &str = "session.json";

/// `session.json` (the qemu provider's record is this one with its own fields beside).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) name: String,
    pub(crate) spec: RuntimeSpec,
    pub(crate) fingerprint: String,
    pub(crate) source_file: PathBuf,
    #[serde(flatten)]
    pub(crate) synced: Synced,
    /// Host port per named port.
    pub(crate) ports: BTreeMap<String, u16>,
    pub(crate) intent: Intent,
    #[serde(default)]
    pub(crate) pid: Option<i32>,
    /// The pid's start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    #[serde(default)]
    pub(crate) start_ticks: Option<u64>,
}

#[derive(Clone)]
pub struct ProcessProvider {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    config: ProcessConfig,
    /// Identifies this state directory in the processes' environment.
    key_prefix: String,
    /// Serialises port allocation and record writes.
    lock: Mutex<()>,
    /// The records as last read or written, and the ports they hold.
    records: std::sync::Mutex<Records>,
    /// Workspaces of destroyed sessions, kept for a while.
    kept: super::kept::Kept,
    changes: tokio::sync::watch::Sender<u64>,
}

impl ProcessProvider {
    /// A provider keeping its sessions under `root` (created if missing).
    pub fn new(
        root: PathBuf,
        config: ProcessConfig,
        kept: super::kept::Kept,
    ) -> std::io::Result<ProcessProvider> {
        std::fs::create_dir_all(&root)?;
        let root = root.canonicalize()?;
        let key_prefix = format!("{}#", root.display());
        Ok(ProcessProvider {
            inner: Arc::new(Inner {
                root,
                config,
                key_prefix,
                lock: Mutex::new(()),
                records: std::sync::Mutex::new(Records::default()),
                kept,
                changes: tokio::sync::watch::channel(0).0,
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn dir(&self, session: &str) -> PathBuf {
        self.inner.root.join(session)
    }

    fn key(&self, session: &str) -> String {
        format!("{}{session}", self.inner.key_prefix)
    }

    /// Stop every running session (used at exit when `keep_on_exit` is false): those whose
    /// recorded process lives or that have a process carrying their key (one look at `/proc`
    /// for all of them), [`STOP_ALL_AT_ONCE`] at a time. Sessions that do not run are left
    /// as they are, so stopping costs what runs, not what is declared.
    pub async fn stop_all(&self) {
        use futures_util::StreamExt;
        let names: Vec<String> = list_dirs(&self.inner.root).unwrap_or_default();
        let marked = sessions_with_processes(&self.inner.key_prefix);
        let running: Vec<String> = names
            .into_iter()
            .filter(|n| {
                marked.contains(n.as_str())
                    || self
                        .inner
                        .read_record(&self.dir(n))
                        .ok()
                        .flatten()
                        .is_some_and(|r| alive(r.pid, r.start_ticks))
            })
            .collect();
        futures_util::stream::iter(running)
            .for_each_concurrent(STOP_ALL_AT_ONCE, |n| async move {
                if let Err(e) = self.stop(&n, None).await {
                    tracing::warn!(session = %n, "at exit: {e}");
                }
            })
            .await;
    }
}

pub(crate) fn list_dirs(root: &Path) -> std::io::Result<Vec<String>> {
    list_dirs_and_trash(root).map(|(dirs, _)| dirs)
}

/// The session directories under `root`, sorted, and what interrupted destroys left there
/// (`.trash-*`), in one listing.
fn list_dirs_and_trash(root: &Path) -> std::io::Result<(Vec<String>, Vec<PathBuf>)> {
    let (mut out, mut trash) = (Vec::new(), Vec::new());
    for e in std::fs::read_dir(root)? {
        let e = e?;
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if name.starts_with(".trash-") {
            trash.push(e.path());
        } else if e.file_type()?.is_dir() && !name.starts_with('.') {
            out.push(name);
        }
    }
    out.sort();
    Ok((out, trash))
}

/// Session records kept in memory, each with its file's identity when it was last read or
/// written: a record whose file is unchanged is not read and parsed again (a pass over 10,000
/// sessions stats their records instead of reading them), and host ports are handed out from
/// the set the records hold instead of reading every record for each create.
#[derive(Default)]
struct Records {
    by_dir: HashMap<PathBuf, Cached>,
    /// Host ports the records hold, with how many hold each.
    ports: HashMap<u16, u32>,
    /// Every session directory has been read at least once (the port set is whole).
    complete: bool,
    /// Every port from the provider's base up to this one is held by a record (a port
    /// released lowers it).
    floor: u16,
    /// Moves on with every change of a record kept here.
    generation: u64,
    /// A look at the disk is asked for (the periodic resync): the next observe lists every
    /// session directory and stats every record instead of answering from memory.
    stale: bool,
    /// The disk has been looked at since this provider began.
    looked: bool,
    /// Session directories the last look at the disk found without a readable record:
    /// reported as that look reported them until a record is written there.
    odd: BTreeMap<String, Odd>,
    /// What the last observe saw, for `unchanged`.
    seen: Option<Seen>,
}

/// A session directory without a readable record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Odd {
    /// Its record cannot be read: vessel cannot tell what it is.
    Unreadable,
    /// It has no record (vessel stopped between making the directory and recording it).
    HalfMade,
}

/// What one observe saw: the records' generation, and each process it looked at (pid, start
/// time) with whether it ran.
struct Seen {
    generation: u64,
    looked: Vec<(Option<i32>, Option<u64>, bool)>,
}

struct Cached {
    stamp: Stamp,
    /// Its times were older than `RACY` when it was read: an unchanged stamp means unchanged
    /// bytes (a write within the same clock tick could keep every field the same).
    trusted: bool,
    /// Made in memory, its file being written (by a create, outside the provider's lock):
    /// its ports are held, and it is what the file will say.
    pending: bool,
    record: Option<Record>,
}

/// A record file's identity: inode, size, modification and change times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// How recently a file may have changed for its stamp not to be trusted.
const RACY: Duration = Duration::from_secs(2);

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> (Stamp, bool) {
        use std::os::unix::fs::MetadataExt;
        let stamp = Stamp {
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        };
        let newest = stamp.mtime.max(stamp.ctime).0;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        (stamp, newest + (RACY.as_secs() as i64) < now)
    }
}

impl Records {
    fn set(&mut self, dir: &Path, entry: Option<Cached>) {
        self.generation += 1;
        if let Some(name) = dir.file_name().and_then(|n| n.to_str()) {
            self.odd.remove(name);
        }
        let old = match entry {
            Some(e) => {
                if let Some(r) = &e.record {
                    for p in r.ports.values() {
                        *self.ports.entry(*p).or_default() += 1;
                    }
                }
                self.by_dir.insert(dir.to_path_buf(), e)
            }
            None => self.by_dir.remove(dir),
        };
        for p in old
            .iter()
            .flat_map(|o| o.record.iter())
            .flat_map(|r| r.ports.values())
        {
            if let Some(n) = self.ports.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    self.ports.remove(p);
                    self.floor = self.floor.min(*p);
                }
            }
        }
    }
}

impl Inner {
    /// The record in `dir`, from memory when its file is unchanged.
    fn read_record(&self, dir: &Path) -> Result<Option<Record>, ProviderError> {
        if let Some(c) = crate::lock_or_reset(&self.records).by_dir.get(dir)
            && c.pending
        {
            return Ok(c.record.clone());
        }
        let path = dir.join(RECORD);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::lock_or_reset(&self.records).set(dir, None);
                return Ok(None);
            }
            Err(e) => return Err(ProviderError::io("read", path.display().to_string())(e)),
        };
        let (stamp, trusted) = Stamp::of(&meta);
        {
            let m = crate::lock_or_reset(&self.records);
            if let Some(c) = m.by_dir.get(dir)
                && c.trusted
                && c.stamp == stamp
            {
                return Ok(c.record.clone());
            }
        }
        let record: Option<Record> = super::record::read(&path)?;
        crate::lock_or_reset(&self.records).set(
            dir,
            Some(Cached {
                stamp,
                trusted,
                pending: false,
                record: record.clone(),
            }),
        );
        Ok(record)
    }

    /// Write the record in `dir` (atomically), and keep it.
    fn write_record(&self, dir: &Path, r: &Record) -> Result<(), ProviderError> {
        let path = dir.join(RECORD);
        super::record::write(&path, r)?;
        let entry = std::fs::symlink_metadata(&path).ok().map(|meta| {
            let (stamp, trusted) = Stamp::of(&meta);
            Cached {
                stamp,
                trusted,
                pending: false,
                record: Some(r.clone()),
            }
        });
        crate::lock_or_reset(&self.records).set(dir, entry);
        Ok(())
    }

    /// Keep `r` as the record of `dir` before its file is written: its ports are held from
    /// now on. `write_record` (or `forget_record`, if the write failed) follows.
    fn hold_record(&self, dir: &Path, r: &Record) {
        let entry = Cached {
            stamp: Stamp {
                ino: 0,
                size: 0,
                mtime: (0, 0),
                ctime: (0, 0),
            },
            trusted: false,
            pending: true,
            record: Some(r.clone()),
        };
        crate::lock_or_reset(&self.records).set(dir, Some(entry));
    }

    /// Forget the record of a session directory that is gone.
    fn forget_record(&self, dir: &Path) {
        crate::lock_or_reset(&self.records).set(dir, None);
    }

    /// Read every session directory's record once, so the port set is whole.
    fn load_all_records(&self) {
        if crate::lock_or_reset(&self.records).complete {
            return;
        }
        for n in list_dirs(&self.root).unwrap_or_default() {
            let _ = self.read_record(&self.root.join(n));
        }
        crate::lock_or_reset(&self.records).complete = true;
    }
}

/// `/proc/<pid>/stat`: (state char, start time in ticks).
pub(crate) fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// When a process that started `ticks` clock ticks after boot started (`btime` of
/// `/proc/stat` plus its start time).
pub(crate) fn started_at(ticks: u64) -> Option<chrono::DateTime<chrono::Utc>> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: i64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // `/proc` counts in USER_HZ, which Linux fixes at 100 whatever the kernel's own HZ.
    let hz: u64 = 100;
    let ms = (ticks % hz) * 1000 / hz;
    chrono::DateTime::from_timestamp(btime + (ticks / hz) as i64, (ms * 1_000_000) as u32)
}

/// Is the recorded pid alive and still the process that was started?
pub(crate) fn alive(pid: Option<i32>, ticks: Option<u64>) -> bool {
    match (pid, proc_stat_of(pid)) {
        (Some(_), Some((state, start))) => {
            state != 'Z' && state != 'X' && ticks.is_none_or(|t| t == start)
        }
        _ => false,
    }
}

fn proc_stat_of(pid: Option<i32>) -> Option<(char, u64)> {
    pid.and_then(proc_stat)
}

/// The process group of `pid` (`/proc/<pid>/stat` field 5).
fn proc_pgrp(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 1..];
    after.split_whitespace().nth(2)?.parse().ok()
}

/// The session's process that leads its own group: the one vessel started. Strays (children
/// that outlived it, or left its group) are never adopted.
fn find_leader(key: &str) -> Option<i32> {
    find_by_key(key)
        .into_iter()
        .find(|p| proc_pgrp(*p) == Some(*p))
}

/// How many sessions [`ProcessProvider::stop_all`] stops at once (each waits for its
/// processes to exit, up to its stop timeout).
const STOP_ALL_AT_ONCE: usize = 64;

/// The sessions that have a live process carrying a key `<prefix><session>`, in one pass
/// over `/proc`.
fn sessions_with_processes(prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    keyed_processes(prefix, |_, session| {
        if let Ok(s) = std::str::from_utf8(session) {
            out.insert(s.to_string());
        }
    });
    out
}

/// Live processes whose environment carries `VESSEL_SESSION_KEY=<key>`.
fn find_by_key(key: &str) -> Vec<i32> {
    let mut out = Vec::new();
    keyed_processes(key, |pid, rest| {
        if rest.is_empty() {
            out.push(pid);
        }
    });
    out.sort_unstable();
    out
}

/// Each live process whose environment has `VESSEL_SESSION_KEY=<prefix>...`: its pid and
/// what follows the prefix.
fn keyed_processes(prefix: &str, mut each: impl FnMut(i32, &[u8])) {
    let needle = format!("VESSEL_SESSION_KEY={prefix}");
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let Some(rest) = env
            .split(|b| *b == 0)
            .find_map(|v| v.strip_prefix(needle.as_bytes()))
        else {
            continue;
        };
        if proc_stat(pid).is_some_and(|(s, _)| s != 'Z' && s != 'X') {
            each(pid, rest);
        }
    }
}

/// Expand `{port.NAME}`, `{workspace}`, `{session}` and `{vessel}` in one argument.
fn expand(
    arg: &str,
    r: &Record,
    workspace: &Path,
    vessel: &Path,
) -> Result<String, super::PlaceholderError> {
    super::expand(arg, |key| match key {
        "workspace" => Some(Ok(workspace.display().to_string())),
        "session" => Some(Ok(r.name.clone())),
        "vessel" => Some(Ok(vessel.display().to_string())),
        k => super::port_placeholder(k, &r.ports),
    })
}

impl ProcessProvider {
    /// Every session: from the records kept in memory, looking only at the processes they
    /// name; from the disk (every directory listed, every record stat-ed) at the first
    /// observe and after `resync`.
    async fn observe_all(&self) -> Result<Vec<ObservedSession>, ProviderError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let from_disk = {
                let r = crate::lock_or_reset(&me.inner.records);
                r.stale || !r.looked
            };
            if from_disk {
                me.look_at_disk()?;
            }
            me.observe_records()
        })
        .await
        .map_err(|e| ProviderError::failed("observe", "process sessions", e.to_string()))?
    }

    /// Read every session directory: records whose files changed are read again, those of
    /// directories that went are forgotten, and what has no readable record is noted.
    fn look_at_disk(&self) -> Result<(), ProviderError> {
        let root = &self.inner.root;
        let (names, trash) = list_dirs_and_trash(root)
            .map_err(ProviderError::io("list", root.display().to_string()))?;
        // What an interrupted destroy left behind.
        for t in trash {
            let _ = std::fs::remove_dir_all(t);
        }
        let mut odd = BTreeMap::new();
        for name in &names {
            match self.inner.read_record(&root.join(name)) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    odd.insert(name.clone(), Odd::HalfMade);
                }
                Err(e) => {
                    tracing::warn!(session = %name, "{}", crate::error_chain(&e));
                    odd.insert(name.clone(), Odd::Unreadable);
                }
            }
        }
        let listed: BTreeSet<&String> = names.iter().collect();
        let mut r = crate::lock_or_reset(&self.inner.records);
        let gone: Vec<PathBuf> = r
            .by_dir
            .iter()
            .filter(|(d, c)| {
                !c.pending
                    && d.file_name()
                        .and_then(|n| n.to_str())
                        .is_none_or(|n| !listed.contains(&n.to_string()))
            })
            .map(|(d, _)| d.clone())
            .collect();
        for d in gone {
            r.set(&d, None);
        }
        r.odd = odd;
        r.complete = true;
        r.looked = true;
        r.stale = false;
        Ok(())
    }

    /// What the records kept in memory say, each process they name looked at.
    fn observe_records(&self) -> Result<Vec<ObservedSession>, ProviderError> {
        let kind = ComputeKind::Process;
        let mut out = Vec::new();
        let mut looked = Vec::new();
        let mut adopt = Vec::new();
        let generation = {
            let r = crate::lock_or_reset(&self.inner.records);
            for (name, o) in &r.odd {
                if r.by_dir.contains_key(&self.dir(name)) {
                    // Being made now: its record says what it is.
                    continue;
                }
                // Unreadable: vessel cannot tell what it is, so it is reported as not
                // vessel's; the plan holds it as it is. Half made: ours, broken, so the plan
                // replaces or removes it.
                out.push(match o {
                    Odd::Unreadable => {
                        ObservedSession::bare(name.clone(), kind, SessionState::Failed, false)
                    }
                    Odd::HalfMade => ObservedSession {
                        healthy: Some(false),
                        ..ObservedSession::bare(name.clone(), kind, SessionState::Failed, true)
                    },
                });
            }
            for (dir, c) in &r.by_dir {
                let Some(rec) = &c.record else { continue };
                let running = alive(rec.pid, rec.start_ticks);
                if rec.pid.is_some() || rec.intent == Intent::Running {
                    looked.push((rec.pid, rec.start_ticks, running));
                }
                if !running && rec.intent == Intent::Running {
                    adopt.push((dir.clone(), rec.clone()));
                } else {
                    out.push(rec.observed(kind, running));
                }
            }
            r.generation
        };
        let mut generation = Some(generation);
        for (dir, mut rec) in adopt {
            // Adopt a process that was started but never recorded.
            let mut running = false;
            if let Some(pid) = find_leader(&self.key(&rec.name)) {
                rec.pid = Some(pid);
                rec.start_ticks = proc_stat(pid).map(|(_, t)| t);
                self.inner.write_record(&dir, &rec)?;
                running = true;
                generation = None;
            }
            out.push(rec.observed(kind, running));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        crate::lock_or_reset(&self.inner.records).seen =
            generation.map(|generation| Seen { generation, looked });
        Ok(out)
    }

    /// Nothing `observe` would report has changed since it last ran: no record changed and
    /// every process it looked at is as it was. Costs what runs, not what is declared.
    fn unchanged_since_observe(&self) -> bool {
        let r = crate::lock_or_reset(&self.inner.records);
        match &r.seen {
            Some(seen) if !r.stale && seen.generation == r.generation => seen
                .looked
                .iter()
                .all(|(pid, ticks, was)| alive(*pid, *ticks) == *was),
            _ => false,
        }
    }

    /// Host ports for `names`: the lowest free ones from `port_base` up, not held by another
    /// session and bindable now. Call with the lock held.
    fn allocate(&self, names: &[String]) -> Result<BTreeMap<String, u16>, ProviderError> {
        self.inner.load_all_records();
        let mut records = crate::lock_or_reset(&self.inner.records);
        // Ports below `floor` are all held by records: the walk starts past them, so making
        // N sessions costs O(N), not O(N²).
        let start = records.floor.max(self.inner.config.port_base);
        let (out, floor) = allocate_ports(start, names, |p| records.ports.contains_key(&p))?;
        records.floor = floor;
        Ok(out)
    }

    async fn kill_orphans(&self, session: &str) {
        let _ = terminate_session(None, &self.key(session), Duration::from_secs(2)).await;
    }
}

impl Record {
    /// What observe reports of the session this record is of, `running` or not.
    pub(crate) fn observed(&self, kind: ComputeKind, running: bool) -> ObservedSession {
        ObservedSession {
            name: self.name.clone(),
            provider: kind,
            state: match (running, self.intent) {
                (true, _) => SessionState::Running,
                (false, Intent::Stopped) => SessionState::Stopped,
                (false, Intent::Running) => SessionState::Failed,
            },
            owned: true,
            fingerprint: self.fingerprint.clone(),
            endpoints: self.endpoints(),
            source_file: Some(self.source_file.clone()),
            synced_source: self.synced.synced_source.clone(),
            save_to: self.synced.save_to.clone(),
            healthy: None,
            host: None,
            started: running
                .then_some(self.start_ticks)
                .flatten()
                .and_then(started_at),
            spec: Some(self.spec.clone()),
            asleep: None,
            snapshots: None,
            half_made: None,
        }
    }

    /// Where each port answers: 127.0.0.1 and the host port it was given.
    pub(crate) fn endpoints(&self) -> BTreeMap<String, String> {
        self.ports
            .iter()
            .map(|(n, p)| (n.clone(), format!("127.0.0.1:{p}")))
            .collect()
    }

    /// Record what a source sync put in.
    pub(crate) fn set_synced(
        &mut self,
        path: &Path,
        exclude: &[String],
        save_to: &Option<PathBuf>,
    ) {
        self.synced.synced_source = Some(path.to_path_buf());
        self.synced.exclude = exclude.to_vec();
        self.synced.save_to = save_to.clone();
    }
}

/// Host ports for `names` for a session under `root` (each session a directory with a
/// `session.json`): none another session there holds, from `base` up.
pub(crate) fn allocate_in(
    root: &Path,
    base: u16,
    names: &[String],
) -> Result<BTreeMap<String, u16>, ProviderError> {
    let mut used: BTreeSet<u16> = BTreeSet::new();
    for n in list_dirs(root).unwrap_or_default() {
        if let Ok(Some(r)) = super::record::read::<Record>(&root.join(n).join(RECORD)) {
            used.extend(r.ports.values());
        }
    }
    allocate_ports(base, names, |p| used.contains(&p)).map(|(out, _)| out)
}

/// Host ports for `names`: the lowest from `start` up that are not `held` and are bindable on
/// 127.0.0.1 now. Also the new floor: one past the last port of the unbroken run from `start`
/// that is held or handed out here (a port bound by someone else ends the run: it is tried
/// again next time).
fn allocate_ports(
    start: u16,
    names: &[String],
    held: impl Fn(u16) -> bool,
) -> Result<(BTreeMap<String, u16>, u16), ProviderError> {
    let mut out = BTreeMap::new();
    let (mut p, mut floor, mut unbroken) = (start, start, true);
    for name in names {
        loop {
            if p == u16::MAX {
                return Err(ProviderError::failed(
                    "allocate ports for",
                    name.clone(),
                    "no free port left",
                ));
            }
            let candidate = p;
            p += 1;
            let taken = held(candidate) || out.values().any(|v| *v == candidate);
            if !taken && std::net::TcpListener::bind(("127.0.0.1", candidate)).is_ok() {
                out.insert(name.clone(), candidate);
            } else if !taken {
                unbroken = false;
                continue;
            }
            if unbroken {
                floor = candidate + 1;
            }
            if !taken {
                break;
            }
        }
    }
    Ok((out, floor))
}

/// Remove what an interrupted destroy left behind.
pub(crate) fn clean_trash(root: &Path) {
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            if e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(".trash-"))
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Send `sig` to the recorded leader's group and to every process carrying the session's
/// marker (its group if it leads one, else itself).
fn signal_session(leader: Option<i32>, key: &str, sig: Signal) {
    if let Some(l) = leader {
        let _ = killpg(Pid::from_raw(l), sig);
    }
    for pid in find_by_key(key) {
        if proc_pgrp(pid) == Some(pid) {
            let _ = killpg(Pid::from_raw(pid), sig);
        } else {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
        }
    }
}

/// Stop everything of one session: SIGTERM to the recorded leader's group and to every
/// process carrying the session's marker (its group if it leads one, else itself); wait until
/// none is left; SIGKILL what remains at the timeout. Returns the pids still alive after that
/// (none, normally). Strays that ignore SIGTERM are not left behind to be adopted later.
async fn terminate_session(leader: Option<i32>, key: &str, timeout: Duration) -> Vec<i32> {
    let signal_all = |sig: Signal| signal_session(leader, key, sig);
    let group_alive = || leader.is_some_and(|l| killpg(Pid::from_raw(l), None).is_ok());
    signal_all(Signal::SIGTERM);
    // A paused session (asleep at depth `pause`) gets its SIGTERM only once it runs again.
    signal_all(Signal::SIGCONT);
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if !group_alive() && find_by_key(key).is_empty() {
            return Vec::new();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal_all(Signal::SIGKILL);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        if !group_alive() && find_by_key(key).is_empty() {
            return Vec::new();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    find_by_key(key)
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        return "(nothing)".into();
    }
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

impl SessionSteps for ProcessProvider {
    async fn pull_image(
        &self,
        session: &str,
        image: &str,
        _pull: crate::model::PullPolicy,
        _host: Option<&str>,
    ) -> Result<(), ProviderError> {
        // The planner pulls only for providers that run images; a process runs none.
        Err(ProviderError::failed(
            "pull image for",
            session,
            format!("a process session runs no image (asked for {image})"),
        ))
    }
    async fn create(&self, a: &CreateArgs<'_>) -> Result<(), ProviderError> {
        let (session, spec, fingerprint, source_file, start) =
            (a.session, a.spec, a.fingerprint, a.source_file, a.start);
        let save_to: Option<PathBuf> = a.save_to.map(Path::to_path_buf);
        let dir = self.dir(session);
        let made = {
            let _guard = self.inner.lock.lock().await;
            if let Some(r) = self.inner.read_record(&dir)? {
                if r.fingerprint != fingerprint {
                    return Err(ProviderError::failed(
                        "create",
                        session,
                        "a session with another spec exists; it must be destroyed first",
                    ));
                }
                None
            } else {
                // Remove a half-made directory, then make it again from scratch.
                if dir.exists() {
                    self.kill_orphans(session).await;
                    std::fs::remove_dir_all(&dir)
                        .map_err(ProviderError::io("clean", dir.display().to_string()))?;
                }
                let ports = self.allocate(&spec.ports.keys().cloned().collect::<Vec<_>>())?;
                let r = Record {
                    name: session.to_string(),
                    spec: spec.clone(),
                    fingerprint: fingerprint.to_string(),
                    source_file: source_file.to_path_buf(),
                    synced: Synced {
                        save_to: save_to.clone(),
                        ..Synced::default()
                    },
                    ports,
                    intent: if start {
                        Intent::Running
                    } else {
                        Intent::Stopped
                    },
                    pid: None,
                    start_ticks: None,
                };
                // Its ports are held from here; the files are written outside the lock, so
                // sessions made at once write (and flush) theirs at once.
                self.inner.hold_record(&dir, &r);
                Some(r)
            }
        };
        if let Some(r) = made {
            let (me, d, restore, name) =
                (self.clone(), dir.clone(), a.restore, session.to_string());
            let written = tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&d)
                    .map_err(ProviderError::io("create", d.display().to_string()))?;
                super::local::make_workspace(&d, &me.inner.kept, restore, &name)?;
                me.inner.write_record(&d, &r)
            })
            .await
            .map_err(|e| ProviderError::failed("create", session, e.to_string()))
            .and_then(|r| r);
            if let Err(e) = written {
                // Not made: its ports go back; what was made of it is half made, which the
                // next create cleans away.
                self.inner.forget_record(&dir);
                return Err(e);
            }
        }
        if start {
            self.start(session).await
        } else {
            Ok(())
        }
    }
    /// The record takes the new spec; ports of names that stay keep their host port, new
    /// names get new ones. With `restart`, the process is stopped (with its old spec's stop
    /// timeout) and started again; the workspace stays as it is.
    async fn update(
        &self,
        session: &str,
        spec: &RuntimeSpec,
        fingerprint: &str,
        restart: bool,
    ) -> Result<(), ProviderError> {
        let dir = self.dir(session);
        if restart {
            self.stop(session, None).await?;
        }
        {
            let _guard = self.inner.lock.lock().await;
            let mut r = self
                .inner
                .read_record(&dir)?
                .ok_or_else(|| ProviderError::failed("update", session, "it does not exist"))?;
            let mut ports: BTreeMap<String, u16> = std::mem::take(&mut r.ports)
                .into_iter()
                .filter(|(n, _)| spec.ports.contains_key(n))
                .collect();
            let new: Vec<String> = spec
                .ports
                .keys()
                .filter(|n| !ports.contains_key(*n))
                .cloned()
                .collect();
            // The record on disk still holds the old ports: none is handed out twice.
            ports.extend(self.allocate(&new)?);
            r.ports = ports;
            r.spec = spec.clone();
            r.fingerprint = fingerprint.to_string();
            self.inner.write_record(&dir, &r)?;
        }
        if restart {
            self.start(session).await?;
        }
        Ok(())
    }
    async fn start(&self, session: &str) -> Result<(), ProviderError> {
        let dir = self.dir(session);
        let _guard = self.inner.lock.lock().await;
        let mut r = self
            .inner
            .read_record(&dir)?
            .ok_or_else(|| ProviderError::failed("start", session, "it does not exist"))?;
        if alive(r.pid, r.start_ticks) {
            // Running, or paused (asleep at depth `pause`): resumed either way.
            if let Some(pid) = r.pid {
                signal_session(Some(pid), &self.key(session), Signal::SIGCONT);
            }
            return Ok(());
        }
        if let Some(pid) = find_leader(&self.key(session)) {
            r.pid = Some(pid);
            r.start_ticks = proc_stat(pid).map(|(_, t)| t);
            r.intent = Intent::Running;
            return self.inner.write_record(&dir, &r);
        }
        let workspace = dir.join("workspace");
        let vessel = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("vessel"));
        let argv: Vec<String> = r
            .spec
            .command
            .iter()
            .map(|a| expand(a, &r, &workspace, &vessel))
            .collect::<Result<_, _>>()
            .map_err(|e| ProviderError::caused("start", session, Arc::new(e)))?;
        let Some((program, args)) = argv.split_first() else {
            return Err(ProviderError::failed(
                "start",
                session,
                "the plan has no command",
            ));
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log"))
            .map_err(ProviderError::io("open log of", session))?;
        let log2 = log
            .try_clone()
            .map_err(ProviderError::io("open log of", session))?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .current_dir(&workspace)
            // A clean environment: vessel's own may hold secrets.
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .env("HOME", &workspace)
            .env("LANG", "C.UTF-8")
            .envs(&r.spec.env)
            .env("VESSEL_SESSION", session)
            .env("VESSEL_WORKSPACE", &workspace)
            .env("VESSEL_SESSION_KEY", self.key(session))
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false);
        // A session of its own (and so a group of its own, led by the session's process):
        // its group is never orphaned by vessel's exit, which would send a paused session
        // SIGHUP (POSIX sends SIGHUP and SIGCONT to a stopped group orphaned by its parent's
        // exit), and no terminal's signals reach it.
        // SAFETY: setsid is async-signal-safe, and the closure touches nothing else.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        for (name, port) in &r.ports {
            cmd.env(format!("PORT_{}", super::env_name(name)), port.to_string());
        }
        if let Some(port) = r.spec.health_port().and_then(|n| r.ports.get(n)) {
            cmd.env("PORT", port.to_string());
        }
        let mut child = cmd
            .spawn()
            .map_err(ProviderError::io("start", format!("{session} ({program})")))?;
        let pid = child.id().map(|p| p as i32);
        r.pid = pid;
        r.start_ticks = pid.and_then(proc_stat).map(|(_, t)| t);
        r.intent = Intent::Running;
        self.inner.write_record(&dir, &r)?;
        // Reap it when it exits, and say that something changed.
        let changes = self.inner.changes.clone();
        tokio::spawn(async move {
            let _ = child.wait().await;
            changes.send_modify(|v| *v += 1);
        });
        Ok(())
    }
    /// SIGTERM to the group, SIGKILL after the stop timeout.
    async fn stop(
        &self,
        session: &str,
        stop_timeout: Option<crate::model::Duration>,
    ) -> Result<(), ProviderError> {
        let dir = self.dir(session);
        let Some(mut r) = self.inner.read_record(&dir)? else {
            return Ok(());
        };
        let timeout = stop_timeout
            .or(r.spec.stop_timeout)
            .map(|d| d.std())
            .unwrap_or(Duration::from_secs(10));
        let leader = r.pid.filter(|_| alive(r.pid, r.start_ticks));
        let left = terminate_session(leader, &self.key(session), timeout).await;
        if !left.is_empty() {
            return Err(ProviderError::failed(
                "stop",
                session,
                format!(
                    "processes {} survived SIGKILL",
                    left.iter()
                        .map(i32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let _guard = self.inner.lock.lock().await;
        r.intent = Intent::Stopped;
        r.pid = None;
        r.start_ticks = None;
        self.inner.write_record(&dir, &r)
    }
    async fn destroy(
        &self,
        session: &str,
        stop_timeout: Option<crate::model::Duration>,
        retain: bool,
    ) -> Result<(), ProviderError> {
        let dir = self.dir(session);
        if !dir.exists() {
            return Ok(());
        }
        if self.inner.read_record(&dir).ok().flatten().is_some() {
            self.stop(session, stop_timeout).await?;
        }
        self.kill_orphans(session).await;
        let removed = super::local::keep_and_remove(
            &self.inner.root,
            &dir,
            &self.inner.kept,
            session,
            retain,
        )
        .await;
        // Whatever is left on disk is read again when it is next looked at.
        self.inner.forget_record(&dir);
        removed
    }
    async fn wait_healthy(
        &self,
        session: &str,
        port: &str,
        check: Option<&Health>,
    ) -> Result<(), ProviderError> {
        let dir = self.dir(session);
        let r = self.inner.read_record(&dir)?.ok_or_else(|| {
            ProviderError::failed("check health of", session, "it does not exist")
        })?;
        let Some(port) = r.ports.get(port).copied() else {
            return Err(ProviderError::failed(
                "check health of",
                session,
                format!("it has no port `{port}`"),
            ));
        };
        let path = check.map(|h| h.path.as_str());
        let addr = format!("127.0.0.1:{port}");
        let key = self.key(session);
        // A look at the record is cheap: look after every probe.
        super::health::wait_until_healthy(path, Duration::ZERO, Duration::ZERO, || async {
            let r = self
                .inner
                .read_record(&dir)?
                .ok_or_else(|| ProviderError::failed("check health of", session, "it went away"))?;
            if !alive(r.pid, r.start_ticks) && find_by_key(&key).is_empty() {
                return Err(ProviderError::failed(
                    "check health of",
                    session,
                    format!(
                        "it exited; its log ends with: {}",
                        log_tail(&dir.join("log"))
                    ),
                ));
            }
            Ok(Some(addr.clone()))
        })
        .await
    }
    async fn sync_source(
        &self,
        session: &str,
        path: &Path,
        exclude: &[String],
        save_to: &Option<PathBuf>,
    ) -> Result<(), ProviderError> {
        let dir = self.dir(session);
        super::local::sync_in(session, path, &dir.join("workspace"), exclude).await?;
        let _guard = self.inner.lock.lock().await;
        let mut r = self.inner.read_record(&dir)?.ok_or_else(|| {
            ProviderError::failed("sync source into", session, "it does not exist")
        })?;
        r.set_synced(path, exclude, save_to);
        self.inner.write_record(&dir, &r)
    }
    async fn save_work(&self, session: &str, path: &Path) -> Result<(), ProviderError> {
        let dir = self.dir(session);
        let exclude = self
            .inner
            .read_record(&dir)?
            .map(|r| r.synced.exclude)
            .unwrap_or_default();
        no_symlinks("save work of", session, path)?;
        super::local::save_out(session, &dir.join("workspace"), path, &exclude).await
    }
}

impl ComputeProvider for ProcessProvider {
    fn kind(&self) -> ComputeKind {
        ComputeKind::Process
    }

    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedSession>, ProviderError>> {
        Box::pin(self.observe_all())
    }

    fn unchanged(&self) -> bool {
        self.unchanged_since_observe()
    }

    fn resync(&self) {
        crate::lock_or_reset(&self.inner.records).stale = true;
    }

    fn apply<'a>(&'a self, action: &'a SessionAction) -> BoxFut<'a, Result<(), ProviderError>> {
        Box::pin(super::run_session_step(self, action))
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.inner.changes.subscribe())
    }

    /// From the session's record alone (a route to a session made this pass reads it).
    fn endpoints<'a>(
        &'a self,
        session: &'a str,
    ) -> BoxFut<'a, Result<BTreeMap<String, String>, ProviderError>> {
        Box::pin(async move {
            Ok(self
                .inner
                .read_record(&self.dir(session))?
                .map(|r| r.endpoints())
                .unwrap_or_default())
        })
    }

    fn pause<'a>(&'a self, session: &'a str) -> BoxFut<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let dir = self.dir(session);
            let _guard = self.inner.lock.lock().await;
            let r = self
                .inner
                .read_record(&dir)?
                .ok_or_else(|| ProviderError::failed("pause", session, "it does not exist"))?;
            let leader = r.pid.filter(|_| alive(r.pid, r.start_ticks));
            if leader.is_none() {
                return Err(ProviderError::failed("pause", session, "it is not running"));
            }
            // The whole group stops where it is: memory kept, no CPU. SIGCONT (a start)
            // resumes it.
            signal_session(leader, &self.key(session), Signal::SIGSTOP);
            Ok(())
        })
    }

    fn retained(
        &self,
    ) -> BoxFut<'_, Result<Vec<(String, crate::model::observed::RetainedWorkspace)>, ProviderError>>
    {
        Box::pin(self.inner.kept.list_now())
    }

    fn shutdown(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if !self.inner.config.keep_on_exit {
                self.stop_all().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider with its sessions and kept workspaces under `dir`.
    fn provider_in(dir: &Path, config: ProcessConfig) -> ProcessProvider {
        let kept = super::super::kept::Kept::new(
            dir.join("kept"),
            ComputeKind::Process,
            Duration::from_secs(60),
        );
        ProcessProvider::new(dir.join("s"), config, kept).expect("provider")
    }

    fn create_args<'a>(name: &'a str, spec: &'a RuntimeSpec, start: bool) -> CreateArgs<'a> {
        CreateArgs {
            session: name,
            spec,
            fingerprint: "f1",
            source_file: Path::new("s.yaml"),
            save_to: None,
            start,
            host: None,
            restore: false,
        }
    }

    /// A runtime, a provider in a new directory with ports from `port_base`, and a spec of
    /// one port running `command`.
    fn one_port_sessions(
        port_base: u16,
        command: &[&str],
    ) -> (
        tokio::runtime::Runtime,
        tempfile::TempDir,
        ProcessProvider,
        RuntimeSpec,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = ProcessConfig {
            port_base,
            ..ProcessConfig::default()
        };
        let p = provider_in(dir.path(), config);
        let spec: RuntimeSpec = serde_json::from_value(serde_json::json!({
            "compute": "process", "command": command, "ports": {"ide": 1}
        }))
        .expect("spec");
        (rt, dir, p, spec)
    }

    /// Records are kept in memory (a port released by a destroy is handed out again, the
    /// walk for a free port starts past the ones held) and a record changed on disk is read
    /// again, whoever changed it.
    #[test]
    fn records_in_memory_follow_the_disk_and_ports_are_reused() {
        // A base no other test uses; ports taken by something else are skipped anyway.
        let (rt, _dir, p, spec) = one_port_sessions(31500, &["/bin/true"]);
        let create = |name: &str| {
            rt.block_on(p.create(&create_args(name, &spec, false)))
                .expect("create");
        };
        let port = |name: &str| {
            p.inner
                .read_record(&p.dir(name))
                .expect("read")
                .expect("record")
                .ports["ide"]
        };
        create("a");
        create("b");
        let (a, b) = (port("a"), port("b"));
        assert!(b > a, "{a} {b}");
        rt.block_on(p.destroy("a", None, false)).expect("destroy");
        create("c");
        assert_eq!(port("c"), a, "the released port is handed out again");
        assert_ne!(port("c"), b);

        // Trusted once its times are older than RACY; then an edit by hand is still seen.
        std::thread::sleep(RACY + Duration::from_millis(100));
        let seen = rt.block_on(p.observe_all()).expect("observe");
        assert!(seen.iter().all(|s| s.fingerprint == "f1"));
        let file = p.dir("b").join(RECORD);
        let text = std::fs::read_to_string(&file).expect("record");
        std::fs::write(&file, text.replace("\"f1\"", "\"f2\"")).expect("edit");
        // Between resyncs observe answers from memory; the resync reads the disk again.
        let seen = rt.block_on(p.observe_all()).expect("observe");
        let b_now = seen.iter().find(|s| s.name == "b").expect("b");
        assert_eq!(b_now.fingerprint, "f1", "between resyncs, memory answers");
        ComputeProvider::resync(&p);
        let seen = rt.block_on(p.observe_all()).expect("observe");
        let b_now = seen.iter().find(|s| s.name == "b").expect("b");
        assert_eq!(
            b_now.fingerprint, "f2",
            "the edit on disk is seen at the resync"
        );
        // A directory removed by hand is gone at the resync, and its port is free again.
        std::fs::remove_dir_all(p.dir("c")).expect("rm");
        ComputeProvider::resync(&p);
        let seen = rt.block_on(p.observe_all()).expect("observe");
        assert!(seen.iter().all(|s| s.name != "c"), "{seen:?}");
        create("d");
        assert_eq!(
            port("d"),
            a,
            "the port of the removed directory is free again"
        );
    }

    /// `unchanged` says whether observe would report the same: false before the first
    /// observe, after a record changes, and when a process it saw running exits.
    #[test]
    fn unchanged_follows_records_and_processes() {
        let (rt, _dir, p, spec) = one_port_sessions(31550, &["/bin/sh", "-c", "sleep 30"]);
        assert!(!ComputeProvider::unchanged(&p), "never observed");
        rt.block_on(p.create(&create_args("a", &spec, true)))
            .expect("create");
        rt.block_on(p.observe_all()).expect("observe");
        assert!(ComputeProvider::unchanged(&p));
        rt.block_on(p.create(&create_args("b", &spec, false)))
            .expect("create");
        assert!(!ComputeProvider::unchanged(&p), "a record was written");
        let seen = rt.block_on(p.observe_all()).expect("observe");
        assert!(ComputeProvider::unchanged(&p));
        let a = seen.iter().find(|s| s.name == "a").expect("a");
        assert_eq!(a.state, SessionState::Running);
        // The process exits by itself: no record changes, and yet it shows.
        let pid = p
            .inner
            .read_record(&p.dir("a"))
            .expect("read")
            .expect("record")
            .pid
            .expect("pid");
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let gone = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            !ComputeProvider::unchanged(&p)
        });
        assert!(gone, "an exit is a change");
        let seen = rt.block_on(p.observe_all()).expect("observe");
        let a = seen.iter().find(|s| s.name == "a").expect("a");
        assert_eq!(a.state, SessionState::Failed, "down against its intent");
        assert!(ComputeProvider::unchanged(&p), "seen as it is now");
        ComputeProvider::resync(&p);
        assert!(!ComputeProvider::unchanged(&p), "a resync looks again");
    }

    /// At exit with `keep_on_exit: false`, the sessions that run are stopped, all of them
    /// (a process that takes its time on SIGTERM does not hold up the others), and one that
    /// was never started is left as it was.
    #[test]
    fn stop_at_exit_stops_what_runs_and_leaves_the_rest() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = ProcessConfig {
            port_base: 31600,
            keep_on_exit: false,
            ..ProcessConfig::default()
        };
        let p = provider_in(dir.path(), config);
        // Each leaves a second after its SIGTERM.
        let spec: RuntimeSpec = serde_json::from_value(serde_json::json!({
            "compute": "process",
            "command": ["/bin/sh", "-c", "trap 'sleep 1; exit 0' TERM; while :; do sleep 0.1; done"],
            "ports": {"ide": 1}
        }))
        .expect("spec");
        let create = |name: &str, start: bool| {
            rt.block_on(p.create(&create_args(name, &spec, start)))
                .expect("create");
        };
        for n in ["a", "b", "c"] {
            create(n, true);
        }
        create("idle", false);
        let idle = std::fs::read(p.dir("idle").join(RECORD)).expect("record");
        for n in ["a", "b", "c"] {
            assert!(!find_by_key(&p.key(n)).is_empty(), "{n} runs");
        }
        assert_eq!(
            sessions_with_processes(&p.inner.key_prefix),
            ["a", "b", "c"].map(String::from).into_iter().collect(),
            "one look at /proc finds the sessions that run"
        );
        rt.block_on(p.shutdown());
        for n in ["a", "b", "c"] {
            assert!(find_by_key(&p.key(n)).is_empty(), "{n} is stopped");
            let r = p
                .inner
                .read_record(&p.dir(n))
                .expect("read")
                .expect("record");
            assert_eq!(r.intent, Intent::Stopped);
        }
        assert_eq!(
            std::fs::read(p.dir("idle").join(RECORD)).expect("record"),
            idle,
            "a session that did not run is not written"
        );
    }

    #[test]
    fn placeholders_expand() {
        let r = Record {
            name: "alice".into(),
            spec: RuntimeSpec {
                compute: ComputeKind::Process,
                image: None,
                guest: None,
                template: None,
                clone: None,
                storage: None,
                pull: None,
                command: vec![],
                env: BTreeMap::new(),
                cpus: None,
                memory: None,
                disk: None,
                ports: BTreeMap::new(),
                health: None,
                firewall: None,
                hotplug: false,
                stop_timeout: None,
            },
            fingerprint: String::new(),
            source_file: PathBuf::new(),
            synced: Synced::default(),
            ports: [("ide".to_string(), 20001u16)].into_iter().collect(),
            intent: Intent::Running,
            pid: None,
            start_ticks: None,
        };
        let e = |a: &str| expand(a, &r, Path::new("/w"), Path::new("/bin/vessel"));
        assert_eq!(e("127.0.0.1:{port.ide}"), Ok("127.0.0.1:20001".into()));
        assert_eq!(e("{workspace}/x"), Ok("/w/x".into()));
        assert_eq!(e("{vessel}"), Ok("/bin/vessel".into()));
        assert_eq!(e("{session}"), Ok("alice".into()));
        assert_eq!(e("{other}"), Ok("{other}".into()));
        assert!(
            e("{port.app}")
                .unwrap_err()
                .to_string()
                .contains("no port `app`")
        );
    }

    #[test]
    fn our_own_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = std::process::id() as i32;
        let ticks = proc_stat(me).map(|(_, t)| t);
        assert!(ticks.is_some());
        assert!(alive(Some(me), ticks));
        assert!(!alive(Some(me), ticks.map(|t| t + 1)));
        assert!(!alive(None, None));
    }
}
