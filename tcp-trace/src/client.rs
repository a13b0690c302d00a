//! Connecting to an agent, over its Unix socket or TCP.
use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::{api::ListenAddr, proto::tcp_trace_client::TcpTraceClient};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "cannot reach the agent at {addr}: {source} (is `tcp-trace agent` running, and may you open its socket?)"
    )]
    Unreachable {
        addr: String,
        source: tonic::transport::Error,
    },
}

pub async fn connect(addr: &ListenAddr) -> Result<TcpTraceClient<Channel>, ConnectError> {
    Ok(TcpTraceClient::new(channel(addr).await?).max_decoding_message_size(64 << 20))
}

/// A gRPC channel to the agent, for its other services (health, reflection) too.
pub async fn channel(addr: &ListenAddr) -> Result<Channel, ConnectError> {
    let unreachable = |source| ConnectError::Unreachable {
        addr: addr.to_string(),
        source,
    };
    let channel = match addr {
        ListenAddr::Unix(path) => {
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
        ListenAddr::Tcp(sock) => Endpoint::from_shared(format!("http://{sock}"))
            .expect("a socket address makes a valid URI")
            .connect()
            .await
            .map_err(unreachable)?,
    };
    Ok(channel)
}
