//! The agent's Unix socket files: made mode 0660 from birth, placed only where nothing but a
//! stale socket was, and removed on stop only if still the agent's own.
use std::{
    ffi::CString,
    os::unix::{
        ffi::OsStrExt,
        fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use tokio::net::UnixListener;

use super::{DEFAULT_SOCKET_DIR, ListenError};

/// A socket file the agent made. Dropping it removes the file, if the path still names that
/// socket (same device and inode): never a file someone put there since.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && meta.dev() == self.dev
            && meta.ino() == self.ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds a listener at `path`, mode 0660 and group `gid` from the moment the path exists.
///
/// The socket is bound inside a fresh directory of the agent's own (mode 0700, next to `path`,
/// so on the same filesystem), given its mode and group there, and then renamed into place.
/// Setting a umask around bind() instead would change it for every thread of the process,
/// and chmod after bind() leaves a window in which anyone may connect.
pub async fn bind(
    path: &Path,
    gid: Option<(u32, &str)>,
) -> Result<(UnixListener, SocketFile), ListenError> {
    let io = |source| ListenError::Io {
        addr: format!("unix:{}", path.display()),
        source,
    };
    let dir = parent_dir(path)?;
    let stale = match std::fs::symlink_metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => false,
        Err(err) => return Err(io(err)),
        Ok(meta) if meta.file_type().is_socket() => {
            // A live agent answers; a socket left by a crash (kill -9) does not, and is replaced.
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(ListenError::InUse(path.to_owned()));
            }
            true
        }
        Ok(meta) => {
            let kind = meta.file_type();
            let what = if kind.is_symlink() {
                "a symbolic link"
            } else if kind.is_dir() {
                "a directory"
            } else if kind.is_file() {
                "a regular file"
            } else {
                "a device or pipe"
            };
            return Err(ListenError::NotASocket {
                path: path.to_owned(),
                what,
            });
        }
    };

    let private = PrivateDir::create(&dir).map_err(io)?;
    let temporary = private.0.join("s");
    let listener = UnixListener::bind(&temporary).map_err(io)?;
    // Owner and group only: the stream shows every connection on the host.
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
    if let Some((gid, group)) = gid {
        std::os::unix::fs::chown(&temporary, None, Some(gid)).map_err(|source| {
            ListenError::Chown {
                path: path.to_owned(),
                group: group.to_owned(),
                source,
            }
        })?;
    }
    let meta = std::fs::symlink_metadata(&temporary).map_err(io)?;
    if stale {
        match std::fs::remove_file(path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(io(err)),
            _ => {}
        }
    }
    // Never over something that appeared meanwhile (another agent starting at the same time).
    rename_noreplace(&temporary, path).map_err(|err| {
        if err.kind() == std::io::ErrorKind::AlreadyExists {
            ListenError::InUse(path.to_owned())
        } else {
            io(err)
        }
    })?;
    drop(private);
    Ok((
        listener,
        SocketFile {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// The directory `path` goes in. It must exist, except the default's under /run (a tmpfs
/// emptied at boot), which is made root's, mode 0755: the socket's own mode and group decide
/// who connects, and `--socket-group` members must be able to reach it.
fn parent_dir(path: &Path) -> Result<PathBuf, ListenError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    if dir.is_dir() {
        return Ok(dir);
    }
    if dir == Path::new(DEFAULT_SOCKET_DIR) {
        let made = std::fs::DirBuilder::new().mode(0o755).create(&dir);
        match made {
            Ok(()) => {
                // The umask may have taken bits off.
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            }
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(err) => Err(err),
        }
        .map_err(|source| ListenError::Io {
            addr: format!("unix:{}", path.display()),
            source,
        })?;
        return Ok(dir);
    }
    Err(ListenError::NoDirectory {
        path: path.to_owned(),
        dir,
    })
}

/// A directory only root can enter, removed (with what is left in it) when dropped.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create(parent: &Path) -> std::io::Result<PrivateDir> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let mut attempts = 0;
        loop {
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = parent.join(format!(".tcp-trace.{}.{n}", std::process::id()));
            // mkdir fails on anything already there: only a directory made here is used.
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(PrivateDir(dir)),
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists && attempts < 100 => {
                    attempts += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0.join("s"));
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// rename(2) that fails with EEXIST instead of replacing what is at `to`.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    // A filesystem without RENAME_NOREPLACE: check, then rename (racy, but only there).
    if err.raw_os_error() == Some(libc::EINVAL) {
        if std::fs::symlink_metadata(to).is_ok() {
            return Err(std::io::ErrorKind::AlreadyExists.into());
        }
        return std::fs::rename(from, to);
    }
    Err(err)
}
