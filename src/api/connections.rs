//! Accepting gRPC connections, at most `grpc.max_connections` at once. Each connection holds
//! a permit for its lifetime (its TLS handshake included); while none is free the listener is
//! not polled, so further clients wait in the kernel's backlog instead of costing scand memory.
//! With TLS (`tls`), the handshake is done here, with the configuration in force at accept.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::tls::ReloadingTls;
use crate::telemetry::metrics as m;

/// The byte stream of a connection: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An accepted connection (past its TLS handshake, with TLS) and its permit; dropping it frees
/// a place.
pub struct LimitedConnection {
    stream: Box<dyn Io>,
    info: TcpConnectInfo,
    _permit: OwnedSemaphorePermit,
}

impl LimitedConnection {
    fn new(stream: Box<dyn Io>, info: TcpConnectInfo, permit: OwnedSemaphorePermit) -> Self {
        metrics::gauge!(m::GRPC_CONNECTIONS).increment(1.0);
        Self {
            stream,
            info,
            _permit: permit,
        }
    }
}

impl Drop for LimitedConnection {
    fn drop(&mut self) {
        metrics::gauge!(m::GRPC_CONNECTIONS).decrement(1.0);
    }
}

/// How long a client may take over its TLS handshake, holding a place meanwhile.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections as the server consumes them; ends when `shutdown` is cancelled. With `tls`, each
/// connection's handshake runs in a task of its own with the configuration in force when it
/// was accepted, so a slow client holds up nobody else and a reload never touches an open one.
pub fn incoming(
    listener: TcpListener,
    max_connections: usize,
    tls: Option<Arc<ReloadingTls>>,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<LimitedConnection>> {
    let permits = Arc::new(Semaphore::new(max_connections));
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => return,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            // A test's stand-in for the accept loop's death (an unexpected panic or exit).
            fail::fail_point!("grpc-accept-loop-ends", |_| ());
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: the server must keep listening.
                    tracing::warn!(%error, "accepting a gRPC connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Without TCP_NODELAY small acks wait for delayed-ACK timers (~40 ms a round trip).
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "TCP_NODELAY not set");
            }
            let info = stream.connect_info();
            let Some(tls) = &tls else {
                let connection = LimitedConnection::new(Box::new(stream), info, permit);
                if tx.send(Ok(connection)).await.is_err() {
                    return;
                }
                continue;
            };
            let acceptor = tls.acceptor();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let connection = LimitedConnection::new(Box::new(stream), info, permit);
                        let _ = tx.send(Ok(connection)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

impl Connected for LimitedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for LimitedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
