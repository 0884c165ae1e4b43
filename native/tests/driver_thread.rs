//! The driver thread over real loopback sockets: an "Intermediate" endpoint run by its own
//! thread relays tunnel DATAGRAMs between two client connections through its route table
//! while its owner does nothing; the owner hears only of what needs it (new connections,
//! datagrams no route takes), through the notify descriptor.

mod common;

use std::net::UdpSocket;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use _native::core::{Core, Ev};
use _native::driver::{lock, Driver, Io, Source};
use common::*;

const AGENT_ID: u32 = 0x0A0B_0C0D;

fn io(core: Core) -> Arc<Mutex<Io>> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    Arc::new(Mutex::new(Io::new(core, sock, 256, UDP_PAYLOAD).unwrap()))
}

fn readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) > 0 }
}

/// A client endpoint driven by hand (as the asyncio driver does): read, time out, drive, send.
fn step(io: &Arc<Mutex<Io>>, wait: Duration) -> Vec<Ev> {
    let fd = {
        let g = lock(io);
        std::os::fd::AsRawFd::as_raw_fd(g.sock.as_ref().unwrap())
    };
    let r = readable(fd, wait);
    let mut g = lock(io);
    let now = g.clamp(Instant::now());
    if r {
        g.receive(now);
    }
    g.core.handle_timeouts(now);
    g.drive_guarded(now);
    g.transmit();
    std::mem::take(&mut g.core.events)
}

fn datagrams(evs: &[Ev], on: usize) -> Vec<Vec<u8>> {
    evs.iter()
        .filter_map(|e| match e {
            Ev::Datagrams { h, items } if *h == on => Some(items.iter().map(|d| d.to_vec()).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect()
}

struct Pair {
    server: Arc<Mutex<Io>>,
    driver: Driver,
    notify: RawFd,
    agent: Arc<Mutex<Io>>,
    connector: Arc<Mutex<Io>>,
    /// Client handles (agent, connector) and the server's handles of those connections.
    ca: usize,
    cc: usize,
    sa: usize,
    sc: usize,
}

/// A threaded server endpoint and two clients connected to it (the agent first).
fn connected() -> Pair {
    let setup = setup(None);
    let server = io(server_core(&setup));
    let addr = lock(&server).sock.as_ref().unwrap().local_addr().unwrap();
    let driver = Driver::spawn(server.clone()).unwrap();
    let notify = driver.notify_fd();

    let (agent, connector) = (io(client_core()), io(client_core()));
    let mut handles = Vec::new();
    for c in [&agent, &connector] {
        let (h, _) = lock(c).core.connect(Instant::now(), setup.client_cfg.clone(), addr, "localhost").unwrap();
        lock(c).drive_guarded(Instant::now());
        lock(c).transmit();
        handles.push(h);
    }
    let (ca, cc) = (handles[0], handles[1]);

    // The owner's part: admit the attempts the thread reports, learn the connections.
    let mut server_conns = Vec::new();
    let mut client_up = [false, false];
    let deadline = Instant::now() + Duration::from_secs(10);
    while (server_conns.len() < 2 || !client_up.iter().all(|u| *u)) && Instant::now() < deadline {
        for (i, c) in [&agent, &connector].iter().enumerate() {
            if step(c, Duration::from_millis(1)).iter().any(|e| matches!(e, Ev::Connected { .. })) {
                client_up[i] = true;
            }
        }
        if readable(notify, Duration::from_millis(1)) {
            driver.clear_notify();
            let mut g = lock(&server);
            g.taken();
            let now = g.clamp(Instant::now());
            for ev in std::mem::take(&mut g.core.events) {
                match ev {
                    Ev::Incoming { id, .. } => {
                        g.core.accept(id, now);
                    }
                    Ev::Connected { h, .. } => server_conns.push(h),
                    _ => {}
                }
            }
            g.drive_guarded(now);
            g.transmit();
            g.rearm();
        }
    }
    assert_eq!(server_conns.len(), 2, "the thread carried both handshakes");
    assert!(client_up.iter().all(|u| *u));
    // Which server connection is whose: the handshakes may finish in either order.
    let agent_addr = lock(&agent).sock.as_ref().unwrap().local_addr().unwrap().port();
    let port_of = |h: usize| lock(&server).core.conn(h).map(|c| c.remote.port());
    let (sa, sc) = if port_of(server_conns[0]) == Some(agent_addr) {
        (server_conns[0], server_conns[1])
    } else {
        (server_conns[1], server_conns[0])
    };
    assert_eq!(port_of(sa), Some(agent_addr));
    Pair { server, driver, notify, agent, connector, ca, cc, sa, sc }
}

#[test]
fn threaded_endpoint_relays_without_its_owner() {
    let Pair { server, mut driver, notify, agent, connector, ca, cc, sa, sc } = connected();
    {
        let mut g = lock(&server);
        assert!(g.core.route_agent(sa, b"echo", sc, AGENT_ID));
        assert!(g.core.route_reply(sc, AGENT_ID, sa));
        g.rearm();
    }
    while readable(notify, Duration::ZERO) {
        driver.clear_notify();
    }

    // Agent → connector and back, byte for byte, with the owner never taking a lock.
    let mut packet = vec![0u8; 400];
    XorShift(7).fill(&mut packet);
    packet[0] = 0x45;
    let mut up = vec![0x2F, 4];
    up.extend_from_slice(b"echo");
    up.extend_from_slice(&packet);
    for round in 0..20u8 {
        packet[1] = round;
        up[6 + 1] = round;
        lock(&agent).core.send_datagram(ca, &up);
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.is_empty() && Instant::now() < deadline {
            got = datagrams(&step(&connector, Duration::from_millis(5)), cc);
            step(&agent, Duration::ZERO);
        }
        let mut want = vec![0x30, 1];
        want.extend_from_slice(&AGENT_ID.to_be_bytes());
        want.extend_from_slice(&up[1..]);
        assert_eq!(got, vec![want], "round {round}: 0x30 at the connector");

        let mut down = vec![0x31, 1];
        down.extend_from_slice(&AGENT_ID.to_be_bytes());
        down.extend_from_slice(&packet);
        lock(&connector).core.send_datagram(cc, &down);
        let mut back = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while back.is_empty() && Instant::now() < deadline {
            back = datagrams(&step(&agent, Duration::from_millis(5)), ca);
            step(&connector, Duration::ZERO);
        }
        assert_eq!(back, vec![packet.clone()], "round {round}: the bare packet at the agent");
    }
    {
        let g = lock(&server);
        assert_eq!(g.core.stats.relay_forwarded, 40);
        assert_eq!(g.core.stats.panics, 0);
        assert!(g.core.events.iter().all(|e| !matches!(e, Ev::Datagrams { .. })), "nothing went to the owner");
    }
    assert!(driver.stats.wakeups.load(std::sync::atomic::Ordering::Relaxed) >= 40);

    // A datagram no route takes reaches the owner through the notify descriptor.
    lock(&agent).core.send_datagram(ca, b"\x2Fstray");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut owner = Vec::new();
    while owner.is_empty() && Instant::now() < deadline {
        step(&agent, Duration::from_millis(1));
        if readable(notify, Duration::from_millis(5)) {
            driver.clear_notify();
            let mut g = lock(&server);
            g.taken();
            owner = datagrams(&std::mem::take(&mut g.core.events), sa);
        }
    }
    assert_eq!(owner, vec![b"\x2Fstray".to_vec()]);

    assert!(driver.running());
    driver.join();
    assert!(!driver.running());
}

/// A pump's source: datagrams arriving on a "backend" socket become DATAGRAMs on one
/// connection, queued by the driver thread in the batch that saw the socket readable.
struct Backend {
    sock: UdpSocket,
    h: usize,
}

impl Source for Backend {
    fn fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.sock)
    }

    fn ready(&mut self, core: &mut Core, _now: Instant) {
        let mut buf = [0u8; 2048];
        while let Ok(n) = self.sock.recv(&mut buf) {
            core.send_datagram(self.h, &buf[..n]);
        }
    }
}

#[test]
fn a_source_added_to_a_running_thread_is_served_without_its_owner() {
    let Pair { server, mut driver, notify, agent, ca, sa, .. } = connected();
    while readable(notify, Duration::ZERO) {
        driver.clear_notify();
    }
    let backend = UdpSocket::bind("127.0.0.1:0").unwrap();
    backend.set_nonblocking(true).unwrap();
    let to = backend.local_addr().unwrap();
    lock(&server).add_source(Box::new(Backend { sock: backend, h: sa })).unwrap();
    let app = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut payload = vec![0u8; 700];
    for round in 0..10u8 {
        XorShift(round as u64 + 1).fill(&mut payload);
        app.send_to(&payload, to).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.is_empty() && Instant::now() < deadline {
            got = datagrams(&step(&agent, Duration::from_millis(5)), ca);
        }
        assert_eq!(got, vec![payload.clone()], "round {round}: the backend's datagram at the agent");
    }
    assert!(!readable(notify, Duration::ZERO), "the owner was never needed");
    assert_eq!(lock(&server).core.stats.panics, 0);
    driver.join();
}

/// The owner's answer to the thread's notification, as the binding gives it: take the events,
/// answer the admission ones, drive, send, let the thread go on.
fn owner_round(server: &Arc<Mutex<Io>>, driver: &Driver, conns: &mut Vec<usize>) -> Vec<Ev> {
    driver.clear_notify();
    let mut g = lock(server);
    g.taken();
    let now = g.clamp(Instant::now());
    let evs = std::mem::take(&mut g.core.events);
    for ev in &evs {
        match ev {
            Ev::Incoming { id, .. } => {
                g.core.accept(*id, now);
            }
            Ev::Connected { h, .. } => conns.push(*h),
            _ => {}
        }
    }
    g.drive_guarded(now);
    g.transmit();
    g.rearm();
    evs
}

fn stream_data(evs: &[Ev], on: (usize, u64)) -> Vec<u8> {
    let mut out = Vec::new();
    for e in evs {
        if let Ev::Stream { h, sid, data, .. } = e {
            if (*h, *sid) == on {
                out.extend_from_slice(data);
            }
        }
    }
    out
}

/// A stream the owner splices to a socket some time after it read the stream's header (the
/// Connector, once its backend connected): whatever the thread read from the stream in the
/// meantime and left queued for the owner belongs to the splice, in order, and nothing of it
/// reaches the owner afterwards.
#[test]
fn splice_takes_over_what_the_thread_read_before_it() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use _native::sockpump::SocketSplicer;

    let setup = setup(None);
    let server = io(server_core(&setup));
    let addr = lock(&server).sock.as_ref().unwrap().local_addr().unwrap();
    let driver = Driver::spawn(server.clone()).unwrap();
    let notify = driver.notify_fd();
    let client = io(client_core());
    let (ch, _) = lock(&client).core.connect(Instant::now(), setup.client_cfg.clone(), addr, "localhost").unwrap();
    let mut conns = Vec::new();
    let mut up = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while (conns.is_empty() || !up) && Instant::now() < deadline {
        up |= step(&client, Duration::from_millis(1)).iter().any(|e| matches!(e, Ev::Connected { .. }));
        if readable(notify, Duration::from_millis(1)) {
            owner_round(&server, &driver, &mut conns);
        }
    }
    assert!(up && conns.len() == 1, "handshake through the thread");
    let sh = conns[0];

    // The header: the owner reads it and consumes it, then waits for its backend.
    let sid = lock(&client).core.open_bi(ch).unwrap();
    lock(&client).core.stream_write(ch, sid, b"HDR", false);
    let mut head = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while head.len() < 3 && Instant::now() < deadline {
        step(&client, Duration::from_millis(1));
        if readable(notify, Duration::from_millis(1)) {
            head.extend(stream_data(&owner_round(&server, &driver, &mut conns), (sh, sid)));
        }
    }
    assert_eq!(head, b"HDR");
    lock(&server).core.consume(sh, sid, 3);

    // Meanwhile the body arrives and the thread reads it; the owner does not look yet.
    let mut body = vec![0u8; 96 * 1024];
    XorShift(11).fill(&mut body);
    let (first, second) = body.split_at(40 * 1024);
    lock(&client).core.stream_write(ch, sid, first, false);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stream_data(&lock(&server).core.events, (sh, sid)).len() < first.len() && Instant::now() < deadline {
        step(&client, Duration::from_millis(1));
    }
    assert_eq!(stream_data(&lock(&server).core.events, (sh, sid)), first, "queued for the owner");

    // The backend is there: the owner splices the stream to it, with nothing in hand.
    let (mut backend, theirs) = UnixStream::pair().unwrap();
    backend.set_nonblocking(true).unwrap();
    let splice_fd = {
        let mut g = lock(&server);
        let sp = SocketSplicer::new().unwrap();
        let fd = sp.fd();
        g.splicer = Some(sp);
        let Io { splicer, core, .. } = &mut *g;
        splicer.as_mut().unwrap().add(core, sh, sid, theirs.into(), &[], false, &[]).unwrap();
        g.rearm();
        fd
    };
    lock(&client).core.stream_write(ch, sid, second, true);
    let mut got = Vec::new();
    let mut owner_saw = Vec::new();
    let mut eof = false;
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !eof && Instant::now() < deadline {
        step(&client, Duration::from_millis(1));
        if readable(notify, Duration::ZERO) {
            owner_saw.extend(stream_data(&owner_round(&server, &driver, &mut conns), (sh, sid)));
        }
        if readable(splice_fd, Duration::ZERO) {
            // The binding's pump: the spliced socket became writable or readable.
            let mut g = lock(&server);
            let now = g.clamp(Instant::now());
            g.splicer.as_mut().unwrap().poll();
            g.drive_guarded(now);
            g.transmit();
            g.rearm();
        }
        loop {
            match backend.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
    }
    assert!(owner_saw.is_empty(), "{} stream bytes reached the owner after the splice", owner_saw.len());
    assert!(eof, "the stream's FIN reached the socket ({} of {} bytes)", got.len(), body.len());
    assert!(got == body, "the socket got the body in order ({} of {} bytes)", got.len(), body.len());
    assert!(lock(&server).core.stats.splice_claimed >= 1);
    drop(driver);
}
