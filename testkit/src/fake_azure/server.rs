//! Accept loops for the plain HTTP and HTTPS listeners.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::pki::IssuedCert;

/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the TLS acceptor for the HTTPS listeners, using the aws-lc-rs provider.
///
/// Also installs aws-lc-rs as the process-wide rustls provider if none is installed yet, so
/// clients built in the same process without an explicit provider agree with the fake.
pub(crate) fn tls_acceptor(cert: &IssuedCert) -> anyhow::Result<TlsAcceptor> {
    // An error means another provider is already installed, which is fine for the fake because
    // its own configuration names aws-lc-rs explicitly.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let chain = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("failed to parse the fake Azure server certificate PEM")?;
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
        .context("failed to parse the fake Azure server key PEM")?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("failed to select TLS versions for the fake Azure server")?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("failed to load the fake Azure server certificate into rustls")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `router` on `listener` until `shutdown` turns true. Connections still open at that
/// point are dropped with the task's connection set.
pub(crate) async fn serve(
    name: &'static str,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let stopped = async move {
        // An error means the sender is gone, which also means the fake is stopping.
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    debug!(listener = name, %peer, "accepted a connection");
                    connections.spawn(serve_connection(name, stream, tls.clone(), router.clone()));
                }
                Err(error) => {
                    // Accept errors such as running out of file descriptors are usually
                    // temporary, so the loop pauses and retries.
                    warn!(listener = name, %error, "failed to accept a connection, retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut stopped => break,
        }
    }
    debug!(
        listener = name,
        open_connections = connections.len(),
        "listener stopped"
    );
}

async fn serve_connection(
    name: &'static str,
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    router: Router,
) {
    let service = TowerToHyperService::new(router);
    let result = match tls {
        Some(acceptor) => {
            let handshake =
                tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
            match handshake {
                Ok(Ok(stream)) => {
                    http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
                Ok(Err(error)) => {
                    debug!(listener = name, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(listener = name, "TLS handshake timed out");
                    return;
                }
            }
        }
        None => {
            http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
        }
    };
    if let Err(error) = result {
        debug!(listener = name, %error, "connection ended with an error");
    }
}
