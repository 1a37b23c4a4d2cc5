//! Job files: `.json` (one import_group_msg body or an array of them) and `.ndjson`/`.jsonl`
//! (one message per line, streamed so memory does not grow with the file). A line longer than
//! [`MAX_LINE_BYTES`] is a problem named by its line number and is never held whole: memory stays
//! bounded whatever the file holds. A `.json` file is parsed whole, so it may hold at most
//! [`MAX_JSON_FILE_BYTES`].
//!
//! The file's size, modification and change times are taken from the open handle before reading
//! and again after; when they moved (the file was written to meanwhile) or fewer bytes were read
//! than it held, nothing is queued and [`IngestError::Changed`] says so: the caller takes it again
//! once it stopped changing.
//!
//! A file is parsed and validated on a blocking thread while its messages are written to the
//! queue on the async side, all inside one `BEGIN IMMEDIATE` transaction: the first problem stops
//! the writing, the rest of the file is still validated so the report lists every problem, and the
//! transaction is rolled back. A crash (SIGKILL) at any instant leaves the file either queued once
//! (committed; a later run recognises its content hash) or not at all (uncommitted; the file is
//! still in the spool and is taken again). Cancellation rolls back the same way.
//!
//! A caller-given Random may appear once per group: a second message of the group with the same
//! value, in the same file or queued before by any job (given or assigned), is a problem naming
//! both lines, since Tencent would drop one of the two as a duplicate. Repeats within the file are
//! found while parsing; repeats of earlier jobs when the messages are written.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::validate::{self, Fields, Inherited, RawMessage};
use crate::store::{JobOutcome, NewMessage, Store, StoreError, unix_now};

/// At most this many problems are written to a report; the count covers all of them.
pub const MAX_REPORTED_PROBLEMS: usize = 10_000;
const BATCH: usize = 1024;

/// The longest NDJSON line read: a message is its MsgBody (at most 12,000 bytes as sent,
/// [`validate::MAX_BODY_BYTES`]) plus an envelope of a few short fields; the rest is room for
/// whitespace and escapes. A longer line cannot be a valid message and is skipped unread.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// The largest `.json` job file: it is parsed whole, so its size bounds the memory an ingest
/// takes. Larger exports are split, or written as `.ndjson` (streamed line by line).
pub const MAX_JSON_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// One problem in a job file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// 1-based line in the file (0 when the problem concerns the whole file).
    pub line: u64,
    /// 0-based index of the message in the file (counting every MsgList entry / NDJSON line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_index: Option<u64>,
    /// For `.json` files: 0-based index of the request body in the top-level array.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_index: Option<u64>,
    pub problem: String,
}

/// What became of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum FileOutcome {
    Accepted {
        job_id: i64,
        messages: i64,
        groups: i64,
    },
    /// The same bytes were queued before as `job_id`.
    Duplicate { job_id: i64 },
    /// Valid, not queued (`--dry-run`).
    Valid { messages: i64, groups: i64 },
    Rejected {
        problem_count: u64,
        problems: Vec<Problem>,
    },
}

/// An ingest that could not run to a verdict (the file stays where it is).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("ingest of {0} was cancelled; nothing of it was queued")]
    Cancelled(PathBuf),
    #[error(
        "{0} changed while it was read (its size or times moved); nothing of it was queued, it is taken again once it stops changing"
    )]
    Changed(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The kinds of job file, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Ndjson,
}

impl Format {
    /// `.json`, `.ndjson` or `.jsonl`; anything else is not a job file.
    pub fn of(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "json" => Some(Format::Json),
            "ndjson" | "jsonl" => Some(Format::Ndjson),
            _ => None,
        }
    }
}

enum Event {
    Batch(Vec<NewMessage>),
    Done {
        hash: String,
        problems: Vec<Problem>,
        problem_count: u64,
        messages: i64,
        groups: i64,
        whole: WholeGroups,
    },
}

/// The `Group` and `Members` parts of whole-group bodies.
#[derive(Default)]
struct WholeGroups {
    defs: Vec<(String, validate::GroupDef, u64)>,
    members: Vec<(String, crate::store::NewMember)>,
    /// Accounts listed with profile data (`AccountList`, NDJSON `{"UserID", ...}` lines).
    accounts: Vec<crate::store::NewAccount>,
}

impl WholeGroups {
    fn is_empty(&self) -> bool {
        self.defs.is_empty() && self.members.is_empty() && self.accounts.is_empty()
    }
}

/// Validates `path` and, with a store, queues it. `follow_symlinks` is false for the spool, where
/// a symlink must be rejected rather than followed.
pub async fn ingest_file(
    store: Option<&Store>,
    path: &Path,
    follow_symlinks: bool,
    cancel: &CancellationToken,
) -> Result<FileOutcome, IngestError> {
    let Some(format) = Format::of(path) else {
        return Ok(rejected_whole(format!(
            "unsupported file name {:?}: job files end in .json, .ndjson or .jsonl",
            path.file_name().unwrap_or_default()
        )));
    };
    let file = match open_regular(path, follow_symlinks) {
        Ok(f) => f,
        Err(OpenError::NotRegular(what)) => {
            return Ok(rejected_whole(format!(
                "not a regular file ({what}); not followed"
            )));
        }
        Err(OpenError::HardLinked(links)) => {
            return Ok(rejected_whole(hard_link_problem(links)));
        }
        Err(OpenError::Io(source)) => {
            return Err(IngestError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    // A second handle on the same open file, to see after reading whether it changed meanwhile.
    let probe = file.try_clone().map_err(|source| IngestError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let before = FileStamp::of(&probe).map_err(|source| IngestError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if format == Format::Json && before.size > MAX_JSON_FILE_BYTES {
        return Ok(rejected_whole(format!(
            "the file is {} bytes; a .json job file is read whole and may hold at most {} MiB: split it, or write it as .ndjson (one message per line, streamed)",
            before.size,
            MAX_JSON_FILE_BYTES >> 20
        )));
    }
    let (tx, mut rx) = mpsc::channel::<Event>(8);
    let now = unix_now();
    let parser = tokio::task::spawn_blocking(move || match format {
        Format::Ndjson => parse_ndjson(file, now, &tx),
        Format::Json => parse_json(file, now, &tx),
    });

    let mut writer = None;
    let mut clean = true;
    let mut verdict = None;
    let mut whole = WholeGroups::default();
    loop {
        let event = tokio::select! {
            e = rx.recv() => e,
            _ = cancel.cancelled() => {
                drop(rx);
                if let Some(w) = writer {
                    let w: crate::store::JobWriter = w;
                    w.rollback().await?;
                }
                let _ = parser.await;
                return Err(IngestError::Cancelled(path.to_path_buf()));
            }
        };
        match event {
            Some(Event::Batch(batch)) => {
                if !clean {
                    continue;
                }
                let Some(store) = store else { continue };
                if writer.is_none() {
                    writer = Some(store.job_writer("file", &display_name(path)).await?);
                }
                if let Some(w) = writer.as_mut() {
                    for m in batch {
                        w.push(m).await?;
                    }
                }
            }
            Some(Event::Done {
                hash,
                problems,
                problem_count,
                messages,
                groups,
                whole: w,
            }) => {
                whole = w;
                verdict = Some((hash, problems, problem_count, messages, groups));
            }
            None => break,
        }
        if let Some((_, _, count, _, _)) = &verdict
            && *count > 0
        {
            clean = false;
        }
    }
    let parse_result = parser.await.map_err(|e| IngestError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let read = match parse_result {
        Ok(read) => read,
        Err(source) => {
            if let Some(w) = writer {
                w.rollback().await?;
            }
            return Err(IngestError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let after = FileStamp::of(&probe).ok();
    if after != Some(before) || read != before.size {
        if let Some(w) = writer {
            w.rollback().await?;
        }
        return Err(IngestError::Changed(path.to_path_buf()));
    }
    let Some((hash, mut problems, mut problem_count, messages, groups)) = verdict else {
        return Err(IngestError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other("parser ended without a verdict"),
        });
    };
    // Randoms repeating those of earlier jobs (found as the messages were written).
    if let Some(w) = writer.as_mut() {
        let conflicts = w.take_conflicts().await?;
        if !conflicts.is_empty() {
            problem_count += conflicts.len() as u64;
            for c in &conflicts {
                if problems.len() < MAX_REPORTED_PROBLEMS {
                    problems.push(Problem {
                        line: u64::try_from(c.source_line).unwrap_or(0),
                        message_index: None,
                        body_index: None,
                        problem: c.describe(w.job_id()),
                    });
                }
            }
            problems.sort_by_key(|p| p.line);
        }
    }
    if problem_count > 0 {
        if let Some(w) = writer {
            w.rollback().await?;
        }
        return Ok(FileOutcome::Rejected {
            problem_count,
            problems,
        });
    }
    if messages == 0 && whole.is_empty() {
        if let Some(w) = writer {
            w.rollback().await?;
        }
        return Ok(rejected_whole("the file holds no message".into()));
    }
    if let Some(store) = store
        && !whole.is_empty()
    {
        if writer.is_none() {
            writer = Some(store.job_writer("file", &display_name(path)).await?);
        }
        if let Some(w) = writer.as_mut() {
            for (group, def, _) in &whole.defs {
                w.set_group_spec(group, &def.spec).await?;
            }
            for (group, m) in &whole.members {
                w.add_member(group, m).await?;
            }
            for a in std::mem::take(&mut whole.accounts) {
                w.add_account(a);
            }
        }
    }
    match (store, writer) {
        (None, _) => Ok(FileOutcome::Valid { messages, groups }),
        (Some(_), Some(w)) => Ok(match w.commit(Some(&hash)).await? {
            JobOutcome::Accepted {
                job_id,
                messages,
                groups,
            } => FileOutcome::Accepted {
                job_id,
                messages,
                groups,
            },
            JobOutcome::Duplicate { job_id } => FileOutcome::Duplicate { job_id },
        }),
        (Some(_), None) => Err(IngestError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other("messages counted but none written"),
        }),
    }
}

/// The file's name as text for the job's source and for logs: control characters and bytes that
/// are not UTF-8 escaped.
fn display_name(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    match path.file_name() {
        Some(n) => crate::telemetry::escape_bytes(n.as_bytes()),
        None => crate::telemetry::escape_bytes(path.as_os_str().as_bytes()),
    }
}

/// The problem reported for a spool file with more than one link.
pub fn hard_link_problem(links: u64) -> String {
    format!(
        "the file has {links} hard links: another name could change it while it is queued, and it is not moved or altered; drop a copy with a single link (write it elsewhere, then rename it into the spool)"
    )
}

/// Size, modification and change times and inode of an open file: equal before and after
/// reading means nothing wrote to it meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
}

impl FileStamp {
    fn of(file: &File) -> std::io::Result<FileStamp> {
        let m = file.metadata()?;
        Ok(FileStamp {
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            ino: m.ino(),
        })
    }
}

/// A verdict for the file as a whole (line 0).
pub fn rejected_whole(problem: String) -> FileOutcome {
    FileOutcome::Rejected {
        problem_count: 1,
        problems: vec![Problem {
            line: 0,
            message_index: None,
            body_index: None,
            problem,
        }],
    }
}

enum OpenError {
    NotRegular(&'static str),
    /// Spool files only: the file has this many links.
    HardLinked(u64),
    Io(std::io::Error),
}

/// Opens a regular file; with `follow_symlinks` false (the spool), a symlink is refused
/// (O_NOFOLLOW) rather than followed, and so is a FIFO, socket, device or directory (checked
/// before opening, so a FIFO is never opened, and again on the open handle), and a file with more
/// than one hard link.
fn open_regular(path: &Path, follow_symlinks: bool) -> Result<File, OpenError> {
    if !follow_symlinks {
        let meta = std::fs::symlink_metadata(path).map_err(OpenError::Io)?;
        if let Some(what) = not_regular(&meta.file_type()) {
            return Err(OpenError::NotRegular(what));
        }
    }
    let mut opts = OpenOptions::new();
    opts.read(true);
    let mut flags = libc::O_NONBLOCK; // never hang on a FIFO
    if !follow_symlinks {
        flags |= libc::O_NOFOLLOW;
    }
    opts.custom_flags(flags);
    let file = match opts.open(path) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(OpenError::NotRegular("a symbolic link"));
        }
        Err(e) => return Err(OpenError::Io(e)),
    };
    let meta = file.metadata().map_err(OpenError::Io)?;
    if let Some(what) = not_regular(&meta.file_type()) {
        return Err(OpenError::NotRegular(what));
    }
    if !follow_symlinks && meta.nlink() > 1 {
        return Err(OpenError::HardLinked(meta.nlink()));
    }
    Ok(file)
}

/// What a non-regular entry is, or `None` for a regular file.
pub fn not_regular(ft: &std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_file() {
        None
    } else if ft.is_symlink() {
        Some("a symbolic link")
    } else if ft.is_dir() {
        Some("a directory")
    } else if ft.is_fifo() {
        Some("a FIFO")
    } else if ft.is_socket() {
        Some("a Unix socket")
    } else {
        Some("a device")
    }
}

struct Collector<'a> {
    tx: &'a mpsc::Sender<Event>,
    batch: Vec<NewMessage>,
    problems: Vec<Problem>,
    problem_count: u64,
    messages: i64,
    /// The first (smallest) SendTime of each group seen.
    groups: crate::store::FastMap<String, i64>,
    whole: WholeGroups,
    next_index: u64,
    /// Caller-given Randoms seen, per group: the line and MsgList index that gave each (empty for
    /// files without Random).
    randoms: crate::store::FastMap<String, crate::store::FastMap<u32, (i64, i64)>>,
    /// The request body being parsed (.json arrays), for problems found per message.
    body_index: Option<u64>,
    /// UserIDs listed with profile data so far, and the line of each.
    account_lines: crate::store::FastMap<String, u64>,
    /// False once the receiver is gone (cancelled): stop parsing.
    open: bool,
}

impl<'a> Collector<'a> {
    fn new(tx: &'a mpsc::Sender<Event>) -> Self {
        Collector {
            tx,
            batch: Vec::with_capacity(BATCH),
            problems: Vec::new(),
            problem_count: 0,
            messages: 0,
            groups: crate::store::FastMap::default(),
            whole: WholeGroups::default(),
            next_index: 0,
            randoms: crate::store::FastMap::default(),
            body_index: None,
            account_lines: crate::store::FastMap::default(),
            open: true,
        }
    }

    fn problem(&mut self, line: u64, index: Option<u64>, body: Option<u64>, problem: String) {
        self.problem_count += 1;
        if self.problems.len() < MAX_REPORTED_PROBLEMS {
            self.problems.push(Problem {
                line,
                message_index: index,
                body_index: body,
                problem,
            });
        }
    }

    fn message(&mut self, m: NewMessage) {
        if let Some(r) = m.random
            && let Some(problem) = self.repeated_random(&m, r)
        {
            let line = u64::try_from(m.source_line).unwrap_or(0);
            let index = self.next_index.checked_sub(1);
            self.problem(line, index, self.body_index, problem);
            return;
        }
        self.messages += 1;
        match self.groups.get_mut(&m.group_id) {
            Some(t) => *t = (*t).min(m.send_time),
            None => {
                self.groups.insert(m.group_id.clone(), m.send_time);
            }
        }
        if self.problem_count == 0 {
            self.batch.push(m);
            if self.batch.len() >= BATCH {
                self.flush();
            }
        }
    }

    /// The problem when `r` repeats a Random given earlier in the file for the same group.
    fn repeated_random(&mut self, m: &NewMessage, r: u32) -> Option<String> {
        let seen = match self.randoms.get_mut(&m.group_id) {
            Some(s) => s,
            None => self.randoms.entry(m.group_id.clone()).or_default(),
        };
        match seen.entry(r) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert((m.source_line, m.source_index));
                None
            }
            std::collections::hash_map::Entry::Occupied(o) => {
                let (line, index) = *o.get();
                let index = if index > 0 {
                    format!(" (MsgList index {index})")
                } else {
                    String::new()
                };
                Some(format!(
                    "Random {r} repeats the Random given at line {line}{index} of this file in group {}: Tencent would drop one of the two as a duplicate; give another Random or none",
                    m.group_id
                ))
            }
        }
    }

    fn flush(&mut self) {
        if self.batch.is_empty() || !self.open {
            self.batch.clear();
            return;
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        if self.tx.blocking_send(Event::Batch(batch)).is_err() {
            self.open = false;
        }
    }

    fn finish(mut self, hash: String) {
        self.flush();
        // A group created by the job must be older than its first message.
        let checks: Vec<(u64, String)> = self
            .whole
            .defs
            .iter()
            .filter_map(|(group, def, line)| {
                let first = *self.groups.get(group)?;
                match def.create_time {
                    Some(ct) if ct >= first => Some((
                        *line,
                        format!(
                            "Group.CreateTime {ct} is not before the first SendTime {first} of group {group}'s messages"
                        ),
                    )),
                    None => Some((
                        *line,
                        format!(
                            "Group.CreateTime is required for group {group}: it must be before its first SendTime {first} (Tencent would date the group now, after every message)"
                        ),
                    )),
                    Some(_) => None,
                }
            })
            .collect();
        for (line, p) in checks {
            self.problem(line, None, None, p);
        }
        let groups = i64::try_from(self.groups.len()).unwrap_or(i64::MAX);
        let _ = self.tx.blocking_send(Event::Done {
            hash,
            problems: self.problems,
            problem_count: self.problem_count,
            messages: self.messages,
            groups,
            whole: self.whole,
        });
    }

    /// An account listed with profile data at `line` (`at` names it in problems).
    fn account(&mut self, v: &serde_json::Value, at: &str, line: u64) {
        match validate::account(v, at) {
            Ok(a) => {
                if let Some(first) = self.account_lines.get(&a.user_id) {
                    let p = format!(
                        "{at}: account {:?} is listed already at line {first}; list each account once",
                        a.user_id
                    );
                    self.problem(line, None, self.body_index, p);
                    return;
                }
                self.account_lines.insert(a.user_id.clone(), line);
                self.whole.accounts.push(a);
            }
            Err(ps) => {
                for p in ps {
                    self.problem(line, None, self.body_index, p);
                }
            }
        }
    }

    fn validate(
        &mut self,
        raw: Result<RawMessage<'_>, String>,
        inherited: Option<&Inherited>,
        now: i64,
        line: u64,
        body_index: Option<u64>,
        list_index: i64,
    ) {
        let index = self.next_index;
        self.next_index += 1;
        let line_i = i64::try_from(line).unwrap_or(i64::MAX);
        let result = raw
            .map_err(|e| vec![e])
            .and_then(|raw| Fields::from_raw(&raw))
            .and_then(|f| validate::message(&f, inherited, now, line_i, list_index));
        match result {
            Ok(m) => self.message(m),
            Err(problems) => {
                for p in problems {
                    self.problem(line, Some(index), body_index, p);
                }
            }
        }
    }
}

/// Reads one line (through its `\n`) into `buf`, hashing every byte, keeping at most `cap` bytes:
/// a longer line is consumed to its end without being kept. Returns the bytes consumed (0 at the
/// end of the file) and whether the line was too long.
fn read_line_bounded<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
    hasher: &mut Sha256,
) -> std::io::Result<(u64, bool)> {
    buf.clear();
    let mut consumed = 0u64;
    let mut too_long = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok((consumed, too_long));
        }
        let (chunk, ends) = match memchr::memchr(b'\n', available) {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        hasher.update(chunk);
        if !too_long {
            if buf.len() + chunk.len() > cap {
                too_long = true;
                buf.clear();
                buf.shrink_to(4096);
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        let n = chunk.len();
        reader.consume(n);
        consumed += n as u64;
        if ends {
            return Ok((consumed, too_long));
        }
    }
}

fn parse_ndjson(file: File, now: i64, tx: &mpsc::Sender<Event>) -> std::io::Result<u64> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut c = Collector::new(tx);
    let mut buf = Vec::with_capacity(4096);
    let mut line_no = 0u64;
    let mut read = 0u64;
    loop {
        // Room for the line's own "\r\n" on top of the limit.
        let (n, too_long) =
            read_line_bounded(&mut reader, &mut buf, MAX_LINE_BYTES + 2, &mut hasher)?;
        if n == 0 {
            break;
        }
        read += n;
        line_no += 1;
        if !c.open {
            continue;
        }
        if too_long {
            c.next_index += 1;
            c.problem(
                line_no,
                None,
                None,
                format!(
                    "the line is {n} bytes, longer than any message can be ({MAX_LINE_BYTES} bytes at most: a MsgBody takes at most {} bytes); it was not read",
                    validate::MAX_BODY_BYTES
                ),
            );
            continue;
        }
        let Ok(text) = std::str::from_utf8(&buf) else {
            c.problem(line_no, None, None, "the line is not valid UTF-8".into());
            continue;
        };
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        if let Some(m) = validate::fast_message(text, None, now, line_i64(line_no), 0) {
            c.next_index += 1;
            c.message(m);
            continue;
        }
        // An account line (`{"UserID", "Nick"?, "FaceUrl"?}`) rather than a message.
        if text.contains("\"UserID\"")
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(text)
            && validate::looks_like_account(&v)
        {
            c.account(&v, "the account", line_no);
            continue;
        }
        let raw = serde_json::from_str::<RawMessage<'_>>(text)
            .map_err(|e| format!("not a valid message object: {e}"));
        c.validate(raw, None, now, line_no, None, 0);
    }
    c.finish(hex::encode(hasher.finalize()));
    Ok(read)
}

/// A request body in a .json job file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBody<'a> {
    #[serde(rename = "GroupId", borrow, default)]
    group_id: Option<&'a RawValue>,
    #[serde(rename = "TopicId", borrow, default)]
    topic_id: Option<&'a RawValue>,
    #[serde(rename = "RecentContactFlag", borrow, default)]
    recent_contact_flag: Option<&'a RawValue>,
    #[serde(rename = "MsgList", borrow, default)]
    msg_list: Option<Vec<&'a RawValue>>,
    #[serde(rename = "Group", borrow, default)]
    group: Option<&'a RawValue>,
    #[serde(rename = "Members", borrow, default)]
    members: Option<&'a RawValue>,
    #[serde(rename = "AccountList", borrow, default)]
    account_list: Option<&'a RawValue>,
}

fn parse_json(file: File, now: i64, tx: &mpsc::Sender<Event>) -> std::io::Result<u64> {
    let mut bytes = Vec::new();
    // One byte past the limit at most: a file that grew meanwhile is caught by the size check.
    file.take(MAX_JSON_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    let read = bytes.len() as u64;
    let hash = hex::encode(Sha256::digest(&bytes));
    let mut c = Collector::new(tx);
    let Ok(text) = std::str::from_utf8(&bytes) else {
        c.problem(0, None, None, "the file is not valid UTF-8".into());
        c.finish(hash);
        return Ok(read);
    };
    let lines = LineIndex::new(text);
    let top: &RawValue = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            c.problem(
                u64::try_from(e.line()).unwrap_or(0),
                None,
                None,
                format!("not valid JSON: {e}"),
            );
            c.finish(hash);
            return Ok(read);
        }
    };
    let bodies: Vec<(&RawValue, Option<u64>)> = if top.get().trim_start().starts_with('[') {
        match serde_json::from_str::<Vec<&RawValue>>(top.get()) {
            Ok(v) => v
                .into_iter()
                .enumerate()
                .map(|(i, b)| (b, Some(i as u64)))
                .collect(),
            Err(e) => {
                c.problem(0, None, None, format!("not a JSON array of bodies: {e}"));
                c.finish(hash);
                return Ok(read);
            }
        }
    } else {
        vec![(top, None)]
    };
    for (raw_body, body_index) in bodies {
        c.body_index = body_index;
        let body_line = lines.line_of(text, raw_body.get());
        let body: RawBody<'_> = match serde_json::from_str(raw_body.get()) {
            Ok(b) => b,
            Err(e) => {
                c.problem(
                    body_line,
                    None,
                    body_index,
                    format!("invalid request body: {e}"),
                );
                continue;
            }
        };
        if let Some(raw) = body.account_list {
            let line = lines.line_of(text, raw.get());
            match serde_json::from_str::<Vec<&RawValue>>(raw.get()) {
                Ok(list) => {
                    for (i, item) in list.into_iter().enumerate() {
                        let item_line = lines.line_of(text, item.get());
                        match serde_json::from_str::<serde_json::Value>(item.get()) {
                            Ok(v) => c.account(&v, &format!("AccountList[{i}]"), item_line),
                            Err(e) => c.problem(
                                item_line,
                                None,
                                body_index,
                                format!("AccountList[{i}]: {e}"),
                            ),
                        }
                    }
                }
                Err(e) => c.problem(
                    line,
                    None,
                    body_index,
                    format!("AccountList must be an array of accounts: {e}"),
                ),
            }
            if body.group_id.is_none()
                && body.msg_list.is_none()
                && body.group.is_none()
                && body.members.is_none()
                && body.topic_id.is_none()
                && body.recent_contact_flag.is_none()
            {
                // A body of accounts only.
                continue;
            }
        }
        let mut inherited = Inherited::default();
        let mut body_ok = true;
        let mut fields = Fields::default();
        for (name, raw, slot) in [
            ("GroupId", body.group_id, &mut fields.group_id),
            ("TopicId", body.topic_id, &mut fields.topic_id),
            (
                "RecentContactFlag",
                body.recent_contact_flag,
                &mut fields.recent_contact_flag,
            ),
        ] {
            if let Some(r) = raw {
                match serde_json::from_str::<serde_json::Value>(r.get()) {
                    Ok(serde_json::Value::Null) => {}
                    Ok(v) => *slot = Some(v),
                    Err(e) => {
                        c.problem(body_line, None, body_index, format!("{name}: {e}"));
                        body_ok = false;
                    }
                }
            }
        }
        match validate::non_empty_string("GroupId", fields.group_id.as_ref()) {
            Ok(g) => inherited.group_id = Some(g),
            Err(e) => {
                c.problem(body_line, None, body_index, e);
                body_ok = false;
            }
        }
        match validate::optional_string("TopicId", fields.topic_id.as_ref()) {
            Ok(t) => inherited.topic_id = t,
            Err(e) => {
                c.problem(body_line, None, body_index, e);
                body_ok = false;
            }
        }
        match validate::recent_contact(fields.recent_contact_flag.as_ref()) {
            Ok(r) => inherited.recent_contact = r,
            Err(e) => {
                c.problem(body_line, None, body_index, e);
                body_ok = false;
            }
        }
        // The group itself and its members, for a whole-group job.
        let mut create_time = None;
        if let (Some(raw), Some(group)) = (body.group, inherited.group_id.as_ref()) {
            let line = lines.line_of(text, raw.get());
            match serde_json::from_str::<serde_json::Value>(raw.get())
                .map_err(|e| vec![format!("Group: {e}")])
                .and_then(|v| validate::group_def(group, &v, now))
            {
                Ok(def) => {
                    create_time = def.create_time;
                    c.whole.defs.push((group.clone(), def, line));
                }
                Err(ps) => ps
                    .into_iter()
                    .for_each(|p| c.problem(line, None, body_index, p)),
            }
        }
        if let (Some(raw), Some(group)) = (body.members, inherited.group_id.as_ref()) {
            let line = lines.line_of(text, raw.get());
            match serde_json::from_str::<serde_json::Value>(raw.get())
                .map_err(|e| vec![format!("Members: {e}")])
                .and_then(|v| validate::members(&v, create_time, now))
            {
                Ok(ms) => c
                    .whole
                    .members
                    .extend(ms.into_iter().map(|m| (group.clone(), m))),
                Err(ps) => ps
                    .into_iter()
                    .for_each(|p| c.problem(line, None, body_index, p)),
            }
        }
        let Some(list) = body.msg_list else {
            if body.group.is_none() && body.members.is_none() && body.account_list.is_none() {
                c.problem(body_line, None, body_index, "MsgList is missing".into());
            }
            continue;
        };
        for (i, raw_msg) in list.into_iter().enumerate() {
            let line = lines.line_of(text, raw_msg.get());
            if body_ok {
                let index = i64::try_from(i).unwrap_or(i64::MAX);
                if let Some(m) = validate::fast_message(
                    raw_msg.get(),
                    Some(&inherited),
                    now,
                    line_i64(line),
                    index,
                ) {
                    c.next_index += 1;
                    c.message(m);
                    continue;
                }
            }
            let raw = serde_json::from_str::<RawMessage<'_>>(raw_msg.get())
                .map_err(|e| format!("MsgList[{i}]: not a valid message object: {e}"));
            if body_ok {
                c.validate(
                    raw,
                    Some(&inherited),
                    now,
                    line,
                    body_index,
                    i64::try_from(i).unwrap_or(i64::MAX),
                );
            } else {
                c.next_index += 1;
            }
        }
    }
    c.finish(hash);
    Ok(read)
}

fn line_i64(line: u64) -> i64 {
    i64::try_from(line).unwrap_or(i64::MAX)
}

/// Byte offsets of line starts, to turn a borrowed slice of the file into its line number.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    /// The 1-based line where `slice` (a sub-slice of `text`) starts.
    fn line_of(&self, text: &str, slice: &str) -> u64 {
        let offset = (slice.as_ptr() as usize).saturating_sub(text.as_ptr() as usize);
        let line = match self.starts.binary_search(&offset) {
            Ok(i) => i + 1,
            Err(i) => i,
        };
        line as u64
    }
}
