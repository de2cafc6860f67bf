//! The discovery protocols' libp2p behaviours, configured from `[discovery]`:
//! Kademlia (the DHT registry), gossipsub (signed announces) and mDNS.
//! Kademlia stores nothing by itself (`StoreInserts::FilterBoth`): every
//! inbound record and provider entry is checked by the discovery service
//! first. The scale benchmark builds its Kademlia with [`kademlia`] too.

use std::num::NonZeroUsize;
use std::time::Duration;

use libp2p::kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p::{PeerId, StreamProtocol, gossipsub, identity, kad};

use crate::services::discovery::DiscoveryConfig;

/// The Kademlia protocol name: nodes of other DHTs are not mixed in.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/peer-protocol/kad/1.2.0");

/// The gossipsub topic of signed peer-record announces.
pub const ANNOUNCE_TOPIC: &str = "peer-protocol/1.2/announce";

/// Room around a record in a Kademlia message or a gossip message.
const FRAMING: usize = 16 * 1024;

/// Kademlia for `peer_id`: k and alpha, record and provider lifetimes and
/// intervals, store bounds, manual record filtering, and always in server
/// mode (every node answers queries; on loopback or a LAN no address is ever
/// "confirmed external", so the automatic mode would leave every node a client).
pub fn kademlia(peer_id: PeerId, c: &DiscoveryConfig) -> kad::Behaviour<MemoryStore> {
    let k = NonZeroUsize::new(c.k).unwrap_or(kad::K_VALUE);
    let alpha = NonZeroUsize::new(c.alpha).unwrap_or(kad::ALPHA_VALUE);
    let refresh = Duration::from_secs(c.refresh_secs);
    let expire = Duration::from_secs(c.expire_secs);
    let mut config = kad::Config::new(KAD_PROTOCOL);
    config
        .set_replication_factor(k)
        .set_kbucket_size(k)
        .set_parallelism(alpha)
        .set_query_timeout(Duration::from_secs(c.query_timeout_secs))
        .set_record_filtering(kad::StoreInserts::FilterBoth)
        .set_record_ttl(Some(expire))
        .set_provider_record_ttl(Some(expire))
        .set_publication_interval(Some(refresh))
        .set_provider_publication_interval(Some(refresh))
        .set_replication_interval(Some(refresh))
        .set_periodic_bootstrap_interval(Some(Duration::from_secs(c.bootstrap_secs)))
        .set_max_packet_size(c.max_record_bytes + FRAMING);
    let store = MemoryStore::with_config(
        peer_id,
        MemoryStoreConfig {
            max_records: c.max_records,
            max_value_bytes: c.max_record_bytes,
            max_providers_per_key: c.k,
            max_provided_keys: peer_core::registry::MAX_CAPABILITIES,
        },
    );
    let mut kad = kad::Behaviour::with_config(peer_id, store, config);
    kad.set_mode(Some(kad::Mode::Server));
    kad
}

/// Gossipsub for announces: messages signed by the sending peer's key (and
/// the record inside by the entity's), checked by the discovery service
/// before they are forwarded, identified by their content so one announce
/// arriving by two paths is one message.
///
/// # Errors
/// If the configuration is refused by gossipsub.
pub fn gossipsub(
    key: &identity::Keypair,
    c: &DiscoveryConfig,
) -> Result<gossipsub::Behaviour, String> {
    let config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(c.max_record_bytes + FRAMING)
        .message_id_fn(|m: &gossipsub::Message| {
            use sha2::Digest;
            gossipsub::MessageId::from(sha2::Sha256::digest(&m.data).to_vec())
        })
        .build()
        .map_err(|e| e.to_string())?;
    let mut behaviour =
        gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), config)?;
    if c.announce {
        behaviour
            .subscribe(&announce_topic())
            .map_err(|e| e.to_string())?;
    }
    Ok(behaviour)
}

/// The announce topic.
pub fn announce_topic() -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(ANNOUNCE_TOPIC)
}
