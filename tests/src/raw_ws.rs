//! A WebSocket client written by hand over TCP, for what client libraries will not do: send
//! broken frames, or inflate permessage-deflate. What the server sends is read with
//! pushgate-websocket's client-side reader, which checks it as strictly as the node checks
//! clients.

use std::net::SocketAddr;

use bytes::BytesMut;
use pushgate_websocket::{Config, FrameReader, Incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::WAIT;

/// The first byte of a frame: FIN, RSV1–3 and the opcode.
pub mod first {
    pub const FIN: u8 = 0x80;
    pub const RSV1: u8 = 0x40;
    pub const RSV2: u8 = 0x20;
    pub const RSV3: u8 = 0x10;
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
}

pub struct RawWs {
    tcp: TcpStream,
    /// Bytes read and not yet taken as frames.
    buf: BytesMut,
    reader: FrameReader,
    /// Messages read that came compressed (RSV1).
    pub compressed: usize,
}

impl RawWs {
    /// Asks `addr` to upgrade `path`, with `headers` (each line ending in CRLF) after the
    /// handshake's own; returns the client and the response head once it is `101`.
    pub async fn open(addr: SocketAddr, path: &str, headers: &str) -> (Self, String) {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             {headers}\r\n"
        );
        tcp.write_all(request.as_bytes()).await.expect("write");
        let mut ws = Self {
            tcp,
            buf: BytesMut::new(),
            reader: FrameReader::client(Config {
                max_message: 1 << 20,
                deflate: headers.contains("permessage-deflate"),
            }),
            compressed: 0,
        };
        let head = loop {
            if let Some(end) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break String::from_utf8_lossy(&ws.buf.split_to(end + 4)).into_owned();
            }
            assert!(
                ws.fill().await > 0,
                "the connection ended before a response"
            );
        };
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        (ws, head)
    }

    /// Reads more from the socket; 0 once it ended.
    async fn fill(&mut self) -> usize {
        let mut chunk = [0; 8192];
        let n = timeout(WAIT, self.tcp.read(&mut chunk))
            .await
            .expect("timed out reading")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// The server's next message or control frame; `None` once the connection ended.
    pub async fn next(&mut self) -> Option<Incoming> {
        loop {
            let rsv1 = self.buf.first().is_some_and(|b| b & first::RSV1 != 0);
            if let Some(message) = self.reader.read(&mut self.buf).expect("a valid frame") {
                self.compressed += usize::from(rsv1 && matches!(message, Incoming::Text(_)));
                return Some(message);
            }
            if self.fill().await == 0 {
                return None;
            }
        }
    }

    /// The next text message, skipping control frames.
    pub async fn next_text(&mut self) -> Vec<u8> {
        loop {
            match self.next().await.expect("a text message") {
                Incoming::Text(text) => return text.to_vec(),
                Incoming::Close(close) => panic!("closed instead: {close:?}"),
                _ => {}
            }
        }
    }

    /// Writes one frame; `first` is its first byte (see [`first`]).
    pub async fn send(&mut self, first: u8, masked: bool, payload: &[u8]) {
        let mut frame = vec![first];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n @ 0..=125 => frame.push(mask_bit | n as u8),
            n @ 126..=0xffff => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [0x12, 0x34, 0x56, 0x78];
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            frame.extend_from_slice(payload);
        }
        self.tcp.write_all(&frame).await.expect("write");
    }

    /// The code of the server's close frame, skipping what comes before it; `None` if the
    /// connection ended without one (or the close frame had no code).
    pub async fn close_code(&mut self) -> Option<u16> {
        while let Some(message) = self.next().await {
            if let Incoming::Close(close) = message {
                return close.map(|(code, _)| code);
            }
        }
        None
    }

    /// Reads until the server ends the TCP connection.
    pub async fn until_ended(&mut self) {
        while self.next().await.is_some() {}
    }
}
