//! Fuzzing the native datagram entry (`Core::datagram`) the way the socket driver calls it:
//! random bytes, truncated, bit-flipped and re-headed copies of real packets (Initial, Retry,
//! Handshake, 0-RTT, 1-RTT), short headers that carry a live connection's CID, random first
//! bytes and random sources, into a server and a client that keep a real connection open,
//! with the cores driven between inputs. Nothing is caught here: a panic in `datagram` fails
//! the test directly, and one inside a connection (which `Core::drive` contains and counts)
//! fails it through `stats.panics`.
//!
//! Deterministic (xorshift with a fixed seed), so a failure reproduces.
//! The default test runs 1,000,000 inputs (seconds in a debug build); a 10,000,000-input run
//! with another seed is
//! `cargo test --manifest-path native/Cargo.toml --no-default-features --test fuzz_datagram -- --ignored`.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use _native::core::{Core, Ev};
use common::*;
use quinn_proto::EcnCodepoint;

/// The real packets the mutations start from, oldest replaced first once full.
struct Corpus {
    from_client: Vec<Vec<u8>>,
    from_server: Vec<Vec<u8>>,
    next: usize,
}

const CORPUS_MAX: usize = 4096;

impl Corpus {
    fn add(&mut self, captured: Vec<(bool, Vec<u8>)>) {
        for (from_client, d) in captured {
            let v = if from_client { &mut self.from_client } else { &mut self.from_server };
            if v.len() < CORPUS_MAX {
                v.push(d);
            } else {
                self.next = (self.next + 1) % CORPUS_MAX;
                v[self.next] = d;
            }
        }
    }
}

#[derive(Default, Debug)]
struct Tally {
    raw: u64,
    incoming: u64,
    accepted: u64,
    retried: u64,
    refused: u64,
    ignored: u64,
    closed: u64,
}

/// Answer what the owner of `core` was told. Admission is random so every answer's path is
/// exercised on fuzzed attempts; stream bytes are consumed so credit keeps flowing.
fn handle_events(core: &mut Core, rng: &mut XorShift, now: Instant, tally: &mut Tally, keep: &[usize]) {
    for ev in std::mem::take(&mut core.events) {
        match ev {
            Ev::Raw { .. } => tally.raw += 1,
            Ev::Incoming { id, .. } => {
                tally.incoming += 1;
                match rng.below(4) {
                    0 => {
                        if core.accept(id, now).is_some() {
                            tally.accepted += 1;
                        }
                    }
                    1 => {
                        core.retry(id);
                        tally.retried += 1;
                    }
                    2 => {
                        core.refuse(id);
                        tally.refused += 1;
                    }
                    _ => {
                        core.ignore(id);
                        tally.ignored += 1;
                    }
                }
            }
            Ev::Stream { h, sid, data, .. } => core.consume(h, sid, data.len() as u64),
            Ev::Closed { h, reason, .. } => {
                assert!(!keep.contains(&h), "the real connection {h} was closed by fuzz input: {reason}");
                tally.closed += 1;
            }
            _ => {}
        }
    }
}

fn mutate(rng: &mut XorShift, base: &[u8], live_dcid: &[u8], out: &mut Vec<u8>) {
    out.clear();
    match rng.below(10) {
        // Random bytes of a random length (0 included), any first byte.
        0 => {
            out.resize(rng.below(1500), 0);
            rng.fill(out);
        }
        // A real packet cut short.
        1 => out.extend_from_slice(&base[..rng.below(base.len() + 1)]),
        // A real packet with a few bit flips.
        2 | 3 => {
            out.extend_from_slice(base);
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
        }
        // A real packet with another first byte (other header forms, types, reserved bits).
        4 => {
            out.extend_from_slice(base);
            out[0] = rng.next() as u8;
        }
        // A real packet sent again as it was (replay).
        5 => out.extend_from_slice(base),
        // A real packet with random bytes over a random range, or garbage appended (as if
        // coalesced).
        6 => {
            out.extend_from_slice(base);
            if rng.below(2) == 0 {
                let start = rng.below(out.len());
                let end = (start + 1 + rng.below(64)).min(out.len());
                rng.fill(&mut out[start..end]);
            } else {
                let mut tail = vec![0u8; 1 + rng.below(200)];
                rng.fill(&mut tail);
                out.extend_from_slice(&tail);
            }
        }
        // A short header with the live connection's CID and a random body: passes the
        // endpoint's routing and reaches the connection's header protection and AEAD.
        7 | 8 => {
            out.push(0x40 | (rng.next() as u8 & 0x3f));
            out.extend_from_slice(live_dcid);
            let mut body = vec![0u8; rng.below(1300)];
            rng.fill(&mut body);
            out.extend_from_slice(&body);
        }
        // A long header of random version/type with CIDs of random, possibly lying, lengths.
        _ => {
            out.push(0x80 | (rng.next() as u8 & 0x7f));
            let version = match rng.below(4) {
                0 => 0,
                1 => 1,
                2 => 0x6b33_43cf, // QUIC v2, not enabled here
                _ => rng.next() as u32,
            };
            out.extend_from_slice(&version.to_be_bytes());
            for _ in 0..2 {
                let len = rng.below(256);
                out.push(len as u8);
                let mut cid = vec![0u8; len.min(rng.below(30))];
                rng.fill(&mut cid);
                out.extend_from_slice(&cid);
            }
            let mut body = vec![0u8; rng.below(1300)];
            rng.fill(&mut body);
            out.extend_from_slice(&body);
        }
    }
}

fn fuzz(inputs: usize, seed: u64) {
    let started = std::time::Instant::now();
    let mut rng = XorShift(seed);
    let setup = setup(Some(Tickets::default()));
    let mut p = Pair::new(&setup);
    p.capture = Some(Vec::new());

    // Real traffic to start from: a connection through Retry, 1-RTT stream data and
    // DATAGRAMs, then a second connection resumed in 0-RTT.
    p.admit = Admit::Retry;
    let (ch, sh) = p.establish(&setup);
    assert!(p.c.stream_write(ch, 0, &[7u8; 5000], false));
    assert!(p.s.stream_write(sh, 0, &[8u8; 5000], false));
    p.c.send_datagram(ch, &[1u8; 900]);
    p.s.send_datagram(sh, &[2u8; 900]);
    p.settle(Duration::from_millis(300));
    p.admit = Admit::Accept;
    p.s_seen = Seen::default();
    p.c_seen = Seen::default();
    let (ch2, zero_rtt) = p.connect(&setup);
    assert!(zero_rtt);
    assert!(p.c.stream_write(ch2, 0, b"early", false));
    assert!(p.run_until(Duration::from_secs(5), |p| connected(&p.c_seen, ch2).is_some()
        && p.s_seen.events.iter().any(|e| matches!(e, Ev::Connected { .. }))));
    let sh2 = p
        .s_seen
        .events
        .iter()
        .find_map(|e| match e {
            Ev::Connected { h, .. } => Some(*h),
            _ => None,
        })
        .unwrap();
    p.settle(Duration::from_millis(100));
    p.s_seen = Seen::default();
    p.c_seen = Seen::default();
    let mut corpus = Corpus { from_client: Vec::new(), from_server: Vec::new(), next: 0 };
    corpus.add(p.capture.take().unwrap());
    assert!(corpus.from_client.len() > 5 && corpus.from_server.len() > 5);
    let long_headers = corpus.from_client.iter().filter(|d| d[0] & 0x80 != 0).count();
    assert!(long_headers >= 3, "Initials and Handshake packets in the corpus");

    let keep_c = [ch, ch2];
    let keep_s = [sh, sh2];
    let mut tally_s = Tally::default();
    let mut tally_c = Tally::default();
    let mut buf = Vec::with_capacity(2048);
    let stranger = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)), 40000);

    for i in 0..inputs {
        let to_server = rng.below(10) < 7;
        let pool = if to_server { &corpus.from_client } else { &corpus.from_server };
        let base = &pool[rng.below(pool.len())];
        let live = if to_server { p.c.conn(ch).map(|c| c.last_dcid.clone()) } else { p.s.conn(sh).map(|c| c.last_dcid.clone()) };
        mutate(&mut rng, base, &live.unwrap_or_default(), &mut buf);
        let from = match rng.below(8) {
            0 => SocketAddr::new(stranger.ip(), 1 + rng.below(65535) as u16),
            _ if to_server => p.c_addr,
            _ => p.s_addr,
        };
        let ecn = match rng.below(4) {
            0 => Some(EcnCodepoint::Ect0),
            1 => Some(EcnCodepoint::Ce),
            _ => None,
        };
        if to_server {
            p.s.datagram(p.now, from, None, ecn, &buf);
        } else {
            p.c.datagram(p.now, from, None, ecn, &buf);
        }
        handle_events(&mut p.s, &mut rng, p.now, &mut tally_s, &keep_s);
        handle_events(&mut p.c, &mut rng, p.now, &mut tally_c, &keep_c);

        if i % 16 == 15 {
            // Real traffic goes on between the inputs, so fuzzed packets meet connections
            // in every state (sending, acking, timers running), and fresh 1-RTT packets with
            // current keys and packet numbers join the corpus.
            if i % 512 == 511 {
                p.capture = Some(Vec::new());
                let n = 1 + rng.below(3000);
                p.c.stream_write(ch, 0, &vec![i as u8; n], false);
                p.s.stream_write(sh2, 0, &vec![i as u8; n], false);
                p.c.send_datagram(ch2, &[3u8; 300]);
                p.s.send_datagram(sh, &[4u8; 300]);
                p.c.ping(ch2);
            }
            for _ in 0..2 {
                p.s.drive(p.now);
                p.c.drive(p.now);
                handle_events(&mut p.s, &mut rng, p.now, &mut tally_s, &keep_s);
                handle_events(&mut p.c, &mut rng, p.now, &mut tally_c, &keep_c);
                p.exchange();
            }
            if let Some(cap) = p.capture.take() {
                corpus.add(cap);
            }
            p.now += Duration::from_micros(rng.below(5000) as u64);
            p.s.handle_timeouts(p.now);
            p.c.handle_timeouts(p.now);
        }
    }

    assert_eq!(p.s.stats.panics, 0, "a connection panicked inside the server core");
    assert_eq!(p.c.stats.panics, 0, "a connection panicked inside the client core");
    // Both real connections survived everything and still carry data.
    for (c, s) in [(ch, sh), (ch2, sh2)] {
        assert!(p.c.conn(c).is_some() && p.s.conn(s).is_some());
        assert!(p.c.stream_write(c, 0, b"after fuzz", false));
    }
    assert!(p.run_until(Duration::from_secs(5), |p| {
        [sh, sh2].iter().all(|&s| p.s_seen.streams.get(&(s, 0)).is_some_and(|v| v.ends_with(b"after fuzz")))
    }));
    eprintln!(
        "fuzz: {inputs} inputs in {:.1?}; server {:?} malformed={} unknown_cid={} non_quic={}; client {:?}",
        started.elapsed(),
        tally_s,
        p.s.stats.malformed,
        p.s.stats.unknown_cid,
        p.s.stats.non_quic,
        tally_c
    );
}

#[test]
fn fuzz_datagram_entry_1m() {
    fuzz(1_000_000, 0x5eed_0001);
}

/// A longer run with another seed, for when the core or quinn changes.
#[test]
#[ignore = "10,000,000 inputs; run with -- --ignored"]
fn fuzz_datagram_entry_10m() {
    fuzz(10_000_000, 0x5eed_0002);
}
