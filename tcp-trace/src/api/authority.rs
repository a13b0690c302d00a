//! Makes the Unix socket usable by gRPC clients that send the socket path as `:authority`.
//!
//! gRPC's C core (Python grpcio, Ruby, C++, PHP) and grpc-java name a Unix socket target's
//! authority after its path: grpcio 1.85 sends `run%2Ftcp-trace%2Ftcp-trace.sock` for
//! `unix:/run/tcp-trace/tcp-trace.sock` (grpc/grpc#38142), grpc-java the path itself
//! (grpc-java#12664). Neither is an RFC 3986 authority. h2 parses `:authority` with
//! `http::uri::Authority` when it turns a HEADERS frame into a request (`Peer::convert_poll_message`
//! in h2's server.rs) and resets the stream with PROTOCOL_ERROR if that fails, before hyper or
//! tonic see the request. Neither h2, hyper nor tonic has a setting to relax it: the h2 change
//! that would (hyperium/h2#487) has been open since 2020, and the clients keep their behaviour
//! (grpc-go, grpc-js and grpcurl#442 switched to `localhost`). So the server must normalise the
//! authority before h2 reads it, in the byte stream.
//!
//! [`LocalAuthority`] wraps an accepted Unix stream. It passes every frame through untouched
//! except header blocks (HEADERS and CONTINUATION frames from the client), which it decodes with
//! HPACK and encodes again, `:authority` replaced by `localhost` when it is not a valid authority
//! (the convention of grpc-go, Kubernetes and the h2 pull request). A header block cannot be
//! patched in place: its fields may be Huffman-coded or refer to the dynamic table that earlier
//! blocks built, so a changed entry would leave h2's table out of step with the client's. The
//! blocks are therefore re-encoded with every field a plain literal that is not indexed: h2's
//! decoder table stays empty and can never disagree with anything. The cost is one decode and
//! encode of each request's headers, on the local socket only; responses (the event stream) go
//! out untouched, and TCP listeners do not use this at all.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::{codegen::http::uri::Authority, transport::server::Connected};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The initial SETTINGS_MAX_FRAME_SIZE, which every HTTP/2 peer accepts (the agent keeps it).
const MAX_FRAME: usize = 16_384;
/// The initial SETTINGS_HEADER_TABLE_SIZE of h2's decoder, which the agent keeps: the most a
/// client's encoder may use, so the most the mirror of its table may grow to.
const TABLE_SIZE: usize = 4_096;
/// Largest header block buffered. hyper refuses header lists over 16 KiB; this only bounds
/// the memory a broken client can make the adapter hold.
const MAX_BLOCK: usize = 1 << 20;
/// Largest header list re-encoded, counted as HTTP/2 does (name + value + 32 per field). One
/// byte can name a 4 KiB table entry, so this bounds what a small block expands to; it is far
/// above the 16 KiB hyper accepts, so only requests h2 would refuse anyway are cut short.
const MAX_LIST: usize = 1 << 20;
/// What an unusable authority becomes.
const LOCALHOST: &[u8] = b"localhost";

/// A Unix stream whose inbound HTTP/2 header blocks carry a valid `:authority` (see the module
/// documentation). Writes pass straight through.
pub struct LocalAuthority<S> {
    inner: S,
    rewriter: Rewriter,
    /// The client closed its side: what is left of `rewriter`'s input has been handed over.
    eof: bool,
}

impl<S> LocalAuthority<S> {
    pub fn new(inner: S) -> LocalAuthority<S> {
        LocalAuthority {
            inner,
            rewriter: Rewriter::default(),
            eof: false,
        }
    }
}

impl<S: Connected> Connected for LocalAuthority<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LocalAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let output = &mut this.rewriter.output;
            if !output.is_empty() {
                let n = output.len().min(buf.remaining());
                buf.put_slice(&output.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // A truncated frame goes to h2 as it is: it reports the truncation itself.
                this.eof = true;
                this.rewriter.flush();
            } else {
                this.rewriter.input.extend_from_slice(read.filled());
                this.rewriter.rewrite()?;
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LocalAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The client-to-server byte stream, from `input` to `output`, header blocks re-encoded.
struct Rewriter {
    input: BytesMut,
    output: BytesMut,
    /// The connection preface has been passed on.
    started: bool,
    /// Not HTTP/2 with prior knowledge: everything passes through, for h2 to refuse.
    transparent: bool,
    /// Payload bytes of the current other frame still to pass through.
    passing: usize,
    /// A header block whose END_HEADERS has not arrived yet.
    block: Option<Block>,
    /// Mirrors the client encoder's dynamic table, block after block.
    decoder: loona_hpack::Decoder<'static>,
}

impl Default for Rewriter {
    fn default() -> Rewriter {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Rewriter {
            input: BytesMut::new(),
            output: BytesMut::new(),
            started: false,
            transparent: false,
            passing: 0,
            block: None,
            decoder,
        }
    }
}

struct Block {
    stream: u32,
    /// END_STREAM and PRIORITY, as the HEADERS frame had them.
    flags: u8,
    /// The PRIORITY fields (stream dependency and weight), kept as sent.
    priority: Option<[u8; 5]>,
    fragments: BytesMut,
}

/// A frame header (RFC 9113 section 4.1).
struct Head {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Head {
    fn parse(b: &[u8]) -> Head {
        Head {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    fn put(&self, out: &mut BytesMut) {
        let len = self.len as u32;
        out.put_slice(&len.to_be_bytes()[1..]);
        out.put_u8(self.kind);
        out.put_u8(self.flags);
        out.put_u32(self.stream);
    }
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 client sent {what}"),
    )
}

impl Rewriter {
    /// Moves everything complete in `input` to `output`.
    fn rewrite(&mut self) -> io::Result<()> {
        loop {
            if self.transparent {
                self.flush();
                return Ok(());
            }
            if !self.started {
                if self.input.len() < PREFACE.len() {
                    return Ok(());
                }
                self.transparent = &self.input[..PREFACE.len()] != PREFACE;
                let preface = self.input.split_to(PREFACE.len());
                self.output.extend_from_slice(&preface);
                self.started = true;
                continue;
            }
            if self.passing > 0 {
                let n = self.passing.min(self.input.len());
                if n == 0 {
                    return Ok(());
                }
                let payload = self.input.split_to(n);
                self.output.extend_from_slice(&payload);
                self.passing -= n;
                continue;
            }
            if self.input.len() < FRAME_HEADER {
                return Ok(());
            }
            let head = Head::parse(&self.input[..FRAME_HEADER]);
            if head.kind != HEADERS && head.kind != CONTINUATION {
                if self.block.is_some() {
                    return Err(malformed("a frame inside a header block"));
                }
                let header = self.input.split_to(FRAME_HEADER);
                self.output.extend_from_slice(&header);
                self.passing = head.len;
                continue;
            }
            if head.len > MAX_BLOCK {
                return Err(malformed("a header block over 1 MiB"));
            }
            if self.input.len() < FRAME_HEADER + head.len {
                return Ok(());
            }
            let frame = self.input.split_to(FRAME_HEADER + head.len).freeze();
            self.header_frame(&head, frame.slice(FRAME_HEADER..))?;
        }
    }

    /// Hands over whatever is left, as it is.
    fn flush(&mut self) {
        let rest = self.input.split();
        self.output.unsplit(rest);
    }

    fn header_frame(&mut self, head: &Head, payload: Bytes) -> io::Result<()> {
        let fragment = if head.kind == HEADERS {
            if self.block.is_some() {
                return Err(malformed("HEADERS inside a header block"));
            }
            let mut body = &payload[..];
            let mut pad = 0;
            if head.flags & PADDED != 0 {
                let (&len, rest) = body
                    .split_first()
                    .ok_or_else(|| malformed("no pad length"))?;
                pad = usize::from(len);
                body = rest;
            }
            let mut priority = None;
            if head.flags & PRIORITY != 0 {
                let (fields, rest) = body
                    .split_first_chunk::<5>()
                    .ok_or_else(|| malformed("a short PRIORITY"))?;
                priority = Some(*fields);
                body = rest;
            }
            let end = body
                .len()
                .checked_sub(pad)
                .ok_or_else(|| malformed("more padding than payload"))?;
            let fragment = &body[..end];
            self.block = Some(Block {
                stream: head.stream,
                flags: head.flags & (END_STREAM | PRIORITY),
                priority,
                fragments: BytesMut::with_capacity(fragment.len()),
            });
            fragment
        } else {
            match &self.block {
                Some(block) if block.stream == head.stream => &payload[..],
                _ => return Err(malformed("CONTINUATION outside a header block")),
            }
        };
        let Some(block) = self.block.as_mut() else {
            return Err(malformed("CONTINUATION outside a header block"));
        };
        if block.fragments.len() + fragment.len() > MAX_BLOCK {
            return Err(malformed("a header block over 1 MiB"));
        }
        block.fragments.extend_from_slice(fragment);
        if head.flags & END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            self.emit(block)?;
        }
        Ok(())
    }

    /// Re-encodes a complete header block and writes it out as HEADERS (+ CONTINUATION) frames.
    fn emit(&mut self, block: Block) -> io::Result<()> {
        let mut fields = BytesMut::with_capacity(block.fragments.len() * 2);
        let mut listed = 0;
        self.decoder
            .decode_with_cb(&block.fragments, |name, value| {
                listed += name.len() + value.len() + 32;
                if listed > MAX_LIST {
                    return;
                }
                let value = if &*name == b":authority" && Authority::try_from(&*value).is_err() {
                    LOCALHOST
                } else {
                    &value
                };
                put_literal(&mut fields, &name, value);
            })
            // h2 would answer the same block with a COMPRESSION_ERROR, a connection error.
            .map_err(|err| malformed(&format!("an undecodable header block ({err:?})")))?;
        if listed > MAX_LIST {
            return Err(malformed("a header list over 1 MiB"));
        }
        let mut rest = &fields[..];
        let mut first = true;
        loop {
            let priority = if first { block.priority } else { None };
            let room = MAX_FRAME - if priority.is_some() { 5 } else { 0 };
            let (chunk, after) = rest.split_at(rest.len().min(room));
            let mut flags = if first { block.flags } else { 0 };
            if after.is_empty() {
                flags |= END_HEADERS;
            }
            Head {
                len: chunk.len() + if priority.is_some() { 5 } else { 0 },
                kind: if first { HEADERS } else { CONTINUATION },
                flags,
                stream: block.stream,
            }
            .put(&mut self.output);
            if let Some(priority) = priority {
                self.output.put_slice(&priority);
            }
            self.output.put_slice(chunk);
            if after.is_empty() {
                return Ok(());
            }
            rest = after;
            first = false;
        }
    }
}

/// A "literal header field without indexing, new name" with raw (not Huffman) strings
/// (RFC 7541 section 6.2.2).
fn put_literal(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_u8(0);
    for string in [name, value] {
        put_integer(out, 0, 7, string.len());
        out.put_slice(string);
    }
}

/// An HPACK integer with an N-bit prefix (RFC 7541 section 5.1).
fn put_integer(out: &mut BytesMut, high_bits: u8, prefix: u32, mut n: usize) {
    let max = (1usize << prefix) - 1;
    if n < max {
        out.put_u8(high_bits | n as u8);
        return;
    }
    out.put_u8(high_bits | max as u8);
    n -= max;
    while n >= 128 {
        out.put_u8((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.put_u8(n as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first bytes grpcio 1.85 sent on `unix:/tmp/capauth.sock` for one unary call: the
    /// preface, SETTINGS, WINDOW_UPDATE, then HEADERS with `:authority: tmp%2Fcapauth.sock`.
    const GRPCIO: &str = "505249202a20485454502f322e300d0a0d0a534d0d0a0d0a000024040000000000000200000000000300000000000400400000000500400000000600004000fe0300000001000004080000000000003f00010000000401000000000000d701040000000140053a70617468062f612e422f43400a3a617574686f7269747912746d70253246636170617574682e736f636b8386400c636f6e74656e742d74797065106170706c69636174696f6e2f677270634002746508747261696c6572734014677270632d6163636570742d656e636f64696e67176964656e746974792c206465666c6174652c20677a6970400c677270632d74696d656f7574023253400a757365722d6167656e7430677270632d707974686f6e2f312e38352e3320677270632d632f35382e302e3020286c696e75783b206368747470322900000408000000000100000005000005000100000001000000000000000408000000000000000005";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// kind, flags, stream, decoded header list (header blocks) and payload (other frames).
    type Frame = (u8, u8, u32, Vec<(String, String)>, Vec<u8>);

    /// Splits a rewritten stream (after the preface) into frames, decoding header blocks as h2
    /// would.
    fn frames(mut bytes: &[u8]) -> Vec<Frame> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut out = vec![];
        let mut block = Vec::new();
        while !bytes.is_empty() {
            let head = Head::parse(&bytes[..FRAME_HEADER]);
            let payload = bytes[FRAME_HEADER..FRAME_HEADER + head.len].to_vec();
            bytes = &bytes[FRAME_HEADER + head.len..];
            let mut fields = vec![];
            if head.kind == HEADERS || head.kind == CONTINUATION {
                let skip = if head.flags & PRIORITY != 0 { 5 } else { 0 };
                block.extend_from_slice(&payload[skip..]);
                if head.flags & END_HEADERS == 0 {
                    continue;
                }
                for (name, value) in decoder.decode(&block).unwrap() {
                    fields.push((
                        String::from_utf8(name).unwrap(),
                        String::from_utf8(value).unwrap(),
                    ));
                }
                block.clear();
            }
            out.push((head.kind, head.flags, head.stream, fields, payload));
        }
        out
    }

    fn rewrite_in_pieces(input: &[u8], piece: usize) -> Vec<u8> {
        let mut rewriter = Rewriter::default();
        for chunk in input.chunks(piece) {
            rewriter.input.extend_from_slice(chunk);
            rewriter.rewrite().unwrap();
        }
        rewriter.flush();
        rewriter.output.to_vec()
    }

    #[test]
    fn grpcio_socket_path_authority_becomes_localhost_and_the_rest_is_unchanged() {
        let input = hex(GRPCIO);
        for piece in [1, 7, 4096] {
            let output = rewrite_in_pieces(&input, piece);
            assert_eq!(&output[..PREFACE.len()], PREFACE);
            let got = frames(&output[PREFACE.len()..]);
            let want = frames(&input[PREFACE.len()..]);
            assert_eq!(got.len(), want.len());
            for (got, want) in got.iter().zip(&want) {
                assert_eq!(got.0, want.0, "frame kind");
                assert_eq!(got.2, want.2, "stream");
                if got.0 == HEADERS {
                    let authority = |fields: &[(String, String)]| {
                        fields
                            .iter()
                            .find(|(n, _)| n == ":authority")
                            .map(|(_, v)| v.clone())
                    };
                    assert_eq!(authority(&want.3).unwrap(), "tmp%2Fcapauth.sock");
                    assert_eq!(authority(&got.3).unwrap(), "localhost");
                    let others = |fields: &[(String, String)]| {
                        fields
                            .iter()
                            .filter(|(n, _)| n != ":authority")
                            .cloned()
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(others(&got.3), others(&want.3));
                    assert_eq!(got.1, want.1, "flags");
                } else {
                    assert_eq!((got.1, &got.4), (want.1, &want.4), "other frames as sent");
                }
            }
        }
    }

    fn headers_frame(stream: u32, flags: u8, block: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        Head {
            len: block.len(),
            kind: HEADERS,
            flags,
            stream,
        }
        .put(&mut out);
        out.put_slice(block);
        out.to_vec()
    }

    #[test]
    fn an_indexed_bad_authority_in_a_later_block_is_replaced_too_and_valid_ones_are_kept() {
        let mut input = PREFACE.to_vec();
        // Literal with incremental indexing, name ":authority" from the static table (index 1):
        // the client's table now holds it at index 62.
        let mut first = vec![0x41, 12];
        first.extend_from_slice(b"/run/x.sock\0");
        input.extend(headers_frame(1, END_HEADERS | END_STREAM, &first));
        // The next request refers to it by index only.
        input.extend(headers_frame(3, END_HEADERS, &[0x80 | 62]));
        // A valid authority stays as it is.
        let mut third = vec![0x01, 14];
        third.extend_from_slice(b"localhost:4000");
        input.extend(headers_frame(5, END_HEADERS, &third));
        let output = rewrite_in_pieces(&input, 5);
        let got = frames(&output[PREFACE.len()..]);
        let values: Vec<_> = got.iter().map(|f| (f.2, f.3.clone())).collect();
        let pair = |v: &str| vec![(":authority".to_owned(), v.to_owned())];
        assert_eq!(
            values,
            vec![
                (1, pair("localhost")),
                (3, pair("localhost")),
                (5, pair("localhost:4000"))
            ]
        );
        assert_eq!(got[0].1, END_HEADERS | END_STREAM, "END_STREAM kept");
    }

    #[test]
    fn padding_and_priority_are_handled_and_large_blocks_split_into_continuations() {
        let mut input = PREFACE.to_vec();
        let big = "x".repeat(40_000);
        let mut block = vec![0x00, 3];
        block.extend_from_slice(b"big");
        let mut len = BytesMut::new();
        put_integer(&mut len, 0, 7, big.len());
        block.extend_from_slice(&len);
        block.extend_from_slice(big.as_bytes());
        // PADDED (2 bytes of padding) and PRIORITY, then the fragment split over a CONTINUATION.
        let (a, b) = block.split_at(100);
        let mut payload = vec![2];
        payload.extend_from_slice(&[0, 0, 0, 0, 15]);
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0]);
        input.extend(headers_frame(1, PADDED | PRIORITY, &payload));
        let mut continuation = BytesMut::new();
        Head {
            len: b.len(),
            kind: CONTINUATION,
            flags: END_HEADERS,
            stream: 1,
        }
        .put(&mut continuation);
        continuation.put_slice(b);
        input.extend_from_slice(&continuation);
        let output = rewrite_in_pieces(&input, 1000);
        let got = frames(&output[PREFACE.len()..]);
        assert_eq!(got.len(), 1, "one header block");
        assert_eq!(got[0].3, vec![("big".to_owned(), big)]);
        let mut rest = &output[PREFACE.len()..];
        let mut kinds = vec![];
        while !rest.is_empty() {
            let head = Head::parse(rest);
            assert!(head.len <= MAX_FRAME);
            kinds.push((head.kind, head.flags));
            rest = &rest[FRAME_HEADER + head.len..];
        }
        assert_eq!(
            kinds,
            vec![
                (HEADERS, PRIORITY),
                (CONTINUATION, 0),
                (CONTINUATION, END_HEADERS)
            ]
        );
    }

    #[test]
    fn a_block_that_expands_past_the_header_list_bound_ends_the_connection() {
        let mut input = PREFACE.to_vec();
        // One 4,000-byte entry in the table, then 300 one-byte references to it: 1.2 MB.
        let mut block = vec![0x40, 1, b'x'];
        let mut len = BytesMut::new();
        put_integer(&mut len, 0, 7, 4_000);
        block.extend_from_slice(&len);
        block.extend_from_slice(&[b'y'; 4_000]);
        block.extend_from_slice(&[0x80 | 62; 300]);
        input.extend(headers_frame(1, END_HEADERS, &block));
        let mut rewriter = Rewriter::default();
        rewriter.input.extend_from_slice(&input);
        let err = rewriter.rewrite().unwrap_err();
        assert!(err.to_string().contains("over 1 MiB"), "{err}");
        assert!(rewriter.output.len() < 100, "nothing of it was passed on");
    }

    #[test]
    fn not_http2_passes_through_unchanged() {
        let input = b"GET / HTTP/1.1\r\nHost: /run/x.sock\r\n\r\n".repeat(3);
        assert_eq!(rewrite_in_pieces(&input, 10), input);
    }
}
