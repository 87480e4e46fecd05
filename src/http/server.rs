//! The HTTP/1.1 listener: accepts connections, bounds them, and drains them
//! on shutdown.
//!
//! hyper is used directly rather than `axum::serve` because the latter
//! installs no timer, so it cannot enforce a header-read timeout and an idle
//! or slowloris client would hold a connection forever. HTTP/1.1 only: the
//! automatic HTTP/2 detection reads a preface with no timeout of its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let task = tokio::spawn(accept_loop(listener, router, options, shutdown));
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
        let service = TowerToHyperService::new(router.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "connection ended with an error");
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
