//! The driver of stream ⇄ socket splices: kernel TCP sockets (non-blocking, in one epoll set
//! of our own) joined to their QUIC streams in a `Core`.
//!
//! The owner adds the epoll descriptor to its event loop once; when it is readable, or after
//! the core ran (packets, timers), one `service()` pass moves what every ready splice can
//! move: the stream's tap into the socket (consuming as the kernel accepts, which is what
//! lets quinn grant the peer more credit) and the socket into the stream while that stream's
//! unsent queue is below `SPLICE_BACKLOG`. Edge-triggered readiness is remembered per socket
//! (cleared only on EAGAIN), so a splice paused by back-pressure resumes without a syscall
//! to ask. FIN is a half-close each way (`shutdown(SHUT_WR)` / EOF → stream FIN); a reset
//! stream or a failed socket ends the splice with an `Ev::Spliced` event and the owner
//! aborts its side.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use bytes::BytesMut;

use crate::core::{Core, Ev};
use crate::splice::{SPLICE_BACKLOG, SPLICE_DONE, SPLICE_FAILED, SPLICE_GONE, SPLICE_RESET};

/// Bytes read from a socket at once (one stream write).
const READ_CHUNK: usize = 64 * 1024;
/// Chunks handed to one writev.
const IOV_MAX: usize = 16;
/// Readiness reports taken from epoll per call.
const EPOLL_BATCH: usize = 256;

struct Splice {
    id: u64,
    fd: OwnedFd,
    h: usize,
    sid: u64,
    readable: bool,
    writable: bool,
    /// The socket said EOF and the stream's FIN is queued.
    read_eof: bool,
    /// The peer's FIN was passed on as shutdown(SHUT_WR).
    write_shut: bool,
    sent: u64,
    received: u64,
}

pub struct SocketSplicer {
    epoll: OwnedFd,
    next_id: u64,
    splices: HashMap<u64, Splice>,
    by_stream: HashMap<(usize, u64), u64>,
    /// Splices epoll reported since the last service pass.
    ready: HashSet<u64>,
    buf: BytesMut,
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

impl SocketSplicer {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            epoll: crate::driver::epoll()?,
            next_id: 0,
            splices: HashMap::new(),
            by_stream: HashMap::new(),
            ready: HashSet::new(),
            buf: BytesMut::with_capacity(4 * READ_CHUNK),
        })
    }

    /// The descriptor to watch for readability (the owner's event loop).
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn len(&self) -> usize {
        self.splices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.splices.is_empty()
    }

    /// Splice `fd` (a connected stream socket; ownership passes here and it is made
    /// non-blocking) to stream `sid` of `h`. `down` (already delivered to the owner, not yet
    /// consumed) is written to the socket first and `down_fin` says the stream's FIN came
    /// with it; `up` (read from the socket by the owner) goes into the stream first.
    #[allow(clippy::too_many_arguments)]
    pub fn add(&mut self, core: &mut Core, h: usize, sid: u64, fd: OwnedFd, down: &[u8], down_fin: bool,
               up: &[u8]) -> Result<u64, String> {
        if self.by_stream.contains_key(&(h, sid)) {
            return Err("stream is already spliced".into());
        }
        let raw = fd.as_raw_fd();
        unsafe {
            let flags = libc::fcntl(raw, libc::F_GETFL);
            if flags < 0 || libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(format!("fcntl: {}", errno()));
            }
        }
        if !core.tap(h, sid, down, down_fin) {
            return Err("no such live connection".into());
        }
        if !up.is_empty() && !core.stream_write(h, sid, up, false) {
            core.untap(h, sid);
            return Err("stream is closed for writing".into());
        }
        self.next_id += 1;
        let id = self.next_id;
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: id,
        };
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, raw, &mut ev) } < 0 {
            core.untap(h, sid);
            return Err(format!("epoll_ctl: {}", errno()));
        }
        self.splices.insert(id, Splice {
            id, fd, h, sid, readable: true, writable: true, read_eof: false, write_shut: false,
            sent: up.len() as u64, received: 0,
        });
        self.by_stream.insert((h, sid), id);
        self.ready.insert(id);
        Ok(id)
    }

    /// End a splice without an event (the owner takes the stream over, e.g. to resume it
    /// elsewhere): (id, sent, received). The socket is left as it is; our descriptor closes.
    pub fn remove(&mut self, core: &mut Core, h: usize, sid: u64) -> Option<(u64, u64, u64)> {
        let id = self.by_stream.remove(&(h, sid))?;
        let sp = self.splices.remove(&id)?;
        self.ready.remove(&id);
        core.untap(h, sid);
        unsafe {
            libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, sp.fd.as_raw_fd(), std::ptr::null_mut());
        }
        Some((id, sp.sent, sp.received))
    }

    /// (sent, received) so far.
    pub fn counts(&self, h: usize, sid: u64) -> Option<(u64, u64)> {
        let sp = self.splices.get(self.by_stream.get(&(h, sid))?)?;
        Some((sp.sent, sp.received))
    }

    /// Take epoll's readiness reports (without waiting).
    pub fn poll(&mut self) {
        let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; EPOLL_BATCH];
        loop {
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), evs.as_mut_ptr(), EPOLL_BATCH as i32, 0) };
            if n <= 0 {
                return;
            }
            for ev in &evs[..n as usize] {
                let (bits, id) = (ev.events, ev.u64);
                if let Some(sp) = self.splices.get_mut(&id) {
                    let bits = bits as i32;
                    if bits & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) != 0 {
                        sp.readable = true;
                    }
                    if bits & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) != 0 {
                        sp.writable = true;
                    }
                    self.ready.insert(id);
                }
            }
            if (n as usize) < EPOLL_BATCH {
                return;
            }
        }
    }

    /// Whether a service pass has work (the core or epoll reported something).
    pub fn has_work(&self, core: &Core) -> bool {
        !self.ready.is_empty() || core.splice_ready.iter().any(|k| self.by_stream.contains_key(k))
    }

    /// Move what every ready splice can move.
    pub fn service(&mut self, core: &mut Core) {
        let mut ids: Vec<u64> = self.ready.drain().collect();
        let from_core: Vec<(usize, u64)> =
            core.splice_ready.iter().copied().filter(|k| self.by_stream.contains_key(k)).collect();
        for key in from_core {
            core.splice_ready.remove(&key);
            if let Some(id) = self.by_stream.get(&key) {
                ids.push(*id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            self.service_one(core, id);
        }
    }

    fn service_one(&mut self, core: &mut Core, id: u64) {
        let Some(mut sp) = self.splices.remove(&id) else { return };
        let end = Self::step(core, &mut sp, &mut self.buf);
        match end {
            None => {
                self.splices.insert(id, sp);
            }
            Some((how, code)) => {
                self.by_stream.remove(&(sp.h, sp.sid));
                core.untap(sp.h, sp.sid);
                unsafe {
                    libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, sp.fd.as_raw_fd(), std::ptr::null_mut());
                }
                if how == SPLICE_RESET || how == SPLICE_GONE {
                    // The far side is gone without a FIN: stop both ways now, so the local
                    // application does not wait on a half-open socket (the owner adds RST).
                    unsafe { libc::shutdown(sp.fd.as_raw_fd(), libc::SHUT_RDWR) };
                }
                core.events.push(Ev::Spliced {
                    id: sp.id, h: sp.h, sid: sp.sid, sent: sp.sent, received: sp.received, how, code,
                });
            }
        }
    }

    /// One splice's work; Some((how, code)) when it is over.
    fn step(core: &mut Core, sp: &mut Splice, buf: &mut BytesMut) -> Option<(u8, u64)> {
        let (h, sid) = (sp.h, sp.sid);
        if !core.live(h) {
            return Some((SPLICE_GONE, 0));
        }
        let raw = sp.fd.as_raw_fd();
        // Stream → socket.
        let (reset, stopped) = {
            let Some(tap) = core.tap_mut(h, sid) else {
                // The stream is gone under us (reset by the owner).
                return Some((SPLICE_FAILED, 0));
            };
            (tap.reset, tap.stopped)
        };
        let mut wrote = 0u64;
        let mut write_failed = false;
        if sp.writable {
            if let Some(tap) = core.tap_mut(h, sid) {
                while !tap.buf.is_empty() {
                    let iov: Vec<libc::iovec> = tap
                        .buf
                        .iter()
                        .take(IOV_MAX)
                        .map(|b| libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() })
                        .collect();
                    let n = unsafe { libc::writev(raw, iov.as_ptr(), iov.len() as i32) };
                    if n < 0 {
                        let e = errno();
                        match e.kind() {
                            io::ErrorKind::WouldBlock => sp.writable = false,
                            io::ErrorKind::Interrupted => continue,
                            _ => write_failed = true,
                        }
                        break;
                    }
                    let mut left = n as usize;
                    wrote += left as u64;
                    tap.bytes -= left;
                    while left > 0 {
                        let Some(front) = tap.buf.front_mut() else { break };
                        if front.len() <= left {
                            left -= front.len();
                            tap.buf.pop_front();
                        } else {
                            let _ = front.split_to(left);
                            left = 0;
                        }
                    }
                }
            }
        }
        if wrote > 0 {
            sp.received += wrote;
            core.consume(h, sid, wrote);
        }
        if write_failed {
            core.reset_stream(h, sid, 0);
            return Some((SPLICE_FAILED, 0));
        }
        if let Some(code) = reset.or(stopped) {
            if stopped.is_some() {
                core.reset_stream(h, sid, code);
            }
            return Some((SPLICE_RESET, code));
        }
        let drained_fin = core.tap_mut(h, sid).is_some_and(|t| t.fin && t.buf.is_empty());
        if drained_fin && !sp.write_shut {
            sp.write_shut = true;
            unsafe { libc::shutdown(raw, libc::SHUT_WR) };
        }
        // Socket → stream, while the stream keeps up.
        while sp.readable && !sp.read_eof && core.stream_backlog(h, sid) < SPLICE_BACKLOG {
            if buf.capacity() < READ_CHUNK {
                *buf = BytesMut::with_capacity(READ_CHUNK.max(buf.capacity()) * 4);
            }
            let room = buf.capacity().min(READ_CHUNK);
            // SAFETY: read(2) writes at most `room` bytes into the spare capacity; only the
            // `n` it reports are made part of `buf`.
            let n = unsafe { libc::read(raw, buf.as_mut_ptr() as *mut libc::c_void, room) };
            if n < 0 {
                let e = errno();
                match e.kind() {
                    io::ErrorKind::WouldBlock => sp.readable = false,
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        core.reset_stream(h, sid, 0);
                        return Some((SPLICE_FAILED, 0));
                    }
                }
                break;
            }
            if n == 0 {
                sp.read_eof = true;
                core.stream_write(h, sid, &[], true);
                break;
            }
            let n = n as usize;
            unsafe { buf.set_len(n) };
            // The chunk goes to the stream as it is; the rest of the allocation is reused.
            let chunk = buf.split_to(n).freeze();
            if !core.stream_write_bytes(h, sid, chunk, false) {
                core.reset_stream(h, sid, 0);
                return Some((SPLICE_FAILED, 0));
            }
            sp.sent += n as u64;
        }
        if sp.read_eof && sp.write_shut {
            return Some((SPLICE_DONE, 0));
        }
        None
    }
}
