//! State shared by the nodes of a cluster, in etcd (v3 API): what must be the same on
//! every node, decided once. Single-host state stays in SQLite ([`crate::store`]).
//!
//! Keys, under a prefix (`/vmfabric` by default):
//! - `nodes/{node}`: the node's underlay address; under the node's etcd lease, so a
//!   node that stops renewing it is gone for the others.
//! - `networks/{net}/spec`: a cluster network (JSON, as the API takes it).
//! - `networks/{net}/policy`: its egress policy (JSON), set on any node, applied on all.
//! - `networks/{net}/members/{node}` and `networks/{net}/macs/{mac}` (= node): who
//!   serves the network and where each guest's MAC lives; under the node's lease too,
//!   so a dead node's MACs go with it.
//! - `networks/{net}/addresses/{ip}`: who holds an address (MAC, node, until when,
//!   name). Claimed by one transaction (create it if absent, or take it over if its
//!   holder's time ran out, compared on its revision), so two nodes answering DHCP at
//!   the same moment never hand out one address. Not under a lease: a lease outlives a
//!   node's restart.

pub mod leases;
pub mod node;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};
use fabric::Mac;
use serde::{Deserialize, Serialize};

use crate::model::NetworkSpec;

/// Why the cluster's state could not be read or changed. A caller that cannot reach
/// etcd fails closed: no address is handed out on a guess.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd holds {key} = {value:?}, which does not parse")]
    Corrupt { key: String, value: String },
    #[error("{0}: too many nodes changed it at once; try again")]
    Contended(String),
    #[error("etcd did not answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// What a claim on an address came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The address is now this MAC's.
    Won,
    /// It already was (a renewal, or the same claim again); its time is extended.
    Held,
    /// Another MAC holds it.
    TakenBy(Mac),
}

/// Who holds an address, as etcd keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    #[serde(with = "crate::model::mac_text")]
    pub mac: Mac,
    pub node: String,
    /// Seconds since the Unix epoch; past it, any node may give the address away.
    pub expires: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A cluster network as etcd holds it.
#[derive(Debug, Clone)]
pub struct ClusterNetwork {
    pub spec: NetworkSpec,
    /// Nodes that serve it now.
    pub members: BTreeSet<String>,
    /// Where its guests' MACs live.
    pub macs: HashMap<Mac, String>,
    pub addresses: HashMap<Ipv4Addr, Holder>,
    /// Its egress policy (JSON as the API takes it), when one was set.
    pub policy: Option<String>,
}

/// Everything under the prefix, read at one revision.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub revision: i64,
    /// Live nodes and their underlay addresses.
    pub nodes: HashMap<String, IpAddr>,
    pub networks: BTreeMap<String, ClusterNetwork>,
}

#[derive(Serialize, Deserialize)]
struct NodeRecord {
    underlay: IpAddr,
}

/// A connection to the cluster's etcd as one node, its keys under `prefix`.
#[derive(Clone)]
pub struct ClusterStore {
    client: Client,
    prefix: String,
    node: String,
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn corrupt(kv: &KeyValue) -> ClusterError {
    ClusterError::Corrupt {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: String::from_utf8_lossy(kv.value()).into_owned(),
    }
}

fn parse<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, ClusterError> {
    serde_json::from_slice(kv.value()).map_err(|_| corrupt(kv))
}

/// TLS to etcd (`https://` endpoints): the CA that signed etcd's certificate, and this
/// node's certificate and key where etcd asks clients for one (`--client-cert-auth`).
#[derive(Clone)]
pub struct ClusterTls {
    ca_pem: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClusterTls {
    /// Reads the PEM files; a certificate needs its key.
    pub fn load(
        ca: &std::path::Path,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> std::io::Result<ClusterTls> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
        };
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a client certificate and its key go together",
                ))
            }
        };
        Ok(ClusterTls {
            ca_pem: read(ca)?,
            identity,
        })
    }

    fn options(&self) -> etcd_client::TlsOptions {
        let tls = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&self.ca_pem));
        match &self.identity {
            Some((cert, key)) => tls.identity(etcd_client::Identity::from_pem(cert, key)),
            None => tls,
        }
    }
}

impl ClusterStore {
    /// Connects to any of `endpoints` (`http://host:port`, or `https://` with `tls`)
    /// as node `node`; each request gives up after `timeout`, so an unreachable etcd
    /// costs a caller one timeout, not a hang.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        node: &str,
        timeout: Duration,
        tls: Option<&ClusterTls>,
    ) -> Result<ClusterStore, ClusterError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(2), timeout);
        if let Some(tls) = tls {
            options = options.with_tls(tls.options());
        }
        let client = Client::connect(endpoints, Some(options)).await?;
        Ok(ClusterStore {
            client,
            prefix: prefix.trim_end_matches('/').to_string(),
            node: node.to_string(),
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn network_key(&self, network: &str) -> String {
        format!("{}/networks/{network}/", self.prefix)
    }

    fn address_key(&self, network: &str, ip: Ipv4Addr) -> String {
        format!("{}addresses/{ip}", self.network_key(network))
    }

    fn member_key(&self, network: &str) -> String {
        format!("{}members/{}", self.network_key(network), self.node)
    }

    fn mac_key(&self, network: &str, mac: Mac) -> String {
        format!("{}macs/{mac}", self.network_key(network))
    }

    /// Claims `ip` on `network` for `mac` until `expires`, in one transaction each
    /// try: created if never held; taken over if its holder's time ran out; extended
    /// if `mac` holds it already; else the holder is told.
    pub async fn claim_address(
        &self,
        network: &str,
        ip: Ipv4Addr,
        mac: Mac,
        expires: u64,
        name: Option<&str>,
    ) -> Result<Claim, ClusterError> {
        let key = self.address_key(network, ip);
        let holder = Holder {
            mac,
            node: self.node.clone(),
            expires,
            name: name.map(String::from),
        };
        let value = serde_json::to_string(&holder).expect("plain data");
        // Each lost race means another node changed the key: a few tries settle it.
        for _ in 0..8 {
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), value.clone(), None)])
                .or_else([TxnOp::get(key.clone(), None)]);
            let response = self.client.clone().txn(txn).await?;
            if response.succeeded() {
                return Ok(Claim::Won);
            }
            let current = response.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(get) => get.kvs().first().cloned(),
                _ => None,
            });
            // The compare failed, so the key existed at that revision and the read
            // in the same transaction sees it.
            let current = current.ok_or_else(|| ClusterError::Corrupt {
                key: key.clone(),
                value: "(missing in the transaction that found it)".into(),
            })?;
            let held: Holder = parse(&current)?;
            let outcome = if held.mac == mac {
                Claim::Held
            } else if held.expires <= now_secs() {
                Claim::Won
            } else {
                return Ok(Claim::TakenBy(held.mac));
            };
            // Extend or take over only what was read: another node's change since
            // makes this try lose, and the next one reads that change.
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    current.mod_revision(),
                )])
                .and_then([TxnOp::put(key.clone(), value.clone(), None)]);
            if self.client.clone().txn(txn).await?.succeeded() {
                return Ok(outcome);
            }
        }
        Err(ClusterError::Contended(key))
    }

    /// Gives `ip` up if `mac` holds it; whether it did.
    pub async fn release_address(&self, network: &str, ip: Ipv4Addr, mac: Mac) -> Result<bool, ClusterError> {
        let key = self.address_key(network, ip);
        let got = self.client.clone().get(key.clone(), None).await?;
        let Some(current) = got.kvs().first() else {
            return Ok(false);
        };
        let held: Holder = parse(current)?;
        if held.mac != mac {
            return Ok(false);
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                current.mod_revision(),
            )])
            .and_then([TxnOp::delete(key, None)]);
        Ok(self.client.clone().txn(txn).await?.succeeded())
    }

    /// A new lease for this node's keys: they go when it is not kept alive for `ttl`.
    pub async fn grant_lease(&self, ttl: Duration) -> Result<i64, ClusterError> {
        let ttl = ttl.as_secs().max(2) as i64;
        Ok(self.client.clone().lease_grant(ttl, None).await?.id())
    }

    /// Renews `lease` once: the seconds it has left, 0 if it expired. A stream of its
    /// own each time, so a renewal after a member died goes to one that lives.
    pub async fn renew_lease(&self, lease: i64) -> Result<i64, ClusterError> {
        let (mut keeper, mut stream) = self.client.clone().lease_keep_alive(lease).await?;
        keeper.keep_alive().await?;
        Ok(stream.message().await?.map(|r| r.ttl()).unwrap_or(0))
    }

    /// Says this node is up, at `underlay`, for as long as `lease` lives.
    pub async fn register(&self, underlay: IpAddr, lease: i64) -> Result<(), ClusterError> {
        let key = format!("{}/nodes/{}", self.prefix, self.node);
        let value = serde_json::to_string(&NodeRecord { underlay }).expect("plain data");
        self.client
            .clone()
            .put(key, value, Some(PutOptions::new().with_lease(lease)))
            .await?;
        Ok(())
    }

    /// Stores a new cluster network; false if one of that name exists.
    pub async fn create_network(&self, spec: &NetworkSpec) -> Result<bool, ClusterError> {
        let key = format!("{}spec", self.network_key(&spec.name));
        let value = serde_json::to_string(spec).expect("plain data");
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)]);
        Ok(self.client.clone().txn(txn).await?.succeeded())
    }

    /// Sets a cluster network's egress policy (JSON) for every node; false if the
    /// network is not in etcd.
    pub async fn put_policy(&self, network: &str, policy: &str) -> Result<bool, ClusterError> {
        let base = self.network_key(network);
        let txn = Txn::new()
            .when([Compare::create_revision(format!("{base}spec"), CompareOp::Greater, 0)])
            .and_then([TxnOp::put(format!("{base}policy"), policy, None)]);
        Ok(self.client.clone().txn(txn).await?.succeeded())
    }

    /// Removes a cluster network and everything under it; every node takes it down.
    pub async fn delete_network(&self, network: &str) -> Result<(), ClusterError> {
        self.client
            .clone()
            .delete(self.network_key(network), Some(DeleteOptions::new().with_prefix()))
            .await?;
        Ok(())
    }

    /// Says this node serves `network`, for as long as `lease` lives.
    pub async fn join_network(&self, network: &str, lease: i64) -> Result<(), ClusterError> {
        let opts = PutOptions::new().with_lease(lease);
        self.client
            .clone()
            .put(self.member_key(network), self.node.clone(), Some(opts))
            .await?;
        Ok(())
    }

    /// Says `mac` lives on this node, for as long as `lease` lives.
    pub async fn publish_mac(&self, network: &str, mac: Mac, lease: i64) -> Result<(), ClusterError> {
        let opts = PutOptions::new().with_lease(lease);
        self.client
            .clone()
            .put(self.mac_key(network, mac), self.node.clone(), Some(opts))
            .await?;
        Ok(())
    }

    /// Takes back a MAC this node published (compared: only if it is still this node's).
    pub async fn withdraw_mac(&self, network: &str, mac: Mac) -> Result<(), ClusterError> {
        let key = self.mac_key(network, mac);
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, self.node.clone())])
            .and_then([TxnOp::delete(key, None)]);
        self.client.clone().txn(txn).await?;
        Ok(())
    }

    /// The addresses held in `network`, on any node: its address keys alone, not the
    /// cluster's whole state (a port is added on the API's path).
    pub async fn held_addresses(&self, network: &str) -> Result<HashSet<Ipv4Addr>, ClusterError> {
        let prefix = format!("{}addresses/", self.network_key(network));
        let opts = GetOptions::new().with_prefix().with_keys_only();
        let got = self.client.clone().get(prefix.clone(), Some(opts)).await?;
        got.kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                key.get(prefix.len()..)
                    .and_then(|ip| ip.parse().ok())
                    .ok_or_else(|| corrupt(kv))
            })
            .collect()
    }

    /// Everything under the prefix, at one revision.
    pub async fn view(&self) -> Result<ClusterView, ClusterError> {
        let root = format!("{}/", self.prefix);
        let got = self
            .client
            .clone()
            .get(root.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        let mut view = ClusterView {
            revision: got.header().map(|h| h.revision()).unwrap_or(0),
            ..Default::default()
        };
        let mut specs = BTreeMap::new();
        let mut policies = BTreeMap::new();
        let mut parts: BTreeMap<String, Vec<&KeyValue>> = BTreeMap::new();
        for kv in got.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            let rest = &key[root.len().min(key.len())..];
            let fields: Vec<&str> = rest.split('/').collect();
            match fields.as_slice() {
                ["nodes", node] => {
                    let rec: NodeRecord = parse(kv)?;
                    view.nodes.insert(node.to_string(), rec.underlay);
                }
                ["networks", net, "spec"] => {
                    specs.insert(net.to_string(), parse::<NetworkSpec>(kv)?);
                }
                ["networks", net, "policy"] => {
                    policies.insert(net.to_string(), String::from_utf8_lossy(kv.value()).into_owned());
                }
                ["networks", net, ..] => parts.entry(net.to_string()).or_default().push(kv),
                _ => {}
            }
        }
        for (name, spec) in specs {
            let mut net = ClusterNetwork {
                spec,
                members: BTreeSet::new(),
                macs: HashMap::new(),
                addresses: HashMap::new(),
                policy: policies.remove(&name),
            };
            for kv in parts.remove(&name).unwrap_or_default() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let (kind, item) = key
                    .rsplit_once('/')
                    .and_then(|(head, item)| Some((head.rsplit_once('/')?.1, item)))
                    .unwrap_or(("", ""));
                let value = String::from_utf8_lossy(kv.value()).into_owned();
                match kind {
                    "members" => {
                        net.members.insert(item.to_string());
                    }
                    "macs" => {
                        let mac: Mac = item.parse().map_err(|_| corrupt(kv))?;
                        net.macs.insert(mac, value);
                    }
                    "addresses" => {
                        let ip: Ipv4Addr = item.parse().map_err(|_| corrupt(kv))?;
                        net.addresses.insert(ip, parse(kv)?);
                    }
                    _ => {}
                }
            }
            view.networks.insert(name, net);
        }
        Ok(view)
    }

    /// Resolves when anything under the prefix changes after `revision` (or the
    /// watch fails: the caller reads the view again either way).
    pub async fn changed_since(&self, revision: i64) -> Result<(), ClusterError> {
        let root = format!("{}/", self.prefix);
        let opts = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = self.client.clone().watch(root, Some(opts)).await?;
        loop {
            match stream.message().await? {
                Some(r) if r.canceled() => return Ok(()),
                Some(r) if !r.events().is_empty() => return Ok(()),
                Some(_) => continue,
                None => return Ok(()),
            }
        }
    }
}
