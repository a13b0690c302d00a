use super::*;

fn reference(event: &proto::Event) -> String {
    to_json(event, "tcptrace.v1.Event")
}

#[test]
fn events_use_the_proto3_json_mapping() {
    let event = proto::Event {
        seq: 7,
        time: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 500_000_000,
        }),
        kernel_time_ns: 123,
        connection: Some(proto::Connection {
            id: 3,
            local: Some(proto::Endpoint {
                address: "::1".into(),
                port: 8080,
            }),
            direction: proto::Direction::Passive as i32,
            ..Default::default()
        }),
        body: Some(Body::StateChange(proto::StateChange {
            old_state: proto::TcpState::Listen as i32,
            new_state: proto::TcpState::SynRecv as i32,
            task: None,
            context: "kernel".into(),
            ..Default::default()
        })),
    };
    let json: serde_json::Value = serde_json::from_str(&super::event(&event)).unwrap();
    assert_eq!(json["seq"], "7", "64-bit integers are strings");
    assert_eq!(json["time"], "2023-11-14T22:13:20.500Z");
    assert_eq!(json["kernelTimeNs"], "123");
    assert_eq!(json["connection"]["direction"], "DIRECTION_PASSIVE");
    assert_eq!(json["connection"]["local"]["port"], 8080);
    assert_eq!(json["stateChange"]["oldState"], "TCP_STATE_LISTEN");
    assert_eq!(json["stateChange"]["newState"], "TCP_STATE_SYN_RECV");
    assert!(
        json["connection"].get("sock").is_none(),
        "defaults are omitted"
    );
}

/// xorshift64*: varied but reproducible events, without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self) -> bool {
        self.below(2) == 0
    }

    /// 0 half the time (the default, omitted), else anything up to `max`.
    fn u32(&mut self, max: u32) -> u32 {
        if self.chance() {
            0
        } else {
            self.below(u64::from(max) + 1) as u32
        }
    }

    fn u64(&mut self) -> u64 {
        match self.below(4) {
            0 => 0,
            1 => u64::MAX,
            2 => self.below(1000),
            _ => self.next(),
        }
    }

    /// An enum value: mostly known ones (0 included), sometimes one this build does not know.
    fn enumeration(&mut self, known: i32) -> i32 {
        match self.below(10) {
            0 => 99,
            1 => -3,
            _ => self.below(known as u64 + 1) as i32,
        }
    }

    fn nanos(&mut self) -> i32 {
        match self.below(5) {
            0 => 0,
            1 => self.below(1000) as i32 * 1_000_000,
            2 => self.below(1_000_000) as i32 * 1_000,
            3 => 1,
            _ => self.below(1_000_000_000) as i32,
        }
    }

    fn string(&mut self) -> String {
        const PIECES: &[&str] = &[
            "",
            "curl",
            "kworker/0:1",
            "say \"hi\"",
            "back\\slash",
            "line\nbreak\ttab\r",
            "\u{1}\u{1f}\u{7f}",
            "caf\u{e9} \u{1f600}",
            "</script>",
        ];
        PIECES[self.below(PIECES.len() as u64) as usize].to_owned()
    }

    fn address(&mut self) -> String {
        const ADDRESSES: &[&str] = &[
            "127.0.0.1",
            "198.51.100.7",
            "::1",
            "2001:db8::1",
            "::ffff:198.51.100.7",
            "fe80::1%eth0",
        ];
        ADDRESSES[self.below(ADDRESSES.len() as u64) as usize].to_owned()
    }

    fn maybe<T>(&mut self, make: impl FnOnce(&mut Rng) -> T) -> Option<T> {
        if self.below(3) == 0 {
            None
        } else {
            Some(make(self))
        }
    }

    fn timestamp(&mut self) -> prost_types::Timestamp {
        let seconds = match self.below(4) {
            0 => 0,
            1 => 253_402_300_799,
            2 => 1_700_000_000 + self.below(10) as i64,
            _ => self.below(4_000_000_000) as i64,
        };
        prost_types::Timestamp {
            seconds,
            nanos: self.nanos(),
        }
    }

    fn duration(&mut self) -> prost_types::Duration {
        prost_types::Duration {
            seconds: match self.below(3) {
                0 => 0,
                1 => self.below(100) as i64,
                _ => self.below(315_576_000_000) as i64,
            },
            nanos: self.nanos(),
        }
    }

    fn endpoint(&mut self) -> proto::Endpoint {
        proto::Endpoint {
            address: if self.below(5) == 0 {
                String::new()
            } else {
                self.address()
            },
            port: self.u32(65535),
        }
    }

    fn process(&mut self) -> proto::Process {
        proto::Process {
            pid: self.u32(u32::MAX),
            tid: self.u32(4_000_000),
            comm: self.string(),
            attribution: self.enumeration(4),
        }
    }

    fn settings(&mut self) -> proto::KeepaliveSettings {
        proto::KeepaliveSettings {
            enabled: self.chance(),
            idle_seconds: self.u32(7200),
            interval_seconds: self.u32(75),
            count: self.u32(9),
            idle_set: self.chance(),
            interval_set: self.chance(),
            count_set: self.chance(),
        }
    }

    fn handshake(&mut self) -> proto::Handshake {
        proto::Handshake {
            latency: self.maybe(Rng::duration),
            retransmits: self.u32(6),
        }
    }

    fn connection(&mut self) -> proto::Connection {
        proto::Connection {
            id: self.u64(),
            sock: self.u64(),
            ip_version: self.u32(6),
            local: self.maybe(Rng::endpoint),
            remote: self.maybe(Rng::endpoint),
            netns: self.u64(),
            direction: self.enumeration(4),
            owner: self.maybe(Rng::process),
            state: self.enumeration(13),
            opened_at: self.maybe(Rng::timestamp),
            handshake_latency: self.maybe(Rng::duration),
            keepalive: self.maybe(Rng::settings),
        }
    }

    fn body(&mut self, kind: u64) -> Option<Body> {
        Some(match kind {
            0 => return None,
            1 => Body::StateChange(proto::StateChange {
                old_state: self.enumeration(13),
                new_state: self.enumeration(13),
                task: self.maybe(Rng::process),
                context: self.string(),
                handshake: self.maybe(Rng::handshake),
                error: self.u32(200),
                error_name: self.string(),
            }),
            2 => Body::ConnectionClosed(proto::ConnectionClosed {
                path: (0..self.below(8)).map(|_| self.enumeration(13)).collect(),
                duration: self.maybe(Rng::duration),
                seen_open: self.chance(),
                cause: self.enumeration(11),
                first_fin: self.enumeration(4),
                lifetime: self.enumeration(2),
                handshake: self.maybe(Rng::handshake),
                failed_handshake_retransmits: self.u32(6),
                retransmits: self.u32(u32::MAX),
                resets_sent: self.u32(3),
                resets_received: self.u32(3),
                error: self.u32(200),
                error_name: self.string(),
                keepalive: self.maybe(Rng::settings),
                keepalive_probes: self.u32(9),
                keepalive_unanswered: self.u32(9),
                srtt_us: self.u32(u32::MAX),
                bytes_sent: self.u64(),
                bytes_received: self.u64(),
            }),
            3 => Body::Lost(proto::Lost {
                count: self.u64(),
                stage: self.enumeration(4),
                ring_full: self.u64(),
                runs_skipped: self.u64(),
                first_seq: self.u64(),
            }),
            4 => Body::Retransmit(proto::Retransmit {
                state: self.enumeration(13),
                count: self.u32(100),
            }),
            5 => Body::Reset(proto::Reset {
                sent: self.chance(),
                reason: self.u32(100),
                without_socket: self.chance(),
            }),
            _ => Body::Keepalive(proto::Keepalive {
                what: self.enumeration(5),
                probe: self.u32(9),
                settings: self.maybe(Rng::settings),
                by: self.maybe(Rng::process),
            }),
        })
    }

    fn event(&mut self, kind: u64) -> proto::Event {
        proto::Event {
            seq: self.u64(),
            time: self.maybe(Rng::timestamp),
            kernel_time_ns: self.u64(),
            connection: self.maybe(Rng::connection),
            body: self.body(kind),
        }
    }
}

#[test]
fn the_event_writer_matches_the_descriptor_based_json_byte_for_byte() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut writer = EventWriter::default();
    let mut out = Vec::new();
    let mut kinds = [0usize; 7];
    for i in 0..20_000u64 {
        let kind = i % 7;
        kinds[kind as usize] += 1;
        let event = rng.event(kind);
        out.clear();
        writer.write(&mut out, &event);
        let ours = std::str::from_utf8(&out).expect("UTF-8");
        assert_eq!(ours, reference(&event), "{event:?}");
    }
    assert!(
        kinds.iter().all(|&n| n > 1000),
        "every body kind: {kinds:?}"
    );
}

#[test]
fn empty_and_default_messages_are_written_as_the_mapping_says() {
    let cases = [
        proto::Event::default(),
        proto::Event {
            connection: Some(proto::Connection::default()),
            body: Some(Body::Lost(proto::Lost::default())),
            ..Default::default()
        },
        proto::Event {
            time: Some(prost_types::Timestamp::default()),
            body: Some(Body::ConnectionClosed(proto::ConnectionClosed {
                duration: Some(prost_types::Duration::default()),
                handshake: Some(proto::Handshake::default()),
                ..Default::default()
            })),
            ..Default::default()
        },
        // Not normalised, or negative: written as prost-types normalises them.
        proto::Event {
            body: Some(Body::StateChange(proto::StateChange {
                handshake: Some(proto::Handshake {
                    latency: Some(prost_types::Duration {
                        seconds: -2,
                        nanos: -500_000_000,
                    }),
                    retransmits: 0,
                }),
                ..Default::default()
            })),
            ..Default::default()
        },
    ];
    for event in cases {
        assert_eq!(super::event(&event), reference(&event), "{event:?}");
    }
    assert_eq!(super::event(&proto::Event::default()), "{}");
}

#[test]
fn consecutive_events_in_one_second_and_across_seconds_keep_their_own_time() {
    let mut writer = EventWriter::default();
    for (seconds, nanos) in [
        (10, 5),
        (10, 999_999_999),
        (11, 0),
        (10, 1_000),
        (86_400, 0),
    ] {
        let event = proto::Event {
            time: Some(prost_types::Timestamp { seconds, nanos }),
            ..Default::default()
        };
        let mut out = Vec::new();
        writer.write(&mut out, &event);
        assert_eq!(String::from_utf8(out).unwrap(), reference(&event));
    }
}
