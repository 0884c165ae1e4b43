//! Splices end to end in memory: a stream ⇄ stream pair inside the server core (the
//! Intermediate's), and a stream ⇄ socket splice over a real socketpair (the Agent's and the
//! Connector's), checked byte for byte, with half-close, resets and the bound on buffering.

mod common;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use _native::core::{Ev, PY_WINDOW};
use _native::sockpump::SocketSplicer;
use _native::splice::{PAIR_BACKLOG, SPLICE_DONE, SPLICE_GONE, SPLICE_RESET};
use common::*;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    XorShift(seed).fill(&mut v);
    v
}

fn spliced(seen: &Seen) -> Vec<(usize, u64, u64, u64, u8)> {
    seen.events
        .iter()
        .filter_map(|e| match e {
            Ev::Spliced { h, sid, sent, received, how, .. } => Some((*h, *sid, *sent, *received, *how)),
            _ => None,
        })
        .collect()
}

/// One round of the network plus the splices' own work (what the binding does per batch).
fn round(p: &mut Pair, splicer: Option<&mut SocketSplicer>) {
    p.step();
    p.s.pump_pairs();
    if let Some(sp) = splicer {
        sp.poll();
        sp.service(&mut p.s);
    }
}

/// Two client connections to one server; returns (client a, server a, client b, server b).
fn two_connections(p: &mut Pair, setup: &Setup) -> (usize, usize, usize, usize) {
    let (ca, sa) = p.establish(setup);
    let (cb, _) = p.connect(setup);
    assert!(p.run_until(Duration::from_secs(5), |p| connected(&p.c_seen, cb).is_some()
        && p.s_seen.events.iter().filter(|e| matches!(e, Ev::Connected { .. })).count() == 2));
    let sb = p.last_server_connected();
    assert_ne!(sa, sb);
    (ca, sa, cb, sb)
}

#[test]
fn stream_pair_moves_both_ways_with_half_close_and_reports_counts() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (ca, sa, cb, sb) = two_connections(&mut p, &setup);
    // Agent side opens a stream; the "Intermediate" reads its header and opens the other leg.
    let a_sid = p.c.open_bi(ca).unwrap();
    p.c.stream_write(ca, a_sid, b"HDR", false);
    assert!(p.run_until(Duration::from_secs(5), |p| stream_bytes(&p.s_seen, sa, a_sid) == 3));
    let b_sid = p.s.open_bi(sb).unwrap();
    p.s.stream_write(sb, b_sid, b"hdr", false);
    let id = p.s.splice_streams((sa, a_sid), (sb, b_sid)).expect("spliced");
    assert!(p.s.splice_streams((sa, a_sid), (sb, b_sid)).is_none(), "a stream is spliced once");
    let up = pattern(3 * 1024 * 1024, 1);
    let down = pattern(2 * 1024 * 1024 + 17, 2);
    p.c.stream_write(ca, a_sid, &up, true); // FIN one way ...
    let mut answered = false;
    for _ in 0..20000 {
        round(&mut p, None);
        // ... while the other way keeps flowing after it.
        if !answered && p.c_seen.fins.get(&(cb, b_sid)).is_some() {
            p.c.stream_write(cb, b_sid, &down, true);
            answered = true;
        }
        if spliced(&p.s_seen).len() == 2 && p.c_seen.fins.contains_key(&(ca, a_sid)) {
            break;
        }
    }
    let b_got = p.c_seen.streams.get(&(cb, b_sid)).cloned().unwrap_or_default();
    assert!(b_got.len() == 3 + up.len() && b_got[3..] == up[..], "a → b byte for byte ({})", b_got.len());
    let a_got = p.c_seen.streams.get(&(ca, a_sid)).cloned().unwrap_or_default();
    assert!(a_got == down, "b → a byte for byte ({} of {})", a_got.len(), down.len());
    assert_eq!(p.c_seen.fins.get(&(ca, a_sid)), Some(&true));
    let ends = spliced(&p.s_seen);
    assert!(ends.contains(&(sa, a_sid, down.len() as u64, up.len() as u64, SPLICE_DONE)), "{ends:?}");
    assert!(ends.contains(&(sb, b_sid, up.len() as u64, down.len() as u64, SPLICE_DONE)), "{ends:?}");
    assert!(p.s.pairs.is_empty());
    let _ = id;
}

#[test]
fn stream_pair_buffers_are_bounded_by_a_slow_reader() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (ca, sa, cb, sb) = two_connections(&mut p, &setup);
    let a_sid = p.c.open_bi(ca).unwrap();
    p.c.stream_write(ca, a_sid, b"H", false);
    assert!(p.run_until(Duration::from_secs(5), |p| stream_bytes(&p.s_seen, sa, a_sid) == 1));
    let b_sid = p.s.open_bi(sb).unwrap();
    p.s.splice_streams((sa, a_sid), (sb, b_sid)).unwrap();
    // The client never consumes what arrives on the far leg: a reader that stopped.
    p.c_consume = false;
    let total = 24 * 1024 * 1024;
    p.c.stream_write(ca, a_sid, &pattern(total, 3), false);
    let mut peak = 0;
    for _ in 0..3000 {
        round(&mut p, None);
        peak = peak.max(p.s.stream_backlog(sb, b_sid));
    }
    let delivered = stream_bytes(&p.c_seen, cb, b_sid);
    assert_eq!(delivered as u64, PY_WINDOW, "the reader got exactly its window");
    // What the server holds for the far leg stays within the pair's bound (plus one window
    // read before the bound applied); the rest waits at the sender, not in the middle.
    assert!(peak <= PAIR_BACKLOG + PY_WINDOW as usize, "peak backlog {peak}");
    assert!(p.c.stream_backlog(ca, a_sid) > total / 2, "the sender is held back");
    // The far reader goes away: the pair ends and the sender's stream is reset.
    p.c.reset_stream(cb, b_sid, 7);
    for _ in 0..200 {
        round(&mut p, None);
    }
    let ends = spliced(&p.s_seen);
    assert!(ends.iter().any(|e| e.0 == sa && e.4 == SPLICE_RESET), "{ends:?}");
    assert!(p.c_seen.events.iter().any(|e| matches!(e, Ev::StreamReset { h, sid, code: 7 } if *h == ca && *sid == a_sid)));
}

#[test]
fn socket_splice_half_close_both_ways_byte_for_byte() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (ch, sh) = p.establish(&setup);
    let mut splicer = SocketSplicer::new().unwrap();
    let sid = p.c.open_bi(ch).unwrap();
    p.c.stream_write(ch, sid, b"header", false);
    assert!(p.run_until(Duration::from_secs(5), |p| stream_bytes(&p.s_seen, sh, sid) == 6));
    let (ours, mut app) = UnixStream::pair().unwrap();
    app.set_nonblocking(true).unwrap();
    // What the owner was handed after the header, not yet consumed, goes first.
    splicer.add(&mut p.s, sh, sid, OwnedFd::from(ours), b"early:", false, b"first:").unwrap();
    let up = pattern(5 * 1024 * 1024 + 3, 4);
    p.c.stream_write(ch, sid, &up, true);
    let reply = pattern(3 * 1024 * 1024 + 1, 5);
    let (mut got, mut sent_reply, mut eof) = (Vec::new(), 0usize, false);
    let mut buf = vec![0u8; 65536];
    for _ in 0..40000 {
        round(&mut p, Some(&mut splicer));
        loop {
            match app.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
        // The application answers after the tunnel's FIN reached it (half-close).
        if eof && sent_reply < reply.len() {
            match app.write(&reply[sent_reply..]) {
                Ok(n) => sent_reply += n,
                Err(_) => {}
            }
            if sent_reply == reply.len() {
                app.shutdown(std::net::Shutdown::Write).unwrap();
            }
        }
        if !spliced(&p.s_seen).is_empty() && p.c_seen.fins.contains_key(&(ch, sid)) {
            break;
        }
    }
    let mut want = b"early:".to_vec();
    want.extend_from_slice(&up);
    assert!(eof, "the stream's FIN became the socket's EOF");
    assert_eq!(got.len(), want.len());
    assert!(got == want, "stream → socket byte for byte");
    let mut back = b"first:".to_vec();
    back.extend_from_slice(&reply);
    assert!(p.c_seen.streams.get(&(ch, sid)).is_some_and(|v| *v == back), "socket → stream byte for byte");
    assert_eq!(spliced(&p.s_seen), vec![(sh, sid, back.len() as u64, want.len() as u64, SPLICE_DONE)]);
    assert!(splicer.is_empty());
}

#[test]
fn socket_splice_ends_when_the_connection_goes() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (ch, sh) = p.establish(&setup);
    let mut splicer = SocketSplicer::new().unwrap();
    let sid = p.c.open_bi(ch).unwrap();
    p.c.stream_write(ch, sid, b"h", false);
    assert!(p.run_until(Duration::from_secs(5), |p| stream_bytes(&p.s_seen, sh, sid) == 1));
    let (ours, mut app) = UnixStream::pair().unwrap();
    splicer.add(&mut p.s, sh, sid, OwnedFd::from(ours), b"", false, b"").unwrap();
    p.s.close(sh, p.now, 0, "bye");
    for _ in 0..50 {
        round(&mut p, Some(&mut splicer));
    }
    assert!(spliced(&p.s_seen).iter().any(|e| e.4 == SPLICE_GONE));
    // The application is not left waiting on a half-open socket.
    app.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(app.read(&mut buf).unwrap(), 0);
    let _ = app.flush();
}
