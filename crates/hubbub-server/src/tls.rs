//! TLS with rustls: the certificate and key are loaded at startup (a bad or
//! unreadable one is an error before the port opens) and again on reload,
//! without touching open connections. Handshakes run in each connection's
//! own task (`serve`), off the accept loop, so a slow or silent client
//! cannot hold up others; the HTTP connection caps, per address and in
//! total, bound how many are in progress.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsAcceptor;

/// Where the PEM certificate chain and private key are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Longest a client may take to complete its handshake. Default 10 s.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Most handshakes in progress at once; connections beyond it are
    /// closed at once. Default 1,024. (One address holds at most
    /// `http.max_connections_per_ip` of them.)
    #[serde(default = "default_max_pending_handshakes")]
    pub max_pending_handshakes: usize,
}

fn default_max_pending_handshakes() -> usize {
    1024
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read or holds no PEM object of the right kind.
    #[error("cannot read {what} from {path}: {cause}")]
    Read {
        /// `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        cause: String,
    },
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("invalid certificate or key: {0}")]
    Invalid(#[from] rustls::Error),
}

/// Reloads the certificate and key from their files; connections made
/// afterwards use the new ones. Cheap to clone.
#[derive(Clone)]
pub struct TlsReloader {
    settings: TlsSettings,
    acceptor: Arc<RwLock<TlsAcceptor>>,
}

impl std::fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsReloader").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl TlsReloader {
    /// Loads the files for the first time.
    pub(crate) fn load(settings: TlsSettings) -> Result<Self, TlsError> {
        let acceptor = Arc::new(RwLock::new(acceptor(&settings)?));
        Ok(Self { settings, acceptor })
    }

    /// Reads the files again. On error the old certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = acceptor(&self.settings)?;
        *self.acceptor.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// The acceptor for new connections.
    pub(crate) fn current(&self) -> TlsAcceptor {
        self.acceptor.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Longest a client may take to complete its handshake.
    pub(crate) fn handshake_timeout(&self) -> Duration {
        self.settings.handshake_timeout
    }

    /// Most handshakes in progress at once.
    pub(crate) fn max_pending_handshakes(&self) -> usize {
        self.settings.max_pending_handshakes
    }
}

fn acceptor(settings: &TlsSettings) -> Result<TlsAcceptor, TlsError> {
    let certs = read_certs(&settings.cert)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key).map_err(|err| TlsError::Read {
        what: "private key",
        path: settings.key.clone(),
        cause: err.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    // The server speaks HTTP/1.1 only; WebSocket upgrades need it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |cause: String| TlsError::Read { what: "certificate", path: path.to_owned(), cause };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| error(err.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| error(err.to_string()))?;
    if certs.is_empty() {
        return Err(error("no PEM certificate in the file".to_owned()));
    }
    Ok(certs)
}
