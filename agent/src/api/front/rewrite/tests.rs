//! The rewriting of header blocks, frame by frame (helpers shared with the front's tests).

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
