//! Every gRPC client on the agent's Unix socket, not only Rust's.
//!
//! grpc-core (Python, Ruby, C++, PHP), grpc-java, grpc-swift and older
//! grpc-go name a Unix-socket channel's `:authority` after the socket path,
//! percent-encoded (`%2Frun%2Fherald%2Fagent.sock`). That is not a valid
//! URI authority, and the HTTP/2 layer under tonic (`h2`) resets such a
//! stream with `PROTOCOL_ERROR` before any handler runs (hyperium/h2#487).
//!
//! On the Unix socket only — TCP listeners keep h2's strict parsing — the
//! client's side of the connection passes through [`AuthorityRewriter`]:
//! frames are forwarded untouched except header blocks, which are decoded
//! (HPACK, with the client's dynamic table tracked across the connection)
//! and re-encoded without indexing, with an invalid `:authority` replaced
//! by `localhost`. The authority carries no meaning on a Unix socket: the
//! caller is identified by the kernel's peer credentials, never by it.

use std::io;

use loona_hpack::Decoder;

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame payload h2 accepts unless told otherwise
/// (SETTINGS_MAX_FRAME_SIZE's initial value): re-encoded blocks are split
/// to fit.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// The dynamic table size h2 advertises (SETTINGS_HEADER_TABLE_SIZE's
/// initial value): a client's encoder may not use more.
const HEADER_TABLE_SIZE: usize = 4_096;
/// A header block larger than this (HEADERS and its CONTINUATIONs) ends
/// the connection: Workload API and SDS requests carry a few short headers.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// What an unusable authority becomes.
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// A header block being collected (a HEADERS frame without END_HEADERS and
/// the CONTINUATION frames that follow it).
struct PendingBlock {
    stream_id: u32,
    end_stream: bool,
    block: Vec<u8>,
}

/// The client-to-server byte stream of one HTTP/2 connection, rewritten as
/// the module documentation describes. Feed it what the socket reads; take
/// what h2 should read.
pub struct AuthorityRewriter {
    decoder: Decoder<'static>,
    /// Bytes read but not yet forming a whole frame header (or preface).
    input: Vec<u8>,
    /// Bytes ready for h2.
    output: Vec<u8>,
    preface_seen: bool,
    /// Payload bytes of the current non-header frame still to forward as
    /// they arrive (DATA frames are not buffered whole).
    passthrough: usize,
    /// The current header frame: (type, flags, stream, payload length).
    header_frame: Option<(u8, u8, u32, usize)>,
    pending: Option<PendingBlock>,
    /// Whether a block has been re-encoded: then every later one must be.
    rewriting: bool,
}

impl std::fmt::Debug for AuthorityRewriter {
    // Header values (and the HPACK table holding them) stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityRewriter")
            .field("buffered", &self.input.len())
            .field("ready", &self.output.len())
            .finish_non_exhaustive()
    }
}

impl Default for AuthorityRewriter {
    fn default() -> Self {
        Self::new()
    }
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("HTTP/2: {what}"))
}

impl AuthorityRewriter {
    /// A rewriter for a new connection.
    pub fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            decoder,
            input: Vec::new(),
            output: Vec::new(),
            preface_seen: false,
            passthrough: 0,
            header_frame: None,
            pending: None,
            rewriting: false,
        }
    }

    /// Whether rewritten bytes are waiting to be taken.
    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// Moves up to `buf.len()` rewritten bytes into `buf`; returns how many.
    pub fn take(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.output.len());
        buf[..n].copy_from_slice(&self.output[..n]);
        self.output.drain(..n);
        n
    }

    /// Processes bytes read from the client. An error means the client
    /// broke HTTP/2 (or HPACK) and the connection should end.
    pub fn feed(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if !self.preface_seen {
                let want = PREFACE.len() - self.input.len();
                let n = want.min(data.len());
                self.input.extend_from_slice(&data[..n]);
                data = &data[n..];
                if self.input.len() == PREFACE.len() {
                    if self.input != PREFACE {
                        // Not HTTP/2 prior knowledge: let h2 say so.
                        self.output.append(&mut self.input);
                        self.output.extend_from_slice(data);
                        self.passthrough = usize::MAX;
                        self.preface_seen = true;
                        return Ok(());
                    }
                    self.output.append(&mut self.input);
                    self.preface_seen = true;
                }
                continue;
            }
            if self.passthrough > 0 {
                let n = self.passthrough.min(data.len());
                self.output.extend_from_slice(&data[..n]);
                data = &data[n..];
                if self.passthrough != usize::MAX {
                    self.passthrough -= n;
                }
                continue;
            }
            if let Some((kind, flags, stream, len)) = self.header_frame {
                let want = len - self.input.len();
                let n = want.min(data.len());
                self.input.extend_from_slice(&data[..n]);
                data = &data[n..];
                if self.input.len() == len {
                    let payload = std::mem::take(&mut self.input);
                    self.header_frame = None;
                    self.header_payload(kind, flags, stream, &payload)?;
                }
                continue;
            }
            let want = FRAME_HEADER_LEN - self.input.len();
            let n = want.min(data.len());
            self.input.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.input.len() < FRAME_HEADER_LEN {
                continue;
            }
            let h = std::mem::take(&mut self.input);
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            let (kind, flags) = (h[3], h[4]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            if self.pending.is_some() && kind != CONTINUATION {
                return Err(protocol_error("a header block was interrupted"));
            }
            match kind {
                HEADERS | CONTINUATION => {
                    if len > MAX_HEADER_BLOCK {
                        return Err(protocol_error("header frame too large"));
                    }
                    if len == 0 {
                        self.header_payload(kind, flags, stream, &[])?;
                    } else {
                        self.header_frame = Some((kind, flags, stream, len));
                    }
                }
                _ => {
                    self.output.extend_from_slice(&h);
                    self.passthrough = len;
                }
            }
        }
        Ok(())
    }

    /// A whole HEADERS or CONTINUATION payload.
    fn header_payload(&mut self, kind: u8, flags: u8, stream: u32, p: &[u8]) -> io::Result<()> {
        if kind == CONTINUATION {
            let Some(pending) = self.pending.as_mut() else {
                return Err(protocol_error("CONTINUATION without HEADERS"));
            };
            if pending.stream_id != stream {
                return Err(protocol_error("CONTINUATION on another stream"));
            }
            if pending.block.len() + p.len() > MAX_HEADER_BLOCK {
                return Err(protocol_error("header block too large"));
            }
            pending.block.extend_from_slice(p);
        } else {
            let mut rest = p;
            let mut pad = 0;
            if flags & PADDED != 0 {
                let (&n, r) = rest
                    .split_first()
                    .ok_or_else(|| protocol_error("padded HEADERS without a pad length"))?;
                pad = usize::from(n);
                rest = r;
            }
            // Priority signals are deprecated (RFC 9113 §5.3.2) and h2
            // ignores them: they are dropped, not forwarded.
            if flags & PRIORITY != 0 {
                rest = rest
                    .get(5..)
                    .ok_or_else(|| protocol_error("HEADERS priority fields cut short"))?;
            }
            let keep = rest
                .len()
                .checked_sub(pad)
                .ok_or_else(|| protocol_error("padding exceeds the frame"))?;
            self.pending = Some(PendingBlock {
                stream_id: stream,
                end_stream: flags & END_STREAM != 0,
                block: rest[..keep].to_vec(),
            });
        }
        if flags & END_HEADERS != 0
            && let Some(done) = self.pending.take()
        {
            self.emit(done)?;
        }
        Ok(())
    }

    /// Decodes a complete block and writes it out re-encoded, as HEADERS
    /// (and CONTINUATION frames when it outgrows one frame) — unless it is
    /// the connection's first and needs no rewrite: then it goes out as
    /// the client encoded it, and so does everything after it, undecoded.
    /// The client's HPACK table is then h2's too, and gRPC clients name
    /// one authority per channel; a Rust client's connection costs one
    /// decode, not one per call.
    fn emit(&mut self, done: PendingBlock) -> io::Result<()> {
        let mut block = Vec::with_capacity(done.block.len() + 32);
        let mut replaced = false;
        self.decoder
            .decode_with_cb(&done.block, |name, value| {
                let value: &[u8] = if &*name == b":authority" && !valid_authority(&value) {
                    replaced = true;
                    REPLACEMENT_AUTHORITY
                } else {
                    &value
                };
                encode_literal(&mut block, &name, value);
            })
            .map_err(|e| protocol_error(&format!("HPACK: {e:?}")))?;
        if !replaced && !self.rewriting {
            self.block_frames(done.stream_id, done.end_stream, &done.block);
            self.passthrough = usize::MAX;
            return Ok(());
        }
        // From here on h2's table is not the client's: every block is
        // re-encoded without indexing.
        self.rewriting = true;
        self.block_frames(done.stream_id, done.end_stream, &block);
        Ok(())
    }

    /// A header block as HEADERS and, when it outgrows one frame,
    /// CONTINUATION frames.
    fn block_frames(&mut self, stream: u32, end_stream: bool, block: &[u8]) {
        // An empty block is legal (a bare END_STREAM trailer): one frame.
        let chunks: Vec<&[u8]> = if block.is_empty() {
            vec![&[]]
        } else {
            block.chunks(MAX_FRAME_PAYLOAD).collect()
        };
        let count = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            let end_headers = if i + 1 == count { END_HEADERS } else { 0 };
            if i == 0 {
                let end_stream = if end_stream { END_STREAM } else { 0 };
                self.frame(HEADERS, end_stream | end_headers, stream, chunk);
            } else {
                self.frame(CONTINUATION, end_headers, stream, chunk);
            }
        }
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        // Payloads are at most MAX_FRAME_PAYLOAD: the length fits 24 bits.
        let len = (payload.len() as u32).to_be_bytes();
        self.output.extend_from_slice(&len[1..]);
        self.output.push(kind);
        self.output.push(flags);
        self.output.extend_from_slice(&stream.to_be_bytes());
        self.output.extend_from_slice(payload);
    }
}

/// Whether h2 would accept `value` as an authority.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// HPACK integer with an `n`-bit prefix whose high bits are `first`
/// (RFC 7541 §5.1).
fn encode_integer(out: &mut Vec<u8>, first: u8, n: u8, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A literal header field without indexing, new name, no Huffman coding
/// (RFC 7541 §6.2.2): h2's table stays empty, so nothing can diverge.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_integer(out, 0x00, 7, name.len());
    out.extend_from_slice(name);
    encode_integer(out, 0x00, 7, value.len());
    out.extend_from_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// (type, flags, stream, payload) of every frame after the preface.
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert!(bytes.starts_with(PREFACE));
        bytes = &bytes[PREFACE.len()..];
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    fn request(authority: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("workload.spiffe.io", "true"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    fn rewrite_in_pieces(input: &[u8], piece: usize) -> io::Result<Vec<u8>> {
        let mut r = AuthorityRewriter::new();
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            r.feed(chunk)?;
            let mut buf = [0u8; 7];
            while r.has_output() {
                let n = r.take(&mut buf);
                out.extend_from_slice(&buf[..n]);
            }
        }
        Ok(out)
    }

    const PATH_AUTHORITY: &str = "%2Frun%2Fherald%2Fagent.sock";

    #[test]
    fn a_path_authority_becomes_localhost_and_everything_else_passes() {
        // Two requests from one HPACK encoder: the second reuses the
        // dynamic table entries the first created.
        let mut enc = loona_hpack::Encoder::new();
        let first = enc.encode(
            request(PATH_AUTHORITY)
                .iter()
                .map(|(n, v)| (&n[..], &v[..])),
        );
        let second = enc.encode(
            request(PATH_AUTHORITY)
                .iter()
                .map(|(n, v)| (&n[..], &v[..])),
        );
        assert!(second.len() < first.len(), "the second block is indexed");
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
        input.extend(frame(HEADERS, END_HEADERS, 1, &first));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\x05hello"));
        input.extend(frame(HEADERS, END_HEADERS, 3, &second));
        input.extend(frame(0x0, END_STREAM, 3, b"\0\0\0\0\0"));
        for piece in [1, 3, 9, 64, input.len()] {
            let out = rewrite_in_pieces(&input, piece).unwrap();
            let fs = frames(&out);
            assert_eq!(fs.len(), 5, "piece {piece}");
            assert_eq!((fs[0].0, fs[0].3.clone()), (0x4, vec![0, 3, 0, 0, 0, 100]));
            assert_eq!((fs[2].0, fs[2].1, fs[2].2), (0x0, END_STREAM, 1));
            assert_eq!(fs[2].3, b"\0\0\0\0\x05hello");
            let mut dec = Decoder::new();
            for (i, stream) in [(1, 1), (3, 3)] {
                assert_eq!((fs[i].0, fs[i].1, fs[i].2), (HEADERS, END_HEADERS, stream));
                let headers = dec.decode(&fs[i].3).unwrap();
                assert_eq!(headers, request("localhost"), "piece {piece}");
            }
        }
    }

    #[test]
    fn a_connection_whose_first_authority_is_valid_passes_as_sent() {
        // Two requests from one encoder, the second indexed against the
        // first: the bytes h2 reads are the client's, unchanged.
        let mut enc = loona_hpack::Encoder::new();
        let mut blocks = (0..2).map(|_| {
            enc.encode(
                request("localhost:8443")
                    .iter()
                    .map(|(n, v)| (&n[..], &v[..])),
            )
        });
        let (first, second) = (blocks.next().unwrap(), blocks.next().unwrap());
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &first));
        input.extend(frame(HEADERS, END_HEADERS, 3, &second));
        input.extend(frame(0x0, END_STREAM, 3, b"\0\0\0\0\0"));
        for piece in [1, 5, input.len()] {
            assert_eq!(
                rewrite_in_pieces(&input, piece).unwrap(),
                input,
                "piece {piece}"
            );
        }
        let fs = frames(&input);
        let mut dec = Decoder::new();
        for f in &fs[..2] {
            assert_eq!(dec.decode(&f.3).unwrap(), request("localhost:8443"));
        }
    }

    #[test]
    fn padded_prioritised_and_continued_blocks_are_joined() {
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode(
            request(PATH_AUTHORITY)
                .iter()
                .map(|(n, v)| (&n[..], &v[..])),
        );
        let (a, b) = block.split_at(block.len() / 2);
        let mut headers = vec![3u8]; // pad length
        headers.extend_from_slice(&[0, 0, 0, 0, 16]); // priority fields
        headers.extend_from_slice(a);
        headers.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &headers));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, b));
        let fs = frames(&rewrite_in_pieces(&input, 2).unwrap());
        assert_eq!(fs.len(), 1);
        assert_eq!(
            (fs[0].0, fs[0].1, fs[0].2),
            (HEADERS, END_HEADERS | END_STREAM, 5)
        );
        assert_eq!(
            Decoder::new().decode(&fs[0].3).unwrap(),
            request("localhost")
        );
    }

    #[test]
    fn a_block_larger_than_a_frame_is_split_into_continuations() {
        let mut headers = request(PATH_AUTHORITY);
        headers.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode(headers.iter().map(|(n, v)| (&n[..], &v[..])));
        let mut input = PREFACE.to_vec();
        let (a, b) = block.split_at(MAX_FRAME_PAYLOAD);
        let (b, c) = b.split_at(MAX_FRAME_PAYLOAD);
        input.extend(frame(HEADERS, 0, 1, a));
        input.extend(frame(CONTINUATION, 0, 1, b));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, c));
        let fs = frames(&rewrite_in_pieces(&input, 4096).unwrap());
        assert_eq!(fs.len(), 3);
        assert!(fs.iter().all(|f| f.3.len() <= MAX_FRAME_PAYLOAD));
        assert_eq!((fs[0].0, fs[0].1), (HEADERS, 0));
        assert_eq!((fs[1].0, fs[1].1), (CONTINUATION, 0));
        assert_eq!((fs[2].0, fs[2].1), (CONTINUATION, END_HEADERS));
        let joined: Vec<u8> = fs.iter().flat_map(|f| f.3.clone()).collect();
        let mut expected = request("localhost");
        expected.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        assert_eq!(Decoder::new().decode(&joined).unwrap(), expected);
    }

    #[test]
    fn broken_framing_and_hpack_end_the_connection() {
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode(
            request(PATH_AUTHORITY)
                .iter()
                .map(|(n, v)| (&n[..], &v[..])),
        );
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "continuation alone",
                frame(CONTINUATION, END_HEADERS, 1, &block),
            ),
            ("data inside a header block", {
                let mut v = frame(HEADERS, 0, 1, &block[..4]);
                v.extend(frame(0x0, 0, 1, b"x"));
                v
            }),
            ("continuation on another stream", {
                let mut v = frame(HEADERS, 0, 1, &block[..4]);
                v.extend(frame(CONTINUATION, END_HEADERS, 3, &block[4..]));
                v
            }),
            (
                "oversized block",
                frame(HEADERS, END_HEADERS, 1, &vec![0u8; MAX_HEADER_BLOCK + 1]),
            ),
            (
                "padding beyond the frame",
                frame(HEADERS, PADDED | END_HEADERS, 1, &[200, 0x82]),
            ),
            (
                "index past both tables",
                frame(HEADERS, END_HEADERS, 1, &[0xff, 0x7f]),
            ),
            (
                "table size over the limit",
                frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0xff, 0x03, 0x82]),
            ),
        ];
        for (what, body) in cases {
            let mut input = PREFACE.to_vec();
            input.extend(body);
            assert!(rewrite_in_pieces(&input, 3).is_err(), "{what}");
        }
    }

    #[test]
    fn a_connection_that_is_not_http2_passes_through() {
        let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n and then some more bytes";
        let out = rewrite_in_pieces(input, 4).unwrap();
        assert_eq!(out, input);
    }
}
