//! The client → server byte stream of one HTTP/2 connection, rewritten without I/O: frame
//! headers and payloads pass as they are, header blocks come out HPACK-decoded, with
//! `:authority: localhost`, encoded again with literals only (see `api/front.rs`).

use std::borrow::Cow;

use bytes::{BufMut as _, BytesMut};
use loona_hpack::decoder::DecoderError;
use loona_hpack::Decoder;

pub(crate) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub(crate) const FRAME_HEADER_LEN: usize = 9;
/// Largest frame payload the front writes: the SETTINGS_MAX_FRAME_SIZE minimum (RFC 9113
/// §6.5.2), which every server accepts. berthd does not raise h2's default, which is this.
pub(crate) const MAX_FRAME_OUT: usize = 16_384;
/// Largest header block (frame headers included) the front collects before it gives up.
pub(crate) const MAX_HEADER_BLOCK: usize = 1 << 20;
/// Largest decoded header list (RFC 9113 §6.5.2 size: name + value + 32 per field).
pub(crate) const MAX_DECODED_HEADERS: usize = 1 << 20;
/// The HPACK table size the server allows (SETTINGS_HEADER_TABLE_SIZE): berthd keeps the
/// default, so a client may not grow its table past this.
pub(crate) const HEADER_TABLE_SIZE: usize = 4096;
/// What `:authority` becomes.
pub(crate) const LOCAL_AUTHORITY: &[u8] = b"localhost";

pub(crate) const TYPE_HEADERS: u8 = 0x1;
pub(crate) const TYPE_CONTINUATION: u8 = 0x9;
pub(crate) const FLAG_END_STREAM: u8 = 0x1;
pub(crate) const FLAG_END_HEADERS: u8 = 0x4;
pub(crate) const FLAG_PADDED: u8 = 0x8;
pub(crate) const FLAG_PRIORITY: u8 = 0x20;

/// Why the front closed a connection: what the client sent is not HTTP/2 it can follow.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrontError {
    #[error("the client did not start with the HTTP/2 connection preface")]
    Preface,
    #[error("header block on stream {stream} is over {MAX_HEADER_BLOCK} bytes")]
    HeaderBlockTooLarge { stream: u32 },
    #[error("decoded header list on stream {stream} is over {MAX_DECODED_HEADERS} bytes")]
    HeaderListTooLarge { stream: u32 },
    #[error("frame of type {frame_type:#x} on stream {stream} where a CONTINUATION was due")]
    ExpectedContinuation { frame_type: u8, stream: u32 },
    #[error("CONTINUATION on stream {stream} without a header block to continue")]
    UnexpectedContinuation { stream: u32 },
    #[error("HEADERS on stream 0")]
    HeadersOnStreamZero,
    #[error("HEADERS on stream {stream} with padding or priority longer than the frame")]
    Padding { stream: u32 },
    #[error("decoding the header block on stream {stream}")]
    Hpack {
        stream: u32,
        #[source]
        source: DecoderError,
    },
}

impl From<FrontError> for std::io::Error {
    fn from(err: FrontError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, err)
    }
}

/// One frame header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameHeader {
    pub(crate) len: usize,
    pub(crate) kind: u8,
    pub(crate) flags: u8,
    pub(crate) stream: u32,
}

impl FrameHeader {
    pub(crate) fn parse(bytes: &[u8; FRAME_HEADER_LEN]) -> Self {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]);
        Self {
            len: usize::try_from(len).unwrap_or(usize::MAX),
            kind: bytes[3],
            flags: bytes[4],
            stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff,
        }
    }

    /// Writes a frame header; `len` is at most [`MAX_FRAME_OUT`].
    fn write(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
        let len = u32::try_from(len).expect("invariant: frames written are at most 16384 bytes");
        out.put_slice(&len.to_be_bytes()[1..]);
        out.put_u8(kind);
        out.put_u8(flags);
        out.put_u32(stream);
    }
}

/// A header block being collected (HEADERS seen, END_HEADERS not yet).
#[derive(Debug)]
struct HeaderBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// Bytes on the wire so far, frame headers included.
    wire_len: usize,
    /// The frames as they came (the connection's first block only).
    raw: Vec<u8>,
}

/// What the front does with a connection's header blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the end of the first header block, which decides.
    FirstBlock,
    /// The first block's `:authority` was not a valid authority: every block is rewritten.
    Rewrite,
    /// The first block's `:authority` was valid (or absent): it went to the server as it
    /// came, and so does everything after it, unparsed.
    Transparent,
}

/// The client → server half of the front, without I/O: it turns the client's bytes into what
/// the server reads, except frame payloads that pass as they are, which the caller moves
/// itself (see [`Rewriter::passthrough`]).
pub(crate) struct Rewriter {
    mode: Mode,
    preface_seen: bool,
    /// Payload bytes of the current frame still to pass through unchanged.
    passthrough: usize,
    block: Option<HeaderBlock>,
    decoder: Decoder<'static>,
}

impl std::fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriter")
            .field("mode", &self.mode)
            .field("preface_seen", &self.preface_seen)
            .field("passthrough", &self.passthrough)
            .field("block", &self.block)
            .finish_non_exhaustive()
    }
}

impl Default for Rewriter {
    fn default() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            mode: Mode::FirstBlock,
            preface_seen: false,
            passthrough: 0,
            block: None,
            decoder,
        }
    }
}

impl Rewriter {
    /// A rewriter that rewrites every header block, whatever the first one holds.
    #[cfg(test)]
    pub(crate) fn rewriting_every_block() -> Self {
        Self {
            mode: Mode::Rewrite,
            ..Self::default()
        }
    }

    /// Whether the rest of the client's stream goes to the server as it is, unparsed.
    pub(crate) fn is_transparent(&self) -> bool {
        self.mode == Mode::Transparent
    }

    /// Payload bytes that follow in the client's stream and go to the server unchanged; the
    /// caller moves them and reports them with [`Rewriter::passed`] before the next
    /// [`Rewriter::process`].
    pub(crate) fn passthrough(&self) -> usize {
        self.passthrough
    }

    /// `count` passthrough bytes went to the server.
    pub(crate) fn passed(&mut self, count: usize) {
        self.passthrough = self.passthrough.saturating_sub(count);
    }

    /// Consumes the preface, frame headers and whole header-block frames from the front of
    /// `input` and appends what the server reads to `out`. Returns when `input` holds no
    /// complete unit more, when a frame's payload is to pass through, or when the connection
    /// turned transparent.
    pub(crate) fn process(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<(), FrontError> {
        while self.passthrough == 0 && self.mode != Mode::Transparent {
            if !self.preface_seen {
                let seen = input.len().min(PREFACE.len());
                if input[..seen] != PREFACE[..seen] {
                    return Err(FrontError::Preface);
                }
                if seen < PREFACE.len() {
                    return Ok(());
                }
                out.put_slice(&input.split_to(PREFACE.len()));
                self.preface_seen = true;
                continue;
            }
            let Some(header_bytes) = input.first_chunk::<FRAME_HEADER_LEN>() else {
                return Ok(());
            };
            let header = FrameHeader::parse(header_bytes);
            let in_block = self.block.is_some();
            if header.kind != TYPE_HEADERS && header.kind != TYPE_CONTINUATION && !in_block {
                out.put_slice(&input.split_to(FRAME_HEADER_LEN));
                self.passthrough = header.len;
                continue;
            }
            match (header.kind, &self.block) {
                (TYPE_CONTINUATION, Some(block)) if block.stream != header.stream => {
                    return Err(FrontError::ExpectedContinuation {
                        frame_type: header.kind,
                        stream: header.stream,
                    })
                }
                (TYPE_CONTINUATION, None) => {
                    return Err(FrontError::UnexpectedContinuation {
                        stream: header.stream,
                    })
                }
                (TYPE_CONTINUATION, Some(_)) => {}
                (kind, Some(_)) => {
                    return Err(FrontError::ExpectedContinuation {
                        frame_type: kind,
                        stream: header.stream,
                    })
                }
                (_, None) => {}
            }
            let collected = self.block.as_ref().map_or(0, |block| block.wire_len);
            let frame_len = FRAME_HEADER_LEN.saturating_add(header.len);
            if collected.saturating_add(frame_len) > MAX_HEADER_BLOCK {
                return Err(FrontError::HeaderBlockTooLarge {
                    stream: header.stream,
                });
            }
            if input.len() < frame_len {
                input.reserve(frame_len - input.len());
                return Ok(());
            }
            let frame = input.split_to(frame_len);
            let payload = &frame[FRAME_HEADER_LEN..];
            let mut block = match self.block.take() {
                Some(mut block) => {
                    block.fragment.extend_from_slice(payload);
                    block.wire_len += frame_len;
                    block
                }
                None => headers_frame(header, payload)?,
            };
            if self.mode == Mode::FirstBlock {
                block.raw.extend_from_slice(&frame);
            }
            if header.flags & FLAG_END_HEADERS == 0 {
                self.block = Some(block);
            } else {
                self.emit(&block, out)?;
            }
        }
        Ok(())
    }

    /// Decodes a complete header block and writes it again with `:authority: localhost`,
    /// literals only, as HEADERS plus CONTINUATIONs. The connection's first block goes out as
    /// it came instead when its `:authority` is valid (as h2 judges it) or absent, and the
    /// connection turns transparent.
    fn emit(&mut self, block: &HeaderBlock, out: &mut BytesMut) -> Result<(), FrontError> {
        let stream = block.stream;
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        let mut decoded_size = 0usize;
        let mut too_large = false;
        let mut authority_valid = None;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                decoded_size = decoded_size
                    .saturating_add(name.len())
                    .saturating_add(value.len())
                    .saturating_add(32);
                if decoded_size > MAX_DECODED_HEADERS {
                    too_large = true;
                    return;
                }
                let value = if name.as_ref() == b":authority" {
                    authority_valid = Some(http::uri::Authority::try_from(value.as_ref()).is_ok());
                    Cow::Borrowed(LOCAL_AUTHORITY)
                } else {
                    value
                };
                write_literal(&mut encoded, &name, &value);
            })
            .map_err(|source| FrontError::Hpack { stream, source })?;
        if too_large {
            return Err(FrontError::HeaderListTooLarge { stream });
        }
        if self.mode == Mode::FirstBlock {
            if authority_valid != Some(false) {
                out.put_slice(&block.raw);
                self.mode = Mode::Transparent;
                return Ok(());
            }
            self.mode = Mode::Rewrite;
        }

        let priority_len = if block.priority.is_some() { 5 } else { 0 };
        let first_len = encoded.len().min(MAX_FRAME_OUT - priority_len);
        let (first, mut rest) = encoded.split_at(first_len);
        let mut flags = 0;
        if block.end_stream {
            flags |= FLAG_END_STREAM;
        }
        if block.priority.is_some() {
            flags |= FLAG_PRIORITY;
        }
        if rest.is_empty() {
            flags |= FLAG_END_HEADERS;
        }
        out.reserve(encoded.len() + FRAME_HEADER_LEN * (1 + encoded.len() / MAX_FRAME_OUT) + 5);
        FrameHeader::write(out, priority_len + first.len(), TYPE_HEADERS, flags, stream);
        if let Some(priority) = &block.priority {
            out.put_slice(priority);
        }
        out.put_slice(first);
        while !rest.is_empty() {
            let (chunk, remaining) = rest.split_at(rest.len().min(MAX_FRAME_OUT));
            let flags = if remaining.is_empty() {
                FLAG_END_HEADERS
            } else {
                0
            };
            FrameHeader::write(out, chunk.len(), TYPE_CONTINUATION, flags, stream);
            out.put_slice(chunk);
            rest = remaining;
        }
        Ok(())
    }
}

/// The start of a header block from a HEADERS frame: padding dropped, priority kept.
fn headers_frame(header: FrameHeader, payload: &[u8]) -> Result<HeaderBlock, FrontError> {
    let stream = header.stream;
    if stream == 0 {
        return Err(FrontError::HeadersOnStreamZero);
    }
    let mut rest = payload;
    let mut padding = 0;
    if header.flags & FLAG_PADDED != 0 {
        let (&length, after) = rest.split_first().ok_or(FrontError::Padding { stream })?;
        padding = usize::from(length);
        rest = after;
    }
    let mut priority = None;
    if header.flags & FLAG_PRIORITY != 0 {
        let (fields, after) = rest
            .split_first_chunk::<5>()
            .ok_or(FrontError::Padding { stream })?;
        priority = Some(*fields);
        rest = after;
    }
    let fragment_len = rest
        .len()
        .checked_sub(padding)
        .ok_or(FrontError::Padding { stream })?;
    Ok(HeaderBlock {
        stream,
        end_stream: header.flags & FLAG_END_STREAM != 0,
        priority,
        fragment: rest[..fragment_len].to_vec(),
        wire_len: FRAME_HEADER_LEN + payload.len(),
        raw: Vec::new(),
    })
}

/// HPACK "literal header field without indexing — new name" (RFC 7541 §6.2.2), no Huffman.
fn write_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    for string in [name, value] {
        loona_hpack::encoder::encode_integer_into(string.len(), 7, 0, out)
            .expect("invariant: writing to a Vec cannot fail");
        out.extend_from_slice(string);
    }
}

/// Runs `input` through a [`Rewriter`] (for the fuzz target): what the server would read, or
/// the error that closes the connection.
pub(crate) fn rewrite_all(input: &[u8]) -> Result<Vec<u8>, FrontError> {
    let mut rewriter = Rewriter::default();
    let mut input = BytesMut::from(input);
    let mut out = BytesMut::new();
    loop {
        rewriter.process(&mut input, &mut out)?;
        if rewriter.is_transparent() {
            out.put_slice(&input);
            return Ok(out.to_vec());
        }
        let passthrough = rewriter.passthrough();
        if passthrough == 0 || input.is_empty() {
            return Ok(out.to_vec());
        }
        let count = passthrough.min(input.len());
        out.put_slice(&input.split_to(count));
        rewriter.passed(count);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use loona_hpack::Encoder;

    use super::*;

    pub(crate) const SOCKET_PATH: &str = "/run/berth/berthd.sock";

    pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        let len = u32::try_from(payload.len()).unwrap();
        out.put_slice(&len.to_be_bytes()[1..]);
        out.put_u8(kind);
        out.put_u8(flags);
        out.put_u32(stream);
        out.put_slice(payload);
        out.to_vec()
    }

    /// Preface and an empty SETTINGS frame.
    pub(crate) fn preface() -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        out.extend(frame(0x4, 0, 0, &[]));
        out
    }

    /// Decoded header fields, in order.
    pub(crate) type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    pub(crate) fn request_headers(authority: &str) -> Fields {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/grpc.health.v1.Health/Check"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-accept-encoding", "identity,deflate,gzip"),
            (
                "user-agent",
                "grpc-python/1.85.3 grpc-c/51.0.0 (linux; chttp2)",
            ),
        ]
        .into_iter()
        .map(|(name, value)| (name.as_bytes().to_vec(), value.as_bytes().to_vec()))
        .collect()
    }

    pub(crate) fn encode(encoder: &mut Encoder<'_>, headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
    }

    /// The frames of the server's view, after the preface.
    fn frames(mut bytes: &[u8]) -> Vec<(FrameHeader, Vec<u8>)> {
        assert!(bytes.starts_with(PREFACE));
        bytes = &bytes[PREFACE.len()..];
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let header = FrameHeader::parse(bytes.first_chunk().unwrap());
            let end = FRAME_HEADER_LEN + header.len;
            frames.push((header, bytes[FRAME_HEADER_LEN..end].to_vec()));
            bytes = &bytes[end..];
        }
        frames
    }

    /// Header blocks of the server's view, decoded by a decoder that, like the server's,
    /// never saw the client's table: only literals may be there.
    fn header_blocks(bytes: &[u8]) -> Vec<(FrameHeader, Fields)> {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(0);
        let mut blocks = Vec::new();
        let mut current: Option<(FrameHeader, Vec<u8>)> = None;
        for (header, payload) in frames(bytes) {
            assert!(header.len <= MAX_FRAME_OUT, "{header:?}");
            match header.kind {
                TYPE_HEADERS => {
                    assert!(current.is_none());
                    assert_eq!(header.flags & FLAG_PADDED, 0);
                    let skip = if header.flags & FLAG_PRIORITY != 0 {
                        5
                    } else {
                        0
                    };
                    current = Some((header, payload[skip..].to_vec()));
                }
                TYPE_CONTINUATION => current.as_mut().unwrap().1.extend(payload),
                _ => {
                    assert!(current.is_none());
                    continue;
                }
            }
            if header.flags & FLAG_END_HEADERS != 0 {
                let (first, block) = current.take().unwrap();
                let fields = decoder.decode(&block).unwrap();
                blocks.push((first, fields));
            }
        }
        assert!(current.is_none());
        blocks
    }

    fn authority(fields: &[(Vec<u8>, Vec<u8>)]) -> Option<&[u8]> {
        fields
            .iter()
            .find(|(name, _)| name == b":authority")
            .map(|(_, value)| value.as_slice())
    }

    #[test]
    fn an_authority_h2_refuses_becomes_localhost_and_the_rest_is_kept() {
        for sent in [SOCKET_PATH, "%2Frun%2Fberth%2Fberthd.sock", ""] {
            let mut input = preface();
            let headers = request_headers(sent);
            let block = encode(&mut Encoder::new(), &headers);
            input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
            input.extend(frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0"));
            let out = rewrite_all(&input).unwrap();
            let blocks = header_blocks(&out);
            assert_eq!(blocks.len(), 1);
            let mut expected = headers.clone();
            expected[3].1 = b"localhost".to_vec();
            assert_eq!(blocks[0].1, expected, "{sent:?}");
            // The DATA frame after it is there unchanged.
            assert!(out.ends_with(&frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0")));
        }
    }

    #[test]
    fn a_connection_that_starts_with_a_valid_authority_passes_untouched() {
        for first in ["localhost", "example.com:50051", "[::]:50051"] {
            let mut encoder = Encoder::new();
            let mut input = preface();
            let block = encode(&mut encoder, &request_headers(first));
            input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS | FLAG_PADDED, 1, &{
                let mut padded = vec![2];
                padded.extend(&block);
                padded.extend([0, 0]);
                padded
            }));
            // Later blocks are not looked at, whatever they hold.
            let block = encode(&mut encoder, &request_headers(SOCKET_PATH));
            input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &block));
            input.extend(b"anything at all");
            assert_eq!(rewrite_all(&input).unwrap(), input, "{first:?}");
        }
        // No :authority at all counts as valid.
        let mut headers = request_headers("");
        headers.remove(3);
        let mut input = preface();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &encode(&mut Encoder::new(), &headers),
        ));
        assert_eq!(rewrite_all(&input).unwrap(), input);
    }

    #[test]
    fn padding_priority_and_continuations_are_followed() {
        let headers = request_headers(SOCKET_PATH);
        let block = encode(&mut Encoder::new(), &headers);
        let (first, second) = block.split_at(10);
        let (second, third) = second.split_at(7);
        let mut payload = vec![3]; // pad length
        payload.extend([0x80, 0, 0, 3, 200]); // exclusive dependency on stream 3, weight 200
        payload.extend(first);
        payload.extend([0, 0, 0]);
        let mut input = preface();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            5,
            &payload,
        ));
        input.extend(frame(TYPE_CONTINUATION, 0, 5, second));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 5, third));
        let out = rewrite_all(&input).unwrap();
        let all = frames(&out);
        assert_eq!(all.len(), 2, "SETTINGS and one HEADERS");
        let (header, payload) = &all[1];
        assert_eq!(header.kind, TYPE_HEADERS);
        assert_eq!(header.stream, 5);
        assert_eq!(
            header.flags,
            FLAG_END_STREAM | FLAG_END_HEADERS | FLAG_PRIORITY
        );
        assert_eq!(&payload[..5], &[0x80, 0, 0, 3, 200]);
        let blocks = header_blocks(&out);
        assert_eq!(authority(&blocks[0].1), Some(&b"localhost"[..]));
        assert_eq!(blocks[0].1.len(), headers.len());
    }

    #[test]
    fn the_clients_dynamic_table_is_followed_across_requests() {
        let mut encoder = Encoder::new();
        let mut input = preface();
        let mut sent = Vec::new();
        for stream in [1u32, 3, 5] {
            let mut headers = request_headers(SOCKET_PATH);
            headers.push((b"x-request".to_vec(), stream.to_string().into_bytes()));
            let block = encode(&mut encoder, &headers);
            input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, stream, &block));
            sent.push((stream, headers, block));
        }
        // The later blocks refer to the client's dynamic table (indexes 62 and up).
        assert!(sent[2].2.len() < sent[0].2.len());
        assert!(sent[2].2.iter().any(|&byte| byte >= 0x80 | 62));
        let out = rewrite_all(&input).unwrap();
        let blocks = header_blocks(&out);
        assert_eq!(blocks.len(), 3);
        for ((header, fields), (stream, mut headers, _)) in blocks.into_iter().zip(sent) {
            assert_eq!(header.stream, stream);
            headers[3].1 = b"localhost".to_vec();
            assert_eq!(fields, headers);
        }
    }

    #[test]
    fn a_table_size_update_is_honoured_and_bounded() {
        let mut input = preface();
        // Size update to 0, then a literal with incremental indexing (not kept: table is 0).
        let mut block = vec![0x20];
        block.extend(encode(&mut Encoder::new(), &request_headers(SOCKET_PATH)));
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        let out = rewrite_all(&input).unwrap();
        assert_eq!(header_blocks(&out).len(), 1);

        // Growing the table past the server's SETTINGS_HEADER_TABLE_SIZE is refused.
        let mut input = preface();
        let mut block = Vec::new();
        loona_hpack::encoder::encode_integer_into(8192, 5, 0x20, &mut block).unwrap();
        block.extend(encode(&mut Encoder::new(), &request_headers(SOCKET_PATH)));
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        assert!(matches!(
            rewrite_all(&input),
            Err(FrontError::Hpack { stream: 1, .. })
        ));
    }

    #[test]
    fn a_large_header_block_is_split_into_frames_the_server_accepts() {
        let mut headers = request_headers(SOCKET_PATH);
        headers.push((b"x-large".to_vec(), vec![b'a'; 40_000]));
        let block = encode(&mut Encoder::new(), &headers);
        let mut input = preface();
        for (index, chunk) in block.chunks(20_000).enumerate() {
            let last = (index + 1) * 20_000 >= block.len();
            let kind = if index == 0 {
                TYPE_HEADERS
            } else {
                TYPE_CONTINUATION
            };
            let flags = if last { FLAG_END_HEADERS } else { 0 };
            input.extend(frame(kind, flags, 1, chunk));
        }
        let out = rewrite_all(&input).unwrap();
        assert!(frames(&out)
            .iter()
            .all(|(header, _)| header.len <= MAX_FRAME_OUT));
        assert!(frames(&out).len() >= 4);
        let blocks = header_blocks(&out);
        assert_eq!(blocks[0].1.last(), headers.last());
    }

    #[test]
    fn what_is_not_http2_is_refused() {
        let refuse = |input: &[u8]| rewrite_all(input).unwrap_err();
        assert!(matches!(
            refuse(b"GET / HTTP/1.1\r\n\r\n"),
            FrontError::Preface
        ));
        assert!(matches!(refuse(b"PRI * HTTP/1.1"), FrontError::Preface));
        // A prefix of the preface is not refused yet: more may come.
        assert_eq!(rewrite_all(&PREFACE[..10]).unwrap(), Vec::<u8>::new());

        let block = encode(&mut Encoder::new(), &request_headers(SOCKET_PATH));
        let with = |frames: &[Vec<u8>]| {
            let mut input = preface();
            for frame in frames {
                input.extend(frame);
            }
            input
        };
        assert!(matches!(
            refuse(&with(&[frame(
                TYPE_CONTINUATION,
                FLAG_END_HEADERS,
                1,
                &block
            )])),
            FrontError::UnexpectedContinuation { stream: 1 }
        ));
        assert!(matches!(
            refuse(&with(&[
                frame(TYPE_HEADERS, 0, 1, &block),
                frame(0x0, 0, 1, b"data")
            ])),
            FrontError::ExpectedContinuation {
                frame_type: 0,
                stream: 1
            }
        ));
        assert!(matches!(
            refuse(&with(&[
                frame(TYPE_HEADERS, 0, 1, &block),
                frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &[])
            ])),
            FrontError::ExpectedContinuation { stream: 3, .. }
        ));
        assert!(matches!(
            refuse(&with(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 0, &block)])),
            FrontError::HeadersOnStreamZero
        ));
        assert!(matches!(
            refuse(&with(&[frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS | FLAG_PADDED,
                1,
                &[200, 0x82]
            )])),
            FrontError::Padding { stream: 1 }
        ));
        assert!(matches!(
            refuse(&with(&[frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS | FLAG_PRIORITY,
                1,
                &[0, 0]
            )])),
            FrontError::Padding { stream: 1 }
        ));
        // Index 200 is in neither table.
        assert!(matches!(
            refuse(&with(&[frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS,
                1,
                &[0xff, 0x49]
            )])),
            FrontError::Hpack { stream: 1, .. }
        ));
        // One frame announcing 16 MiB is refused from its header, before its payload.
        let mut input = preface();
        input.extend([0xff, 0xff, 0xff, TYPE_HEADERS, 0, 0, 0, 0, 1]);
        assert!(matches!(
            refuse(&input),
            FrontError::HeaderBlockTooLarge { stream: 1 }
        ));
        // So is an endless run of empty CONTINUATIONs.
        let mut input = preface();
        input.extend(frame(TYPE_HEADERS, 0, 1, &block));
        for _ in 0..(MAX_HEADER_BLOCK / FRAME_HEADER_LEN) {
            input.extend(frame(TYPE_CONTINUATION, 0, 1, &[]));
        }
        assert!(matches!(
            refuse(&input),
            FrontError::HeaderBlockTooLarge { stream: 1 }
        ));
        // And a small block that decodes to a huge list (one 4 KiB entry, indexed again and
        // again).
        let mut block = Vec::new();
        block.push(0x40);
        write_literal_string(&mut block, b"x-big");
        write_literal_string(&mut block, &[b'b'; 4000]);
        block.extend(std::iter::repeat_n(0x80 | 62, 300));
        assert!(matches!(
            refuse(&with(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block)])),
            FrontError::HeaderListTooLarge { stream: 1 }
        ));
    }

    fn write_literal_string(out: &mut Vec<u8>, string: &[u8]) {
        loona_hpack::encoder::encode_integer_into(string.len(), 7, 0, out).unwrap();
        out.extend_from_slice(string);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let block = encode(&mut Encoder::new(), &request_headers(SOCKET_PATH));
        for round in 0..3000 {
            let mut input = preface();
            let mut body = frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block);
            body.extend(frame(0x0, 0, 1, b"hello"));
            let len = rng.random_range(0..200);
            if round % 2 == 0 {
                // Mutate a valid stream.
                for _ in 0..rng.random_range(1..6) {
                    let at = rng.random_range(0..body.len());
                    body[at] = rng.random();
                }
            } else {
                // Random frames with a plausible header.
                body.clear();
                for _ in 0..rng.random_range(1..5) {
                    let payload: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                    body.extend(frame(
                        rng.random_range(0..11),
                        rng.random(),
                        rng.random_range(0..4),
                        &payload,
                    ));
                }
            }
            input.extend(body);
            let _ = rewrite_all(&input);
            let _ = rewrite_all(&input[PREFACE.len()..]);
        }
    }
}
