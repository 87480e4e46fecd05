//! The HTTP/1.1 listener: accepts connections, bounds them, terminates TLS
//! when configured, and drains them on shutdown.
//!
//! hyper is used directly rather than `axum::serve` because the latter
//! installs no timer, so it cannot enforce a header-read timeout and an idle
//! or slowloris client would hold a connection forever. HTTP/1.1 only: the
//! automatic HTTP/2 detection reads a preface with no timeout of its own.
//!
//! With TLS, each new connection takes the certificate in force when it is
//! accepted, from the reloadable settings: a SIGHUP reload changes the
//! certificate of later handshakes while open connections keep theirs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::security::LiveSettings;

/// Connection-level limits.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// Time to send a complete request head, including on an idle keep-alive connection.
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// How long in-flight requests may finish after shutdown begins.
    pub drain_timeout: Duration,
}

/// Most header lines in one request; more are answered 431 by hyper.
const MAX_HEADERS: usize = 100;
/// Largest request head hyper buffers; a larger one is answered 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A running listener.
#[derive(Debug)]
pub struct HttpServer {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// Starts accepting on `listener` (on the current runtime) until `shutdown`
    /// is cancelled, then drains.
    pub fn start(
        listener: TcpListener,
        router: Router,
        options: ServerOptions,
        settings: LiveSettings,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let task = tokio::spawn(accept_loop(listener, router, options, settings, shutdown));
        Ok(Self { local_addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Resolves once the listener is closed and connections are drained (or
    /// the drain bound has passed).
    pub async fn stopped(self) {
        if let Err(error) = self.task.await {
            tracing::error!(%error, "the HTTP accept loop failed");
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    options: ServerOptions,
    settings: LiveSettings,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(options.max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEAD_BYTES);
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Running out of file descriptors is transient: back off
                    // briefly instead of spinning or giving up.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, %peer, "could not set TCP_NODELAY");
        }
        // Handlers see the client's address (rate limiting without tokens
        // keys on it) as axum's `ConnectInfo`.
        let router = router.clone();
        let service = tower::service_fn(move |mut request: axum::extract::Request<_>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            tower::ServiceExt::oneshot(router.clone(), request)
        });
        let service = TowerToHyperService::new(service);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = settings.current().tls.clone();
        let handshake_timeout = options.header_read_timeout;
        tokio::spawn(async move {
            match tls {
                None => serve(&builder, stream, service, watcher, peer).await,
                Some(config) => {
                    // The handshake is bounded like a request head, so a
                    // client that stalls it cannot hold a connection slot.
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => serve(&builder, stream, service, watcher, peer).await,
                        Ok(Err(error)) => {
                            tracing::debug!(%error, %peer, "TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    let open = graceful.count();
    tracing::info!(open_connections = open, "stopped accepting; draining");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(options.drain_timeout) => {
            tracing::warn!(timeout_ms = options.drain_timeout.as_millis(), "drain bound reached; closing the remaining connections");
        }
    }
}

/// Serves HTTP/1.1 on one connection, plain or TLS, until it closes or the
/// graceful shutdown ends it.
async fn serve<I, S>(
    builder: &http1::Builder,
    io: I,
    service: S,
    watcher: Watcher,
    peer: SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<axum::body::Body>,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = builder.serve_connection(TokioIo::new(io), service);
    if let Err(error) = watcher.watch(connection).await {
        tracing::debug!(%error, %peer, "connection ended with an error");
    }
}
