//! The listening sockets and what arrives on them: binding (or adopting sockets the caller
//! bound), accepting WebSocket-port connections and publishers, and backing off when the
//! process runs out of descriptors.

use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mio::Interest;
use mio::net::{TcpListener, UnixListener};

use super::timer::Tick;
use super::token::{self, Source};
use super::{Server, TimerEvent};
use crate::base::ids::ConnId;
use crate::config::{Config, TIMER_TICK};
use crate::error::StartupError;
use crate::publish::port::Stream;
use crate::publish::{PublisherConn, command, http};
use crate::ws::conn::ClientConn;

/// How long accepting pauses after the process runs out of file descriptors.
const ACCEPT_BACKOFF_TICKS: u64 = 10;

/// The two listening sockets a server runs on.
pub struct Listeners {
    /// WebSocket and HTTP.
    pub ws: std::net::TcpListener,
    /// The publish port.
    pub publish: std::os::unix::net::UnixListener,
    /// The publish port's TCP listener (`publish_listen`), HTTP only.
    pub publish_tcp: Option<std::net::TcpListener>,
    /// The publish socket's file, removed when the server stops, when the server made it.
    socket_file: Option<SocketFile>,
}

impl Listeners {
    /// Binds `config.listen` and `config.publish_socket`. A socket file left by a crashed
    /// server is replaced; one a live server still answers on is an error, and so is a path
    /// that exists but is not a socket. The file is removed when the server stops.
    ///
    /// # Errors
    /// A [`StartupError`] naming the address or path at fault.
    pub fn bind(config: &Config) -> Result<Listeners, StartupError> {
        let ws =
            bind_ws(config.listen, config.reuse_port).map_err(|source| StartupError::Listen {
                addr: config.listen,
                source,
            })?;
        let publish = bind_publish_socket(&config.publish_socket, config.publish_socket_mode)?;
        let publish_tcp = match config.publish_listen {
            Some(addr) => Some(
                std::net::TcpListener::bind(addr)
                    .map_err(|source| StartupError::Listen { addr, source })?,
            ),
            None => None,
        };
        Ok(Listeners {
            ws,
            publish,
            publish_tcp,
            socket_file: Some(SocketFile(config.publish_socket.clone())),
        })
    }

    /// Sockets the caller bound itself (tests, or a supervisor passing sockets down); the
    /// caller keeps the publish socket's file.
    pub fn from_std(
        ws: std::net::TcpListener,
        publish: std::os::unix::net::UnixListener,
    ) -> Listeners {
        Listeners {
            ws,
            publish,
            publish_tcp: None,
            socket_file: None,
        }
    }

    /// The listeners in mio form.
    pub(super) fn into_mio(self) -> io::Result<Listening> {
        self.ws.set_nonblocking(true)?;
        self.publish.set_nonblocking(true)?;
        let publish_tcp = match self.publish_tcp {
            Some(listener) => {
                listener.set_nonblocking(true)?;
                Some(TcpListener::from_std(listener))
            }
            None => None,
        };
        Ok(Listening {
            ws: TcpListener::from_std(self.ws),
            publish: UnixListener::from_std(self.publish),
            publish_tcp,
            _socket_file: self.socket_file,
        })
    }
}

/// The listeners while the server accepts.
pub(super) struct Listening {
    pub(super) ws: TcpListener,
    pub(super) publish: UnixListener,
    pub(super) publish_tcp: Option<TcpListener>,
    /// Dropped (the file removed) when the listeners close.
    _socket_file: Option<SocketFile>,
}

impl Listening {
    /// Registers every listener with its token.
    pub(super) fn register(&mut self, registry: &mio::Registry) -> io::Result<()> {
        let ws = token::encode(Source::Listener);
        registry.register(&mut self.ws, ws, Interest::READABLE)?;
        let publish = token::encode(Source::PublishListener);
        registry.register(&mut self.publish, publish, Interest::READABLE)?;
        if let Some(tcp) = &mut self.publish_tcp {
            let token = token::encode(Source::PublishTcpListener);
            registry.register(tcp, token, Interest::READABLE)?;
        }
        Ok(())
    }

    /// Deregisters every listener (they close when dropped).
    pub(super) fn deregister(&mut self, registry: &mio::Registry) {
        let _ = registry.deregister(&mut self.ws);
        let _ = registry.deregister(&mut self.publish);
        if let Some(tcp) = &mut self.publish_tcp {
            let _ = registry.deregister(tcp);
        }
    }
}

/// Removes the publish socket file when dropped.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Server {
    pub(super) fn accept_clients(&mut self, now: Tick) {
        while !self.accept_paused {
            let Some(listening) = &self.listening else {
                return;
            };
            let (mut socket, peer) = match listening.ws.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_resource_exhaustion(&e) => {
                    log::warn!(
                        "accept failed ({e}); pausing accepts for {:?}",
                        TIMER_TICK * ACCEPT_BACKOFF_TICKS as u32
                    );
                    self.accept_paused = true;
                    self.timers
                        .insert(now.after(ACCEPT_BACKOFF_TICKS), TimerEvent::ResumeAccept);
                    return;
                }
                Err(e) => {
                    log::debug!("accept failed: {e}");
                    continue;
                }
            };
            // Events are small and latency matters more than packet count.
            let _ = socket.set_nodelay(true);
            if self.config.send_buffer_size > 0 {
                // Caps what the kernel holds for this peer: without it, autotuning lets a
                // stalled reader pin megabytes the server's RSS never shows.
                let _ = socket2::SockRef::from(&socket)
                    .set_send_buffer_size(self.config.send_buffer_size);
            }
            let key = self.fanout.clients().next_key();
            let token = token::encode(Source::Client(key));
            if let Err(e) = self
                .poll
                .registry()
                .register(&mut socket, token, Interest::READABLE)
            {
                log::error!("cannot register connection from {peer}: {e}");
                continue;
            }
            self.next_generation = self.next_generation.wrapping_add(1);
            let id = ConnId {
                key: key as u32,
                generation: self.next_generation,
            };
            let limit = self.config.max_output_buffer;
            self.fanout
                .clients_mut()
                .insert(|_| ClientConn::new(id, socket, peer, limit));
            self.arm(
                key,
                now.after(self.ticks.ticks_in(self.config.handshake_timeout)),
            );
            log::debug!("conn={} accepted from {peer}", id.generation);
        }
    }

    /// Accepts publishers on the Unix socket, or (`tcp`) on `publish_listen`.
    pub(super) fn accept_publishers(&mut self, tcp: bool) {
        loop {
            let Some(listening) = &self.listening else {
                return;
            };
            let accepted = match (&listening.publish_tcp, tcp) {
                (Some(listener), true) => listener.accept().map(|(s, _)| {
                    // Replies are small and a worker waits on each one.
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                }),
                (None, true) => return,
                (_, false) => listening.publish.accept().map(|(s, _)| Stream::Unix(s)),
            };
            let mut socket = match accepted {
                Ok(socket) => socket,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("publish port accept failed: {e}");
                    return;
                }
            };
            if self.publishers.len() >= self.config.max_publishers {
                let max = self.config.max_publishers;
                log::warn!("max_publishers ({max}) reached; refusing a publisher");
                let message = format!("too many publishers (max_publishers {max})");
                let refusal = match socket {
                    Stream::Unix(_) => command::error_reply(None, &message).into_bytes(),
                    Stream::Tcp(_) => {
                        http::Reject::closing("503 Service Unavailable", message).response()
                    }
                };
                // Best effort: a fresh socket's buffer takes one short answer.
                let _ = socket.write(&refusal);
                continue;
            }
            let entry = self.publishers.vacant_entry();
            let token = token::encode(Source::Publisher(entry.key()));
            let interest = Interest::READABLE | Interest::WRITABLE;
            let mut publisher = PublisherConn::new(self.next_publisher + 1, socket);
            if let Err(e) = self
                .poll
                .registry()
                .register(publisher.socket(), token, interest)
            {
                log::error!("cannot register publisher: {e}");
                continue;
            }
            self.next_publisher += 1;
            entry.insert(publisher);
            self.fanout.metrics_mut().publishers += 1;
            log::debug!("publisher={} connected", self.next_publisher);
        }
    }
}

/// Accept errors that mean "out of descriptors or memory": retrying at once would spin.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    // Linux errno values: ENOMEM, ENFILE, EMFILE, ENOBUFS.
    matches!(e.raw_os_error(), Some(12 | 23 | 24 | 105))
}

/// Binds the publish socket, replacing a stale file left by a crashed server.
/// Backlog of the WebSocket listener bound with `reuse_port` (what std's `bind` uses).
const BACKLOG: i32 = 128;

/// The WebSocket listener: as `std` binds it, or with `SO_REUSEPORT` so that several nodes
/// on this host share the address and the kernel spreads new connections over them.
fn bind_ws(addr: std::net::SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    if !reuse_port {
        return std::net::TcpListener::bind(addr);
    }
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

fn bind_publish_socket(
    path: &Path,
    mode: u32,
) -> Result<std::os::unix::net::UnixListener, StartupError> {
    let error = |source| StartupError::PublishSocket {
        path: path.to_owned(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(error(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(StartupError::SocketInUse {
                    path: path.to_owned(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("replacing stale publish socket {}", path.display());
                std::fs::remove_file(path).map_err(error)?;
            }
            Err(e) => return Err(error(e)),
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(error)?;
    Ok(listener)
}
