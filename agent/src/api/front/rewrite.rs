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
pub(crate) mod tests;
