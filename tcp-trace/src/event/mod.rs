//! The product's event, built once: what the connection table's answers mean as events, their
//! wall-clock time, their protobuf encoding, and the keys the filters match them by.
//!
//! This stage sits between the table ([`crate::lifecycle`]) and the sequenced bus
//! ([`crate::bus`]): the agent's pipeline hands each answer to [`Events`], which encodes it once
//! into the drain's batch; the bus numbers and fans out those bytes; the gRPC service only
//! forwards them ([`EncodedEvent`]).
mod clock;
pub mod convert;
mod encode;

use std::net::SocketAddr;

use bytes::Bytes;

pub use clock::{Clock, clock_ns, thread_cpu};
pub use encode::Encoder;

use crate::{
    lifecycle::{Connection, KeepaliveChange},
    model::{Direction, Reset, Retransmit, TcpState, Transition},
    proto,
};

/// What an event says: the proto's `EventKind` without its unspecified value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EventKind {
    StateChange = 1,
    ConnectionClosed = 2,
    Lost = 3,
    Retransmit = 4,
    Reset = 5,
    Keepalive = 6,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::StateChange,
        EventKind::ConnectionClosed,
        EventKind::Lost,
        EventKind::Retransmit,
        EventKind::Reset,
        EventKind::Keepalive,
    ];

    /// The kind in the CLI's words (`--kind connection-closed`).
    pub fn name(self) -> &'static str {
        match self {
            EventKind::StateChange => "state-change",
            EventKind::ConnectionClosed => "connection-closed",
            EventKind::Lost => "lost",
            EventKind::Retransmit => "retransmit",
            EventKind::Reset => "reset",
            EventKind::Keepalive => "keepalive",
        }
    }
}

/// What a filter looks at, extracted once per event (or per connection for ListConnections).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keys {
    pub kind: EventKind,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The connection owner's pid, if known.
    pub pid: Option<u32>,
    pub netns: u32,
    /// The connection owner's task name, NUL padded; all zero when the owner is unknown.
    pub comm: [u8; 16],
    pub direction: Direction,
    /// The connection's state as the event leaves it; none for a reset sent without a socket.
    pub state: Option<TcpState>,
}

/// Turns the table's answers into encoded events, a drain at a time. Owns the clock (re-read
/// once per drain: NTP slews CLOCK_REALTIME) and the encoder whose buffer a drain's events share.
pub struct Events {
    clock: Clock,
    encoder: Encoder,
    /// This drain's events, encoded without their seq, with their keys: what the bus publishes.
    pub batch: Vec<(Bytes, Keys)>,
    /// Nobody subscribes: events are counted (so seqs stay exact and a resumed subscription is
    /// told what it missed), not built: building and encoding an event is most of the agent's
    /// work per record, wasted on a replay buffer nobody reads.
    pub unwatched: bool,
    /// Events counted, not built, this drain.
    pub skipped: u64,
    /// The kernel recorded only opens and closes when it recorded the latest transition.
    pub quiet: bool,
    /// This drain's events may lack state changes: the kernel was quiet at its start or for one
    /// of its transitions (the bus marks them for replay).
    pub unrecorded: bool,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            clock: Clock::now(),
            encoder: Encoder::default(),
            batch: Vec::with_capacity(1024),
            unwatched: false,
            skipped: 0,
            quiet: false,
            unrecorded: false,
        }
    }
}

impl Events {
    /// A state transition of `c`: the most frequent event, encoded by hand.
    pub fn state_change(&mut self, t: &Transition, c: &Connection) {
        if self.counted_only() {
            return;
        }
        let bytes = self.encoder.state_change(t, c, &self.clock);
        self.batch
            .push((bytes, convert::keys(c, EventKind::StateChange)));
    }

    pub fn retransmit(&mut self, r: &Retransmit, c: &Connection) {
        if self.counted_only() {
            return;
        }
        let body = convert::retransmit_body(r, c);
        self.push_of(r.ts_ns, c, EventKind::Retransmit, &body);
    }

    /// A reset of a known connection, or bare when it was sent without a socket.
    pub fn reset(&mut self, r: &Reset, c: Option<&Connection>) {
        if self.counted_only() {
            return;
        }
        let event = convert::reset(r, c, &self.clock);
        self.push(event);
    }

    pub fn keepalive(&mut self, ts_ns: u64, change: &KeepaliveChange, c: &Connection) {
        if self.counted_only() {
            return;
        }
        let body = convert::keepalive_body(change, c);
        self.push_of(ts_ns, c, EventKind::Keepalive, &body);
    }

    /// A connection's whole life, once it ended.
    pub fn closed(&mut self, c: &Connection, long_lived_ns: u64) {
        if self.counted_only() {
            return;
        }
        let body = convert::closed_body(c, long_lived_ns);
        self.push_of(c.last_ns, c, EventKind::ConnectionClosed, &body);
        self.encoder.forget(c);
    }

    /// The kernel lost records since the last check: `ring_full` found the ring full, `skipped`
    /// program runs the kernel skipped. Goes to every subscriber.
    pub fn kernel_lost(&mut self, ring_full: u64, skipped: u64) {
        let event = convert::kernel_lost(ring_full, skipped);
        self.push(event);
    }

    /// Called when a drain's batch was published.
    pub fn drain_done(&mut self) {
        self.clock = Clock::now();
        self.unrecorded = self.quiet;
        if self.unwatched {
            // Closes are not seen while unwatched: what the encoder keeps would outlive them.
            self.encoder.forget_all();
        }
    }

    /// Counts the event instead of building it while nobody subscribes.
    fn counted_only(&mut self) -> bool {
        self.skipped += u64::from(self.unwatched);
        self.unwatched
    }

    /// An event of connection `c` with `body`, encoded around the connection's cached identity.
    fn push_of(&mut self, ts_ns: u64, c: &Connection, kind: EventKind, body: &proto::event::Body) {
        let bytes = self.encoder.with_connection(ts_ns, c, &self.clock, body);
        self.batch.push((bytes, convert::keys(c, kind)));
    }

    fn push(&mut self, (event, keys): (proto::Event, Keys)) {
        self.batch.push((self.encoder.message(&event), keys));
    }
}

/// An `Event` already encoded: what the Subscribe stream sends (the server code is generated
/// with this type for `tcptrace.v1.Event`, see build.rs), so that an event goes to any number of
/// subscribers for one encoding and no copies of its strings.
///
/// The seq is written in front of the rest of the encoding as it is sent: field 1 comes first
/// in prost's encoding too, so the bytes are the same as those of the whole message.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedEvent {
    seq: u64,
    unnumbered: Bytes,
}

impl EncodedEvent {
    /// An event the bus numbered `seq`, from its encoding without the seq.
    pub fn new(seq: u64, unnumbered: Bytes) -> EncodedEvent {
        EncodedEvent { seq, unnumbered }
    }

    /// An event built as a message (the rare ones: Lost).
    pub fn message(mut event: proto::Event) -> EncodedEvent {
        use prost::Message as _;
        let seq = std::mem::take(&mut event.seq);
        EncodedEvent {
            seq,
            unnumbered: event.encode_to_vec().into(),
        }
    }
}

impl prost::Message for EncodedEvent {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        if self.seq != 0 {
            prost::encoding::uint64::encode(1, &self.seq, buf);
        }
        buf.put_slice(&self.unnumbered);
    }

    /// The server only sends events; should one ever be decoded, its fields are skipped.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        let seq = if self.seq != 0 {
            prost::encoding::uint64::encoded_len(1, &self.seq)
        } else {
            0
        };
        seq + self.unnumbered.len()
    }

    fn clear(&mut self) {
        *self = EncodedEvent::default();
    }
}
