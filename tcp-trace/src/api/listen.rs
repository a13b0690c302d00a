//! Where the agent listens: a Unix socket by default (owner and group only), TCP on loopback
//! when asked, and TCP on other addresses only with TLS.
use std::{
    ffi::CString,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    str::FromStr,
};

use tokio::net::{TcpListener, UnixListener};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

pub const DEFAULT_SOCKET: &str = "/run/tcp-trace/tcp-trace.sock";

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
    #[error(
        "the TLS configuration does not work: {0} (are --tls-cert and --tls-key PEM files of one key pair?)"
    )]
    Tls(String),
}

/// Who may connect, besides where.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Group (name or number) given the Unix socket files; its members may connect.
    pub socket_group: Option<String>,
    /// TLS for the TCP listeners; required for addresses other than loopback.
    pub tls: Option<TlsFiles>,
}

/// PEM files for serving TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate signed by one of these (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Reads the files. The key pair itself is checked when the server is built with it.
    pub fn server_config(&self) -> Result<ServerTlsConfig, ListenError> {
        let read = |flag, path: &Path| {
            std::fs::read(path).map_err(|source| ListenError::TlsFile {
                flag,
                path: path.to_owned(),
                source,
            })
        };
        let identity = Identity::from_pem(
            read("--tls-cert", &self.cert)?,
            read("--tls-key", &self.key)?,
        );
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            // Without client_auth_optional, a client without a certificate from this CA is
            // refused in the handshake.
            config = config.client_ca_root(Certificate::from_pem(read("--tls-client-ca", ca)?));
        }
        Ok(config)
    }
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
    socket_files: Vec<PathBuf>,
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for path in &self.socket_files {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Listeners {
    /// Hands over the Unix socket files: removing them becomes the caller's job.
    pub fn take_socket_files(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.socket_files)
    }

    pub async fn bind(addrs: &[ListenAddr], access: &Access) -> Result<Listeners, ListenError> {
        let gid = access.socket_group.as_deref().map(group_id).transpose()?;
        let mut listeners = Listeners {
            unix: vec![],
            tcp: vec![],
            bound: vec![],
            socket_files: vec![],
        };
        for addr in addrs {
            match addr {
                ListenAddr::Unix(path) => {
                    let listener = bind_unix(path, gid, access.socket_group.as_deref()).await?;
                    listeners.socket_files.push(path.clone());
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

async fn bind_unix(
    path: &Path,
    gid: Option<u32>,
    group: Option<&str>,
) -> Result<UnixListener, ListenError> {
    let io = |source| ListenError::Io {
        addr: format!("unix:{}", path.display()),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if path.exists() {
        // A live agent answers; a stale file from a crash does not and is replaced.
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ListenError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    // Owner and group only: the stream shows every connection on the host.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
    if let (Some(gid), Some(group)) = (gid, group) {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|source| ListenError::Chown {
            path: path.to_owned(),
            group: group.to_owned(),
            source,
        })?;
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
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

    #[tokio::test]
    async fn unix_sockets_are_0660_replace_stale_files_and_vanish_on_drop() {
        let dir = std::env::temp_dir().join(format!("tcp-trace-listen-{}", std::process::id()));
        let path = dir.join("a.sock");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, b"stale").unwrap();
        let access = Access {
            socket_group: Some("4242".into()),
            tls: None,
        };
        let listeners = Listeners::bind(&[ListenAddr::Unix(path.clone())], &access)
            .await
            .unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(
            std::os::unix::fs::MetadataExt::gid(&meta),
            4242,
            "--socket-group"
        );
        let second = Listeners::bind(&[ListenAddr::Unix(path.clone())], &Access::default()).await;
        assert!(
            matches!(second, Err(ListenError::InUse(_))),
            "a live agent's socket is not taken over"
        );
        drop(listeners);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
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
