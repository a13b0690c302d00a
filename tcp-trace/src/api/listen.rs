//! Where the agent listens: a Unix socket by default (owner and group only), TCP on loopback
//! when asked, and TCP on other addresses only with TLS.
use std::{
    ffi::CString,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    str::FromStr,
};

use tokio::net::{TcpListener, UnixListener};

mod tls;
mod unix;
pub use tls::TlsFiles;
pub use unix::SocketFile;

pub const DEFAULT_SOCKET: &str = "/run/tcp-trace/tcp-trace.sock";
/// The one directory the agent creates for a socket: the default's, under /run (root's).
const DEFAULT_SOCKET_DIR: &str = "/run/tcp-trace";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Default for ListenAddr {
    fn default() -> Self {
        ListenAddr::Unix(PathBuf::from(DEFAULT_SOCKET))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

impl FromStr for ListenAddr {
    type Err = String;

    /// `unix:PATH`, `HOST:PORT`, or a bare `PORT` (loopback).
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, e.g. unix:/run/tcp-trace/tcp-trace.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Ok(port) = s.trim_start_matches(':').parse::<u16>() {
            return Ok(ListenAddr::Tcp(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                port,
            )));
        }
        let with_localhost = s.replacen("localhost:", "127.0.0.1:", 1);
        with_localhost
            .parse::<SocketAddr>()
            .map(ListenAddr::Tcp)
            .map_err(|_| format!("{s:?} is not unix:PATH, HOST:PORT ([::1]:PORT for IPv6) or PORT"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("another agent is already serving on {0}; stop it or choose another --listen")]
    InUse(PathBuf),
    #[error("cannot listen on {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "refusing to serve {0} without TLS: only loopback addresses may be used in plain text \
         (the stream shows every connection on this host); give --tls-cert and --tls-key, \
         and --tls-client-ca to require client certificates"
    )]
    NotLoopback(SocketAddr),
    #[error("--socket-group {0:?}: no such group on this host (see `getent group`)")]
    NoGroup(String),
    #[error("cannot give {path} to group {group}: {source}")]
    Chown {
        path: PathBuf,
        group: String,
        source: std::io::Error,
    },
    #[error("cannot read {flag} {path}: {source}")]
    TlsFile {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {path}: {problem}")]
    TlsMaterial {
        flag: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error(
        "--tls-key {key} is not the private key of the certificate in --tls-cert {cert}; \
         give the two halves of one key pair"
    )]
    TlsKeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the TLS configuration does not work: {0}")]
    Tls(String),
    #[error(
        "refusing to listen on {path}: it is {what}, not a socket; remove it yourself or \
         choose another --listen"
    )]
    NotASocket { path: PathBuf, what: &'static str },
    #[error(
        "cannot listen on {path}: the directory {dir} does not exist; create it (the agent \
         creates only {default_dir}) or choose another --listen",
        default_dir = DEFAULT_SOCKET_DIR
    )]
    NoDirectory { path: PathBuf, dir: PathBuf },
}

/// Who may connect, besides where.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Group (name or number) given the Unix socket files; its members may connect.
    pub socket_group: Option<String>,
    /// TLS for the TCP listeners; required for addresses other than loopback.
    pub tls: Option<TlsFiles>,
}

/// A group name (or number) as a gid.
pub fn group_id(group: &str) -> Result<u32, ListenError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let missing = || ListenError::NoGroup(group.to_owned());
    let name = CString::new(group).map_err(|_| missing())?;
    let mut buf = vec![0 as libc::c_char; 4096];
    loop {
        // SAFETY: all-zero is a valid `group` (null pointers, zero ids) for getgrnam_r to fill.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call, and buf's length is passed with it.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        return if rc == 0 && !found.is_null() {
            Ok(entry.gr_gid)
        } else {
            Err(missing())
        };
    }
}

/// Bound listeners; Unix socket files are removed when dropped.
pub struct Listeners {
    pub unix: Vec<(PathBuf, UnixListener)>,
    pub tcp: Vec<TcpListener>,
    /// Where each listener ended up (TCP port 0 resolved).
    pub bound: Vec<ListenAddr>,
    socket_files: Vec<SocketFile>,
}

impl Listeners {
    /// Hands over the Unix socket files: each removes itself when dropped.
    pub fn take_socket_files(&mut self) -> Vec<SocketFile> {
        std::mem::take(&mut self.socket_files)
    }

    pub async fn bind(addrs: &[ListenAddr], access: &Access) -> Result<Listeners, ListenError> {
        let group = access
            .socket_group
            .as_deref()
            .map(|name| group_id(name).map(|gid| (gid, name)))
            .transpose()?;
        let mut listeners = Listeners {
            unix: vec![],
            tcp: vec![],
            bound: vec![],
            socket_files: vec![],
        };
        for addr in addrs {
            match addr {
                ListenAddr::Unix(path) => {
                    let (listener, file) = unix::bind(path, group).await?;
                    listeners.socket_files.push(file);
                    listeners.unix.push((path.clone(), listener));
                    listeners.bound.push(addr.clone());
                }
                ListenAddr::Tcp(sock) => {
                    if !sock.ip().is_loopback() && access.tls.is_none() {
                        return Err(ListenError::NotLoopback(*sock));
                    }
                    let io = |source| ListenError::Io {
                        addr: addr.to_string(),
                        source,
                    };
                    let listener = TcpListener::bind(sock).await.map_err(io)?;
                    listeners
                        .bound
                        .push(ListenAddr::Tcp(listener.local_addr().map_err(io)?));
                    listeners.tcp.push(listener);
                }
            }
        }
        Ok(listeners)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn listen_addresses_parse_and_bare_ports_mean_loopback() {
        assert_eq!(
            "unix:/tmp/x.sock".parse(),
            Ok(ListenAddr::Unix("/tmp/x.sock".into()))
        );
        assert_eq!(
            "9000".parse(),
            Ok(ListenAddr::Tcp("127.0.0.1:9000".parse().unwrap()))
        );
        assert_eq!(
            ":9000".parse(),
            Ok(ListenAddr::Tcp("127.0.0.1:9000".parse().unwrap()))
        );
        assert_eq!(
            "localhost:9000".parse(),
            Ok(ListenAddr::Tcp("127.0.0.1:9000".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:9000".parse(),
            Ok(ListenAddr::Tcp("[::1]:9000".parse().unwrap()))
        );
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!(
            "nowhere"
                .parse::<ListenAddr>()
                .unwrap_err()
                .contains("is not unix:PATH")
        );
    }

    #[tokio::test]
    async fn plain_text_tcp_is_refused_off_loopback() {
        let addr = ListenAddr::Tcp("0.0.0.0:0".parse().unwrap());
        assert!(matches!(
            Listeners::bind(&[addr], &Access::default()).await,
            Err(ListenError::NotLoopback(_))
        ));
    }

    /// A directory of its own under the temporary directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir()
                .join(format!("tcp-trace-listen-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    async fn bind_one(path: &Path, access: &Access) -> Result<Listeners, ListenError> {
        Listeners::bind(&[ListenAddr::Unix(path.to_owned())], access).await
    }

    #[tokio::test]
    async fn unix_sockets_are_0660_replace_stale_sockets_and_vanish_on_drop() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
        let dir = Scratch::new("stale");
        let path = dir.0.join("a.sock");
        // A socket nobody serves any more: what a crashed agent leaves.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let access = Access {
            socket_group: Some("4242".into()),
            tls: None,
        };
        let listeners = bind_one(&path, &access).await.unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), 4242, "--socket-group");
        let second = bind_one(&path, &Access::default()).await;
        assert!(
            matches!(second, Err(ListenError::InUse(_))),
            "a live agent's socket is not taken over"
        );
        drop(listeners);
        assert!(!path.exists());
        let left: Vec<_> = std::fs::read_dir(&dir.0).unwrap().collect();
        assert!(left.is_empty(), "nothing left behind: {left:?}");
    }

    #[tokio::test]
    async fn anything_but_a_socket_at_the_path_is_refused_and_left_intact() {
        let dir = Scratch::new("refuse");
        let file = dir.0.join("file");
        std::fs::write(&file, b"precious").unwrap();
        let link = dir.0.join("link");
        std::os::unix::fs::symlink(dir.0.join("nowhere"), &link).unwrap();
        let subdir = dir.0.join("subdir");
        std::fs::create_dir(&subdir).unwrap();
        for (path, what) in [
            (&file, "a regular file"),
            (&link, "a symbolic link"),
            (&subdir, "a directory"),
        ] {
            let err = bind_one(path, &Access::default()).await.err().unwrap();
            assert!(
                matches!(&err, ListenError::NotASocket { what: w, .. } if *w == what),
                "{}: {err}",
                path.display()
            );
            assert!(err.to_string().contains(&path.display().to_string()));
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert!(subdir.is_dir());
        assert_eq!(
            std::fs::read_dir(&dir.0).unwrap().count(),
            3,
            "no leftovers"
        );
    }

    #[tokio::test]
    async fn a_missing_directory_is_refused_not_created() {
        let dir = Scratch::new("missing");
        let path = dir.0.join("not/there/a.sock");
        let err = bind_one(&path, &Access::default()).await.err().unwrap();
        assert!(matches!(err, ListenError::NoDirectory { .. }), "{err}");
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(!dir.0.join("not").exists());
    }

    #[tokio::test]
    async fn on_drop_a_file_that_replaced_the_socket_is_left_alone() {
        let dir = Scratch::new("replaced");
        let path = dir.0.join("a.sock");
        let listeners = bind_one(&path, &Access::default()).await.unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(listeners);
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
    }

    #[test]
    fn socket_groups_resolve_by_name_or_number() {
        assert_eq!(group_id("root").unwrap(), 0);
        assert_eq!(group_id("1234").unwrap(), 1234);
        assert!(
            group_id("no-such-group-here")
                .unwrap_err()
                .to_string()
                .contains("no such group")
        );
    }
}
