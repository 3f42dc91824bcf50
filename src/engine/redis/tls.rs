//! TLS to Redis (`rediss://`, `redis_tls`): rustls's client state machine, driven by the
//! link over its non-blocking socket ([`Wire`]), so it fits the loop like plain TCP.
//!
//! rustls because it is sans-I/O (it never touches the socket: the link feeds it bytes and
//! takes bytes from it) and memory-safe; its `ring` provider because it builds with a C
//! compiler alone. Server certificates are verified against `redis_tls_ca`, or the system's
//! root certificates (`rustls-native-certs`); the name checked (and sent as SNI) is the
//! node's host, or `redis_tls_server_name`. A verification failure fails the connection with
//! the reason, at every attempt: there is no fallback to plain TCP.
//!
//! Invariant: a link's TLS session buffers at most `BUFFER_LIMIT` bytes of plaintext it
//! could not encrypt yet; the rest stays in the link's own output, which the engine bounds.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

/// Plaintext a session takes before its peer has read what came before.
const BUFFER_LIMIT: usize = 256 * 1024;

/// The files TLS is set up from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// `redis_tls_ca`: CA certificates (PEM); the system's roots when `None`.
    pub ca: Option<PathBuf>,
    /// `redis_tls_cert` and `redis_tls_key`: a client certificate chain and its key (PEM).
    pub client: Option<(PathBuf, PathBuf)>,
    /// `redis_tls_server_name`: the name every certificate is checked against.
    pub server_name: Option<String>,
}

/// What every TLS link of the engine shares.
#[derive(Clone)]
pub struct Tls {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the certificates and the key.
    ///
    /// # Errors
    /// What is wrong with a file, or that no root certificate was found.
    pub fn new(files: &TlsFiles) -> Result<Tls, String> {
        let mut roots = RootCertStore::empty();
        match &files.ca {
            Some(path) => {
                for cert in certificates(path)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("redis_tls_ca {}: {e}", path.display()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    // A system store may hold certificates rustls cannot use: skip those.
                    let _ = roots.add(cert);
                }
            }
        }
        if roots.is_empty() {
            return Err(
                "no CA certificate to verify Redis with: give redis_tls_ca, or install \
                 the system's (ca-certificates)"
                    .into(),
            );
        }
        // Deprecated for its lack of post-quantum key exchange, which only aws-lc-rs offers
        // (a much heavier build); a link to one's own Redis does not need it yet.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match &files.client {
            Some((cert, key)) => {
                let chain = certificates(cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("redis_tls_key {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("redis_tls_cert: {e}"))?
            }
            None => builder.with_no_client_auth(),
        };
        let server_name = match &files.server_name {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|e| format!("redis_tls_server_name {name:?}: {e}"))?,
            ),
            None => None,
        };
        Ok(Tls {
            config: Arc::new(config),
            server_name,
        })
    }

    /// A session for the node at `host` (a name or an address).
    ///
    /// # Errors
    /// `host` cannot be checked against a certificate.
    pub fn session(&self, host: &str) -> Result<ClientConnection, String> {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                ServerName::try_from(host.to_string())
                    .map_err(|e| format!("TLS: {host:?} is no server name: {e}"))?
            }
        };
        let mut session = ClientConnection::new(Arc::clone(&self.config), name)
            .map_err(|e| format!("TLS: {e}"))?;
        session.set_buffer_limit(Some(BUFFER_LIMIT));
        Ok(session)
    }
}

/// Every certificate in a PEM file.
fn certificates(path: &PathBuf) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// A link's byte stream: the socket itself, or a TLS session over it.
pub enum Wire {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(TcpStream, Box<ClientConnection>),
}

impl Wire {
    /// The socket, for readiness and registration.
    pub fn socket(&mut self) -> &mut TcpStream {
        match self {
            Wire::Plain(socket) | Wire::Tls(socket, _) => socket,
        }
    }

    /// Reads plaintext: `Ok(0)` at the end of the stream, `WouldBlock` when the socket has
    /// nothing more.
    ///
    /// # Errors
    /// The socket's, or a TLS failure (a certificate that does not verify, a broken record).
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (socket, session) = match self {
            Wire::Plain(socket) => return socket.read(buf),
            Wire::Tls(socket, session) => (socket, session),
        };
        loop {
            match session.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if session.read_tls(socket)? == 0 {
                return Ok(0);
            }
            session
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")))?;
            // The handshake may have something to answer.
            push(socket, session)?;
        }
    }

    /// Writes plaintext: as much of `buf` as the socket (or the session's buffer) takes;
    /// `WouldBlock` when it takes nothing.
    ///
    /// # Errors
    /// The socket's.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (socket, session) = match self {
            Wire::Plain(socket) => return socket.write(buf),
            Wire::Tls(socket, session) => (socket, session),
        };
        push(socket, session)?;
        let taken = session.writer().write(buf)?;
        push(socket, session)?;
        if taken == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(taken)
    }

    /// Sends what the TLS session has ready (its handshake, records) until the socket would
    /// block.
    ///
    /// # Errors
    /// The socket's.
    pub fn push(&mut self) -> io::Result<()> {
        match self {
            Wire::Plain(_) => Ok(()),
            Wire::Tls(socket, session) => push(socket, session),
        }
    }
}

fn push(socket: &mut TcpStream, session: &mut ClientConnection) -> io::Result<()> {
    while session.wants_write() {
        match session.write_tls(socket) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
