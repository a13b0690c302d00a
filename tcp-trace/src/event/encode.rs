//! State changes straight to their protobuf encoding, without building a `proto::Event` first.
//!
//! State changes are most of the events (about ten of a connection's twelve). As `proto::Event`s
//! each allocated and freed six strings (two addresses, two task names, the context, the error
//! name), and prost's `encode` computed each nested message's length once per level above it:
//! together half the agent's time at full churn. This writes the same bytes (the tests compare
//! with prost's encoding of `convert::state_change` over many cases); the small messages without
//! strings (timestamps, durations, handshake, keepalive settings) still go through prost.
//!
//! Events are encoded without their seq (field 1): the bus numbers them later and sends the seq
//! in front, where prost puts it too (it writes fields in field-number order).
use std::net::{IpAddr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};
use prost::{
    Message,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint},
};

use super::{Clock, convert};
use crate::{
    lifecycle::{Connection, Direction, SocketMap},
    model::{Task, TcpState, Transition},
    proto,
};

/// Where a drain's events are encoded: each takes its slice off the front (`split`), so they
/// share a few allocations, freed once the last of them has been sent and left the replay buffer.
#[derive(Default)]
pub struct Encoder {
    buffer: BytesMut,
    /// The encoding of each followed connection's fields 1-8 (who it is and who owns it), by
    /// connection id, with what it was made from. Every state change carries them, and they
    /// change rarely (an owner found at accept, a port learned): written once, they are copied
    /// after. An entry goes with its connection's close ([`Encoder::forget`]).
    identities: SocketMap<Identity>,
    /// Buffers of forgotten entries, for the next connections.
    spare: Vec<Vec<u8>>,
}

/// What a connection's fields 1-8 are made of, and their encoding.
struct Identity {
    of: IdentityKey,
    bytes: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct IdentityKey {
    sock: u64,
    local: SocketAddr,
    remote: SocketAddr,
    netns: u32,
    direction: Direction,
    owner: (Option<Task>, proto::Attribution),
}

impl IdentityKey {
    fn of(c: &Connection) -> IdentityKey {
        IdentityKey {
            sock: c.sock,
            local: c.local(),
            remote: c.remote(),
            netns: c.netns,
            direction: c.direction,
            owner: convert::owner(c),
        }
    }
}

/// More cached identities than this (connections that ended without a close reaching the
/// encoder) and the cache starts again.
const MAX_IDENTITIES: usize = 1 << 20;

impl Encoder {
    /// Any event built as a message (the kinds other than state changes).
    pub fn message(&mut self, event: &proto::Event) -> Bytes {
        debug_assert_eq!(event.seq, 0, "the bus numbers events");
        self.reserve(event.encoded_len());
        event.encode_raw(&mut self.buffer);
        self.buffer.split().freeze()
    }

    /// The encoding of an event of connection `c` at `ts_ns` with `body`: the same bytes as
    /// the `proto::Event` `convert` builds with that body (`convert::closed`, `retransmit`,
    /// `keepalive`), without building its connection.
    pub fn with_connection(
        &mut self,
        ts_ns: u64,
        c: &Connection,
        clock: &Clock,
        body: &proto::event::Body,
    ) -> Bytes {
        self.reserve(512 + body.encoded_len());
        self.head(ts_ns, c, clock);
        body.encode(&mut self.buffer);
        self.buffer.split().freeze()
    }

    /// The encoding of `convert::state_change(t, c, clock)`.
    pub fn state_change(&mut self, t: &Transition, c: &Connection, clock: &Clock) -> Bytes {
        // A state change is a few hundred bytes at most (the buffer grows if not).
        self.reserve(1024);
        self.head(t.ts_ns, c, clock);
        let buf = &mut self.buffer;
        nested(buf, 10, |buf| {
            enumeration(buf, 1, convert::state(t.old) as i32);
            enumeration(buf, 2, convert::state(t.new) as i32);
            let task = t.context.task();
            let attribution = match task {
                Some(_) => proto::Attribution::ProcessContext,
                None => proto::Attribution::None,
            };
            nested(buf, 3, |buf| process(buf, task.copied(), attribution));
            string(buf, 4, t.context.describe());
            if t.new == TcpState::Established
                && let Some(handshake) = convert::handshake(c)
            {
                prost::encoding::message::encode(5, &handshake, buf);
            }
            varint(buf, 6, u64::from(t.error));
            string(buf, 7, &convert::errno_text(t.error));
        });
        self.buffer.split().freeze()
    }

    /// Event fields 2-4: time, kernel_time_ns and the connection, its identity copied when the
    /// cache has it as it is.
    fn head(&mut self, ts_ns: u64, c: &Connection, clock: &Clock) {
        if self.identities.len() >= MAX_IDENTITIES {
            self.identities.clear();
        }
        let (identities, spare) = (&mut self.identities, &mut self.spare);
        let buf = &mut self.buffer;
        prost::encoding::message::encode(2, &clock.timestamp(ts_ns), buf);
        varint(buf, 3, ts_ns);
        nested(buf, 4, |buf| {
            let of = IdentityKey::of(c);
            match identities.get_mut(&c.id) {
                Some(identity) if identity.of == of => buf.put_slice(&identity.bytes),
                found => {
                    let at = buf.len();
                    identity(buf, c);
                    let mut bytes = found
                        .map(|old| std::mem::take(&mut old.bytes))
                        .or_else(|| spare.pop())
                        .unwrap_or_default();
                    bytes.clear();
                    bytes.extend_from_slice(&buf[at..]);
                    identities.insert(c.id, Identity { of, bytes });
                }
            }
            connection_rest(buf, c, clock);
        });
    }

    /// Drops what is kept of a connection that ended.
    pub fn forget(&mut self, c: &Connection) {
        if let Some(identity) = self.identities.remove(&c.id)
            && self.spare.len() < 1024
        {
            self.spare.push(identity.bytes);
        }
    }

    /// Drops what is kept of every connection (events are no longer built), memory included.
    /// Called at every drain while nobody subscribes: a map cleared in place would still
    /// rewrite its whole table each time.
    pub fn forget_all(&mut self) {
        if self.identities.capacity() > 0 {
            self.identities = SocketMap::default();
            self.spare = Vec::new();
        }
    }

    fn reserve(&mut self, len: usize) {
        /// Room for a few hundred events: one allocation per drain at full churn.
        const CHUNK: usize = 64 << 10;
        if self.buffer.capacity() < len {
            self.buffer.reserve(len.max(CHUNK));
        }
    }
}

/// Fields 1-8 of `convert::connection(c, clock)`: who the connection is and who owns it.
fn identity(buf: &mut BytesMut, c: &Connection) {
    varint(buf, 1, c.id);
    varint(buf, 2, c.sock);
    varint(buf, 3, if c.local().is_ipv4() { 4 } else { 6 });
    nested(buf, 4, |buf| endpoint(buf, c.local()));
    nested(buf, 5, |buf| endpoint(buf, c.remote()));
    varint(buf, 6, u64::from(c.netns));
    enumeration(buf, 7, convert::direction(c.direction) as i32);
    let (task, attribution) = convert::owner(c);
    nested(buf, 8, |buf| process(buf, task, attribution));
}

/// Fields 9-12 of `convert::connection(c, clock)`: where it stands.
fn connection_rest(buf: &mut BytesMut, c: &Connection, clock: &Clock) {
    enumeration(buf, 9, convert::state(c.state) as i32);
    prost::encoding::message::encode(10, &clock.timestamp(c.opened_ns), buf);
    if let Some(latency) = c.handshake_ns().and_then(convert::duration) {
        prost::encoding::message::encode(11, &latency, buf);
    }
    if let Some(keepalive) = convert::keepalive_settings(c) {
        prost::encoding::message::encode(12, &keepalive, buf);
    }
}

fn endpoint(buf: &mut BytesMut, addr: SocketAddr) {
    encode_key(1, WireType::LengthDelimited, buf);
    match addr.ip() {
        IpAddr::V4(ip) => {
            let (text, len) = convert::ipv4_text(ip);
            encode_varint(len as u64, buf);
            buf.put_slice(&text[..len]);
        }
        IpAddr::V6(ip) => {
            // Rare enough for core::fmt; its text is 2 to 45 bytes: a one-byte length.
            let at = buf.len();
            buf.put_u8(0);
            // Writing into a BytesMut cannot fail.
            let _ = std::fmt::Write::write_fmt(buf, format_args!("{ip}"));
            buf[at] = (buf.len() - at - 1) as u8;
        }
    }
    varint(buf, 2, u64::from(addr.port()));
}

/// The fields of `convert::process`, or of `no_process` when there is no task.
fn process(buf: &mut BytesMut, task: Option<Task>, attribution: proto::Attribution) {
    if let Some(task) = task {
        varint(buf, 1, u64::from(task.pid));
        varint(buf, 2, u64::from(task.tid));
        string(buf, 3, task.comm());
    }
    enumeration(buf, 4, attribution as i32);
}

/// A uint32/uint64 field; proto3 leaves out zeros.
fn varint(buf: &mut BytesMut, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

/// An enum field: an int32 (negative values, which these enums do not have, take ten bytes).
fn enumeration(buf: &mut BytesMut, tag: u32, value: i32) {
    varint(buf, tag, value as i64 as u64);
}

fn string(buf: &mut BytesMut, tag: u32, value: &str) {
    if !value.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(value.len() as u64, buf);
        buf.put_slice(value.as_bytes());
    }
}

/// A message field, always present (as prost writes `Some` of an empty message). Its length is
/// known only once written: `body` writes after a one-byte placeholder, and the rare body of 128
/// bytes or more (an IPv6 connection) is moved up to make room for a longer length.
fn nested(buf: &mut BytesMut, tag: u32, body: impl FnOnce(&mut BytesMut)) {
    encode_key(tag, WireType::LengthDelimited, buf);
    let at = buf.len();
    buf.put_u8(0);
    body(buf);
    let len = buf.len() - at - 1;
    let width = encoded_len_varint(len as u64);
    if width > 1 {
        buf.put_bytes(0, width - 1);
        buf.copy_within(at + 1..at + 1 + len, at + width);
    }
    encode_varint(len as u64, &mut &mut buf[at..at + width]);
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use prost::Message as _;

    use super::*;
    use crate::{
        event::EncodedEvent,
        lifecycle::{KeepaliveDefaults, Peers, Table, testing::LIVES},
        model::{Accept, Context, KeepaliveOption, Retransmit, SocketOption},
    };

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn pick<T: Copy>(&mut self, from: &[T]) -> T {
            from[self.next() as usize % from.len()]
        }

        /// Often 0 or the largest value, else anything.
        fn edgy(&mut self, max: u64) -> u64 {
            match self.next() % 4 {
                0 => 0,
                1 => max,
                _ => self.next() & max,
            }
        }

        fn ip(&mut self, v6: bool) -> IpAddr {
            if !v6 {
                return IpAddr::V4(Ipv4Addr::from(self.edgy(u64::from(u32::MAX)) as u32));
            }
            match self.next() % 4 {
                0 => IpAddr::V6(Ipv6Addr::LOCALHOST),
                1 => IpAddr::V6(Ipv4Addr::from(self.next() as u32).to_ipv6_mapped()),
                2 => IpAddr::V6(Ipv6Addr::from(u128::from(self.next()))),
                _ => IpAddr::V6(Ipv6Addr::from(
                    u128::from(self.next()) << 64 | u128::from(self.next()),
                )),
            }
        }

        fn task(&mut self) -> Task {
            let mut comm = [0; 16];
            let len = self.next() as usize % 16;
            for b in &mut comm[..len] {
                *b = self.pick(b"abcxyz-_.09 ");
            }
            Task {
                pid: self.edgy(u64::from(u32::MAX)) as u32,
                tid: self.edgy(u64::from(u32::MAX)) as u32,
                comm,
            }
        }

        fn context(&mut self) -> Context {
            match self.next() % 3 {
                0 => Context::Process(self.task()),
                1 => Context::Kernel,
                _ => Context::Unknown,
            }
        }
    }

    #[test]
    fn events_of_a_connection_encode_exactly_as_prost_encodes_the_same_message() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let clock = Clock::now();
        let mut table = Table::new(100_000, Peers::new(1000, 1_000_000_000));
        let mut encoder = Encoder::default();
        let mut compared = 0;
        let mut compared_other = 0;
        for life in 0..2000u64 {
            let v6 = life % 2 == 1;
            let sock = rng.edgy(u64::MAX).max(1) ^ (life << 6);
            let netns = rng.edgy(u64::from(u32::MAX)) as u32;
            let local = SocketAddr::new(rng.ip(v6), rng.edgy(65535) as u16);
            let remote = SocketAddr::new(rng.ip(v6), rng.edgy(65535) as u16);
            let mut ts = rng.edgy(1 << 62);
            for (i, &(old, new)) in rng.pick(&LIVES).iter().enumerate() {
                ts += rng.next() % 10_000_000_000;
                let error = if new == TcpState::Close {
                    rng.pick(&[0, 0, 104, 110, 111, 113, 5, 999_999])
                } else {
                    0
                };
                let t = Transition::test(sock, ts, old, new)
                    .in_netns(netns)
                    .between(local, remote)
                    .by(rng.context())
                    .error(error)
                    .rtt(rng.edgy(u64::from(u32::MAX)) as u32, rng.edgy(7) as u32)
                    .bytes(rng.next(), rng.next());
                let c = table.apply(&t).connection;
                let seq = rng.edgy(u64::MAX);
                let (mut expected, _) = convert::state_change(&t, c, &clock);
                expected.seq = seq;
                let sent = EncodedEvent {
                    seq,
                    unnumbered: encoder.state_change(&t, c, &clock),
                };
                let sent = sent.encode_to_vec();
                assert_eq!(sent, expected.encode_to_vec(), "{t:?}\n{c:?}");
                assert_eq!(proto::Event::decode(&sent[..]).unwrap(), expected);
                compared += 1;
                // Keepalive settings and owners change what later events carry.
                if i == 0 && rng.next().is_multiple_of(2) {
                    let option = rng.pick(&[
                        KeepaliveOption::Enabled,
                        KeepaliveOption::Idle,
                        KeepaliveOption::Interval,
                        KeepaliveOption::Count,
                    ]);
                    let o = SocketOption {
                        ts_ns: ts,
                        sock,
                        netns,
                        option,
                        value: rng.edgy(100_000) as i32,
                        task: rng.task(),
                    };
                    if let Some((c, change)) = table.socket_option(&o, KeepaliveDefaults::LINUX) {
                        let body = convert::keepalive_body(&change, c);
                        let (expected, _) = convert::keepalive(ts, &change, c, &clock);
                        let sent = encoder.with_connection(ts, c, &clock, &body);
                        assert_eq!(&sent[..], &expected.encode_to_vec()[..], "{change:?}");
                        compared_other += 1;
                    }
                }
                if i == 1 && rng.next().is_multiple_of(2) {
                    let a = Accept {
                        ts_ns: ts,
                        sock,
                        netns,
                        task: rng.task(),
                    };
                    table.accepted(&a);
                }
                if i == 2 {
                    let r = Retransmit {
                        ts_ns: ts,
                        sock,
                        netns,
                        syn_ack: false,
                        state: new,
                        local,
                        remote,
                    };
                    if let Some(c) = table.retransmit(&r) {
                        let (expected, _) = convert::retransmit(&r, c, &clock);
                        let body = convert::retransmit_body(&r, c);
                        let sent = encoder.with_connection(r.ts_ns, c, &clock, &body);
                        assert_eq!(&sent[..], &expected.encode_to_vec()[..], "{r:?}");
                        compared_other += 1;
                    }
                }
            }
            let mut closed = Vec::new();
            table.end_batch(&mut closed);
            for c in &closed {
                let long_lived = rng.edgy(u64::MAX);
                let (expected, _) = convert::closed(c, &clock, long_lived);
                let body = convert::closed_body(c, long_lived);
                let sent = encoder.with_connection(c.last_ns, c, &clock, &body);
                assert_eq!(&sent[..], &expected.encode_to_vec()[..], "{c:?}");
                encoder.forget(c);
                compared_other += 1;
            }
        }
        assert!(compared > 6000);
        assert!(compared_other > 2000, "{compared_other}");
        // Unwatched, the cache is dropped whole, its memory with it.
        assert!(encoder.identities.capacity() > 0);
        encoder.forget_all();
        assert_eq!(encoder.identities.capacity(), 0);
        assert!(encoder.spare.is_empty());
    }
}
