//! quinn-proto configurations from ztna's limits (one place, both sides).

use std::sync::Arc;
use std::time::Duration;

use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn_proto::{
    ClientConfig, EndpointConfig, IdleTimeout, RandomConnectionIdGenerator, ServerConfig,
    TransportConfig, VarInt,
};

use crate::tls::ConfigError;

pub const CID_LEN: usize = 20;

pub struct Limits {
    pub udp_payload: u16,
    pub idle_timeout: f64,
    pub datagram_queue: usize,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_streams: u32,
}

pub fn transport(l: &Limits) -> Result<TransportConfig, ConfigError> {
    let mut t = TransportConfig::default();
    let idle = IdleTimeout::try_from(Duration::from_secs_f64(l.idle_timeout.max(0.1)))
        .map_err(|e| ConfigError(format!("idle timeout: {e}")))?;
    t.max_idle_timeout(Some(idle));
    // A fixed packet size: ztna's limits decide it (and the DATAGRAM maximum follows it).
    t.initial_mtu(l.udp_payload);
    t.min_mtu(l.udp_payload);
    t.mtu_discovery_config(None);
    t.stream_receive_window(VarInt::from_u32(l.stream_window));
    t.receive_window(VarInt::from_u32(l.connection_window));
    t.send_window(l.connection_window as u64);
    t.max_concurrent_bidi_streams(VarInt::from_u32(l.max_streams));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.datagram_receive_buffer_size(Some(4 * 1024 * 1024));
    let per = l.udp_payload as usize + std::mem::size_of::<bytes::Bytes>();
    t.datagram_send_buffer_size(l.datagram_queue.max(1) * per);
    // Keepalive is the owner's policy (NAT mappings, liveness): it sends PINGs itself.
    t.keep_alive_interval(None);
    Ok(t)
}

pub fn endpoint(reset_key: &[u8], udp_payload: u16) -> Result<EndpointConfig, ConfigError> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
    let mut c = EndpointConfig::new(Arc::new(key));
    c.cid_generator(|| Box::new(RandomConnectionIdGenerator::new(CID_LEN)));
    // Never let peers grease the fixed bit (RFC 9287): a first byte below 0x40 must mean
    // "not QUIC", because P2P probes share the socket and are told apart by it.
    c.grease_quic_bit(false);
    c.max_udp_payload_size(udp_payload.max(1200))
        .map_err(|e| ConfigError(format!("udp payload: {e}")))?;
    Ok(c)
}

pub fn server(tls: rustls::ServerConfig, token_key: &[u8], l: &Limits,
              retry_lifetime: f64, new_tokens: u32) -> Result<ServerConfig, ConfigError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| ConfigError(format!("TLS for QUIC: {e}")))?;
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"ztna address validation").extract(token_key);
    let mut s = ServerConfig::new(Arc::new(crypto), Arc::new(prk));
    s.transport_config(Arc::new(transport(l)?));
    s.retry_token_lifetime(Duration::from_secs_f64(retry_lifetime.max(1.0)));
    s.migration(true);
    let mut v = quinn_proto::ValidationTokenConfig::default();
    v.sent(new_tokens);
    s.validation_token_config(v);
    Ok(s)
}

pub fn client(tls: rustls::ClientConfig, l: &Limits) -> Result<ClientConfig, ConfigError> {
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| ConfigError(format!("TLS for QUIC: {e}")))?;
    let mut c = ClientConfig::new(Arc::new(crypto));
    c.transport_config(Arc::new(transport(l)?));
    Ok(c)
}
