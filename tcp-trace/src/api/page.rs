//! ListConnections in pages: the page token and the choice of one page, pure so that it is
//! tested without an agent.
//!
//! In the manner of the Kubernetes list API's `continue` token and AIP-158: a token names the
//! position of the last connection returned in the requested order, (order key, id), and the
//! next page starts strictly after it. Ids are unique for the agent's life, so positions are
//! totally ordered; connections that open or close between pages neither shift the others nor
//! make them repeat. A connection whose position does not change (every order but
//! handshake latency, whose key appears once the handshake completes) is listed exactly once
//! over the pages if it exists throughout.
use std::hash::{Hash as _, Hasher as _};

use prost::Message as _;

use crate::{lifecycle::Connection, proto};

/// Connections per page when the request asks for no page size.
pub const DEFAULT_PAGE_SIZE: usize = 1000;

/// Most bytes of connections in one response. gRPC clients refuse messages over 4 MiB unless
/// told otherwise (grpcio, grpc-java, grpc-go): this leaves half a MiB to the other fields and
/// the length prefix, which need a few dozen bytes.
pub const MAX_PAGE_BYTES: usize = 3584 << 10;

/// Token format version, the first byte: a token of another version is refused, not misread.
const VERSION: u8 = 1;
/// version, run, request, remaining, rank, id.
const TOKEN_BYTES: usize = 1 + 8 + 8 + 4 + 8 + 8;

/// Where a connection sorts in an order: by rank, then by id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    rank: u64,
    id: u64,
}

impl Position {
    pub fn of(order: proto::ConnectionOrder, c: &Connection) -> Position {
        let rank = match order {
            proto::ConnectionOrder::Unspecified | proto::ConnectionOrder::Id => 0,
            proto::ConnectionOrder::Age => c.opened_ns,
            // Slowest first; no handshake measured sorts last.
            proto::ConnectionOrder::HandshakeLatency => u64::MAX - c.handshake_ns().unwrap_or(0),
        };
        Position { rank, id: c.id }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "page_token is not one this agent gave out: pass the previous response's next_page_token unchanged, or none for the first page"
    )]
    Malformed,
    #[error(
        "page_token is from an earlier run of the agent, whose connection ids meant other connections: list again without page_token"
    )]
    OtherRun,
    #[error(
        "page_token continues a request with another filter, order or limit: send those of the first request with each page_token, or start again without one"
    )]
    OtherRequest,
}

/// The pages of one listing: the same filter, order and limit, in one run of the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listing {
    /// The agent run (its start, nanoseconds since the epoch): ids start again with the agent.
    run: u64,
    /// Filter, order and limit, hashed: a token continues only the request that made it.
    request: u64,
    limit: u32,
}

/// Where a page starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    /// After this position; None: at the first connection.
    after: Option<Position>,
    /// Connections still to come under the limit; usize::MAX without one.
    left: usize,
}

/// One page: its connections, and the token for the next one (empty after the last).
#[derive(Debug, PartialEq)]
pub struct Page<P> {
    pub items: Vec<P>,
    pub next_token: String,
}

impl Listing {
    pub fn new(run: u64, filter: &proto::Filter, order: i32, limit: u32) -> Listing {
        // The std hasher is fixed within one build, and a token outlives neither the run nor so
        // the build that hashed it.
        let mut hasher = std::hash::DefaultHasher::new();
        filter.encode_to_vec().hash(&mut hasher);
        order.hash(&mut hasher);
        limit.hash(&mut hasher);
        Listing {
            run,
            request: hasher.finish(),
            limit,
        }
    }

    /// Where the page asked for with `token` starts ("" for the first page).
    pub fn resume(&self, token: &str) -> Result<Resume, TokenError> {
        let unlimited = usize::MAX;
        if token.is_empty() {
            return Ok(Resume {
                after: None,
                left: match self.limit {
                    0 => unlimited,
                    n => n as usize,
                },
            });
        }
        let bytes = decode_hex(token).ok_or(TokenError::Malformed)?;
        let bytes: [u8; TOKEN_BYTES] = bytes.try_into().map_err(|_| TokenError::Malformed)?;
        let mut fields = Fields(&bytes[1..]);
        let (run, request, remaining) = (fields.u64(), fields.u64(), fields.u32());
        let after = Position {
            rank: fields.u64(),
            id: fields.u64(),
        };
        if bytes[0] != VERSION {
            return Err(TokenError::Malformed);
        }
        if run != self.run {
            return Err(TokenError::OtherRun);
        }
        if request != self.request {
            return Err(TokenError::OtherRequest);
        }
        let left = match (self.limit, remaining) {
            (0, 0) => unlimited,
            // Tokens are only given out while some of the limit is left.
            (limit, remaining) if limit > 0 && (1..=limit).contains(&remaining) => {
                remaining as usize
            }
            _ => return Err(TokenError::Malformed),
        };
        Ok(Resume {
            after: Some(after),
            left,
        })
    }

    /// The page that starts at `resume`: the first `page_size` (0: the default) of the
    /// `candidates` after it, fewer if their encoding would pass `max_bytes` (always one at
    /// least, so a listing advances), fewer if the limit ends first.
    pub fn page<T, P: prost::Message>(
        &self,
        resume: Resume,
        candidates: impl IntoIterator<Item = (Position, T)>,
        page_size: u32,
        max_bytes: usize,
        mut convert: impl FnMut(T) -> P,
    ) -> Page<P> {
        let take = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n as usize,
        }
        .min(resume.left);
        let mut rest: Vec<(Position, T)> = candidates
            .into_iter()
            .filter(|(position, _)| resume.after.is_none_or(|after| *position > after))
            .collect();
        let beyond_page = rest.len() > take;
        if beyond_page {
            // Only the first `take` need sorting.
            rest.select_nth_unstable_by_key(take, |(position, _)| *position);
            rest.truncate(take);
        }
        rest.sort_unstable_by_key(|(position, _)| *position);
        let chosen = rest.len();
        let mut items = Vec::with_capacity(chosen);
        let (mut bytes, mut last) = (0, None);
        for (position, item) in rest {
            let item = convert(item);
            // As a repeated field of the response: tag, length, message.
            let len = prost::encoding::message::encoded_len(1, &item);
            if bytes + len > max_bytes && !items.is_empty() {
                break;
            }
            bytes += len;
            last = Some(position);
            items.push(item);
        }
        let left = resume.left - items.len();
        let next_token = match last {
            Some(after) if left > 0 && (beyond_page || items.len() < chosen) => self.token(
                after,
                match self.limit {
                    0 => 0,
                    // left <= limit, a u32.
                    _ => left as u32,
                },
            ),
            _ => String::new(),
        };
        Page { items, next_token }
    }

    fn token(&self, after: Position, remaining: u32) -> String {
        let mut bytes = Vec::with_capacity(TOKEN_BYTES);
        bytes.push(VERSION);
        bytes.extend_from_slice(&self.run.to_be_bytes());
        bytes.extend_from_slice(&self.request.to_be_bytes());
        bytes.extend_from_slice(&remaining.to_be_bytes());
        bytes.extend_from_slice(&after.rank.to_be_bytes());
        bytes.extend_from_slice(&after.id.to_be_bytes());
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Big-endian integers read in turn from a slice known to be long enough.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().unwrap_or([0; N])
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take())
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != TOKEN_BYTES * 2 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: u64 = 1_700_000_000_123_456_789;

    fn at(id: u64) -> Position {
        Position { rank: 0, id }
    }

    /// Every page of a listing of `ids` (id order), with `page_size` and `max_bytes`, as the
    /// table stands at each page: `table(page number)`.
    fn pages(
        listing: &Listing,
        page_size: u32,
        max_bytes: usize,
        table: impl Fn(usize) -> Vec<u64>,
    ) -> Vec<Vec<u64>> {
        let mut token = String::new();
        let mut out = Vec::new();
        loop {
            let resume = listing.resume(&token).expect("the listing's own token");
            let ids = table(out.len());
            let page = listing.page(
                resume,
                ids.iter().map(|&id| (at(id), id)),
                page_size,
                max_bytes,
                |id| id,
            );
            out.push(page.items);
            if page.next_token.is_empty() {
                return out;
            }
            token = page.next_token;
            assert!(out.len() < 10_000, "the listing advances");
        }
    }

    fn listing(limit: u32) -> Listing {
        Listing::new(RUN, &proto::Filter::default(), 1, limit)
    }

    #[test]
    fn pages_list_every_connection_once_in_order() {
        let ids: Vec<u64> = (1..=2500).rev().collect();
        let got = pages(&listing(0), 1000, MAX_PAGE_BYTES, |_| ids.clone());
        assert_eq!(
            got.iter().map(Vec::len).collect::<Vec<_>>(),
            [1000, 1000, 500]
        );
        assert_eq!(got.concat(), (1..=2500).collect::<Vec<_>>());
    }

    #[test]
    fn a_listing_whose_last_page_is_full_ends_there_without_an_empty_page() {
        let got = pages(&listing(0), 10, MAX_PAGE_BYTES, |_| (1..=20).collect());
        assert_eq!(got, [(1..=10).collect::<Vec<_>>(), (11..=20).collect()]);
        assert_eq!(
            pages(&listing(0), 10, MAX_PAGE_BYTES, |_| Vec::new()),
            [Vec::<u64>::new()]
        );
    }

    #[test]
    fn connections_that_open_and_close_between_pages_do_not_move_the_others() {
        // Even ids live throughout; odd ones close after page 1, and at each page new ones
        // open with higher ids.
        let got = pages(&listing(0), 7, MAX_PAGE_BYTES, |page| {
            (1..=100)
                .filter(|id| id % 2 == 0 || page < 1)
                .chain(1000 + page as u64 * 10..1000 + page as u64 * 10 + 3)
                .collect()
        });
        let all = got.concat();
        let mut unique = all.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), all.len(), "no connection twice: {all:?}");
        for id in (2..=100).step_by(2) {
            assert!(all.contains(&id), "{id} lived throughout");
        }
    }

    #[test]
    fn the_limit_counts_over_all_pages() {
        let got = pages(&listing(25), 10, MAX_PAGE_BYTES, |_| (1..=100).collect());
        assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
        assert_eq!(got.concat(), (1..=25).collect::<Vec<_>>());
        // A limit of exactly a page ends there, with no empty page after.
        let got = pages(&listing(10), 10, MAX_PAGE_BYTES, |_| (1..=100).collect());
        assert_eq!(got, [(1..=10).collect::<Vec<_>>()]);
    }

    #[test]
    fn no_page_size_means_the_default() {
        let got = pages(&listing(0), 0, MAX_PAGE_BYTES, |_| (1..=1500).collect());
        assert_eq!(got[0].len(), DEFAULT_PAGE_SIZE);
        assert_eq!(got.concat().len(), 1500);
    }

    /// The largest connection the agent can describe: IPv6 endpoints, a full comm, every
    /// field set to values that need the most bytes.
    fn largest_connection(id: u64) -> proto::Connection {
        let endpoint = || proto::Endpoint {
            address: "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255".into(),
            port: 65535,
        };
        proto::Connection {
            id,
            sock: u64::MAX,
            ip_version: 6,
            local: Some(endpoint()),
            remote: Some(endpoint()),
            netns: u64::MAX,
            direction: proto::Direction::Passive as i32,
            owner: Some(proto::Process {
                pid: u32::MAX,
                tid: u32::MAX,
                comm: "x".repeat(15),
                attribution: proto::Attribution::None as i32,
            }),
            state: proto::TcpState::CloseWait as i32,
            opened_at: Some(prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: 999_999_999,
            }),
            handshake_latency: Some(prost_types::Duration {
                seconds: i64::MAX,
                nanos: 999_999_999,
            }),
            keepalive: Some(proto::KeepaliveSettings {
                enabled: true,
                idle_seconds: u32::MAX,
                interval_seconds: u32::MAX,
                count: u32::MAX,
                idle_set: true,
                interval_set: true,
                count_set: true,
            }),
        }
    }

    #[test]
    fn no_response_passes_4_mib_however_large_the_page_size() {
        let n = 40_000;
        let listing = listing(0);
        let (mut token, mut seen, mut pages) = (String::new(), Vec::new(), 0);
        loop {
            let resume = listing.resume(&token).expect("own token");
            let page = listing.page(
                resume,
                (1..=n).map(|id| (at(id), id)),
                u32::MAX,
                MAX_PAGE_BYTES,
                largest_connection,
            );
            seen.extend(page.items.iter().map(|c| c.id));
            let response = proto::ListConnectionsResponse {
                connections: page.items,
                matched: u64::MAX,
                next_page_token: page.next_token.clone(),
            };
            let len = response.encoded_len();
            assert!(len < 4 << 20, "page {pages}: {len} bytes");
            pages += 1;
            if page.next_token.is_empty() {
                break;
            }
            // Full pages are cut by bytes, not by count.
            assert!(len > 3 << 20, "page {pages}: only {len} bytes");
            token = page.next_token;
        }
        assert!(pages >= 2, "{n} connections fit one page");
        assert_eq!(seen, (1..=n).collect::<Vec<_>>());
    }

    #[test]
    fn a_connection_larger_than_the_byte_cap_still_comes_alone() {
        let got = pages(&listing(0), 100, 1, |_| (1..=3).collect());
        assert_eq!(got, [vec![1], vec![2], vec![3]]);
    }

    #[test]
    fn positions_sort_by_rank_then_by_id() {
        let a = Position { rank: 5, id: 9 };
        let b = Position { rank: 6, id: 1 };
        assert!(a < b, "rank before id");
        assert!(Position { rank: 5, id: 8 } < a, "id breaks ties");
    }

    #[test]
    fn tokens_from_other_requests_runs_or_hands_are_refused() {
        let first = listing(0);
        let page = first.page(
            first.resume("").expect("first page"),
            (1..=5).map(|id| (at(id), id)),
            2,
            MAX_PAGE_BYTES,
            |id| id,
        );
        let token = page.next_token;
        assert_eq!(first.resume(&token).map(|r| r.after), Ok(Some(at(2))));
        let by_port = proto::Filter {
            ports: vec![80],
            ..Default::default()
        };
        for (other, error) in [
            (
                Listing::new(RUN + 1, &proto::Filter::default(), 1, 0),
                TokenError::OtherRun,
            ),
            (Listing::new(RUN, &by_port, 1, 0), TokenError::OtherRequest),
            (
                Listing::new(RUN, &proto::Filter::default(), 2, 0),
                TokenError::OtherRequest,
            ),
            (
                Listing::new(RUN, &proto::Filter::default(), 1, 9),
                TokenError::OtherRequest,
            ),
        ] {
            assert_eq!(other.resume(&token), Err(error));
        }
        let mut wrong_version = token.clone();
        wrong_version.replace_range(0..2, "02");
        for bad in [
            "x",
            &token[..token.len() - 2],
            &format!("{token}00"),
            &token.replace(|c: char| c.is_ascii_digit(), "g"),
            &wrong_version,
            "é".repeat(TOKEN_BYTES).as_str(),
        ] {
            assert_eq!(first.resume(bad), Err(TokenError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn a_token_cannot_ask_for_more_than_the_limit() {
        let limited = listing(3);
        let forged = limited.token(at(1), 4);
        assert_eq!(limited.resume(&forged), Err(TokenError::Malformed));
        let spent = limited.token(at(1), 0);
        assert_eq!(limited.resume(&spent), Err(TokenError::Malformed));
        let fine = limited.token(at(1), 2);
        assert_eq!(limited.resume(&fine).map(|r| r.left), Ok(2));
    }
}
