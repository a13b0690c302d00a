//! Where the agent listens: a Unix socket by default, TCP on loopback when asked.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    str::FromStr,
};

use tokio::net::{TcpListener, UnixListener};

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
         (the stream shows every connection on this host)"
    )]
    NotLoopback(SocketAddr),
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
    pub async fn bind(addrs: &[ListenAddr]) -> Result<Listeners, ListenError> {
        let mut listeners = Listeners {
            unix: vec![],
            tcp: vec![],
            bound: vec![],
            socket_files: vec![],
        };
        for addr in addrs {
            match addr {
                ListenAddr::Unix(path) => {
                    let listener = bind_unix(path).await?;
                    listeners.socket_files.push(path.clone());
                    listeners.unix.push((path.clone(), listener));
                    listeners.bound.push(addr.clone());
                }
                ListenAddr::Tcp(sock) => {
                    if !sock.ip().is_loopback() {
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

async fn bind_unix(path: &Path) -> Result<UnixListener, ListenError> {
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
            Listeners::bind(&[addr]).await,
            Err(ListenError::NotLoopback(_))
        ));
    }

    #[tokio::test]
    async fn unix_sockets_are_0660_replace_stale_files_and_vanish_on_drop() {
        let dir = std::env::temp_dir().join(format!("tcp-trace-listen-{}", std::process::id()));
        let path = dir.join("a.sock");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, b"stale").unwrap();
        let listeners = Listeners::bind(&[ListenAddr::Unix(path.clone())])
            .await
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let second = Listeners::bind(&[ListenAddr::Unix(path.clone())]).await;
        assert!(
            matches!(second, Err(ListenError::InUse(_))),
            "a live agent's socket is not taken over"
        );
        drop(listeners);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
