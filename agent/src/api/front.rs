//! The HTTP/2 front of the unix socket: every request that arrives there is addressed to
//! `localhost`, whatever its `:authority` held.
//!
//! gRPC clients put different things in `:authority` over a unix socket: grpcio ≥ 1.57 the
//! %-encoded socket path, grpc-java and grpcurl 1.8 the raw path, others `localhost` or
//! nothing. The `h2` crate under tonic refuses any `:authority` that is not an RFC 3986
//! authority with RST_STREAM(PROTOCOL_ERROR) before berthd sees the request (hyperium/h2#487).
//!
//! [`UnixFront`] wraps an accepted connection. Its write side passes through untouched. Its
//! read side (client → server) follows the frame stream: the 24-byte preface, then 9-byte
//! frame headers. Every frame but HEADERS and CONTINUATION passes through as it is, payload
//! included (DATA is read straight into the server's buffer). A header block (HEADERS plus its
//! CONTINUATIONs, bounded in size) is collected and HPACK-decoded with a decoder that lives as
//! long as the connection (so the client's dynamic-table entries and size updates are
//! followed).
//!
//! The connection's first header block decides. If its `:authority` is one h2 accepts (or
//! there is none), that block goes on as it came and the connection turns transparent: the
//! front passes every later byte unparsed, so clients that already worked (tonic, grpc-go,
//! grpc-js, grpcurl 1.9) pay one HPACK decode per connection and nothing per request.
//! Otherwise every header block of the connection is rewritten: padding dropped, `:authority`
//! set to `localhost`, encoded again with literals only (the server's decoder table stays
//! empty, hence always in step with what it is sent), in frames of at most 16384 bytes (the
//! smallest SETTINGS_MAX_FRAME_SIZE a server may have).
//!
//! Anything that is not HTTP/2 up to that point — a wrong preface, a broken header-block
//! sequence, HPACK that does not decode, a header block over 1 MiB — is an `InvalidData` read
//! error, on which the server closes the connection. Other protocol errors (a DATA frame
//! larger than the server allows, a bad stream id on DATA, ...) are left to the server.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

mod rewrite;

pub(crate) use rewrite::rewrite_all;
use rewrite::Rewriter;

/// Bytes asked of the socket per read when the front needs more than it holds.
const READ_CHUNK: usize = 16 * 1024;

/// An accepted unix-socket connection as the HTTP/2 server reads it: see the module docs.
pub(crate) struct UnixFront<IO> {
    inner: IO,
    rewriter: Rewriter,
    /// Bytes read from the client and not yet handled.
    input: BytesMut,
    /// Bytes for the server to read.
    output: BytesMut,
    eof: bool,
    failed: bool,
}

impl<IO> std::fmt::Debug for UnixFront<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnixFront")
            .field("rewriter", &self.rewriter)
            .field("input", &self.input.len())
            .field("output", &self.output.len())
            .field("eof", &self.eof)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<IO> UnixFront<IO> {
    pub(crate) fn new(inner: IO) -> Self {
        Self::with_rewriter(inner, Rewriter::default())
    }

    fn with_rewriter(inner: IO, rewriter: Rewriter) -> Self {
        Self {
            inner,
            rewriter,
            input: BytesMut::new(),
            output: BytesMut::new(),
            eof: false,
            failed: false,
        }
    }
}

/// The same connection info as the bare stream (for a `UnixStream`, tonic's `UdsConnectInfo`
/// with the peer address and SO_PEERCRED credentials), so request extensions are unchanged.
impl<IO: Connected> Connected for UnixFront<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for UnixFront<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if !this.output.is_empty() {
                let count = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..count]);
                this.output.advance(count);
                return Poll::Ready(Ok(()));
            }
            if this.rewriter.is_transparent() {
                if !this.input.is_empty() {
                    let count = this.input.len().min(buf.remaining());
                    buf.put_slice(&this.input[..count]);
                    this.input.advance(count);
                    return Poll::Ready(Ok(()));
                }
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            if this.failed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the connection was refused as not HTTP/2",
                )));
            }
            let passthrough = this.rewriter.passthrough();
            if passthrough > 0 {
                let limit = passthrough.min(buf.remaining());
                if !this.input.is_empty() {
                    let count = limit.min(this.input.len());
                    buf.put_slice(&this.input[..count]);
                    this.input.advance(count);
                    this.rewriter.passed(count);
                    return Poll::Ready(Ok(()));
                }
                if this.eof {
                    return Poll::Ready(Ok(()));
                }
                // Straight from the socket into the server's buffer.
                let mut direct = ReadBuf::new(buf.initialize_unfilled_to(limit));
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut direct))?;
                let count = direct.filled().len();
                if count == 0 {
                    this.eof = true;
                } else {
                    buf.advance(count);
                    this.rewriter.passed(count);
                }
                return Poll::Ready(Ok(()));
            }
            if let Err(err) = this.rewriter.process(&mut this.input, &mut this.output) {
                this.failed = true;
                this.input.clear();
                this.output.clear();
                return Poll::Ready(Err(err.into()));
            }
            if !this.output.is_empty() || this.rewriter.passthrough() > 0 {
                continue;
            }
            if this.eof {
                // End of stream, possibly inside a frame: the server sees the end either way.
                return Poll::Ready(Ok(()));
            }
            this.input.reserve(READ_CHUNK);
            let count = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.input
            ))?;
            if count == 0 {
                this.eof = true;
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for UnixFront<IO> {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response};
    use loona_hpack::Encoder;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

    use super::rewrite::tests::{encode, frame, preface, request_headers, SOCKET_PATH};
    use super::rewrite::{
        FrameHeader, FLAG_END_HEADERS, FLAG_END_STREAM, FRAME_HEADER_LEN, TYPE_HEADERS,
    };
    use super::*;

    /// An h2 server on one end of `front`, answering every request with its `:authority`
    /// and the size of its body, then a streamed body larger than the client's window.
    async fn serve_h2(front: UnixFront<DuplexStream>) -> Result<(), h2::Error> {
        let mut connection = h2::server::handshake(front).await?;
        let mut handlers = tokio::task::JoinSet::new();
        while let Some(accepted) = connection.accept().await {
            let (request, mut respond) = accepted?;
            handlers.spawn(async move {
                let authority = request
                    .uri()
                    .authority()
                    .map(|authority| authority.as_str().to_owned())
                    .unwrap_or_default();
                let mut body = request.into_body();
                let mut received = 0usize;
                while let Some(chunk) = body.data().await {
                    let chunk = chunk?;
                    received += chunk.len();
                    body.flow_control().release_capacity(chunk.len())?;
                }
                let response = Response::builder()
                    .header("x-authority", authority)
                    .header("x-received", received.to_string())
                    .body(())
                    .unwrap();
                let mut send = respond.send_response(response, false)?;
                for _ in 0..4 {
                    send.send_data(Bytes::from(vec![7u8; 40_000]), false)?;
                }
                send.send_data(Bytes::new(), true)?;
                Ok::<_, h2::Error>(())
            });
        }
        while let Some(handled) = handlers.join_next().await {
            handled.unwrap()?;
        }
        Ok(())
    }

    /// h2's client (which sends a valid authority, so the connection turns transparent) and the
    /// same with every header block rewritten: 1 MiB request bodies (more than the initial
    /// windows), streamed answers, several requests on a connection whose HPACK table fills.
    #[tokio::test]
    async fn a_real_h2_client_and_server_talk_through_the_front() {
        for rewrite_every_block in [false, true] {
            let (client_io, server_io) = tokio::io::duplex(64 * 1024);
            let front = if rewrite_every_block {
                UnixFront::with_rewriter(server_io, Rewriter::rewriting_every_block())
            } else {
                UnixFront::new(server_io)
            };
            let server = tokio::spawn(serve_h2(front));
            let (client, connection) = h2::client::handshake(client_io).await.unwrap();
            let connection = tokio::spawn(connection);
            let mut client = client.ready().await.unwrap();
            for round in 0..5u8 {
                let request = Request::post(format!("http://berth.example/echo/{round}"))
                    .header("x-repeated", "same value every time")
                    .header("x-round", round.to_string())
                    .body(())
                    .unwrap();
                let (response, mut send) = client.send_request(request, false).unwrap();
                let body = vec![round; 1 << 20];
                let mut sent = 0;
                while sent < body.len() {
                    send.reserve_capacity(body.len() - sent);
                    let capacity = std::future::poll_fn(|cx| send.poll_capacity(cx))
                        .await
                        .unwrap()
                        .unwrap();
                    let end = (sent + capacity).min(body.len());
                    send.send_data(Bytes::copy_from_slice(&body[sent..end]), end == body.len())
                        .unwrap();
                    sent = end;
                }
                let response = response.await.unwrap();
                let authority = if rewrite_every_block {
                    "localhost"
                } else {
                    "berth.example"
                };
                assert_eq!(response.headers()["x-authority"], authority);
                assert_eq!(response.headers()["x-received"], (1usize << 20).to_string());
                let mut body = response.into_body();
                let mut received = 0;
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.unwrap();
                    received += chunk.len();
                    body.flow_control().release_capacity(chunk.len()).unwrap();
                }
                assert_eq!(received, 160_000);
                client = client.ready().await.unwrap();
            }
            drop(client);
            connection.await.unwrap().unwrap();
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }

    /// A graceful shutdown while a request is in flight on a rewritten connection: the server's
    /// GOAWAY reaches the client, the request in flight still completes, and the connection
    /// then ends cleanly on both sides.
    #[tokio::test]
    async fn graceful_shutdown_goaway_reaches_the_client() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let front = UnixFront::with_rewriter(server_io, Rewriter::rewriting_every_block());
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(front).await?;
            let (request, mut respond) = connection.accept().await.unwrap()?;
            connection.graceful_shutdown();
            let answer = tokio::spawn(async move {
                let mut body = request.into_body();
                while let Some(chunk) = body.data().await {
                    body.flow_control().release_capacity(chunk?.len())?;
                }
                let mut send = respond.send_response(Response::new(()), false)?;
                send.send_data(Bytes::from_static(b"last words"), true)?;
                Ok::<_, h2::Error>(())
            });
            // Drives the connection to its end: no more requests are accepted.
            assert!(connection.accept().await.is_none());
            answer.await.unwrap()
        });
        let (client, connection) = h2::client::handshake(client_io).await.unwrap();
        let connection = tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();
        let (response, mut send) = client
            .send_request(
                Request::post("http://localhost/slow").body(()).unwrap(),
                false,
            )
            .unwrap();
        send.send_data(Bytes::from_static(b"request"), true)
            .unwrap();
        let mut body = response.await.unwrap().into_body();
        assert_eq!(
            body.data().await.unwrap().unwrap(),
            Bytes::from_static(b"last words")
        );
        drop(client);
        tokio::time::timeout(Duration::from_secs(10), connection)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    /// Sends the preface, SETTINGS and one request with `authority` (encoded as a client that
    /// uses the dynamic table would) over `client_io`.
    async fn send_raw_request(client_io: &mut DuplexStream, authority: &str) {
        let mut input = preface();
        let block = encode(&mut Encoder::new(), &request_headers(authority));
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            1,
            &block,
        ));
        client_io.write_all(&input).await.unwrap();
    }

    #[tokio::test]
    async fn h2_gets_localhost_for_a_path_authority() {
        for authority in [SOCKET_PATH, "%2Frun%2Fberth%2Fberthd.sock", ""] {
            let (mut client_io, server_io) = tokio::io::duplex(64 * 1024);
            let server = tokio::spawn(async move {
                let mut connection = h2::server::handshake(UnixFront::new(server_io)).await?;
                let accepted = connection.accept().await;
                Ok::<_, h2::Error>(accepted.map(|accepted| {
                    accepted.map(|(request, _)| request.uri().authority().cloned())
                }))
            });
            send_raw_request(&mut client_io, authority).await;
            let accepted = tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            let authority_seen = accepted.unwrap().unwrap().unwrap();
            assert_eq!(authority_seen.as_str(), "localhost");
        }
    }

    /// The reason the front exists: if this fails, h2 accepts a socket path as `:authority`
    /// (hyperium/h2#487 fixed) and the front can go (see README, "gRPC by example").
    #[tokio::test]
    async fn h2_still_refuses_a_path_authority_without_the_front() {
        let (mut client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.unwrap();
            let accepted = connection.accept().await;
            let accepted = accepted.map(|accepted| accepted.is_ok());
            // Keep the connection driven so that the reset is written.
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            accepted
        });
        send_raw_request(&mut client_io, SOCKET_PATH).await;
        // h2 resets the stream (PROTOCOL_ERROR) and accepts no request.
        let mut seen = Vec::new();
        let mut buffer = [0u8; 4096];
        let reset = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let count = client_io.read(&mut buffer).await.unwrap();
                assert_ne!(count, 0, "connection closed before a reset");
                seen.extend_from_slice(&buffer[..count]);
                let mut rest = seen.as_slice();
                while let Some(header) = rest.first_chunk::<FRAME_HEADER_LEN>() {
                    let header = FrameHeader::parse(header);
                    let end = FRAME_HEADER_LEN + header.len;
                    if rest.len() < end {
                        break;
                    }
                    if header.kind == 0x3 && header.stream == 1 {
                        return u32::from_be_bytes(
                            *rest[FRAME_HEADER_LEN..end].first_chunk().unwrap(),
                        );
                    }
                    rest = &rest[end..];
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(reset, 1, "RST_STREAM(PROTOCOL_ERROR)");
        drop(client_io);
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .unwrap()
                .unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn garbage_on_a_connection_is_a_read_error() {
        let (mut client_io, server_io) = tokio::io::duplex(1024);
        let mut front = UnixFront::new(server_io);
        client_io
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buffer = [0u8; 64];
        let err = front.read(&mut buffer).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // And it stays an error.
        front.read(&mut buffer).await.unwrap_err();
    }

    #[tokio::test]
    async fn connect_info_is_the_unix_streams() {
        let (client, server) = tokio::net::UnixStream::pair().unwrap();
        let front = UnixFront::new(server);
        let info = front.connect_info();
        let credentials = info.peer_cred.unwrap();
        assert_eq!(credentials.uid(), nix::unistd::getuid().as_raw());
        assert_eq!(credentials.gid(), nix::unistd::getgid().as_raw());
        assert_eq!(
            credentials.pid(),
            Some(i32::try_from(std::process::id()).unwrap())
        );
        drop(client);
    }
}
