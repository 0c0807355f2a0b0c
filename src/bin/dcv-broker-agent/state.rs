//! What the agent keeps on disk in `state_dir` (mode 0700): the server id,
//! made once and kept forever, and the journal of the create and delete
//! instructions it carried out, so that an instruction the broker sends
//! again (after a reconnect, or either side restarting) is reported again
//! rather than run twice.
//!
//! The server id does not depend on the hostname or an IP address, unlike
//! DCV's agent's: a renamed or re-addressed host keeps its identity, and so
//! its closed state at the broker.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, BufRead, BufReader, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

const SERVER_ID_FILE: &str = "server-id";
const JOURNAL_FILE: &str = "journal.jsonl";
/// The journal is rewritten once it holds this many entries...
pub const JOURNAL_COMPACT_AT: usize = 4096;
/// ...keeping the entries of sessions that still exist, and at least this
/// many of the latest others: the broker re-sends only instructions still
/// waiting for an answer, which are a few per session at most.
pub const JOURNAL_KEEP_RECENT: usize = 1024;
/// A journal line longer than this was not written by us.
const MAX_JOURNAL_LINE: usize = 16 * 1024;

/// How an instruction went, as journalled and reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The instruction id.
    pub id: String,
    /// `create` or `delete`.
    pub kind: String,
    pub session: String,
    pub success: bool,
    #[serde(default)]
    pub reason: String,
}

/// The state directory.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Creates `dir` (0700) if needed; an existing directory that others
    /// may enter is tightened to 0700.
    pub fn open(dir: &Path) -> io::Result<StateDir> {
        DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let mode = fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        }
        Ok(StateDir {
            dir: dir.to_owned(),
        })
    }

    /// The server id: read from the state directory, or made (UUID v4) and
    /// written atomically the first time.
    pub fn server_id(&self) -> io::Result<String> {
        let path = self.dir.join(SERVER_ID_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => {
                let id = text.trim();
                if uuid::Uuid::parse_str(id).is_ok() {
                    return Ok(id.to_owned());
                }
                Err(io::Error::other(format!(
                    "{} does not hold a UUID; remove it to make a new server id (the broker \
                     will then see a new server)",
                    path.display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let id = uuid::Uuid::new_v4().to_string();
                write_atomically(&path, format!("{id}\n").as_bytes())?;
                Ok(id)
            }
            Err(e) => Err(e),
        }
    }

    /// The instruction journal.
    pub fn journal(&self) -> io::Result<Journal> {
        Journal::open(self.dir.join(JOURNAL_FILE))
    }
}

/// Writes through a private temporary file, fsynced, renamed into place,
/// and the directory fsynced: after a crash the file holds the old bytes or
/// the new ones, never a part.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("no parent directory"))?;
    let name = path
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// The journal of carried-out instructions: one JSON line each, appended
/// and fsynced before the result is reported.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    entries: VecDeque<Outcome>,
    /// Instruction id -> its index in `entries` (rebuilt by compaction).
    by_id: HashMap<String, usize>,
    /// [`JOURNAL_COMPACT_AT`] and [`JOURNAL_KEEP_RECENT`] (smaller in tests).
    compact_at: usize,
    keep_recent: usize,
}

impl Journal {
    fn open(path: PathBuf) -> io::Result<Journal> {
        let mut entries = VecDeque::new();
        match File::open(&path) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    let line = line?;
                    if line.len() > MAX_JOURNAL_LINE {
                        continue;
                    }
                    // A torn last line (a crash mid-append) is skipped: its
                    // instruction was not reported, so it will come again.
                    if let Ok(o) = serde_json::from_str::<Outcome>(&line) {
                        entries.push_back(o);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = append_file(&path)?;
        let mut j = Journal {
            path,
            file,
            entries: VecDeque::new(),
            by_id: HashMap::new(),
            compact_at: JOURNAL_COMPACT_AT,
            keep_recent: JOURNAL_KEEP_RECENT,
        };
        j.replace(entries);
        Ok(j)
    }

    fn replace(&mut self, entries: VecDeque<Outcome>) {
        self.by_id.clear();
        for (i, e) in entries.iter().enumerate() {
            self.by_id.insert(e.id.clone(), i);
        }
        self.entries = entries;
    }

    /// The outcome of the instruction `id`, if it was carried out.
    pub fn get(&self, id: &str) -> Option<&Outcome> {
        let i = *self.by_id.get(id)?;
        self.entries.get(i)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Appends and fsyncs one outcome.
    pub fn record(&mut self, outcome: Outcome) -> io::Result<()> {
        let mut line = serde_json::to_string(&outcome).map_err(io::Error::other)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.sync_data()?;
        self.by_id.insert(outcome.id.clone(), self.entries.len());
        self.entries.push_back(outcome);
        Ok(())
    }

    /// Whether the journal is due for [`Journal::compact`].
    pub fn wants_compaction(&self) -> bool {
        self.entries.len() >= self.compact_at
    }

    /// Rewrites the journal keeping the entries of sessions in `live` and
    /// the latest [`JOURNAL_KEEP_RECENT`] others.
    pub fn compact(&mut self, live: &HashSet<String>) -> io::Result<()> {
        let n = self.entries.len();
        let kept: VecDeque<Outcome> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(i, e)| live.contains(&e.session) || i + self.keep_recent >= n)
            .map(|(_, e)| e.clone())
            .collect();
        let mut text = String::new();
        for e in &kept {
            text.push_str(&serde_json::to_string(e).map_err(io::Error::other)?);
            text.push('\n');
        }
        write_atomically(&self.path, text.as_bytes())?;
        self.file = append_file(&self.path)?;
        self.replace(kept);
        Ok(())
    }
}

fn append_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("agent-state-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn outcome(id: &str, session: &str) -> Outcome {
        Outcome {
            id: id.into(),
            kind: "create".into(),
            session: session.into(),
            success: true,
            reason: String::new(),
        }
    }

    #[test]
    fn the_server_id_is_made_once_and_kept() {
        let d = dir("id");
        let state = StateDir::open(&d).unwrap();
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let id = state.server_id().unwrap();
        assert!(uuid::Uuid::parse_str(&id).is_ok());
        assert_eq!(StateDir::open(&d).unwrap().server_id().unwrap(), id);
        let file = d.join(SERVER_ID_FILE);
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::write(&file, "garbage").unwrap();
        assert!(
            state.server_id().is_err(),
            "a damaged id is not silently replaced"
        );
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn the_journal_survives_a_restart_and_a_torn_line() {
        let d = dir("journal");
        let state = StateDir::open(&d).unwrap();
        let mut j = state.journal().unwrap();
        j.record(outcome("i1", "s1")).unwrap();
        let mut failed = outcome("i2", "s2");
        failed.success = false;
        failed.reason = "dcv: no".into();
        j.record(failed.clone()).unwrap();
        drop(j);
        let mut f = OpenOptions::new()
            .append(true)
            .open(d.join(JOURNAL_FILE))
            .unwrap();
        f.write_all(b"{\"id\":\"i3\",\"ki").unwrap();
        let j = state.journal().unwrap();
        assert_eq!(j.len(), 2);
        assert!(j.get("i1").unwrap().success);
        assert_eq!(j.get("i2").unwrap(), &failed);
        assert!(j.get("i3").is_none());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn compaction_keeps_live_sessions_and_the_latest() {
        let d = dir("compact");
        let state = StateDir::open(&d).unwrap();
        let mut j = state.journal().unwrap();
        (j.compact_at, j.keep_recent) = (64, 16);
        let total = j.compact_at;
        for i in 0..total {
            j.record(outcome(&format!("i{i}"), &format!("s{i}")))
                .unwrap();
        }
        assert!(j.wants_compaction());
        let live: HashSet<String> = ["s0".to_string(), "s5".to_string()].into();
        j.compact(&live).unwrap();
        assert_eq!(j.len(), 16 + 2);
        assert!(!j.wants_compaction());
        assert!(j.get("i0").is_some() && j.get("i5").is_some());
        assert!(j.get("i6").is_none());
        assert!(j.get(&format!("i{}", total - 1)).is_some());
        j.record(outcome("new", "sn")).unwrap();
        drop(j);
        let j = state.journal().unwrap();
        assert_eq!(j.len(), 16 + 3);
        assert!(j.get("new").is_some() && j.get("i5").is_some());
        fs::remove_dir_all(d).unwrap();
    }
}
