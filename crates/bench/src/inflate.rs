//! The bench client's TCP stream, which can also take permessage-deflate: tungstenite cannot
//! read compressed frames, so with `PUSHGATE_BENCH_DEFLATE=inflate` this stream inflates every
//! compressed message from the node (with pushgate-websocket's client-side reader) and hands
//! tungstenite the same message as a plain frame. The load generator thereby pays what a real
//! client pays to inflate, plus a copy.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use pushgate_websocket::{Config, FrameReader, Incoming, frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub struct BenchTcp {
    tcp: TcpStream,
    inflate: Option<Box<Inflate>>,
}

struct Inflate {
    /// Bytes from the node not yet turned into plain frames.
    raw: BytesMut,
    /// Plain bytes for tungstenite.
    out: BytesMut,
    /// The HTTP response passed through: frames follow.
    upgraded: bool,
    reader: FrameReader,
}

impl BenchTcp {
    pub fn new(tcp: TcpStream, inflate: bool) -> Self {
        let inflate = inflate.then(|| {
            Box::new(Inflate {
                raw: BytesMut::new(),
                out: BytesMut::new(),
                upgraded: false,
                reader: FrameReader::client(Config {
                    max_message: 64 << 20,
                    deflate: true,
                }),
            })
        });
        Self { tcp, inflate }
    }
}

impl Inflate {
    /// Moves what `raw` holds, as plain bytes, into `out`.
    fn convert(&mut self) -> io::Result<()> {
        if !self.upgraded {
            let Some(end) = self.raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                return Ok(());
            };
            self.out.extend_from_slice(&self.raw.split_to(end + 4));
            self.upgraded = true;
        }
        while let Some(message) = (self.reader)
            .read(&mut self.raw)
            .map_err(io::Error::other)?
        {
            let out = &mut self.out;
            match message {
                Incoming::Text(text) => frame::put_text(out, &text),
                Incoming::Binary(data) => frame::put_binary(out, &data),
                Incoming::Ping(data) => frame::put_ping(out, &data),
                Incoming::Pong(data) => frame::put_pong(out, &data),
                Incoming::Close(close) => {
                    frame::put_close(out, close.as_ref().map(|(c, r)| (*c, r.as_str())))
                }
            }
        }
        Ok(())
    }
}

impl AsyncRead for BenchTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(inflate) = &mut this.inflate else {
            return Pin::new(&mut this.tcp).poll_read(cx, buf);
        };
        loop {
            if !inflate.out.is_empty() {
                let n = inflate.out.len().min(buf.remaining());
                buf.put_slice(&inflate.out[..n]);
                inflate.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            // Small: the chunk is zeroed on every read, and a delivery is a few hundred bytes.
            let mut chunk = [0u8; 4096];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            inflate.raw.extend_from_slice(read.filled());
            inflate.convert()?;
        }
    }
}

impl AsyncWrite for BenchTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
