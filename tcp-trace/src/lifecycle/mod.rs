//! The connection table: what a socket's transitions mean as one connection's life. Pure and
//! synchronous; the agent feeds it transitions in the order the kernel reserved their records.
//!
//! Per socket that order is the order of the transitions: `tcp_set_state()` runs under the socket
//! lock, and the record is reserved inside the tracepoint, before the lock is released.
//!
//! - [`connection`]: one connection's life and what it means (cause, who closed, bytes);
//! - [`table`]: the sockets followed now, fed the kernel's records;
//! - [`heal`]: the table held against the kernel's own socket list, after a loss;
//! - [`peers`]: aggregates per remote peer.
mod connection;
mod heal;
pub mod peers;
mod socket_map;
mod table;
#[cfg(test)]
pub(crate) mod testing;

pub use connection::{
    Cause, Closer, Connection, Keepalive, KeepaliveSettings, Owner, OwnerSource, Path,
};
pub use heal::Healed;
pub use peers::{PeerKey, PeerStats, Peers};
pub(crate) use socket_map::SocketMap;
pub use table::{Applied, KeepaliveChange, Table, UNRECORDED_WHEN_QUIET};

pub use crate::model::{Direction, KeepaliveDefaults};
