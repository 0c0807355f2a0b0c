//! Who else may touch the store: the store holds the token-signing keys
//! and client ids, so its files must be its owner's alone, and so must the
//! directory they are in (whoever may write it may put files of their own
//! where SQLite will create its journal or log).
//!
//! What is refused, what is only warned about, and why:
//! - a data directory or store file that other users may **write**:
//!   refused, since they could have replaced or changed what it holds;
//! - a store file (or SQLite's file beside it) that others may **read**:
//!   made private at once, before SQLite opens it, with a warning that
//!   whoever read it may know its keys;
//! - a data directory that others may read or search: a warning (the
//!   files in it are private, but their names and sizes are not);
//! - a parent directory that others may write without the sticky bit: a
//!   warning (they could move the data directory aside and put their own
//!   in its place before the next start).

use std::{fs, path::Path};

use super::StoreOpenError;

/// Group and other write permission.
#[cfg(unix)]
const OTHERS_WRITE: u32 = 0o022;
/// Any group or other permission.
#[cfg(unix)]
const OTHERS_ANY: u32 = 0o077;
/// The sticky bit: in such a directory only a file's owner may rename or
/// remove it.
#[cfg(unix)]
const STICKY: u32 = 0o1000;

/// Refuses a data directory others may write; warns about one they may
/// read, and about a parent they may write.
#[cfg(unix)]
pub(super) fn check_directory(dir: &Path) -> Result<(), StoreOpenError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = fs::metadata(dir)
        .map_err(|source| StoreOpenError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .permissions()
        .mode();
    if mode & OTHERS_WRITE != 0 {
        return Err(StoreOpenError::NotPrivate {
            path: dir.to_path_buf(),
            detail: format!(
                "can be written by other users (mode {:04o}), who could put files of their own \
                 where the store's are created; make the directory its owner's alone \
                 (chmod 700) and start again",
                mode & 0o7777
            ),
        });
    }
    if mode & OTHERS_ANY != 0 {
        tracing::warn!(
            data_dir = %dir.display(),
            mode = format!("{:04o}", mode & 0o7777),
            "the data directory can be read by other users: the store's files in it are kept \
             private (0600), but make the directory its owner's alone (chmod 700)"
        );
    }
    let parent = fs::canonicalize(dir)
        .ok()
        .and_then(|d| d.parent().map(Path::to_path_buf));
    if let Some(parent) = parent
        && let Ok(meta) = fs::metadata(&parent)
    {
        let mode = meta.permissions().mode();
        if mode & OTHERS_WRITE != 0 && mode & STICKY == 0 {
            tracing::warn!(
                data_dir = %dir.display(),
                parent = %parent.display(),
                mode = format!("{:04o}", mode & 0o7777),
                "the data directory's parent can be written by other users and has no sticky \
                 bit: they could move the data directory aside and put one of their own in its \
                 place; keep the data directory in a directory only its owner may write"
            );
        }
    }
    Ok(())
}

/// Elsewhere there are no Unix permission bits to check.
#[cfg(not(unix))]
pub(super) fn check_directory(_dir: &Path) -> Result<(), StoreOpenError> {
    Ok(())
}

/// Refuses a store file (or a file of SQLite's beside it) that others may
/// write; makes one they may read private, before SQLite opens it, and
/// warns that its secrets may be known. A missing file passes.
#[cfg(unix)]
pub(super) fn check_file(path: &Path) -> Result<(), StoreOpenError> {
    use std::os::unix::fs::PermissionsExt as _;
    // What is not a file (gone, or a directory in a log's place) SQLite
    // refuses by itself.
    let Ok(meta) = fs::metadata(path) else {
        return Ok(());
    };
    if !meta.is_file() {
        return Ok(());
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & OTHERS_WRITE != 0 {
        return Err(StoreOpenError::NotPrivate {
            path: path.to_path_buf(),
            detail: format!(
                "can be written by other users (mode {mode:04o}), who could have changed the \
                 clients and signing keys it holds; check it, make it its owner's alone \
                 (chmod 600), and start again"
            ),
        });
    }
    if mode & OTHERS_ANY != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o700)).map_err(|e| {
            StoreOpenError::NotPrivate {
                path: path.to_path_buf(),
                detail: format!(
                    "can be read by other users (mode {mode:04o}) and this process cannot make \
                     it private ({e}); make it its owner's alone (chmod 600)"
                ),
            }
        })?;
        tracing::warn!(
            path = %path.display(),
            was = format!("{mode:04o}"),
            now = format!("{:04o}", mode & 0o700),
            "a store file could be read by other users and is private now; whoever read it may \
             know the token-signing keys and the client ids: to draw new keys, stop the broker \
             and run `DELETE FROM secrets` on it with sqlite3 (bearer, page and connection \
             tokens issued before stop working)"
        );
    }
    Ok(())
}

/// Elsewhere there are no Unix permission bits to check.
#[cfg(not(unix))]
pub(super) fn check_file(_path: &Path) -> Result<(), StoreOpenError> {
    Ok(())
}
