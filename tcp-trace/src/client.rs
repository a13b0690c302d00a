//! Connecting to an agent, over its Unix socket or TCP (with TLS when asked).
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{api::ListenAddr, proto::tcp_trace_client::TcpTraceClient};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "cannot reach the agent at {addr}: {source} (is `tcp-trace agent` running, and may you open its socket?{hint})"
    )]
    Unreachable {
        addr: String,
        source: tonic::transport::Error,
        hint: &'static str,
    },
    #[error("cannot read {flag} {path}: {source}")]
    TlsFile {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS needs --tls-ca (the CA that signed the agent's certificate)")]
    NoCa,
    #[error("--tls-cert and --tls-key go together (a client certificate and its key)")]
    HalfIdentity,
    #[error("TLS is for TCP addresses; a Unix socket is guarded by its file permissions")]
    TlsOverUnix,
    #[error("the TLS configuration does not work: {0}")]
    Tls(tonic::transport::Error),
    #[error(transparent)]
    Mismatch(#[from] Mismatch),
}

/// The client and the agent disagree on TLS. The transport reports these as TLS alerts or
/// HTTP/2 framing errors ("h2 protocol error", "transport error"), which say nothing a user can
/// act on; these say what to pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error(
        "the agent requires a client certificate: pass --tls-cert and --tls-key (signed by the CA of the agent's --tls-client-ca)"
    )]
    NeedsClientCertificate,
    #[error(
        "the agent refused the client certificate: pass --tls-cert/--tls-key signed by the CA of the agent's --tls-client-ca"
    )]
    ClientCertificateRefused,
    #[error(
        "the agent at {0} serves TLS: pass --tls-ca (the CA that signed its certificate), and --tls-cert/--tls-key if it requires client certificates"
    )]
    ServesTls(String),
    #[error(
        "the agent at {0} does not serve TLS: leave out --tls-ca, --tls-cert, --tls-key and --tls-domain"
    )]
    NotTls(String),
}

/// Recognises a TLS mismatch in a failed connection (`connected` false) or call (true), from the
/// error and its causes.
pub fn mismatch(
    addr: &ListenAddr,
    options: &ConnectOptions,
    connected: bool,
    error: &(dyn std::error::Error + 'static),
) -> Option<Mismatch> {
    let ListenAddr::Tcp(sock) = addr else {
        return None;
    };
    let text = causes(error);
    let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
    // The agent hung up: how h2 and the socket report it depends on who noticed first. When it
    // hangs up before the first request goes out (a loaded host can delay that request), hyper
    // says the connection "was not ready".
    let hung_up = [
        "connection closed",
        "broken pipe",
        "reset by peer",
        "connection was not ready",
    ];
    let refused = [
        "UnknownCA",
        "BadCertificate",
        "CertificateUnknown",
        "AccessDenied",
    ];
    match &options.tls {
        // TLS 1.3 lets the client finish its side of the handshake before the agent checks its
        // certificate: the refusal comes on the first call, as rustls's name of the agent's
        // alert or, when the agent hung up first, as a closed connection.
        Some(tls) if connected && tls.cert.is_none() => (has(&["CertificateRequired"])
            || has(&hung_up))
        .then_some(Mismatch::NeedsClientCertificate),
        Some(_) if connected => {
            (has(&refused) || has(&hung_up)).then_some(Mismatch::ClientCertificateRefused)
        }
        // A plain HTTP/2 server answers a ClientHello with bytes that are no TLS record, or
        // hangs up.
        Some(_) => (has(&[
            "InvalidContentType",
            "corrupt message",
            "InvalidMessage",
            "close_notify",
        ]) || has(&hung_up))
        .then(|| Mismatch::NotTls(sock.to_string())),
        // A TLS server answers the HTTP/2 preface with an alert record, which HTTP/2 reads as a
        // frame header with an impossible length, or hangs up.
        None if connected => (has(&["h2 protocol error", "frame with invalid size"])
            || has(&hung_up))
        .then(|| Mismatch::ServesTls(sock.to_string())),
        None => None,
    }
}

/// An error and its causes, as one line.
pub fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// How a client proves who the agent is, and optionally who it is itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA that signed the agent's certificate (PEM).
    pub ca: Option<PathBuf>,
    /// A client certificate and key (PEM), for agents that require them (mutual TLS).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name to check the agent's certificate against, when not the host in the address.
    pub domain: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectOptions {
    /// None: plain text (Unix sockets, loopback TCP).
    pub tls: Option<ClientTls>,
}

pub async fn connect(addr: &ListenAddr) -> Result<TcpTraceClient<Channel>, ConnectError> {
    connect_with(addr, &ConnectOptions::default()).await
}

pub async fn connect_with(
    addr: &ListenAddr,
    options: &ConnectOptions,
) -> Result<TcpTraceClient<Channel>, ConnectError> {
    Ok(TcpTraceClient::new(channel_with(addr, options).await?).max_decoding_message_size(64 << 20))
}

/// A gRPC channel to the agent, for its other services (health, reflection) too.
pub async fn channel(addr: &ListenAddr) -> Result<Channel, ConnectError> {
    channel_with(addr, &ConnectOptions::default()).await
}

pub async fn channel_with(
    addr: &ListenAddr,
    options: &ConnectOptions,
) -> Result<Channel, ConnectError> {
    let unreachable = |source| ConnectError::Unreachable {
        addr: addr.to_string(),
        source,
        hint: match (addr, &options.tls) {
            (ListenAddr::Tcp(_), None) => " Does it require TLS (--tls-ca)?",
            (ListenAddr::Tcp(_), Some(_)) => {
                " Does it serve TLS, and does it require a client certificate (--tls-cert, --tls-key)?"
            }
            _ => "",
        },
    };
    let channel = match addr {
        ListenAddr::Unix(path) => {
            if options.tls.is_some() {
                return Err(ConnectError::TlsOverUnix);
            }
            let path: PathBuf = path.clone();
            // The URI is required by the API but unused: the connector below decides.
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        tokio::net::UnixStream::connect(path)
                            .await
                            .map(TokioIo::new)
                    }
                }))
                .await
                .map_err(unreachable)?
        }
        ListenAddr::Tcp(sock) => {
            let scheme = if options.tls.is_some() {
                "https"
            } else {
                "http"
            };
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{sock}"))
                .expect("a socket address makes a valid URI");
            if let Some(tls) = &options.tls {
                endpoint = endpoint
                    .tls_config(tls.config()?)
                    .map_err(ConnectError::Tls)?;
            }
            endpoint
                .connect()
                .await
                .map_err(|err| match mismatch(addr, options, false, &err) {
                    Some(m) => ConnectError::Mismatch(m),
                    None => unreachable(err),
                })?
        }
    };
    Ok(channel)
}

impl ClientTls {
    fn config(&self) -> Result<ClientTlsConfig, ConnectError> {
        let read = |flag, path: &Path| {
            std::fs::read(path).map_err(|source| ConnectError::TlsFile {
                flag,
                path: path.to_owned(),
                source,
            })
        };
        let ca = self.ca.as_deref().ok_or(ConnectError::NoCa)?;
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read("--tls-cert", cert)?,
                    read("--tls-key", key)?,
                ));
            }
            (None, None) => {}
            _ => return Err(ConnectError::HalfIdentity),
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }
}
