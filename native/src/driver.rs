//! The I/O half of an endpoint: one UDP socket driving a `Core`, and optionally a native
//! thread that owns the socket's reads and the connection timers.
//!
//! `Io` holds everything one batch needs (the core, the socket, the receive buffers, the
//! splices and the pumps' drains). The Python binding keeps it behind a mutex so that either
//! the asyncio loop (the calls of `py.rs`) or the driver thread runs a batch, never both.
//!
//! The driver thread (`Driver::spawn`) waits in epoll for the socket, a wake eventfd, the
//! pumps' sources and a timerfd set to the core's next deadline (whoever moves the deadline
//! earlier, the owner or another thread, sets the timer instead of waking the thread). Each wake-up is one batch: receive, run the due timers, drive every
//! touched connection, send. What the relay routes, the stream pairs and the taps handle is
//! finished there without the owner; when the batch left events for the owner, it writes a
//! notify eventfd once (the owner's loop watches it) and the owner takes the events with its
//! next `drive`. The thread never calls into the owner's code except through the core's
//! callbacks (the server's ticket store), so an owner that releases its interpreter lock
//! while it waits for the mutex cannot deadlock with it. A panic in a batch is counted and
//! the thread goes on.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::core::Core;
use crate::sockpump::SocketSplicer;

/// The I/O half of a pump attached to an endpoint (the TUN device's writes, the UDP flows'
/// backend sends): what the pump's tap took during a batch goes out after it.
pub trait Drain: Send + Sync {
    fn drain(&mut self);
}

/// Another descriptor a driver thread waits on besides the socket: a pump's input (the UDP
/// flows' backend sockets behind one epoll descriptor, ...). When it is readable the batch
/// calls `ready` with the core, then drives and sends as for a received datagram, so a
/// backend's reply leaves in the same wake-up without the owner.
pub trait Source: Send + Sync {
    fn fd(&self) -> RawFd;
    fn ready(&mut self, core: &mut Core, now: Instant);
}

const SOURCE_TOKEN: u64 = 16;
const SPLICE_TOKEN: u64 = 3;
const TIMER_TOKEN: u64 = 4;

const RX_BUF: usize = 65536;

pub struct Io {
    pub core: Core,
    /// Native I/O of the pumps attached to this endpoint, run after each batch.
    pub drains: Vec<Box<dyn Drain>>,
    /// Inputs of the pumps that the driver thread polls too (unused without a thread).
    sources: Vec<Box<dyn Source>>,
    /// The driver thread's epoll descriptor, once it runs (sources added later join it).
    epoll: Option<Arc<OwnedFd>>,
    pub sock: Option<UdpSocket>,
    pub udp: quinn_udp::UdpSocketState,
    rx: Vec<Vec<u8>>,
    pub recv_batch: usize,
    pub closed: bool,
    pub blackhole: bool,
    /// Stream ⇄ socket splices (made on first use).
    pub splicer: Option<SocketSplicer>,
    /// The latest instant a batch ran at: the owner's clock and the thread's may disagree by
    /// a little, and the core must never see time go backwards.
    last: Instant,
    /// With a driver thread: the deadline it sleeps towards (None: no timer), its wake
    /// eventfd, the notify eventfd and whether a notification is unread.
    planned: Option<Instant>,
    /// The driver thread's timer (a timerfd in its epoll set): whoever makes the deadline
    /// earlier sets it, so the thread need not be woken only to look at the new deadline.
    timer: Option<Arc<OwnedFd>>,
    wake: Option<Arc<OwnedFd>>,
    notify: Option<Arc<OwnedFd>>,
    notified: bool,
    /// The owner took events and has not finished reacting to them (`rearm` ends it). The
    /// thread runs no batch meanwhile: what the owner decides about an event (a splice, a
    /// route, a refusal) then applies from the next packet on, as with the asyncio driver,
    /// where nothing could arrive between the events and the owner's answer.
    held: bool,
    resume: Option<Arc<Condvar>>,
}

/// Lock an endpoint's `Io`; a panic while it was held leaves the state usable (every batch
/// step runs under its own guard), so a poisoned lock is taken as it is.
pub fn lock(m: &Mutex<Io>) -> MutexGuard<'_, Io> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A non-blocking eventfd (the threads' wake and notify descriptors).
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An epoll descriptor.
pub(crate) fn epoll() -> io::Result<OwnedFd> {
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Make an eventfd readable.
pub(crate) fn signal(fd: &OwnedFd) {
    let one: u64 = 1;
    // A full counter (never in practice) still leaves the descriptor readable.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// How long a driver thread looks for more work before it sleeps, after a batch that moved
/// packets (`ZTNA_THREAD_SPIN_US`, microseconds; 0 = sleep at once).
fn spin_window() -> Duration {
    let us = std::env::var("ZTNA_THREAD_SPIN_US").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(SPIN_DEFAULT_US);
    Duration::from_micros(us.min(10_000))
}

/// Long enough for a reply from a backend or the far side of a fast link; while it lasts
/// the thread yields its CPU to anything else runnable, so it only uses a CPU that would
/// otherwise idle.
const SPIN_DEFAULT_US: u64 = 100;

fn timerfd() -> io::Result<OwnedFd> {
    let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Arm `timer` to fire at `at` (None: disarm); a deadline already past fires at once.
fn set_timer(timer: &OwnedFd, at: Option<Instant>) {
    let value = match at {
        None => libc::timespec { tv_sec: 0, tv_nsec: 0 },
        Some(at) => {
            let d = at.saturating_duration_since(Instant::now()).max(Duration::from_nanos(1));
            libc::timespec { tv_sec: d.as_secs().min(i32::MAX as u64) as libc::time_t, tv_nsec: d.subsec_nanos() as libc::c_long }
        }
    };
    let spec = libc::itimerspec { it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 }, it_value: value };
    unsafe { libc::timerfd_settime(timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
}

/// Read an eventfd (or timerfd) back to not readable.
pub(crate) fn clear(fd: RawFd) {
    let mut v: u64 = 0;
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

impl Io {
    pub fn new(core: Core, sock: UdpSocket, recv_batch: usize, udp_payload: u16) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        let udp = quinn_udp::UdpSocketState::new((&sock).into())?;
        let mut core = core;
        // One GSO send is one UDP datagram for the kernel: its total must stay below 64 KiB,
        // or the whole batch fails with EMSGSIZE.
        core.max_gso_segments = udp.max_gso_segments().clamp(1, (65000 / udp_payload.max(1200) as usize).max(1));
        let rx = (0..quinn_udp::BATCH_SIZE).map(|_| vec![0u8; RX_BUF]).collect();
        Ok(Self {
            core,
            drains: Vec::new(),
            sources: Vec::new(),
            epoll: None,
            sock: Some(sock),
            udp,
            rx,
            recv_batch,
            closed: false,
            blackhole: false,
            splicer: None,
            last: Instant::now(),
            planned: None,
            timer: None,
            wake: None,
            notify: None,
            notified: false,
            held: false,
            resume: None,
        })
    }

    /// `at`, or the latest instant already used if that is later.
    pub fn clamp(&mut self, at: Instant) -> Instant {
        if at > self.last {
            self.last = at;
        }
        self.last
    }

    pub fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> Option<T> {
        match catch_unwind(AssertUnwindSafe(|| f(self))) {
            Ok(v) => Some(v),
            Err(_) => {
                // The panic hook already logged one line with its location.
                self.core.stats.panics += 1;
                None
            }
        }
    }

    /// Read everything the socket has (up to `recv_batch` datagrams) into the core.
    pub fn receive(&mut self, at: Instant) {
        if self.closed {
            return;
        }
        self.guarded(|s| {
            let Some(sock) = s.sock.as_ref() else { return };
            let mut seen = 0usize;
            let mut errors = 0usize;
            let mut metas = [quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
            while seen < s.recv_batch {
                let n = {
                    let mut bufs: Vec<IoSliceMut<'_>> = s.rx.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                    match s.udp.recv(sock.into(), &mut bufs, &mut metas) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            // ICMP errors surface here on Linux (ECONNREFUSED ...).
                            s.core.stats.socket_recv_errors += 1;
                            errors += 1;
                            if errors > 64 {
                                break;
                            }
                            continue;
                        }
                    }
                };
                // A short batch means the queue was empty a moment ago: whatever comes next
                // wakes the (level-triggered) poller again, so the call that would only say
                // EAGAIN is saved.
                let drained = n < s.rx.len();
                if s.blackhole {
                    if drained {
                        break;
                    }
                    continue;
                }
                for (i, meta) in metas.iter().enumerate().take(n) {
                    let ecn = meta.ecn.and_then(|e| quinn_proto::EcnCodepoint::from_bits(e as u8));
                    let stride = meta.stride.max(1);
                    let (rx, core) = (&s.rx, &mut s.core);
                    if meta.len == 0 {
                        // An empty datagram: counted as malformed like any other junk.
                        seen += 1;
                        core.datagram(at, meta.addr, meta.dst_ip, ecn, &[]);
                        continue;
                    }
                    for seg in rx[i][..meta.len].chunks(stride) {
                        seen += 1;
                        if catch_unwind(AssertUnwindSafe(|| core.datagram(at, meta.addr, meta.dst_ip, ecn, seg))).is_err() {
                            core.stats.panics += 1;
                        }
                    }
                }
                if drained {
                    break;
                }
            }
        });
    }

    pub fn transmit(&mut self) {
        for d in self.drains.iter_mut() {
            if catch_unwind(AssertUnwindSafe(|| d.drain())).is_err() {
                self.core.stats.panics += 1;
            }
        }
        let outs = std::mem::take(&mut self.core.out);
        let Some(sock) = self.sock.as_ref() else { return };
        if self.blackhole {
            return;
        }
        for o in outs {
            let t = quinn_udp::Transmit {
                destination: o.dst,
                ecn: o.ecn.and_then(|e| quinn_udp::EcnCodepoint::from_bits(e as u8)),
                contents: &o.data,
                segment_size: o.segment_size,
                src_ip: o.src_ip,
            };
            match self.udp.try_send(sock.into(), &t) {
                Ok(()) => {
                    let n = o.segment_size.map(|s| o.data.len().div_ceil(s.max(1))).unwrap_or(1);
                    self.core.stats.datagrams_sent += n as u64;
                    self.core.stats.bytes_sent += o.data.len() as u64;
                }
                Err(_) => self.core.stats.socket_send_errors += 1, // QUIC recovers the loss
            }
        }
    }

    /// One non-QUIC datagram (P2P probes share the socket).
    pub fn send_raw(&mut self, data: &[u8], dst: SocketAddr) -> bool {
        let t = quinn_udp::Transmit { destination: dst, ecn: None, contents: data, segment_size: None, src_ip: None };
        let Some(sock) = self.sock.as_ref() else { return false };
        match self.udp.try_send(sock.into(), &t) {
            Ok(()) => {
                self.core.stats.datagrams_sent += 1;
                self.core.stats.bytes_sent += data.len() as u64;
                true
            }
            Err(_) => {
                self.core.stats.socket_send_errors += 1;
                false
            }
        }
    }

    /// Run every dirty connection, each under its own guard: a panic aborts only that one.
    /// Splices move their bytes in between (what a connection received goes to its sockets
    /// and streams, and what they gave goes out in the same batch), a few rounds at most.
    pub fn drive_guarded(&mut self, now: Instant) {
        for _ in 0..8 {
            if catch_unwind(AssertUnwindSafe(|| self.core.drive(now))).is_err() {
                self.core.stats.panics += 1;
            }
            let core = &mut self.core;
            let splicer = &mut self.splicer;
            let pairs = !core.pairs.is_empty() && !core.splice_ready.is_empty();
            let socks = splicer.as_ref().is_some_and(|s| s.has_work(core));
            if !pairs && !socks {
                break;
            }
            let run = catch_unwind(AssertUnwindSafe(|| {
                if pairs {
                    core.pump_pairs();
                }
                if let Some(sp) = splicer.as_mut() {
                    sp.service(core);
                }
            }));
            if run.is_err() {
                self.core.stats.panics += 1;
                break;
            }
        }
        // News for streams no splice holds any more is stale.
        let core = &mut self.core;
        let splicer = &self.splicer;
        if !core.splice_ready.is_empty() {
            let pairs = &core.pairs;
            core.splice_ready.retain(|k| pairs.contains(k.0, k.1) || splicer.as_ref().is_some_and(|s| s.counts(k.0, k.1).is_some()));
        }
    }

    /// True while work is queued that the last batch left for a further one.
    pub fn busy(&self) -> bool {
        let core = &self.core;
        core.has_dirty()
            || (!core.pairs.is_empty() && !core.splice_ready.is_empty())
            || self.splicer.as_ref().is_some_and(|s| s.has_work(core))
    }

    pub fn next_timeout(&mut self) -> Option<Instant> {
        self.guarded(|s| s.core.next_timeout()).flatten()
    }

    /// The owner took the events: the next batch that leaves some notifies again.
    pub fn taken(&mut self) {
        self.notified = false;
    }

    /// The owner is handling events it took: hold the thread until `rearm`.
    pub fn hold(&mut self) {
        if self.resume.is_some() {
            self.held = true;
        }
    }

    /// Whether a driver thread runs this endpoint.
    pub fn threaded(&self) -> bool {
        self.wake.is_some()
    }

    /// After the owner changed something: wake the thread if the core's deadline is now
    /// earlier than the one it sleeps towards (or work is queued that no batch has run).
    pub fn rearm(&mut self) {
        let Some(wake) = self.wake.clone() else { return };
        if self.held {
            self.held = false;
            if let Some(cv) = self.resume.as_ref() {
                cv.notify_all();
            }
        }
        self.plan_earlier();
        if self.busy() {
            signal(&wake);
        }
    }

    /// With a driver thread: if the core's deadline is now earlier than the one the thread
    /// sleeps towards, move its timer there (it is not woken before then).
    fn plan_earlier(&mut self) {
        let Some(timer) = self.timer.clone() else { return };
        let next = self.next_timeout();
        if next.is_some_and(|n| self.planned.is_none_or(|p| n < p)) {
            self.planned = next;
            set_timer(&timer, next);
        }
    }

    /// Let the driver thread poll `src` too (now if it runs, else from its start).
    pub fn add_source(&mut self, src: Box<dyn Source>) -> io::Result<()> {
        let token = SOURCE_TOKEN + self.sources.len() as u64;
        if let Some(ep) = self.epoll.as_ref() {
            epoll_add(ep.as_raw_fd(), src.fd(), token)?;
        }
        self.sources.push(src);
        Ok(())
    }

    /// The stream ⇄ socket splicer, made on first use; a running driver thread polls its
    /// descriptor from then on (the spliced sockets are served in its batches).
    pub fn splicer(&mut self) -> io::Result<&mut SocketSplicer> {
        if self.splicer.is_none() {
            let sp = SocketSplicer::new()?;
            if let Some(ep) = self.epoll.as_ref() {
                epoll_add(ep.as_raw_fd(), sp.fd(), SPLICE_TOKEN)?;
            }
            self.splicer = Some(sp);
        }
        Ok(self.splicer.as_mut().expect("made above"))
    }

    /// Work done on this endpoint by another thread (the TUN reader): drive it, send, and
    /// tell the owner if that left events.
    pub fn drive_external(&mut self) {
        let now = self.clamp(Instant::now());
        self.drive_guarded(now);
        self.transmit();
        self.notify_owner();
        // What was sent armed timers (loss detection): the thread's timer must not stay at a
        // later deadline, or a lost tail would wait for that one.
        self.plan_earlier();
    }

    fn notify_owner(&mut self) {
        if !self.notified && (!self.core.events.is_empty() || self.busy()) {
            if let Some(n) = self.notify.as_ref() {
                signal(n);
                self.notified = true;
                self.core.stats.owner_notified += 1;
            }
        }
    }

    /// One batch of the driver thread.
    fn batch(&mut self, readable: bool, spliced: bool, ready: &[usize]) {
        let now = self.clamp(Instant::now());
        if readable {
            self.receive(now);
        }
        if spliced {
            if let Some(sp) = self.splicer.as_mut() {
                if catch_unwind(AssertUnwindSafe(|| sp.poll())).is_err() {
                    self.core.stats.panics += 1;
                }
            }
        }
        for &i in ready {
            let (sources, core) = (&mut self.sources, &mut self.core);
            if let Some(src) = sources.get_mut(i) {
                if catch_unwind(AssertUnwindSafe(|| src.ready(core, now))).is_err() {
                    core.stats.panics += 1;
                }
            }
        }
        self.guarded(|s| s.core.handle_timeouts(now));
        self.drive_guarded(now);
        self.transmit();
        self.notify_owner();
    }
}

/// Counters of a driver thread (read without the lock).
#[derive(Default)]
pub struct DriverStats {
    pub wakeups: AtomicU64,
    pub panics: AtomicU64,
}

/// A native thread that owns an endpoint's socket reads and timers.
pub struct Driver {
    stop: Arc<AtomicBool>,
    resume: Arc<Condvar>,
    wake: Arc<OwnedFd>,
    notify: Arc<OwnedFd>,
    pub stats: Arc<DriverStats>,
    thread: Option<JoinHandle<()>>,
}

struct Poller {
    epoll: Arc<OwnedFd>,
    timer: Arc<OwnedFd>,
    pwait2: bool,
}

fn epoll_add(epoll: RawFd, fd: RawFd, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
    if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const SOCK_TOKEN: u64 = 1;
const WAKE_TOKEN: u64 = 2;

impl Poller {
    fn new(sock: RawFd, wake: RawFd) -> io::Result<Self> {
        let epoll = Arc::new(epoll()?);
        let timer = Arc::new(timerfd()?);
        for (fd, token) in [(sock, SOCK_TOKEN), (wake, WAKE_TOKEN), (timer.as_raw_fd(), TIMER_TOKEN)] {
            epoll_add(epoll.as_raw_fd(), fd, token)?;
        }
        Ok(Self { epoll, timer, pwait2: true })
    }

    /// (socket readable, woken, splices need service, the timer fired) after waiting at
    /// most `timeout` (None: until something happens); the readable sources' indices go to
    /// `ready`.
    fn wait(&mut self, timeout: Option<Duration>, ready: &mut Vec<usize>) -> (bool, bool, bool, bool) {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
        ready.clear();
        let n = loop {
            let n = if self.pwait2 {
                // Nanosecond deadlines: a millisecond-rounded timer would pace sends late.
                let ts = timeout.map(|d| libc::timespec {
                    tv_sec: d.as_secs().min(i32::MAX as u64) as libc::time_t,
                    tv_nsec: d.subsec_nanos() as libc::c_long,
                });
                let p = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
                unsafe { libc::epoll_pwait2(self.epoll.as_raw_fd(), evs.as_mut_ptr(), evs.len() as i32, p, std::ptr::null()) }
            } else {
                let ms = timeout.map_or(-1, |d| d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32);
                unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), evs.as_mut_ptr(), evs.len() as i32, ms) }
            };
            if n >= 0 {
                break n as usize;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOSYS) if self.pwait2 => self.pwait2 = false,
                _ => break 0,
            }
        };
        let (mut readable, mut woken, mut spliced, mut timed) = (false, false, false, false);
        for ev in &evs[..n] {
            let token = ev.u64;
            match token {
                SOCK_TOKEN => readable = true,
                WAKE_TOKEN => woken = true,
                SPLICE_TOKEN => spliced = true,
                TIMER_TOKEN => {
                    clear(self.timer.as_raw_fd());
                    timed = true;
                }
                t if t >= SOURCE_TOKEN => ready.push((t - SOURCE_TOKEN) as usize),
                _ => {}
            }
        }
        (readable, woken, spliced, timed)
    }
}

impl Driver {
    /// Start the thread for `io`, whose socket it reads from now on (the owner must not call
    /// `receive` or run timers any more; it calls `rearm` after changing something).
    pub fn spawn(io: Arc<Mutex<Io>>) -> io::Result<Self> {
        let wake = Arc::new(eventfd()?);
        let notify = Arc::new(eventfd()?);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(DriverStats::default());
        let resume = Arc::new(Condvar::new());
        let spin = spin_window();
        let mut poller = {
            let mut g = lock(&io);
            let fd = g.sock.as_ref().map(|s| s.as_raw_fd()).ok_or_else(|| io::Error::other("socket closed"))?;
            let poller = Poller::new(fd, wake.as_raw_fd())?;
            for (i, src) in g.sources.iter().enumerate() {
                epoll_add(poller.epoll.as_raw_fd(), src.fd(), SOURCE_TOKEN + i as u64)?;
            }
            if let Some(sp) = g.splicer.as_ref() {
                epoll_add(poller.epoll.as_raw_fd(), sp.fd(), SPLICE_TOKEN)?;
            }
            g.epoll = Some(poller.epoll.clone());
            g.timer = Some(poller.timer.clone());
            g.wake = Some(wake.clone());
            g.notify = Some(notify.clone());
            g.resume = Some(resume.clone());
            poller
        };
        let (t_stop, t_wake, t_stats, t_resume) = (stop.clone(), wake.clone(), stats.clone(), resume.clone());
        let thread = std::thread::Builder::new().name("ztna-endpoint".into()).spawn(move || {
            let (mut readable, mut spliced) = (false, false);
            let mut ready: Vec<usize> = Vec::new();
            loop {
                let sent: bool;
                let timeout = {
                    let mut g = lock(&io);
                    while g.held && !t_stop.load(Ordering::Acquire) {
                        g = match t_resume.wait_timeout(g, Duration::from_millis(100)) {
                            Ok((g, _)) => g,
                            Err(e) => e.into_inner().0,
                        };
                    }
                    if t_stop.load(Ordering::Acquire) || g.closed {
                        break;
                    }
                    let sent_before = g.core.stats.datagrams_sent;
                    let r = catch_unwind(AssertUnwindSafe(|| g.batch(readable, spliced, &ready)));
                    // A batch that moved packets (in from the socket, a source or a splice,
                    // or out): an answer to them may follow within the spin window.
                    sent = readable || spliced || !ready.is_empty() || g.core.stats.datagrams_sent != sent_before;
                    if r.is_err() {
                        g.core.stats.panics += 1;
                        t_stats.panics.fetch_add(1, Ordering::Relaxed);
                    }
                    let next = g.next_timeout();
                    g.planned = next;
                    if let Some(t) = g.timer.as_ref() {
                        set_timer(t, next);
                    }
                    // A burst longer than one batch's rounds goes on at once; otherwise the
                    // socket, a source, a wake-up or the timer ends the wait.
                    g.busy().then_some(Duration::ZERO)
                };
                // After a batch that moved packets, look again without sleeping for a short while
                // (yielding the CPU to whatever else is runnable in between): an answer that
                // comes within it (a backend's reply, the far side's) is taken without the
                // cost of waking a sleeping thread on an idle CPU, which on a quiet machine
                // is most of a round trip's added time.
                let mut seen = None;
                if !spin.is_zero() && sent && timeout.is_none() {
                    let until = Instant::now() + spin;
                    loop {
                        let w = poller.wait(Some(Duration::ZERO), &mut ready);
                        if w.0 || w.1 || w.2 || w.3 || !ready.is_empty() {
                            seen = Some(w);
                            break;
                        }
                        if Instant::now() >= until {
                            break;
                        }
                        std::thread::yield_now();
                    }
                }
                let (r, woken, sp, _) = match seen {
                    Some(w) => w,
                    None => poller.wait(timeout, &mut ready),
                };
                if woken {
                    clear(t_wake.as_raw_fd());
                }
                readable = r;
                spliced = sp;
                t_stats.wakeups.fetch_add(1, Ordering::Relaxed);
            }
        })?;
        Ok(Self { stop, resume, wake, notify, stats, thread: Some(thread) })
    }

    /// The descriptor that becomes readable when a batch left events for the owner.
    pub fn notify_fd(&self) -> RawFd {
        self.notify.as_raw_fd()
    }

    /// Read the pending notification (the owner's loop saw the descriptor readable).
    pub fn clear_notify(&self) {
        clear(self.notify.as_raw_fd());
    }

    /// Ask the thread to stop; `join` waits for it.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.resume.notify_all();
        signal(&self.wake);
    }

    pub fn join(&mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Never blocks: the thread sees the flag on its next wake-up and ends by itself.
        self.stop();
    }
}
