//! The sans-IO core end to end: a server `Core` and a client `Core` in memory (see
//! `common`), configured exactly as the Python binding configures them.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use _native::config;
use _native::core::{Core, Ev, SendResult, PY_WINDOW};
use common::*;

const SECS: Duration = Duration::from_secs(5);

fn closed(seen: &Seen, h: usize) -> Option<(String, Option<u64>, bool)> {
    seen.events.iter().find_map(|e| match e {
        Ev::Closed { h: x, reason, code, app } if *x == h => Some((reason.clone(), *code, *app)),
        _ => None,
    })
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    XorShift(seed).fill(&mut v);
    v
}

#[test]
fn handshake_delivers_client_chain() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    p.admit = Admit::Hold;
    let (ch, zero_rtt) = p.connect(&setup);
    assert!(!zero_rtt, "no ticket yet, so no 0-RTT");
    assert!(p.run_until(SECS, |p| p.s_seen.events.iter().any(|e| matches!(e, Ev::Incoming { .. }))));
    let (id, validated) = p
        .s_seen
        .events
        .iter()
        .find_map(|e| match e {
            Ev::Incoming { id, validated, remote, .. } => {
                assert_eq!(*remote, p.c_addr);
                Some((*id, *validated))
            }
            _ => None,
        })
        .unwrap();
    assert!(!validated, "a first Initial without a token is not validated");
    let sh = p.s.accept(id, p.now).expect("accept");
    assert!(p.run_until(SECS, |p| connected(&p.c_seen, ch).is_some() && connected(&p.s_seen, sh).is_some()));
    assert_eq!(connected(&p.c_seen, ch), Some(false));
    assert_eq!(connected(&p.s_seen, sh), Some(false));
    // The server's owner (ztna.identity in Python) decides on the client's chain: it must be
    // the certificate the client presented, leaf first.
    let chain = p.s_seen.events.iter().find_map(|e| match e {
        Ev::Connected { h, chain, .. } if *h == sh => chain.clone(),
        _ => None,
    });
    assert_eq!(chain.expect("client chain").first(), Some(&setup.pki.client_der));
    // HandshakeData comes first, with the name the client dialled; no chain there because
    // this is not a resumed session.
    let hd = p.s_seen.events.iter().find_map(|e| match e {
        Ev::HandshakeData { h, chain, server_name } if *h == sh => Some((chain.clone(), server_name.clone())),
        _ => None,
    });
    assert_eq!(hd, Some((None, Some("localhost".to_string()))));
    assert_eq!(p.s.stats.handshakes_started, 1);
    assert_eq!(p.s.stats.panics + p.c.stats.panics, 0);
}

#[test]
fn retry_then_validated_incoming_is_accepted() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    p.admit = Admit::Retry;
    let (ch, _) = p.connect(&setup);
    assert!(p.run_until(SECS, |p| connected(&p.c_seen, ch).is_some()
        && p.s_seen.events.iter().any(|e| matches!(e, Ev::Connected { .. }))));
    let incoming: Vec<(bool, bool)> = p
        .s_seen
        .events
        .iter()
        .filter_map(|e| match e {
            Ev::Incoming { validated, may_retry, .. } => Some((*validated, *may_retry)),
            _ => None,
        })
        .collect();
    // First attempt: not validated and a Retry is allowed; the second carries the Retry
    // token, so it is validated and a second Retry is not allowed.
    assert_eq!(incoming, vec![(false, true), (true, false)]);
    assert_eq!(p.s.stats.retry_sent, 1);
    assert_eq!(p.s.stats.retry_failures, 0);
    assert!(p.s_seen.events.iter().any(|e| matches!(e, Ev::Connected { .. })));
}

#[test]
fn datagram_size_limit_and_drop_oldest_accounting() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (ch, sh) = p.establish(&setup);
    let max = p.c.conn_mut(ch).unwrap().max_datagram_payload();
    // 1 flags byte, 20-byte CID, 4-byte packet number, 16-byte AEAD tag, 9 for the DATAGRAM
    // frame's type and length.
    assert_eq!(max, UDP_PAYLOAD as usize - 1 - 20 - 4 - 16 - 9);
    assert_eq!(max, 1300);
    assert_eq!(p.s.conn_mut(sh).unwrap().max_datagram_payload(), 1300);

    let big = pattern(max, 1);
    assert_eq!(p.c.send_datagram(ch, &big), SendResult::Queued);
    assert_eq!(p.c.send_datagram(ch, &pattern(max + 1, 2)), SendResult::TooLarge(max));
    assert_eq!(p.c.conn(ch).unwrap().oversize_refused, 1);
    assert_eq!(p.c.stats.oversize_refused, 1);
    assert!(p.run_until(SECS, |p| !p.s_seen.datagrams.is_empty()));
    assert_eq!(p.s_seen.datagrams.len(), 1);
    assert_eq!(&p.s_seen.datagrams[0][..], &big[..]);
    p.s_seen.datagrams.clear();

    // Fill the queue without letting anything go out (no drive in between), with sizes that
    // vary so the accounting is exercised at every boundary. Each datagram carries its
    // sequence number; what arrives must be exactly the newest ones, in order, and the
    // datagrams counted as dropped must be exactly the ones that never arrive.
    let mut rng = XorShift(7);
    let n = 3000u32;
    let mut dropped_results = 0u64;
    for seq in 0..n {
        let len = 4 + rng.below(max - 3);
        let mut d = pattern(len, seq as u64 + 100);
        d[..4].copy_from_slice(&seq.to_be_bytes());
        match p.c.send_datagram(ch, &d) {
            SendResult::Queued => {}
            SendResult::QueuedDroppedOldest => dropped_results += 1,
            other => panic!("datagram {seq}: {other:?}"),
        }
    }
    let dropped = p.c.conn(ch).unwrap().dropped_oldest;
    assert!(dropped > 0, "the queue never filled");
    assert!(dropped >= dropped_results);
    assert_eq!(p.c.stats.datagrams_dropped_queue, dropped);
    let queued = p.c.queued_datagrams(ch);
    assert_eq!(queued as u64 + dropped, n as u64, "mirror of quinn's queue");

    assert!(p.run_until(Duration::from_secs(10), |p| p.s_seen.datagrams.len() >= queued));
    p.settle(Duration::from_millis(200));
    let got: Vec<u32> = p.s_seen.datagrams.iter().map(|d| u32::from_be_bytes(d[..4].try_into().unwrap())).collect();
    let want: Vec<u32> = (dropped as u32..n).collect();
    assert_eq!(got.len(), want.len(), "arrived {} datagrams, {} counted dropped of {n}", got.len(), dropped);
    assert_eq!(got, want);
    assert_eq!(p.c.queued_datagrams(ch), 0);

    // Uniform maximum-size datagrams: the queue is DATAGRAM_QUEUE datagrams of the udp
    // payload plus quinn's per-item overhead, which holds this many of 1300 bytes.
    let overhead = std::mem::size_of::<bytes::Bytes>();
    let capacity = DATAGRAM_QUEUE * (UDP_PAYLOAD as usize + overhead) / (max + overhead);
    let before = p.c.conn(ch).unwrap().dropped_oldest;
    let mut plain = 0;
    for _ in 0..capacity + 10 {
        if p.c.send_datagram(ch, &big) == SendResult::Queued {
            plain += 1;
        }
    }
    assert_eq!(plain, capacity);
    assert_eq!(p.c.conn(ch).unwrap().dropped_oldest - before, 10);
    assert_eq!(p.c.queued_datagrams(ch), capacity);
    assert_eq!(p.s.stats.panics + p.c.stats.panics, 0);
}

#[test]
fn control_stream_written_before_handshake_is_delivered() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (ch, _) = p.connect(&setup);
    // Before any packet: stream 0 cannot be opened in quinn yet (no stream limit known), so
    // the core must keep the bytes and send them once the handshake allows.
    assert!(p.c.stream_write(ch, 0, b"hello control", false));
    assert!(p.c.stream_backlog(ch, 0) > 0);
    assert!(p.run_until(SECS, |p| p.s_seen.streams.values().any(|v| v == b"hello control")));
    let (&(sh, sid), _) = p.s_seen.streams.iter().next().unwrap();
    assert_eq!(sid, 0);
    assert_eq!(connected(&p.s_seen, sh), Some(false));
    assert_eq!(p.c.stream_backlog(ch, 0), 0);
    // And back on the same stream.
    assert!(p.s.stream_write(sh, 0, b"hello back", false));
    assert!(p.run_until(SECS, |p| stream_bytes(&p.c_seen, ch, 0) == 10));
    assert_eq!(p.c_seen.streams[&(ch, 0)], b"hello back");
}

#[test]
fn four_megabyte_stream_arrives_byte_exact() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (ch, sh) = p.establish(&setup);
    let sid = p.c.open_bi(ch).expect("open_bi");
    assert_eq!(sid, 4, "stream 0 is the control stream");
    let data = pattern(4 * 1024 * 1024, 42);
    for chunk in data.chunks(100_000) {
        assert!(p.c.stream_write(ch, sid, chunk, false));
    }
    assert!(p.c.stream_write(ch, sid, b"", true));
    assert!(p.run_until(Duration::from_secs(60), |p| p.s_seen.fins.contains_key(&(sh, sid))));
    let got = &p.s_seen.streams[&(sh, sid)];
    assert_eq!(got.len(), data.len());
    assert!(got == &data, "stream bytes differ");
    assert_eq!(p.c.stream_backlog(ch, sid), 0);
    assert_eq!(p.s.stats.panics + p.c.stats.panics, 0);
}

#[test]
fn receive_credit_follows_consume() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (ch, sh) = p.establish(&setup);
    p.s_consume = false; // the server's owner reads nothing until told below
    let sid = p.c.open_bi(ch).unwrap();
    let first = pattern(4 * 1024 * 1024, 9);
    assert!(p.c.stream_write(ch, sid, &first, false));
    p.settle(Duration::from_secs(2));
    // The owner was handed exactly PY_WINDOW and no more; quinn on the server holds what its
    // window let the client send, and the rest waits in the client's queue.
    assert_eq!(stream_bytes(&p.s_seen, sh, sid) as u64, PY_WINDOW);
    let backlog = p.c.stream_backlog(ch, sid);
    let in_quinn = first.len() - backlog;
    assert!(backlog > 0);
    assert!(
        in_quinn as u64 <= PY_WINDOW + STREAM_WINDOW as u64 + 64 * 1024,
        "{in_quinn} bytes left the client's queue with {PY_WINDOW} consumable"
    );
    // Still stopped after more time: nothing is consumed, so no credit is granted.
    p.settle(Duration::from_secs(2));
    assert_eq!(stream_bytes(&p.s_seen, sh, sid) as u64, PY_WINDOW);
    assert_eq!(p.c.stream_backlog(ch, sid), backlog);
    // More writes while the peer does not consume only grow the backlog.
    let second = pattern(512 * 1024, 10);
    assert!(p.c.stream_write(ch, sid, &second, true));
    p.settle(Duration::from_millis(500));
    assert_eq!(p.c.stream_backlog(ch, sid), backlog + second.len());

    // The owner consumes what it was given, and from now on everything as it comes.
    p.s.consume(sh, sid, PY_WINDOW);
    p.s_consume = true;
    assert!(p.run_until(Duration::from_secs(60), |p| p.s_seen.fins.contains_key(&(sh, sid))));
    let mut want = first;
    want.extend_from_slice(&second);
    let got = &p.s_seen.streams[&(sh, sid)];
    assert_eq!(got.len(), want.len());
    assert!(got == &want, "stream bytes differ");
    assert_eq!(p.c.stream_backlog(ch, sid), 0);
}

#[test]
fn reset_stream_reaches_peer() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (ch, sh) = p.establish(&setup);
    let sid = p.c.open_bi(ch).unwrap();
    assert!(p.c.stream_write(ch, sid, b"partial", false));
    assert!(p.run_until(SECS, |p| stream_bytes(&p.s_seen, sh, sid) == 7));
    p.c.reset_stream(ch, sid, 7);
    assert!(p.run_until(SECS, |p| p.s_seen.events.iter().any(|e| matches!(e, Ev::StreamReset { .. }))));
    let reset = p.s_seen.events.iter().find_map(|e| match e {
        Ev::StreamReset { h, sid, code } => Some((*h, *sid, *code)),
        _ => None,
    });
    assert_eq!(reset, Some((sh, sid, 7)));
    // The connection itself goes on.
    assert!(p.c.stream_write(ch, 0, b"still here", false));
    assert!(p.run_until(SECS, |p| stream_bytes(&p.s_seen, sh, 0) == 10));
}

/// Connect once so the client holds tickets, then connect again with the same client config.
fn second_connection(tickets: Tickets) -> (Pair, usize, usize, u64) {
    let setup = setup(Some(tickets.clone()));
    let mut p = Pair::new(&setup);
    let (ch1, _) = p.establish(&setup);
    // The server sends its NewSessionTickets after the handshake; let them land.
    p.settle(Duration::from_millis(300));
    assert!(tickets.puts.load(Ordering::SeqCst) >= 1, "the server stored no ticket");
    p.c.close(ch1, p.now, 0, "done");
    p.settle(Duration::from_millis(300));
    // quinn reuses connection handles: forget the first connection's events.
    p.s_seen = Seen::default();
    p.c_seen = Seen::default();
    let (ch2, zero_rtt) = p.connect(&setup);
    assert!(zero_rtt, "the client holds a ticket, so it may send 0-RTT");
    // Written before any packet leaves: these bytes travel as 0-RTT data.
    assert!(p.c.stream_write(ch2, 0, b"early control", false));
    let sid = p.c.open_bi(ch2).expect("0-RTT allows opening streams");
    assert!(p.c.stream_write(ch2, sid, b"early stream", true));
    assert!(p.run_until(SECS, |p| connected(&p.c_seen, ch2).is_some()
        && p.s_seen.events.iter().any(|e| matches!(e, Ev::Connected { .. }))
        && p.s_seen.fins.len() == 1
        && p.s_seen.streams.values().any(|v| v == b"early control")));
    let sh2 = p.last_server_connected();
    (p, ch2, sh2, sid)
}

#[test]
fn zero_rtt_resumes_with_single_use_ticket() {
    let tickets = Tickets::default();
    let (p, ch2, sh2, sid) = second_connection(tickets.clone());
    assert_eq!(connected(&p.c_seen, ch2), Some(true), "0-RTT accepted");
    assert_eq!(connected(&p.s_seen, sh2), Some(true));
    assert_eq!(tickets.hits.load(Ordering::SeqCst), 1);
    // Single use: the ticket taken is gone from the store, every other one is still there.
    let stored = tickets.map.lock().unwrap().len();
    assert_eq!(stored, tickets.puts.load(Ordering::SeqCst) - 1);
    // A resumed session carries the chain bound to the ticket at HandshakeData already, so
    // the owner can authorize early data before the handshake completes.
    let early_chain = p.s_seen.events.iter().find_map(|e| match e {
        Ev::HandshakeData { h, chain, .. } if *h == sh2 => chain.clone(),
        _ => None,
    });
    let final_chain = p.s_seen.events.iter().find_map(|e| match e {
        Ev::Connected { h, chain, .. } if *h == sh2 => chain.clone(),
        _ => None,
    });
    assert!(early_chain.is_some(), "no chain at HandshakeData for a resumed session");
    assert_eq!(early_chain, final_chain);
    assert_eq!(p.s_seen.streams[&(sh2, 0)], b"early control");
    assert_eq!(p.s_seen.streams[&(sh2, sid)], b"early stream");
}

#[test]
fn zero_rtt_refused_ticket_replays_early_data() {
    let tickets = Tickets { refuse: true, ..Default::default() };
    let (p, ch2, sh2, sid) = second_connection(tickets.clone());
    assert!(tickets.takes.load(Ordering::SeqCst) >= 1, "the server looked the ticket up");
    assert_eq!(connected(&p.c_seen, ch2), Some(false), "0-RTT rejected");
    assert_eq!(connected(&p.s_seen, sh2), Some(false));
    // quinn forgot the streams written in 0-RTT; the core wrote them again, exactly once.
    assert_eq!(p.s_seen.streams[&(sh2, 0)], b"early control");
    assert_eq!(p.s_seen.streams[&(sh2, sid)], b"early stream");
    assert_eq!(p.s_seen.fins.get(&(sh2, sid)), Some(&true));
}

#[test]
fn raw_datagrams_bypass_quinn_and_fixed_bit_is_not_greased() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    p.capture = Some(Vec::new());
    let (ch, sh) = p.establish(&setup);
    assert!(p.c.stream_write(ch, 0, &pattern(20_000, 3), false));
    assert!(p.run_until(SECS, |p| stream_bytes(&p.s_seen, sh, 0) == 20_000));

    for first in [0x00u8, 0x01, 0x20, 0x3f] {
        let probe = [first, 0xde, 0xad, 0xbe, 0xef];
        let before = p.s.stats.clone();
        p.s.datagram(p.now, p.c_addr, None, None, &probe);
        match p.s.events.pop() {
            Some(Ev::Raw { data, remote }) => {
                assert_eq!(&data[..], &probe[..]);
                assert_eq!(remote, p.c_addr);
            }
            other => panic!("expected Raw, got {other:?}"),
        }
        assert!(p.s.events.is_empty());
        // quinn never saw it: no response, no counter of its paths moved.
        assert!(p.s.out.is_empty());
        assert_eq!(p.s.stats.malformed, before.malformed);
        assert_eq!(p.s.stats.unknown_cid, before.unknown_cid);
        assert_eq!(p.s.stats.endpoint_responses, before.endpoint_responses);
    }
    // A raw datagram with a connection's own CID behind the first byte is still raw.
    let mut fake = vec![0x3f];
    fake.extend_from_slice(&p.c.conn(ch).unwrap().last_dcid);
    fake.extend_from_slice(&[0u8; 40]);
    p.c.datagram(p.now, p.s_addr, None, None, &fake);
    assert!(matches!(p.c.events.pop(), Some(Ev::Raw { .. })));

    // No endpoint greases the fixed bit towards us, so QUIC packets always have it set.
    let cap = p.capture.take().unwrap();
    assert!(cap.len() > 20);
    for (from_client, d) in &cap {
        assert!(d[0] & 0x40 != 0, "packet from {} without the fixed bit", if *from_client { "client" } else { "server" });
    }
    // The endpoint config itself: greasing off, so a long header without the fixed bit is
    // not QUIC to us. Shown with an unknown version, which an endpoint that accepts a greased
    // bit answers with Version Negotiation.
    let ep = config::endpoint(b"k", UDP_PAYLOAD).unwrap();
    assert!(format!("{ep:?}").contains("grease_quic_bit: false"));
    let mut vn = vec![0u8; 1200];
    vn[0] = 0x80; // long header, fixed bit clear
    vn[1..5].copy_from_slice(&0x1a2a_3a4au32.to_be_bytes());
    vn[5] = 8;
    vn[14] = 8;
    let mut ours = Core::new(Arc::new(ep), Some(setup.server_cfg.clone()), false);
    ours.datagram(p.now, p.c_addr, None, None, &vn);
    assert!(ours.out.is_empty(), "answered a packet without the fixed bit");
    assert_eq!(ours.stats.malformed, 1);
    let mut greasing = config::endpoint(b"k", UDP_PAYLOAD).unwrap();
    greasing.grease_quic_bit(true);
    let mut theirs = Core::new(Arc::new(greasing), Some(setup.server_cfg.clone()), false);
    theirs.datagram(p.now, p.c_addr, None, None, &vn);
    assert_eq!(theirs.out.len(), 1, "control: a greasing endpoint answers it");
    assert_eq!(theirs.stats.version_negotiations, 1);
}

#[test]
fn close_reaches_peer_with_code_and_reason() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (ch, sh) = p.establish(&setup);
    p.c.close(ch, p.now, 0x42, "bye now");
    assert!(p.run_until(SECS, |p| closed(&p.s_seen, sh).is_some()));
    assert_eq!(closed(&p.s_seen, sh), Some(("bye now".to_string(), Some(0x42), true)));
    // The closing side hears of its own close at once, as an application close.
    let (reason, _, app) = closed(&p.c_seen, ch).unwrap();
    assert_eq!((reason.as_str(), app), ("bye now", true));
    assert_eq!(p.c.send_datagram(ch, b"late"), SendResult::Closed);
}

#[test]
fn restarted_server_resets_client() {
    let setup = setup(None);
    let mut p = Pair::new(&setup);
    let (ch, _) = p.establish(&setup);
    p.settle(Duration::from_millis(100));
    // A new process with the same reset key: it has no state for the connection, but it
    // derives the same reset token from the CID, so the client believes the reset.
    p.s = server_core(&setup);
    assert!(p.c.stream_write(ch, 0, &pattern(200, 5), false));
    assert!(p.run_until(SECS, |p| closed(&p.c_seen, ch).is_some()));
    let (reason, code, app) = closed(&p.c_seen, ch).unwrap();
    assert!(reason.contains("stateless reset"), "{reason}");
    assert_eq!((code, app), (None, false));
    assert_eq!(p.c.stats.stateless_resets_received, 1);
    assert!(p.s.stats.stateless_resets_sent >= 1);
    assert!(p.s.stats.unknown_cid >= 1);
}

